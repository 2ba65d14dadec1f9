"""Resolved-recipe snapshots: ``python tests/recipe_snapshots.py [--write]``.

Every pretraining recipe in ``recipes/`` is resolved (world size 1) and compared with
``tests/snapshots/<recipe>.resolved.yaml``, so a drifted default shows up as a failing test. ``--write``
regenerates the snapshots after an intended change.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ssl_vil.config import load_config, to_yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SNAPSHOTS = ROOT / "tests" / "snapshots"


def pretraining_recipes() -> list[Path]:
    """Recipes read by the pretraining config (fine-tuning and segmentation recipes, ``finetune_*.yaml`` and
    ``segment_*.yaml``, have their own schemas)."""
    return sorted(p for p in RECIPES.glob("*.yaml") if not p.name.startswith(("finetune_", "segment_")))


def resolved_text(recipe: Path) -> str:
    return to_yaml(load_config(recipe, world_size=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="rewrite the snapshots instead of checking them")
    args = ap.parse_args(argv)
    SNAPSHOTS.mkdir(parents=True, exist_ok=True)
    stale = []
    for recipe in pretraining_recipes():
        snap = SNAPSHOTS / f"{recipe.stem}.resolved.yaml"
        text = resolved_text(recipe)
        if args.write:
            snap.write_text(text)
            print(f"wrote {snap.relative_to(ROOT)}")
        elif not snap.exists() or snap.read_text() != text:
            stale.append(recipe.name)
    if stale:
        print("snapshots out of date: " + ", ".join(stale) + " (run `make snapshots` if the change is intended)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
