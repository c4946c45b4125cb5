import json

import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from text4seg_demo.inference.hub import PRESETS
from text4seg_demo.training import steps, synth, tiny, tower, train


def test_patch_labels_name_the_shape_under_each_patch_centre():
    visible = np.zeros((40, 80), np.int32)
    visible[:20, :40] = 1  # a red circle over the top-left quarter
    visible[10:40, 30:80] = 2  # a blue star on top of it, to the bottom right
    shapes = [synth.Shape("circle", "red", 0, 0, 1, 0, synth.COLOURS["red"]),
              synth.Shape("star", "blue", 0, 0, 1, 0, synth.COLOURS["blue"])]
    kind, colour, instance = tower.patch_labels(visible, shapes, 4).reshape(3, 4, 4)
    circle, star = 1 + synth.SHAPES.index("circle"), 1 + synth.SHAPES.index("star")
    # patch centres fall at rows 5, 15, 25, 35 and columns 10, 30, 50, 70
    assert kind.tolist() == [[circle, circle, 0, 0], [circle, star, star, star], [0, star, star, star],
                             [0, star, star, star]]
    assert colour[0, 0] == 1 + list(synth.COLOURS).index("red") and colour[3, 3] == 1 + list(synth.COLOURS).index("blue")
    assert instance[1, 1] == 2 and instance[0, 1] == 1 and instance[3, 0] == 0


def test_batches_are_the_same_with_any_number_of_workers():
    def make(numpy_rng, python_rng):
        return torch.tensor([numpy_rng.random(), python_rng.random()])

    alone = list(steps.batches(make, seed=3, start=5, stop=9, workers=0))
    helped = list(steps.batches(make, seed=3, start=5, stop=9, workers=2))
    assert len(alone) == 4 and all(torch.equal(a, b) for a, b in zip(alone, helped))
    # a resumed stream picks up exactly where it stopped; another seed is another stream
    assert torch.equal(next(iter(steps.batches(make, 3, 7, 9))), alone[2])
    assert not torch.equal(next(iter(steps.batches(make, 4, 5, 9))), alone[0])


def test_a_run_counts_steps_checkpoints_on_its_clock_and_resumes_where_it_stopped(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(steps.time, "time", lambda: clock[0])

    def make(numpy_rng, python_rng):
        return numpy_rng.random()

    run, saved = steps.Run(tmp_path), []

    def checkpoint():
        run.save(config={"seen": len(saved)})
        run.record({"checkpoint": len(saved)}, log=lambda line: None)
        saved.append(run.step)

    seen = []
    for batch in run.batches(make, seed=1, stop=None, workers=0, minutes=5, eval_every_min=2, checkpoint=checkpoint):
        seen.append(batch)
        clock[0] += 60  # each step takes a minute
    assert len(seen) == 5 and run.step == 5 and saved == [2, 4, 5]  # every 2 minutes, and at the end
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == saved and records[-1]["minutes"] == 5.0

    again = steps.Run(tmp_path, resume=True)
    assert again.step == 5 and again.minutes() == 5.0 and again.state["config"] == {"seen": 2}
    more = list(again.batches(make, seed=1, stop=7, workers=0, minutes=None, eval_every_min=60,
                              checkpoint=lambda: None))
    assert more == list(steps.batches(make, 1, 5, 7)) and again.step == 7  # the same stream, continued
    assert steps.Run(tmp_path).step == 0  # without resume, a run starts afresh


def test_the_cosine_schedule_warms_up_then_falls_to_a_tenth():
    shares = [steps.cosine(step, 4, 20) for step in range(24)]
    assert shares[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(shares[3:], shares[4:])) and shares[12] == pytest.approx(0.55)
    assert shares[20:] == [pytest.approx(0.1)] * 4


@pytest.mark.slow
def test_an_annealed_tower_stage_lowers_its_rate_along_its_steps(tmp_path):
    def last_rate(name, **options):
        cfg = tower.TowerConfig(out=str(tmp_path / name), steps=3, batch=2, eval_scenes=4, warmup=1, lr=1e-3,
                                **options)
        run = tower.train_tower(cfg, log=lambda message: None)
        return torch.load(run / "checkpoint.pt", weights_only=False)["opt"]["param_groups"][0]["lr"]

    assert last_rate("constant") == pytest.approx(1e-3)
    annealed = last_rate("annealed", anneal=True)
    assert annealed == pytest.approx(1e-3 * steps.cosine(2, 1, 3)) and annealed < 0.6e-3
    with pytest.raises(ValueError, match="--steps"):
        tower.train_tower(tower.TowerConfig(out=str(tmp_path / "open"), steps=None, minutes=1, anneal=True))


@pytest.mark.slow
def test_a_few_tower_steps_reduce_both_losses():
    torch.manual_seed(0)
    model = tiny.build_model(tiny.build_tokenizer(tiny.training_corpus()), vision_hidden=64, vision_layers=1)
    vision, head = model.model.vision_tower, tower.PatchHead(64)
    pixels, labels = tower.scenes(synth.SceneMaker(0), 4, tiny.build_image_processor(), 16)
    opt = torch.optim.AdamW([*vision.parameters(), *head.parameters()], lr=3e-3)
    totals = []
    for _ in range(10):
        loss = tower.losses(vision, head, pixels, labels, 16, pool_weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
    assert totals[-1] < 0.7 * totals[0]


@pytest.mark.slow
def test_a_llava_stage_starts_from_a_tower_stage_keeps_it_frozen_and_records_it(tmp_path):
    run = tower.train_tower(tower.TowerConfig(out=str(tmp_path / "tower"), steps=2, batch=2, eval_scenes=4))
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and 0 <= log[-1]["kind_accuracy"] <= 1
    # resuming a finished stage with a larger step budget continues its stream where it stopped
    tower.train_tower(tower.TowerConfig(out=str(run), steps=3), resume=True)
    assert json.loads((run / "text4seg.json").read_text())["training"]["steps"] == 3
    trained = torch.load(run / "checkpoint.pt", weights_only=False)["tower"]

    cfg = train.TrainConfig(out=str(tmp_path / "llava"), steps=2, batch=2, eval_queries=0, init=str(run),
                            freeze_tower=True)
    model_dir = train.train(cfg, log=lambda message: None)
    after = torch.load(tmp_path / "llava" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(after[f"model.vision_tower.{name}"], value) for name, value in trained.items())
    fresh = tiny.build_model(tiny.build_tokenizer(tiny.training_corpus()), text_layers=cfg.text_layers).state_dict()
    projector = "model.multi_modal_projector.linear_1.weight"
    assert projector in after and not torch.equal(after[projector], fresh[projector])  # the rest did train
    lineage = json.loads((model_dir / "text4seg.json").read_text())["training"]["lineage"]
    assert [stage.get("stage") for stage in lineage] == ["tower"] and lineage[0]["steps"] == 3


@pytest.mark.slow
def test_a_head_fitted_to_a_trained_tower_reads_it_and_leaves_it_as_it_was():
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration.from_pretrained(PRESETS["tiny-rrle"].source, dtype=torch.float32)
    vision, processor = model.model.vision_tower, tiny.build_image_processor()
    before = {name: value.clone() for name, value in vision.state_dict().items()}
    head = tower.PatchHead(vision.config.hidden_size)
    pixels, labels = tower.scenes(synth.SceneMaker(7), 32, processor, 16)
    with torch.no_grad():
        fresh = tower.losses(vision, head, pixels, labels, 16, pool_weight=1.0).item()
    fitted = tower.fit_head(vision, head, processor, 16, synth.SceneMaker(6), n=128)
    assert fitted < 0.5 < fresh  # a fresh head misreads the tower's features; the fitted one reads them
    assert all(torch.equal(value, before[name]) for name, value in vision.state_dict().items())
    read = tower.accuracy(vision, head, pixels, labels, 16)  # on scenes the fit never saw
    assert read["kind_accuracy"] > 0.75 and read["colour_accuracy"] > 0.9


@pytest.mark.slow
def test_a_tower_stage_goes_on_from_a_runs_tower_and_a_stage_of_that_run_takes_it_back(tmp_path):
    quiet = lambda message: None  # noqa: E731
    llava = str(tmp_path / "llava")
    train.train(train.TrainConfig(out=llava, steps=1, batch=2, eval_queries=0), log=quiet)
    # at a rate of 0 the stage's tower is where it started: the run's, its patches resized to 28 px
    # and a fifth layer on top
    run = tower.train_tower(tower.TowerConfig(out=str(tmp_path / "tower"), init=llava, image_size=448, steps=1,
                                              vision_layers=5, batch=2, eval_scenes=4, fit_scenes=8, lr=0.0),
                            log=quiet)
    went_on = torch.load(run / "checkpoint.pt", weights_only=False)["tower"]
    larger = tiny.build_model(tiny.build_tokenizer(tiny.training_corpus()), image_size=448,
                              vision_layers=5).model.vision_tower
    assert went_on["embeddings.patch_embedding.weight"].shape[-1] == 28
    assert not went_on["encoder.layers.4.mlp.fc2.weight"].any()
    started = train.fit_tower(train.tower_weights(llava), larger)
    assert started.keys() == went_on.keys() and all(torch.equal(went_on[k], v) for k, v in started.items())

    model_dir = train.train(train.TrainConfig(out=str(tmp_path / "again"), steps=1, batch=2, eval_queries=0,
                                              init=llava, tower=str(run), image_size=448, freeze_tower=True),
                            log=quiet)
    after = torch.load(tmp_path / "again" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(after[f"model.vision_tower.{name}"], value) for name, value in went_on.items())
    record = json.loads((model_dir / "text4seg.json").read_text())["training"]
    flags = tiny.stage_flags(record)  # as deep as the tower it took, unasked
    assert f"--tower {run}" in flags and "--image-size 448" in flags and "--vision-layers 5" in flags
