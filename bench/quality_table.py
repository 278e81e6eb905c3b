"""Render the quality run's test JSON files as a markdown table: ``quality_table.py RUN_DIR``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = [("imagenet_floor", "untrained ImageNet MobileNetV2, pooled (floor)"),
        ("global", "global (triplet network, no attribute conditioning)"),
        ("asen_v2", "ASEN_v2"),
        ("agman", "AG-MAN")]


def main(run_dir: Path) -> None:
    results = {key: json.loads((run_dir / f"{key}_test.json").read_text())
               for key, _ in ROWS if (run_dir / f"{key}_test.json").exists()}
    if not results:
        raise SystemExit(f"no *_test.json in {run_dir}")
    attributes = list(next(iter(results.values()))["per_attribute"])
    queries = next(iter(results.values()))["per_attribute"]
    print("| model | " + " | ".join(attributes) + " | overall |")
    print("|---|" + "---:|" * (len(attributes) + 1))
    print("| test queries | " + " | ".join(str(queries[a]["queries"]) for a in attributes)
          + f" | {sum(q['queries'] for q in queries.values())} |")
    for key, label in ROWS:
        if key in results:
            r = results[key]
            cells = " | ".join(f"{r['per_attribute'][a]['map']:.2f}" for a in attributes)
            print(f"| {label} | {cells} | **{r['overall_map']:.2f}** |")
    for key, _ in ROWS:
        metrics = run_dir / key / "metrics.jsonl"
        if metrics.exists():
            lines = [json.loads(line) for line in metrics.read_text().splitlines()]
            curve = ", ".join(f"{rec['epoch']}: {rec['valid_map']:.2f}" for rec in lines)
            seconds = sum(rec.get("train_seconds", 0) + rec.get("eval_seconds", 0) for rec in lines)
            print(f"\n`{key}` valid MAP by epoch: {curve} ({seconds:.0f} s train+valid)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
