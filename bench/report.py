"""Writing a screening report's HTML page: seconds and size for N verified matches (JSON on stdout).

Each match is a catalogue photo of ../shared/data/fashion-products and a copy of it turned by
5 degrees (written as a JPEG file, as a screening job's query would be), verified as the checker
does; the page carries both thumbnails and the evidence picture of every match. The page is
written ``--rounds`` times and the median reported.

    .venv/bin/python bench/report.py [--rows 100] [--rounds 3] [--out report.json]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

# bench/ is on sys.path when this runs as a script
from copydetect import print_report, shared_dir
from PIL import Image

from agman_milvus.core import copy_features, copy_verify
from agman_milvus.usecases.reports import ReportRow, ScreeningReport, report_html


def load(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    root = shared_dir()
    if root is None or not (root / "data/fashion-products/manifest.csv").is_file():
        print_report({"skipped": "needs ../shared/data/fashion-products (or AGMAN_SHARED_DIR)"}, None)
        return 0
    root = root / "data/fashion-products"
    photos = list(csv.DictReader(open(root / "manifest.csv", encoding="utf-8")))[: args.rows]
    with tempfile.TemporaryDirectory(prefix="report-bench-") as tmp:
        rows = []
        for i, photo in enumerate(photos):
            source = str(root / photo["file"])
            original = load(source)
            query = Path(tmp) / f"q{i}.jpg"
            original.rotate(5, expand=True, fillcolor=(255, 255, 255)).save(query, quality=90)
            v = copy_verify.verify(copy_features.extract(load(str(query))), copy_features.extract(original))
            rows.append(ReportRow(query=str(query), verdict="copy", score=v.score, product_id=photo["id"],
                                  image_id=i, match_source=source, verification=v.to_dict()))
        report = ScreeningReport(job_id=1, status="done", done=len(rows), total=len(rows), created_at=None,
                                 finished_at=None, error=None, rows=rows)
        seconds, size = [], 0
        for _ in range(args.rounds):
            start = time.perf_counter()
            size = len(report_html(report, load).encode("utf-8"))
            seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    result = {"rows": len(rows), "rounds": args.rounds, "seconds_median": round(median, 3),
              "seconds": [round(s, 3) for s in seconds], "ms_per_row": round(1000 * median / len(rows), 1),
              "page_mb": round(size / 1e6, 2), "kb_per_row": round(size / 1e3 / len(rows), 1)}
    print_report(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
