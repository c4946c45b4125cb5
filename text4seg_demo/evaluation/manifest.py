"""Manifests: ``DIR/manifest.jsonl``, one query per line ``{"image", "expression", "mask"}``
and optionally ``"kind"`` (the kind of expression, which ``eval`` breaks its scores down by)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Query:
    image: Path
    expression: str
    mask: Path
    kind: str | None = None


def read_manifest(root: str | Path, limit: int | None = None) -> list[Query]:
    """The queries of a manifest directory, paths resolved against it; bad lines are named."""
    root = Path(root)
    manifest = root / "manifest.jsonl"
    if not manifest.is_file():
        raise FileNotFoundError(f"no manifest.jsonl in {root} (make one with `text4seg synth --out {root}`)")
    queries = []
    for number, line in enumerate(manifest.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            kind = row.get("kind")
            queries.append(Query(root / row["image"], str(row["expression"]), root / row["mask"],
                                 None if kind is None else str(kind)))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{manifest}:{number}: expected {{\"image\", \"expression\", \"mask\"}} ({err})") from None
        if limit and len(queries) >= limit:
            break
    return queries
