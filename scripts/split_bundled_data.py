"""Build data/instructions/{train,validation,test}.jsonl from the per-category files in data/instructions/raw/,
and the generalisation split data/instructions/heldout/ from those.

Deterministic: each category is shuffled with a fixed seed and split 80/10/10, so every split covers all eight of
Dolly's categories in the same proportions. The generalisation split trains and validates on six categories and
tests on the test rows of those six (`seen_categories.jsonl`) and on every row of the two held out
(`unseen_categories.jsonl`): prompts of a kind the student never trained on. Run it again only when the raw files
change.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "data" / "instructions"
SEED = 20261127
FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
HELD_OUT = ("brainstorming", "closed_qa")  # one open-ended kind, one that answers from a given context
HELDOUT = ROOT / "heldout"


def main() -> None:
    splits: dict[str, list[dict]] = {name: [] for name in FRACTIONS}
    seen: set[str] = set()
    for raw in sorted((ROOT / "raw").glob("*.jsonl")):
        rows = [json.loads(line) for line in raw.read_text(encoding="utf-8").splitlines() if line.strip()]
        for row in rows:
            key = row["instruction"].strip().lower()
            if key in seen:
                raise SystemExit(f"{raw}: duplicate instruction across files: {row['instruction']!r}")
            seen.add(key)
        random.Random(f"{SEED}-{raw.stem}").shuffle(rows)
        n_val = round(len(rows) * FRACTIONS["validation"])
        n_test = round(len(rows) * FRACTIONS["test"])
        splits["validation"] += rows[:n_val]
        splits["test"] += rows[n_val : n_val + n_test]
        splits["train"] += rows[n_val + n_test :]
    for name, rows in splits.items():
        random.Random(f"{SEED}-{name}").shuffle(rows)
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (ROOT / f"{name}.jsonl").write_text(text, encoding="utf-8")
        print(f"{name}: {len(rows)} rows")
    heldout_split(splits)


def heldout_split(splits: dict[str, list[dict]]) -> None:
    """data/instructions/heldout/: the main splits without the HELD_OUT categories, and all of those as a test set."""
    seen = {name: [row for row in rows if row["category"] not in HELD_OUT] for name, rows in splits.items()}
    files = {
        "train": seen["train"],
        "validation": seen["validation"],
        "seen_categories": seen["test"],
        "unseen_categories": [row for rows in splits.values() for row in rows if row["category"] in HELD_OUT],
    }
    HELDOUT.mkdir(exist_ok=True)
    for name, rows in files.items():
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (HELDOUT / f"{name}.jsonl").write_text(text, encoding="utf-8")
        print(f"heldout/{name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
