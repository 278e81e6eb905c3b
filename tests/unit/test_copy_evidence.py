"""The evidence picture a reviewer sees: query and match side by side, region and inlier lines."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from agman_milvus.core.copy_evidence import draw_evidence, evidence_jpeg
from agman_milvus.core.copy_features import extract
from agman_milvus.core.copy_verify import verify
from tests.unit.test_copy_verify import textured


def test_evidence_picture_shows_both_images(tmp_path: Path) -> None:
    original = textured(5)
    query = original.crop((20, 10, 190, 180)).resize((120, 120))
    v = verify(extract(query), extract(original))
    pic = draw_evidence(query, original, v.to_dict(), height=128)
    assert pic.height == 128 and pic.width == 128 + 8 + 128
    picture = evidence_jpeg(query, original, v)
    assert Image.open(io.BytesIO(picture)).format == "JPEG"


def test_evidence_outline_stays_on_the_query_side() -> None:
    """An original cut off by the query's right edge maps to an outline reaching past it: the
    outline is drawn on the query's side only, the candidate's side as it is without one."""
    original = textured(5)
    query = Image.new("RGB", (160, 240), (255, 255, 255))
    query.paste(original, (20, 20))  # the original's right 60 px cut off
    v = verify(extract(query), extract(original))
    assert max(x for x, _ in v.region) > query.width + 20
    drawn = np.asarray(draw_evidence(query, original, v, height=240))
    bare = np.asarray(draw_evidence(query, original, replace(v, region=[]), height=240))
    assert (drawn[:, :160] != bare[:, :160]).any()
    assert (drawn[:, 160:] == bare[:, 160:]).all()
