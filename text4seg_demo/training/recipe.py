"""The shipped training recipe as data: the stages that made the bundled tiny models, in order.

``text4seg rebuild-tiny --format F --out DIR`` runs them into ``DIR/<stage>``, each stage starting
from the one before (weights and training heads), so rebuilding a model is one command per format.
A tower stage in the list goes on training the tower of the stage before it; the LLaVA stage after
it starts from that same stage with the new tower in place.
A finished stage (``DIR/<stage>/model``) is kept and an interrupted one resumed, so the same command
continues a rebuild after any stop. Every stage is counted in steps, which mean the same on a GPU
and a CPU. Both formats take the same stages, trained on R-RLE answers (a quarter of the tokens of
full-length ones); then each format takes stages of its own from the last shared one, so the two
commands may share ``DIR`` and the second trains only what it adds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TOWER = "tower"


@dataclass(frozen=True)
class Stage:
    """One stage: its folder name and the :class:`~.train.TrainConfig` fields it sets (with
    ``tower``, the :class:`~.tower.TowerConfig` fields of a tower stage)."""

    name: str
    options: dict = field(default_factory=dict)
    tower: bool = False


# Tower stage first (tower.py defaults), then these. What each adds: docs/training.md.
STAGES = (
    Stage("grounding", {"steps": 3700, "lr": 2e-3, "freeze_tower": True, "image_attention": "causal",
                        "focus": None, "focus_share": 0.5}),
    Stage("unfrozen", {"steps": 600, "lr": 2.5e-4, "image_attention": "causal", "focus": None, "focus_share": 0.5}),
    Stage("side", {"steps": 600, "lr": 5e-4, "image_attention": "causal", "focus": "side", "focus_share": 0.5}),
    Stage("bidirectional", {"steps": 800, "lr": 5e-4, "focus": "side", "focus_share": 0.5}),
    Stage("bidirectional-settle", {"steps": 600, "lr": 2.5e-4, "focus": "side", "focus_share": 0.5}),
    Stage("domain", {"steps": 1230, "lr": 5e-4}),
    Stage("polish-1", {"steps": 1423, "lr": 5e-5}),
    Stage("polish-2", {"steps": 1618, "lr": 5e-5, "seed": 2}),
    Stage("polish-3", {"steps": 2183, "lr": 5e-5, "seed": 3}),
    Stage("polish-4", {"steps": 2003, "lr": 5e-5, "seed": 4}),
    Stage("polish-5", {"steps": 2000, "lr": 1e-4, "seed": 5}),
    Stage("polish-6", {"steps": 2000, "lr": 1e-4, "seed": 6}),
    Stage("polish-7", {"steps": 1500, "lr": 1e-4, "seed": 7}),
    Stage("polish-8", {"steps": 1500, "lr": 1e-4, "seed": 8}),
    Stage("shades", {"steps": 1300, "lr": 1e-4, "seed": 14}),
    Stage("crowds", {"steps": 1500, "lr": 1e-4, "seed": 21}),
    Stage("settle", {"steps": 1500, "lr": 5e-5, "seed": 22, "focus": "side,size,absent"}),
    Stage("settle-2", {"steps": 1400, "lr": 1e-4, "seed": 23, "focus": "side,size,absent"}),
    Stage("tower-2", {"steps": 1958, "lr": 3e-4, "seed": 31}, tower=True),
    Stage("tower-2-frozen", {"steps": 1319, "lr": 1e-4, "seed": 32, "freeze_tower": True,
                             "focus": "side,size,absent"}),
    Stage("settle-3", {"steps": 1313, "lr": 5e-5, "seed": 33, "focus": "side,size,absent"}),
    Stage("tower-3", {"steps": 1753, "lr": 3e-4, "seed": 41}, tower=True),
    Stage("tower-3-frozen", {"steps": 1112, "lr": 1e-4, "seed": 42, "freeze_tower": True,
                             "focus": "side,size,absent"}),
    Stage("settle-4", {"steps": 1269, "lr": 5e-5, "seed": 43, "focus": "side,size,absent"}),
)
# What each format adds to STAGES. R-RLE: three more tower cycles (a tower stage, the language model
# on it, then both together), the last two with the tower's rate annealed and each followed by a short
# stage that gives absent and side queries half the scenes. Full-length: the same grid written cell by
# cell, then the same at half the rate with absent targets among the kinds that get scenes of their own.
OWN = {
    "rrle": (Stage("tower-4", {"steps": 1400, "lr": 3e-4, "seed": 51}, tower=True),
             Stage("tower-4-frozen", {"steps": 700, "lr": 1e-4, "seed": 52, "freeze_tower": True,
                                      "focus": "side,size,absent"}),
             Stage("settle-5", {"steps": 1000, "lr": 5e-5, "seed": 53, "focus": "side,size,absent"}),
             Stage("tower-5", {"steps": 1250, "lr": 3e-4, "seed": 61, "anneal": True}, tower=True),
             Stage("tower-5-frozen", {"steps": 500, "lr": 1e-4, "seed": 62, "freeze_tower": True,
                                      "focus": "side,size,absent"}),
             Stage("settle-6", {"steps": 1000, "lr": 5e-5, "seed": 63, "focus": "side,size,absent"}),
             Stage("settle-7", {"steps": 400, "lr": 5e-5, "seed": 71, "focus": "absent,side", "focus_share": 0.5}),
             Stage("tower-6", {"steps": 1250, "lr": 3e-4, "seed": 81, "anneal": True}, tower=True),
             Stage("tower-6-frozen", {"steps": 500, "lr": 1e-4, "seed": 82, "freeze_tower": True,
                                      "focus": "side,size,absent"}),
             Stage("settle-8", {"steps": 1000, "lr": 5e-5, "seed": 83, "focus": "side,size,absent"}),
             Stage("settle-9", {"steps": 400, "lr": 5e-5, "seed": 84, "focus": "absent,side", "focus_share": 0.5})),
    "full": (Stage("full", {"fmt": "full", "steps": 1500, "lr": 2e-4, "seed": 11}),
             Stage("full-2", {"fmt": "full", "steps": 700, "lr": 1e-4, "seed": 12, "focus": "side,size,absent"})),
}
NAMES = (TOWER, *(stage.name for stage in STAGES), *(stage.name for own in OWN.values() for stage in own))


def rebuild(fmt: str, out: str | Path, tower: str | Path | None = None, until: str | None = None,
            workers: int = 0, eval_every_min: float = 10.0, log: Callable[[str], None] = print) -> Path:
    """Run the recipe for ``fmt`` into ``out`` up to stage ``until`` (default: all); return the
    last stage's folder. ``tower`` reuses a finished tower stage from elsewhere."""
    from . import tower as tower_stage
    from . import train as llava_stage

    stages = (*STAGES, *OWN[fmt])  # all but OWN["full"] write R-RLE, TrainConfig's default
    names = (TOWER, *(stage.name for stage in stages))
    if until is not None and until not in names:
        raise ValueError(f"unknown stage {until!r}: the {fmt} recipe's stages are {', '.join(names)}")
    out = Path(out)
    previous = Path(tower) if tower is not None else out / TOWER
    if tower is None and not _stage(previous, TOWER, "", log):
        tower_stage.train_tower(tower_stage.TowerConfig(out=str(previous), workers=workers,
                                                        eval_every_min=eval_every_min),
                                resume=(previous / "checkpoint.pt").exists(), log=log)
    new_tower = None  # a tower stage's folder, for the LLaVA stage after it
    for stage in stages if until != TOWER else ():
        folder = out / stage.name
        if not _stage(folder, stage.name, f" from {previous}", log):
            common = dict(out=str(folder), init=str(previous), workers=workers, eval_every_min=eval_every_min,
                          **stage.options)
            resume = (folder / "checkpoint.pt").exists()
            if stage.tower:
                tower_stage.train_tower(tower_stage.TowerConfig(**common), resume=resume, log=log)
            else:
                cfg = llava_stage.TrainConfig(tower=new_tower and str(new_tower), **common)
                llava_stage.train(cfg, resume=resume, log=log)
        if stage.name == until:
            return folder
        new_tower, previous = (folder, previous) if stage.tower else (None, folder)
    return previous


def _stage(folder: Path, name: str, source: str, log) -> bool:
    """Whether the stage in ``folder`` is finished (a stage writes its training record last); say
    what happens to it."""
    from ..inference.settings import read_record

    if read_record(folder) or read_record(folder / "model"):
        log(f"{name}: finished in {folder}, kept")
        return True
    verb = "resuming" if (folder / "checkpoint.pt").exists() else "training"
    log(f"{name}: {verb} in {folder}{source}")
    return False
