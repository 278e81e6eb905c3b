"""The procedural demo catalog: determinism, manifest format, pixels, reuse, and the HTML report."""

from __future__ import annotations

import csv
import hashlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agman_milvus.app.demo.garments import COLOURS, TOPS, Garment, Shot, render
from agman_milvus.app.demo.page import CopyCheck, ReportError, SearchHit, SearchResult, build_page
from agman_milvus.app.demo.photos import (
    DEMO_ATTRIBUTES,
    MANIFEST_COLUMNS,
    ensure_catalog,
    generate_catalog,
    sample_products,
)
from agman_milvus.core.images import load_image
from agman_milvus.training.catalog_split import read_catalog, split_catalog


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_catalog(tmp_path_factory: pytest.TempPathFactory):
    return generate_catalog(tmp_path_factory.mktemp("demo") / "catalog", 40, seed=7, image_size=96)


def test_same_seed_gives_identical_files_and_other_seeds_differ(small_catalog, tmp_path: Path) -> None:
    again = generate_catalog(tmp_path / "again", 40, seed=7, image_size=96, threads=1)
    assert _digest(again.root) == _digest(small_catalog.root)
    other = generate_catalog(tmp_path / "other", 40, seed=8, image_size=96)
    assert (other.root / "manifest.csv").read_bytes() != (small_catalog.root / "manifest.csv").read_bytes()


def test_manifest_has_the_fashion_products_layout_and_reads_as_a_catalog(small_catalog) -> None:
    with open(small_catalog.manifest, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == MANIFEST_COLUMNS
    assert MANIFEST_COLUMNS[:2] == ("file", "id") and MANIFEST_COLUMNS[-1] == "productDisplayName"
    assert len(rows) == 40 and len({r["id"] for r in rows}) == 40
    for row in rows:  # sleeve length exactly for tops; others have an empty cell ("no label")
        assert (row["sleeve_length"] != "") == (row["category"] in TOPS), row
        assert row["colour"].title() in row["productDisplayName"]

    catalog = read_catalog(small_catalog.manifest, DEMO_ATTRIBUTES, min_count=1)
    assert catalog.schema.names == DEMO_ATTRIBUTES
    assert set(catalog.schema["colour"].values) <= set(COLOURS)
    sleeve = catalog.schema.index("sleeve_length")
    labelled = {label.image for label in catalog.labels if label.attribute == sleeve}
    assert labelled == {i for i, r in enumerate(rows) if r["category"] in TOPS}
    split = split_catalog(catalog, seed=0, test_fraction=0.3, valid_fraction=0.1)
    assert split.train and split.test.candidates


def test_images_are_decodable_rgb_jpegs_of_the_requested_size(small_catalog) -> None:
    for item in small_catalog.items[:10]:
        path = small_catalog.root / item.file
        assert path.read_bytes()[:2] == b"\xff\xd8"
        image = load_image(path)
        assert image.size == (96, 96) and image.mode == "RGB"


def test_plan_has_colour_variants_and_products_with_two_photos() -> None:
    plan = sample_products(300, seed=0)
    assert sum(photos for _, photos in plan) == 300
    assert any(photos == 2 for _, photos in plan)
    variants = [(a, b) for (a, _), (b, _) in zip(plan, plan[1:], strict=False)
                if a.garment.category == b.garment.category and a.garment.length == b.garment.length
                and a.garment.colour != b.garment.colour]
    assert variants, "expected some products to be the previous product in another colour"
    assert len({p.product_id for p, _ in plan}) == len(plan)


def _plain_shot(angle: float = 0.0) -> Shot:
    return Shot(background=((200, 200, 200), (200, 200, 200)), floor=None, angle=angle, scale=1.0,
                offset=(0.0, 0.0), light=(0.0, 0.0), props=(), brightness=1.0, contrast=1.0,
                white_balance=(1.0, 1.0, 1.0), noise=0.0, folds=(), quality=95)


@pytest.mark.parametrize("colour", ["red", "blue", "yellow"])
def test_a_plain_garment_is_drawn_in_its_named_colour_on_the_backdrop(colour: str) -> None:
    garment = Garment("t-shirt", colour, "plain", "short")
    pixels = np.asarray(render(garment, _plain_shot(), 128), dtype=np.float64)
    centre = pixels[60:70, 60:70].reshape(-1, 3).mean(axis=0)
    assert np.abs(centre - np.asarray(COLOURS[colour])).max() < 12  # fabric grain only
    assert np.abs(pixels[2, 2] - 200).max() < 3  # the corner is backdrop


def test_rotation_turns_the_garment_and_its_pattern() -> None:
    garment = Garment("dress", "black", "stripes", "long", accent=(250, 250, 250))
    upright = np.asarray(render(garment, _plain_shot(0), 128), dtype=np.float64)
    turned = np.asarray(render(garment, _plain_shot(90), 128), dtype=np.float64)
    # horizontal stripes: upright they vary down a column, turned 90 degrees along a row
    assert upright[40:90, 64].std() > 3 * upright[64, 54:74].std()
    assert turned[64, 40:90].std() > 3 * turned[54:74, 64].std()


def test_invalid_garments_are_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="unknown colour 'teal'"):
        Garment("t-shirt", "teal", "plain", "short")
    with pytest.raises(ValueError, match="trousers has no sleeve length"):
        Garment("trousers", "red", "plain", "long")
    with pytest.raises(ValueError, match="t-shirt needs sleeve length"):
        Garment("t-shirt", "red", "plain", None)


def test_ensure_catalog_reuses_a_matching_catalog_and_regenerates_a_different_one(tmp_path: Path) -> None:
    root = tmp_path / "cat"
    first = ensure_catalog(root, 12, seed=1, image_size=64)
    assert first.seconds > 0
    stamp = (root / first.items[0].file).stat().st_mtime_ns
    second = ensure_catalog(root, 12, seed=1, image_size=64)
    assert second.seconds == 0.0 and [i.file for i in second.items] == [i.file for i in first.items]
    assert (root / first.items[0].file).stat().st_mtime_ns == stamp
    (root / first.items[3].file).unlink()  # incomplete -> regenerated
    third = ensure_catalog(root, 12, seed=1, image_size=64)
    assert third.seconds > 0 and (root / first.items[3].file).is_file()
    bigger = ensure_catalog(root, 15, seed=1, image_size=64)
    assert len(bigger.items) == 15 and len(list((root / "images").iterdir())) == 15


def test_ensure_catalog_refuses_a_foreign_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a demo catalog"):
        ensure_catalog(tmp_path, 5)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# -- the HTML report -------------------------------------------------------------------------
class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.text: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_report_page_inlines_thumbnails_and_escapes_text(small_catalog, tmp_path: Path) -> None:
    items = small_catalog.items
    evil = '<script>alert("x")</script> & co'
    query = small_catalog.root / items[0].file
    search = SearchResult(
        query_image=query, attribute="colour", query_value="red",
        hits=[SearchHit(image=small_catalog.root / items[1].file, score=0.91, value="red", title=evil),
              SearchHit(image=Image.new("RGB", (300, 200), (0, 0, 255)), score=0.5, value="blue")],
        filters={"brand": evil},
    )
    copy = {"query_image": (small_catalog.root / items[2].file).read_bytes(), "verdict": "copy",
            "best_match": {"image": query, "title": "match", "product_id": 7, "score": 0.97},
            "evidence": {"descriptor cosine": 0.97, "hash distance": 3, "note": evil},
            "query_label": "crop of image 1", "expected": "copy"}
    page = build_page(evil, summary={"images/s": 41.25, evil: 1}, searches=[search], copy_checks=[copy],
                      notes=[evil])
    assert "<script>" not in page
    parser = _Collector()
    parser.feed(page)
    assert "script" not in parser.tags
    assert sum(evil in t for t in parser.text) >= 4  # title, note, summary row, hit title, filter, evidence
    assert len(parser.images) == 5 and all(s.startswith("data:image/jpeg;base64,") for s in parser.images)
    text = "".join(parser.text)
    assert "matching hits: 1/2" in text and "correct" in text and "0.97" in text
    assert "http" not in page  # nothing external


def test_report_rejects_malformed_section_dicts() -> None:
    with pytest.raises(ReportError, match="has no field"):
        build_page("x", copy_checks=[{"query_image": None, "verdict": "copy", "bogus": 1}])
    with pytest.raises(ReportError, match="expected a SearchResult"):
        build_page("x", searches=[42])  # type: ignore[list-item]


def test_report_survives_an_unreadable_image(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    page = build_page("t", copy_checks=[CopyCheck(query_image=bad, verdict="uncertain")])
    assert "image unavailable" in page and "no candidate found" in page
