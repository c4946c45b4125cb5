"""The shipped recipe: what it runs, in which order, and what it keeps after a stop."""

from pathlib import Path

import pytest

from text4seg_demo.inference.settings import write_record
from text4seg_demo.training import recipe, tower, train

STAGE_FIELDS = ("steps", "lr", "seed", "freeze_tower", "image_attention", "focus", "focus_share")
TOWER_FIELDS = ("steps", "batch", "lr", "seed", "anneal")


@pytest.mark.parametrize("fmt", ["rrle", "full"])
def test_the_recipe_is_the_stages_that_made_the_bundled_model(fmt):
    lineage = train._lineage(f"tiny-{fmt}")
    assert lineage[0]["stage"] == "tower"
    assert {k: lineage[0][k] for k in ("steps", "batch", "lr")} == {
        k: getattr(tower.TowerConfig, k) for k in ("steps", "batch", "lr")}
    made = lineage[1:]
    stages = (*recipe.STAGES, *recipe.OWN[fmt])
    assert len(made) == len(stages)
    for stage, record in zip(stages, made):
        if stage.tower:
            expected = {**{k: getattr(tower.TowerConfig, k) for k in TOWER_FIELDS}, **stage.options}
            # tower stages recorded before --anneal existed ran at a flat rate, its default
            ran = {k: record.get(k, getattr(tower.TowerConfig, k)) for k in TOWER_FIELDS}
            assert record["stage"] == "tower" and ran == expected, stage.name
            continue
        expected = {**{k: getattr(train.TrainConfig, k) for k in ("fmt", *STAGE_FIELDS)}, **stage.options}
        assert {k: record[k] for k in ("fmt", *STAGE_FIELDS)} == expected, stage.name
        # stages that restarted from the bundled weights kept the model still while fresh heads learnt;
        # the recipe carries the heads from stage to stage and needs no such steps
        assert "warm_heads" not in stage.options


def test_the_two_models_share_every_stage_but_their_own():
    rrle, full = train._lineage("tiny-rrle"), train._lineage("tiny-full")
    shared = 1 + len(recipe.STAGES)  # the tower stage, then STAGES
    assert rrle[:shared] == full[:shared]
    assert len(rrle) == shared + len(recipe.OWN["rrle"]) and len(full) == shared + len(recipe.OWN["full"])
    assert {record["fmt"] for record in rrle[1:] if "fmt" in record} == {"rrle"}
    assert [record["fmt"] for record in full[shared:]] == ["full"] * len(recipe.OWN["full"])


class Recorder:
    """Stands in for the tower and LLaVA stages: notes each call and writes what a stage leaves."""

    def __init__(self, stop_in: str | None = None):
        self.calls, self.stop_in = [], stop_in

    def train_tower(self, cfg, resume, log):
        self.calls.append((Path(cfg.out).name, cfg.out, cfg.init, resume))
        Path(cfg.out).mkdir(parents=True)
        write_record(cfg.out, {"training": {"stage": "tower", "steps": cfg.steps}})

    def train(self, cfg, resume, log):
        folder = Path(cfg.out)
        self.calls.append((folder.name, cfg.out, cfg.init, resume, cfg.fmt, cfg.lr, cfg.steps, cfg.tower))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "checkpoint.pt").write_bytes(b"")
        if folder.name == self.stop_in:
            raise KeyboardInterrupt  # a stop inside the stage: its checkpoint stays, no model
        (folder / "model").mkdir()
        write_record(folder / "model", {"training": {"steps": cfg.steps}})


def test_rebuild_chains_the_stages_and_continues_where_a_stop_left_it(tmp_path, monkeypatch):
    first = Recorder(stop_in="side")
    monkeypatch.setattr(tower, "train_tower", first.train_tower)
    monkeypatch.setattr(train, "train", first.train)
    out = tmp_path / "runs"
    with pytest.raises(KeyboardInterrupt):
        recipe.rebuild("full", out, log=lambda m: None)
    assert [c[0] for c in first.calls] == ["tower", "grounding", "unfrozen", "side"]
    assert [c[2] for c in first.calls[1:]] == [str(out / "tower"), str(out / "grounding"), str(out / "unfrozen")]
    assert first.calls[1][4:] == ("rrle", 2e-3, 3700, None) and not any(c[3] for c in first.calls)

    again = Recorder()
    monkeypatch.setattr(tower, "train_tower", again.train_tower)
    monkeypatch.setattr(train, "train", again.train)
    said = []
    last = recipe.rebuild("full", out, until="bidirectional", log=said.append)
    assert last == out / "bidirectional"
    assert [(c[0], c[3]) for c in again.calls] == [("side", True), ("bidirectional", False)]  # the rest kept
    assert any(m.startswith("grounding: finished") for m in said) and any(m.startswith("side: resuming") for m in said)

    reused = Recorder()
    monkeypatch.setattr(tower, "train_tower", reused.train_tower)
    monkeypatch.setattr(train, "train", reused.train)
    recipe.rebuild("rrle", tmp_path / "rrle", tower=out / "tower", until="grounding", log=lambda m: None)
    assert [(c[0], c[2], c[4]) for c in reused.calls] == [("grounding", str(out / "tower"), "rrle")]
    with pytest.raises(ValueError, match=f"unknown stage 'last'.*{recipe.OWN['rrle'][-1].name}$"):
        recipe.rebuild("rrle", out, until="last")
    with pytest.raises(ValueError, match="unknown stage 'full'"):
        recipe.rebuild("rrle", out, until="full")


def test_the_second_format_keeps_every_shared_stage_and_trains_only_its_own(tmp_path, monkeypatch):
    first = Recorder()
    monkeypatch.setattr(tower, "train_tower", first.train_tower)
    monkeypatch.setattr(train, "train", first.train)
    out = tmp_path / "runs"
    assert recipe.rebuild("rrle", out, log=lambda m: None) == out / "settle-9"
    llava = [c for c in first.calls[1:] if len(c) > 4]
    assert {c[4] for c in llava} == {"rrle"} and len(first.calls) == len(recipe.NAMES) - len(recipe.OWN["full"])

    def cycle(start, name, frozen_steps, settle, settle_steps):
        """The calls of a tower cycle: the tower stage goes on from ``start``'s tower, the next stage
        takes it into ``start``, and the settling stage trains both."""
        frozen = f"{name}-frozen"
        return [(name, str(out / name), str(out / start), False),
                (frozen, str(out / frozen), str(out / start), False, "rrle", 1e-4, frozen_steps, str(out / name)),
                (settle, str(out / settle), str(out / frozen), False, "rrle", 5e-5, settle_steps, None)]

    assert first.calls[-19:] == [
        ("settle", str(out / "settle"), str(out / "crowds"), False, "rrle", 5e-5, 1500, None),
        ("settle-2", str(out / "settle-2"), str(out / "settle"), False, "rrle", 1e-4, 1400, None),
        *cycle("settle-2", "tower-2", 1319, "settle-3", 1313),
        *cycle("settle-3", "tower-3", 1112, "settle-4", 1269),
        # R-RLE's own stages: the same cycle three times more from the last shared stage, the last two
        # each followed by a short one
        *cycle("settle-4", "tower-4", 700, "settle-5", 1000),
        *cycle("settle-5", "tower-5", 500, "settle-6", 1000),
        ("settle-7", str(out / "settle-7"), str(out / "settle-6"), False, "rrle", 5e-5, 400, None),
        *cycle("settle-7", "tower-6", 500, "settle-8", 1000),
        ("settle-9", str(out / "settle-9"), str(out / "settle-8"), False, "rrle", 5e-5, 400, None)]

    then = Recorder()
    monkeypatch.setattr(train, "train", then.train)
    # the full-length stages go on from the last shared stage, not from R-RLE's own
    assert recipe.rebuild("full", out, log=lambda m: None) == out / "full-2"
    assert then.calls == [("full", str(out / "full"), str(out / "settle-4"), False, "full", 2e-4, 1500, None),
                          ("full-2", str(out / "full-2"), str(out / "full"), False, "full", 1e-4, 700, None)]
