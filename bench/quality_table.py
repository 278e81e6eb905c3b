"""Render the quality run's test JSON files as a markdown table: ``quality_table.py RUN_DIR``.

Each cell is the test MAP (x100) with its 95% bootstrap interval over queries (when the JSON has
one); the last column is the row's training time from RUN_DIR/timing.txt.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

#: (row key, label); ``{trunk}`` is the backbone the row's JSON names (the last word of "model")
ROWS = [("floor", "untrained ImageNet {trunk}, pooled (floor)"),
        ("imagenet_floor", "untrained ImageNet {trunk}, pooled (floor)"),
        ("probe", "linear probe: frozen ImageNet {trunk}, pooled + one linear classifier per attribute"),
        ("global", "global (no attribute conditioning)"),
        ("asen_v2", "ASEN_v2"),
        ("agman", "AG-MAN")]


def _cell(value: float, interval: list[float] | None, bold: bool = False) -> str:
    text = f"**{value:.1f}**" if bold else f"{value:.1f}"
    return f"{text} [{interval[0]:.1f}, {interval[1]:.1f}]" if interval else text


def _timings(run_dir: Path) -> dict[str, int]:
    path = run_dir / "timing.txt"
    if not path.exists():
        return {}
    found = re.findall(r"^(\S+) train seconds: (\d+)$", path.read_text(), flags=re.M)
    return {("floor" if key == "imagenet_floor" else key): int(seconds) for key, seconds in found}


def main(run_dir: Path) -> None:
    results = {key: json.loads((run_dir / f"{key}_test.json").read_text())
               for key, _ in ROWS if (run_dir / f"{key}_test.json").exists()}
    if not results:
        raise SystemExit(f"no *_test.json in {run_dir}")
    timings = _timings(run_dir)
    attributes = list(next(iter(results.values()))["per_attribute"])
    queries = next(iter(results.values()))["per_attribute"]
    print("| model | " + " | ".join(attributes) + " | overall | training time |")
    print("|---|" + "---:|" * (len(attributes) + 2))
    print("| test queries | " + " | ".join(str(queries[a]["queries"]) for a in attributes)
          + f" | {sum(q['queries'] for q in queries.values())} | |")
    for key, label in ROWS:
        if key in results:
            r = results[key]
            ci = r.get("ci95", {})
            cells = " | ".join(_cell(r["per_attribute"][a]["map"], ci.get(a)) for a in attributes)
            seconds = timings.get("floor" if key == "imagenet_floor" else key)
            time_cell = "-" if seconds is None else ("none" if seconds == 0 else f"{seconds} s")
            overall = _cell(r["overall_map"], ci.get("overall"), bold=True)
            label = label.format(trunk=r["model"].split()[-1])
            print(f"| {label} | {cells} | {overall} | {time_cell} |")
    for key, _ in ROWS:
        metrics = run_dir / key / "metrics.jsonl"
        if metrics.exists():
            lines = [json.loads(line) for line in metrics.read_text().splitlines()]
            curve = ", ".join(f"{rec['epoch']}: {rec['valid_map']:.2f}"
                              for rec in lines if "valid_map" in rec)
            seconds = sum(rec.get(key, 0) for rec in lines
                          for key in ("cache_seconds", "train_seconds", "eval_seconds"))
            if curve:
                print(f"\n`{key}` valid MAP by epoch: {curve} ({seconds:.0f} s cache+train+valid)")
            else:  # --fold-valid: the valid images trained too, the last epoch kept
                print(f"\n`{key}`: no validation, the valid images trained too ({seconds:.0f} s cache+train)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
