"""The README stays true: its Python examples run as written, its config table lists every setting."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image, ImageDraw

from agman_milvus.core.config import Settings
from agman_milvus.core.model import build_model, save_checkpoint
from agman_milvus.core.schema import AttributeSchema

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def test_config_table_lists_every_setting() -> None:
    table = readme_section("Configuration")
    for name in Settings.model_fields:
        assert f"| `{name}` | `AGMAN_{name.upper()}`" in table, name


def test_two_commands_are_given() -> None:
    block = readme_section("Two commands")
    assert "bash scripts/setup.sh && .venv/bin/agman demo" in block
    assert "bash scripts/test.sh" in block
    assert (README.parent / ".ci" / "run").read_text().count("scripts/") >= 2


def product_photo(path: Path, colour: tuple[int, int, int], sleeves: int) -> None:
    image = Image.new("RGB", (96, 96), (240, 240, 240))
    draw = ImageDraw.Draw(image)
    draw.rectangle([30, 20, 66, 80], fill=colour)
    draw.rectangle([30 - sleeves, 20, 66 + sleeves, 34], fill=colour)
    image.save(path, quality=92)


def test_python_examples_run_as_written(tmp_path, monkeypatch) -> None:
    schema = AttributeSchema.from_dict({"sleeve_length": ["short", "long"], "colour": ["red", "blue"]})
    checkpoint = tmp_path / "model.safetensors"
    save_checkpoint(build_model("agman", schema=schema, backbone="mobilenet_v2", image_size=64), checkpoint)
    monkeypatch.setenv("AGMAN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("AGMAN_CHECKPOINT", str(checkpoint))
    for variable in ("AGMAN_MILVUS_URI", "MILVUS_URI", "AGMAN_DATABASE_URL", "AGMAN_BROKER_URL"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)
    for name, colour, sleeves in [("shirt", (200, 30, 30), 4), ("dress", (30, 40, 190), 10),
                                  ("query", (190, 40, 30), 6),
                                  ("suspect", (200, 30, 30), 4), ("upload-1", (20, 30, 200), 14),
                                  ("upload-2", (30, 160, 40), 0)]:
        product_photo(tmp_path / f"{name}.jpg", colour, sleeves)

    blocks = re.findall(r"```python\n(.*?)```", readme_section("Python API"), re.S)
    assert len(blocks) == 6
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own examples
    assert namespace["handle"].status == "indexed"
    assert [hit.product_id for hit in namespace["hits"]] == ["sku-1001"]
    assert [hit.product_id for hit in namespace["similar"]] == ["sku-1002"]
    assert {hit.product_id for hit in namespace["both"]} == {"sku-1001", "sku-1002"}
    assert namespace["check"].verdict == "copy"  # suspect.jpg is a pixel copy of shirt.jpg
    assert namespace["check"].best.product_id == "sku-1001"
    assert (tmp_path / "screening.html").read_text().lower().startswith("<!doctype html>")
    assert [(h.product_id, h.status) for h in namespace["handles"]] == [("sku-2001", "indexed"),
                                                                        ("sku-2002", "indexed")]
    assert namespace["client"].services.catalog.products.get("sku-2003") is None
    namespace["client"].close()


def test_layer_table_matches_the_package_tree() -> None:
    """Every folder of the package is in the README's layer table, and nothing else is."""
    text = readme_section("How it works")
    table = text[text.index("| layer | folder |"):]
    named = set(re.findall(r"`agman_milvus/(\w+)/`", table))
    package = README.parent / "agman_milvus"
    folders = {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert named == folders
    for module in re.findall(r"`(\w+\.py)`", table.split("\n| core |")[1].split("\n")[0]):
        assert (package / "core" / module).is_file(), module
