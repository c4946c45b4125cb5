"""The LLaVA training stage: batches, losses, curricula, cards and probes."""

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from text4seg_demo.descriptors.codec import ROW_SEP, RUN_SEP
from text4seg_demo.evaluation import evaluate as evaluate_module
from text4seg_demo.masks import to_grid
from text4seg_demo.training import synth, tiny, tower, train


def test_a_focus_kind_fills_its_share_of_the_batches():
    def side_share(**focus) -> float:
        cfg = train.TrainConfig(out="unused", batch=16, **focus)
        maker = synth.SceneMaker(7)
        expressions = [words for _ in range(12) for _, words, _ in train.batch_triples(maker, cfg)]
        assert len(expressions) == 12 * 16
        return np.mean([any(words.endswith(side) for side in synth.SIDES) for words in expressions])

    uniform, half, every = side_share(focus=None), side_share(focus="side", focus_share=0.5), side_share(
        focus="side", focus_share=1.0)
    assert every == 1.0 and uniform < 0.3 and half > uniform + 0.25
    shared = side_share(focus="side,size", focus_share=1.0)  # two kinds share the focus scenes
    assert 0.25 < shared < 0.75


def test_a_size_skew_draws_smaller_targets_within_the_domain():
    def target_shares(skew: float) -> np.ndarray:
        cfg = train.TrainConfig(out="unused", batch=16, size_skew=skew)
        maker = train.scene_maker(3, cfg)
        return np.array([mask.mean() for _ in range(8) for _, _, mask in train.batch_triples(maker, cfg)
                         if mask.any()])

    uniform, skewed = target_shares(1.0), target_shares(3.0)
    assert np.median(skewed) < 0.75 * np.median(uniform)  # targets are shapes that show, so less than sizes
    assert skewed.max() > 0.05  # large shapes are still drawn, only less often


def test_backgrounds_restrict_the_families_training_scenes_are_drawn_on():
    def background_spread(families: tuple[str, ...]) -> float:
        """The median over scenes of the background pixels' spread, shapes left out."""
        cfg = train.TrainConfig(out="unused", backgrounds=families)
        maker = train.scene_maker(4, cfg)
        spreads = []
        for _ in range(12):
            image, visible, _ = maker.scene("shape")
            spreads.append(np.asarray(image, np.float32)[visible == 0].std(axis=0).max())
        return float(np.median(spreads))

    assert background_spread(("solid",)) < 8 and background_spread(("stripes", "checks")) > 20


def test_a_model_cards_command_line_gives_back_its_stage():
    from dataclasses import asdict

    from text4seg_demo.cli import build_parser

    cfg = train.TrainConfig(out="RUN", lr=2.5e-4, positions="grid", freeze_tower=True, label_tokens="words",
                            image_attention="bidirectional", contrast=True, colour_rivals=True, focus="side",
                            focus_share=0.3, warm_heads=300, image_size=448, vision_layers=6, size_skew=1.5,
                            perception=0.3, backgrounds=("stripes", "checks"), ema=0.997)
    args = build_parser().parse_args(["train-tiny", "--out", "RUN", *tiny.stage_flags(asdict(cfg)).split()])
    assert (args.lr, args.positions, args.freeze_tower, args.label_tokens, args.image_attention, args.contrast,
            args.colour_rivals, args.focus, args.focus_share, args.warm_heads, args.image_size, args.vision_layers,
            args.size_skew, args.perception, args.backgrounds, args.ema) == (
        2.5e-4, "grid", True, "words", "bidirectional", True, True, "side", 0.3, 300, 448, 6, 1.5, 0.3,
        ("stripes", "checks"), 0.997)
    defaults = tiny.stage_flags(asdict(train.TrainConfig(out="RUN")))
    assert "--backgrounds" not in defaults and "--vision-layers" not in defaults  # every family; the start's depth
    with pytest.raises(SystemExit):  # 16 x 16 patches: the side must divide by 16
        build_parser().parse_args(["train-tiny", "--out", "RUN", "--image-size", "300"])
    with pytest.raises(SystemExit):  # a decay of 1 would never move the average
        build_parser().parse_args(["train-tiny", "--out", "RUN", "--ema", "1"])
    with pytest.raises(SystemExit):  # a family the generator does not draw
        build_parser().parse_args(["train-tiny", "--out", "RUN", "--backgrounds", "stripes,plaid"])


def test_a_stage_at_a_larger_image_size_starts_where_the_smaller_model_was(tmp_path):
    """From a 224 px model, a 448 px stage's tower reads each 28 px patch as the old one read
    the 14 px patch that the image's 2 x 2 averaging gives: the same features, exactly."""
    tokenizer = tiny.build_tokenizer(tiny.training_corpus())
    tiny.save_pretrained(tiny.build_model(tokenizer, text_layers=2, seed=3), tokenizer, tmp_path / "small", {})
    small = LlavaForConditionalGeneration.from_pretrained(tmp_path / "small", dtype=torch.float32).eval()
    large = tiny.build_model(tokenizer, text_layers=2, seed=4, image_size=448).eval()
    train._initialise(large, train.AuxHeads(256, 16), str(tmp_path / "small"), tokenizer)
    assert large.config.vision_config.patch_size == 28
    pixels = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        seen_large = large.model.vision_tower(pixels).last_hidden_state
        seen_small = small.model.vision_tower(torch.nn.functional.avg_pool2d(pixels, 2)).last_hidden_state
    assert torch.allclose(seen_large, seen_small, atol=1e-4)
    assert not torch.allclose(seen_large, small.model.vision_tower(pixels[..., ::2, ::2]).last_hidden_state, atol=1e-2)
    tiny.save_pretrained(large, tokenizer, tmp_path / "large", {})  # and it is saved with its image size
    assert json.loads((tmp_path / "large" / "preprocessor_config.json").read_text())["size"]["height"] == 448
    with pytest.raises(ValueError, match="whole multiple"):
        train.fit_tower(small.state_dict(), tiny.build_model(tokenizer, text_layers=2, image_size=320))


def test_a_deeper_tower_starts_out_answering_as_the_shallower_one_did_and_can_learn(tmp_path):
    """Layers added on top of a trained tower add nothing to the residual stream at first: the
    deeper model's logits are the saved model's, and the new layers' output projections get a
    gradient, so training can put them to use. A tower cannot be made shallower."""
    tokenizer = tiny.build_tokenizer(tiny.training_corpus())
    tiny.save_pretrained(tiny.build_model(tokenizer, text_layers=2, seed=3), tokenizer, tmp_path / "small", {})
    small = LlavaForConditionalGeneration.from_pretrained(tmp_path / "small", dtype=torch.float32).eval()
    deep = tiny.build_model(tokenizer, text_layers=2, seed=4, vision_layers=6).eval()
    train._initialise(deep, train.AuxHeads(256, 16), str(tmp_path / "small"), tokenizer)
    inputs = {"input_ids": torch.tensor([[tokenizer.bos_token_id] + [small.config.image_token_index] * 256]),
              "pixel_values": torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))}
    assert torch.allclose(deep(**inputs).logits, small(**inputs).logits, atol=1e-5)
    deep(**inputs).logits.sum().backward()
    new = deep.model.vision_tower.encoder.layers[5]
    assert new.mlp.fc2.weight.grad.abs().sum() > 0 and new.self_attn.out_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="--vision-layers 6"):
        train.fit_tower(deep.state_dict(), small)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["rrle", "full"])
def test_a_few_training_steps_reduce_the_loss(fmt):
    torch.manual_seed(0)
    tokenizer = tiny.build_tokenizer(tiny.training_corpus())
    processor = tiny.build_image_processor()
    model = tiny.build_model(tokenizer, vision_hidden=64, vision_layers=1, text_hidden=64, text_layers=2)
    heads = train.AuxHeads(64, 16)
    maker, rng = synth.SceneMaker(0), random.Random(0)
    batch = train.collate([train.encode_example(tokenizer, processor, *synth.sample(maker), fmt, 16, rng)
                           for _ in range(4)], tokenizer.pad_token_id)
    opt = torch.optim.AdamW(list(model.parameters()) + list(heads.parameters()), lr=3e-3)
    totals = []
    for _ in range(8):
        lm, patch, row = train.losses(model, heads, batch, 16)
        loss = lm + patch + row
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append((lm.item(), loss.item()))
    assert totals[-1][0] < 0.8 * totals[0][0] and totals[-1][1] < totals[0][1]


@pytest.mark.slow
def test_a_curriculum_stage_starts_from_a_bundled_model_and_records_its_lineage(tmp_path):
    label_tokens = train._lineage("tiny-rrle")[-1]["label_tokens"]
    assert label_tokens == "words"  # the bundled models spell expressions in words
    # whole-expression tokens are the words tokenizer and one token per expression: a stage may start from
    # the bundled model with them; the other way round, tokens would be lost, and the stage is refused
    whole = tiny.build_tokenizer(tiny.training_corpus(), label_tokens="whole")
    depth = train.starting_depth("tiny-rrle")
    extended = train._initialise(tiny.build_model(whole, text_layers=6, vision_layers=depth), train.AuxHeads(256, 16),
                                 "tiny-rrle", whole)
    assert "124 new tokens" in extended
    tiny.save_pretrained(tiny.build_model(whole, text_layers=2), whole, tmp_path / "whole", {})
    tokenizer = tiny.build_tokenizer(tiny.training_corpus(), label_tokens=label_tokens)
    with pytest.raises(ValueError, match="--label-tokens it was trained with"):
        train._initialise(tiny.build_model(tokenizer, text_layers=2), train.AuxHeads(256, 16), str(tmp_path / "whole"),
                          tokenizer)
    model = tiny.build_model(tokenizer, text_layers=6, seed=1, vision_layers=depth)
    message = train._initialise(model, train.AuxHeads(256, 16), "tiny-rrle", tokenizer)
    assert "saved model" in message
    bundled = LlavaForConditionalGeneration.from_pretrained("assets/tiny-rrle", dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), bundled.state_dict().values()))
    # both bundled models started as the same tower stage, frozen in their first own stage: the cards say so
    towers = []
    for name, fmt in (("tiny-rrle", "rrle"), ("tiny-full", "full")):
        lineage = train._lineage(name)
        assert lineage[0].get("stage") == "tower" and lineage[1]["freeze_tower"] and lineage[-1]["fmt"] == fmt
        # each stage from the run before (or its saved model), or the bundled tiny-rrle it was (tiny-full's too),
        # by name or by path; a stage on a new tower from the run that the tower stage went on from
        for before, stage in zip(lineage, lineage[1:]):
            start = Path(stage["init"])
            run = start.parent if start.name == "model" else start
            source = before["out"]
            if before.get("stage") == "tower" and before.get("init"):
                assert Path(stage["tower"]).name == Path(before["out"]).name
                source = before["init"]
            bundled = train._init_source(stage["init"]).resolve() == train._init_source("tiny-rrle").resolve()
            assert bundled or run.name == Path(source).name
        towers.append(lineage[0])
    assert towers[0] == towers[1]
    with pytest.raises(FileNotFoundError, match="--init"):
        train._initialise(model, train.AuxHeads(256, 16), "runs/no-such-run", tokenizer)


@pytest.mark.slow
def test_a_stage_from_a_model_with_fewer_tokens_starts_each_new_token_as_its_pieces(tmp_path, monkeypatch):
    """A saved model whose tokenizer lacks the run-closing counts (`` *N| ``) starts a stage
    whose tokenizer has them: every old token keeps its row, a new one starts as the mean of
    the rows it used to be spelt with, and no new token can outscore the old greedy choice."""
    every = tiny.domain_pieces
    monkeypatch.setattr(tiny, "domain_pieces", lambda label_tokens="whole": [
        p for p in every(label_tokens) if not (p.startswith(" *") and p.endswith((RUN_SEP, ROW_SEP)))])
    old_tokenizer = tiny.build_tokenizer(tiny.training_corpus())
    tiny.save_pretrained(tiny.build_model(old_tokenizer, text_layers=2, seed=3), old_tokenizer, tmp_path / "old", {})
    monkeypatch.undo()
    tokenizer = tiny.build_tokenizer(tiny.training_corpus())
    model = tiny.build_model(tokenizer, text_layers=2, seed=4).eval()
    message = train._initialise(model, train.AuxHeads(256, 16), str(tmp_path / "old"), tokenizer)
    assert "128 new tokens" in message
    old = LlavaForConditionalGeneration.from_pretrained(tmp_path / "old", dtype=torch.float32).eval()

    text = "<seg>others *16\n others *3| the red circle *5| others *8\n"
    old_ids, new_ids = (t(text, add_special_tokens=False)["input_ids"] for t in (old_tokenizer, tokenizer))
    assert len(new_ids) == len(old_ids) - 3  # three separators ride on their counts now
    closing = tokenizer.convert_tokens_to_ids(" *3| ")
    pieces = old_tokenizer(" *3| ", add_special_tokens=False)["input_ids"]
    embed = model.get_input_embeddings().weight
    assert torch.allclose(embed[closing], old.get_input_embeddings().weight[pieces].mean(0))

    prefix = old_ids[:2]  # "<seg>others" under both tokenizers: next comes a count, alone or closing its run
    assert tokenizer.convert_ids_to_tokens(new_ids[:2]) == old_tokenizer.convert_ids_to_tokens(prefix)
    with torch.no_grad():
        before = old(input_ids=torch.tensor([prefix])).logits[0, -1]
        after = model(input_ids=torch.tensor([new_ids[:2]])).logits[0, -1]
    carried = tokenizer.convert_tokens_to_ids(old_tokenizer.convert_ids_to_tokens(list(range(len(old_tokenizer)))))
    assert torch.allclose(after[carried], before, atol=1e-4)
    added = sorted(set(range(len(tokenizer))) - set(carried))
    assert len(added) == 128 and after[added].max() <= before.max()


def test_colour_pairs_tell_a_colour_reader_from_a_shape_reader(monkeypatch):
    cfg = train.TrainConfig(out="unused")
    monkeypatch.setattr(train, "_engine", lambda *args: None)

    def answering(pick):  # answers each pair's queries with the truth of the query pick(i) of the pair
        def answers(engine, queries):
            truths = [to_grid(mask.astype(np.uint8), 16).astype(bool) for *_, mask in queries]
            return [SimpleNamespace(mask=lambda t=truths[pick(i)]: t) for i in range(len(queries))]
        return answers

    monkeypatch.setattr(evaluate_module, "grid_answers", answering(lambda i: i))
    reader = train.colour_pairs(None, None, None, cfg, n=10)
    monkeypatch.setattr(evaluate_module, "grid_answers", answering(lambda i: i - i % 2))  # one answer for both
    shape_only = train.colour_pairs(None, None, None, cfg, n=10)
    assert reader["colour_pairs"] == shape_only["colour_pairs"] == 10
    assert reader["colour_pairs_alike"] == 0 and reader["colour_pairs_right"] == 1
    assert shape_only["colour_pairs_alike"] == 1 and shape_only["colour_pairs_right"] == 0.5


def test_expression_similarity_tells_what_whole_tokens_encode():
    tokenizer = tiny.build_tokenizer(tiny.training_corpus())
    rows = torch.nn.Embedding(len(tokenizer), len(synth.SHAPES))
    with torch.no_grad():
        for colour in synth.COLOURS:
            for k, kind in enumerate(synth.SHAPES):  # a kind, and no colour
                rows.weight[tokenizer.convert_tokens_to_ids(f"the {colour} {kind}")] = torch.eye(len(synth.SHAPES))[k]
    model = SimpleNamespace(get_input_embeddings=lambda: rows)
    assert train._expression_similarity(model, tokenizer) == {
        "expression_cosine_other_colour": pytest.approx(1.0), "expression_cosine_other_kind": pytest.approx(0.0)}


@pytest.mark.slow
def test_the_tower_probe_reads_what_the_features_hold():
    model = LlavaForConditionalGeneration.from_pretrained("assets/tiny-rrle", dtype=torch.float32).eval()
    processor = tiny.build_image_processor()
    trained = tower.tower_probe(model, processor, 16, n_fit=120, n_test=40)
    assert trained["tower_colour_accuracy"] > 0.9  # a trained tower's features hold the colour
    for p in model.model.vision_tower.parameters():
        p.data.zero_()
    blind = tower.tower_probe(model, processor, 16, n_fit=120, n_test=40)
    # constant features: the probe can only guess the commonest class
    for split in ("", "shifted_"):  # on scenes like the probe's and on the shifted split's
        for name in ("colour", "shape"):
            assert blind[f"tower_{split}{name}_accuracy"] <= blind[f"tower_{split}{name}_commonest"] + 1e-6
        assert trained[f"tower_{split}colour_accuracy"] > trained[f"tower_{split}colour_commonest"] + 0.5
        assert trained[f"tower_{split}colour_accuracy_small"] > 0.8  # small shapes keep their colour


@pytest.mark.slow
def test_warm_heads_steps_train_only_the_fresh_heads_then_everything(tmp_path):
    tokenizer = tiny.build_tokenizer(tiny.training_corpus(), label_tokens="words")
    tiny.save_pretrained(tiny.build_model(tokenizer, text_layers=2, seed=3), tokenizer, tmp_path / "saved", {})
    cfg = train.TrainConfig(out=str(tmp_path / "run"), init=str(tmp_path / "saved"), text_layers=2, batch=2,
                            steps=2, warm_heads=2, eval_queries=0, lr=1e-3, warmup=1)
    train.train(cfg, log=lambda m: None)
    saved = LlavaForConditionalGeneration.from_pretrained(tmp_path / "saved", dtype=torch.float32).state_dict()

    def state():
        return torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)

    after_warm = state()
    assert after_warm["step"] == 2
    assert all(torch.equal(after_warm["model"][k], saved[k]) for k in saved)  # the model stood still
    fresh = train.AuxHeads(256, 16).state_dict()
    assert not all(torch.equal(after_warm["heads"][k], fresh[k]) for k in fresh)  # the heads learnt
    train.train(train.TrainConfig(out=cfg.out, steps=3), resume=True, log=lambda m: None)
    assert not all(torch.equal(state()["model"][k], saved[k]) for k in saved)  # then everything moves


def test_a_stage_with_ema_exports_and_hands_on_the_average_of_its_steps(tmp_path):
    cfg = train.TrainConfig(out=str(tmp_path / "run"), text_layers=2, batch=2, steps=1, eval_queries=0, lr=1e-2,
                            warmup=1, ema=0.25)
    train.train(cfg, log=lambda m: None)

    def state():
        return torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)

    first = state()["model"]
    train.train(train.TrainConfig(out=cfg.out, steps=2), resume=True, log=lambda m: None)
    second = state()
    average = train.stage_weights(second)
    key = "model.language_model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(first[key], second["model"][key])
    # the first step's weights start the average; each later step moves it 1 - decay of the way
    assert torch.allclose(average[key], 0.25 * first[key] + 0.75 * second["model"][key])
    exported = LlavaForConditionalGeneration.from_pretrained(tmp_path / "run" / "model", dtype=torch.float32)
    assert torch.allclose(exported.state_dict()[key], average[key], atol=1e-3)
    tower_key = "encoder.layers.0.mlp.fc1.weight"  # a stage that goes on from the run starts from the average
    assert torch.equal(train.tower_weights(cfg.out)[tower_key], average["model.vision_tower." + tower_key])


def test_after_its_warm_heads_steps_the_model_warms_up_and_ends_where_the_heads_end():
    cfg = train.TrainConfig(out="unused", lr=1e-4, warmup=100, warm_heads=300)
    assert train.rates(299, cfg, 1500)[0] == 0.0
    model, heads = train.rates(300, cfg, 1500)
    assert model == pytest.approx(1e-6) and heads == pytest.approx(1e-4, rel=0.05)
    assert train.rates(399, cfg, 1500)[0] == pytest.approx(1e-4)
    assert train.rates(1499, cfg, 1500) == pytest.approx((1e-5, 1e-5), rel=0.01)
    assert train.rates(0, train.TrainConfig(out="unused", lr=1e-4), 1500) == pytest.approx((1e-6, 1e-6))


@pytest.mark.slow
def test_perception_stages_and_plain_ones_follow_each_other_either_way(tmp_path):
    common = dict(text_layers=2, batch=2, steps=1, eval_queries=0, lr=1e-3, warmup=1)
    runs = {name: train.TrainConfig(out=str(tmp_path / name), **common) for name in ("plain", "seeing", "plain-again")}
    runs["seeing"].init, runs["seeing"].perception = runs["plain"].out, 1.0
    runs["plain-again"].init = runs["seeing"].out
    messages = []
    for cfg in runs.values():
        train.train(cfg, log=messages.append)

    def heads(name):
        return torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)["heads"]

    assert [m.split(" (")[0] for m in messages if m.startswith(("initialised", "perception"))] == [
        f"initialised from the run {runs['plain'].out}", "perception head fitted to the starting tower",
        f"initialised from the run {runs['seeing'].out}"]
    assert any(key.startswith("perception.") for key in heads("seeing"))
    assert not any(key.startswith("perception.") for key in heads("plain-again"))
    train.train(train.TrainConfig(out=runs["seeing"].out, steps=2), resume=True, log=lambda m: None)
    assert torch.load(tmp_path / "seeing" / "checkpoint.pt", weights_only=False)["step"] == 2
