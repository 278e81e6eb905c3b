"""Copy checks and their calibration through the real Client (Milvus Lite, SQLite, ingest).

The copy descriptor is the production one (GeM + L2 over the ImageNet MobileNetV2 trunk; the
tests skip when its weights are not in torchvision's cache, see scripts/setup.sh), so is the
verification (SIFT, RANSAC, residual; the dense alignment for these smooth test pictures); the
thresholds are calibrated on this catalogue, as a user would with ``agman calibrate``.
"""

from __future__ import annotations

import io
import json
import math
import random
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agman_milvus.core.copy_edits import EDITS, random_edit
from agman_milvus.core.copy_features import pixel_block
from agman_milvus.core.copy_metrics import micro_average_precision, threshold_for_precision
from agman_milvus.usecases.copyright import (
    COPY,
    DENSE_FEW_K,
    DISTINCT,
    CopyThresholds,
    QueryLook,
    query_views,
    thresholds_path,
)
from tests.integration.test_search import make_client

pytestmark = pytest.mark.timeout(300)
N = 28


def photo(seed: int, size: int = 64) -> Image.Image:
    """A distinct 'product photo': a smooth random colour field."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC)


def jpeg(im: Image.Image, quality: int = 60) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def require_imagenet() -> None:
    from agman_milvus.core.model.weights import MOBILENET_V2_FILE, checkpoint_dir

    if not (checkpoint_dir() / MOBILENET_V2_FILE).is_file():
        pytest.skip("MobileNetV2 ImageNet weights are not in torchvision's cache (run scripts/setup.sh)")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:  # noqa: F821
    require_imagenet()
    c = make_client(tmp_path_factory.mktemp("copy"), pretrained="imagenet", image_size=96)
    for i in range(N):
        assert c.ingest(f"p{i}", photo(i), {"brand": "acme"}).status == "indexed"
    yield c
    c.close()


def test_metrics_on_a_known_ranking() -> None:
    # ranked: T F T F ; 3 positives in total (one never retrieved)
    scores, labels = [0.9, 0.8, 0.7, 0.6], [True, False, True, False]
    assert micro_average_precision(scores, labels, 3) == pytest.approx((1 + 2 / 3) / 3)
    t, recall, precision = threshold_for_precision(scores, labels, 3, 0.99)
    assert (t, recall, precision) == (0.9, pytest.approx(1 / 3), 1.0)
    t, recall, _ = threshold_for_precision(scores, labels, 3, 0.6)
    assert t == 0.7 and recall == pytest.approx(2 / 3)
    assert threshold_for_precision([0.5], [False], 1, 0.9)[0] == math.inf


def test_every_edit_produces_a_valid_image() -> None:
    r = random.Random(0)
    for name, fn in EDITS.items():
        out = fn(photo(1), r)
        assert out.mode == "RGB" and min(out.size) >= 8, name
    edited, names = random_edit(photo(2), r, edits=(3, 3), background=photo(3))
    assert len(names) == 3 and edited.mode == "RGB"


def pixelated(im: Image.Image, block: int) -> Image.Image:
    small = im.resize((im.width // block, im.height // block), Image.Resampling.BILINEAR)
    return small.resize(im.size, Image.Resampling.NEAREST)


def test_a_pixelated_querys_smoothed_view_scales_its_blocks_away() -> None:
    """The third view of a pixelated query averages each block to one pixel and scales back up
    smoothly: no blocks left, and nearer the source than the blur other queries get."""
    source = photo(11, 160)
    query = pixelated(source, 10)
    block = pixel_block(np.asarray(query.convert("L")))
    assert block == pytest.approx(10.0, abs=0.5)
    smoothed, blurred = query_views(query, QueryLook(block))[2], query_views(query)[2]
    assert pixel_block(np.asarray(smoothed.convert("L"))) == 0.0

    def error(im: Image.Image) -> float:
        return float(np.abs(np.asarray(im, np.float32) - np.asarray(source, np.float32)).mean())

    assert error(smoothed) < 0.8 * error(blurred)


def test_a_query_whose_first_candidate_is_a_sure_copy_is_not_voted_for(client, monkeypatch) -> None:
    """Stage 1 verifies each query's first descriptor candidate before the keypoint vote: a
    query whose first candidate is a sure copy gets no voting candidates (its keypoints are not
    searched), and that verification is not made twice; a query without one is voted for."""
    checker = client._copy_checker()
    searched: list[int] = []
    search = checker.vectors.search_keypoints

    def counted(vectors: np.ndarray, k: int):  # noqa: ANN202 - the store's own result
        searched.append(len(vectors))
        return search(vectors, k)

    monkeypatch.setattr(checker.vectors, "search_keypoints", counted)
    noise = Image.fromarray(np.random.default_rng(3).integers(0, 256, (96, 96, 3), dtype=np.uint8))
    scored = checker.score_candidates([jpeg(photo(5), 70), noise], top_k=5)
    (copy_first, sure), = scored.verified[0].items()
    hit, _, info = scored.candidates[0][0]
    assert hit.image_id == copy_first and info.external_id == "p5"
    assert sure.score >= 0.95
    (_, unsure), = scored.verified[1].items()
    assert unsure.score < 0.95
    assert len(searched) == 1 and searched[0] > 0  # one search, of the noise's keypoints alone
    alone = checker.score_candidates([noise], top_k=5)
    assert searched[1] == searched[0]
    assert [h.image_id for h, _, _ in alone.candidates[0]] == [h.image_id for h, _, _ in scored.candidates[1]]

    check = checker.check(jpeg(photo(5), 70))
    assert check.verdict == COPY and check.matches[0].product_id == "p5"
    assert check.matches[0].verification.score == pytest.approx(sure.score)
    assert len(searched) == 2  # no vote for it


def test_every_candidate_of_a_pixelated_query_gets_the_dense_alignment(client) -> None:
    """SIFT finds the blocks' corners, not the picture: the original of a pixelated query is
    aligned densely wherever it ranks among the candidates, its frame resembling the query's
    (before, only the first DENSE_FEW_K were, so an original late in the list scored 0)."""
    checker = client._copy_checker()
    scored = checker.score_candidates([pixelated(photo(9), 4)], top_k=5)
    query, candidates = scored.queries[0], scored.candidates[0]
    assert query.look.block == pytest.approx(4.0, abs=0.5)
    original = next(c for c in candidates if c[2].external_id == "p9")
    others = [c for c in candidates if c is not original]
    last = min(len(candidates), checker.verify_k + checker.vote_k) - 1
    assert last >= DENSE_FEW_K
    candidates = [*others[:last], original]  # the original last of those verified
    verified = checker.verify_candidates(query, candidates)
    assert verified[last].method == "dense" and verified[last].rank >= 0.5, verified[last]
    assert verified[last].rank == max(v.rank for v in verified if v is not None)


def test_a_photo_pasted_into_a_larger_picture_is_found_through_its_frame(client) -> None:
    """A catalogue photo pasted at a third of a larger picture's area: the query frames it and
    the check finds it, its evidence drawn in the whole query's pixels, on the pasted picture."""
    canvas = Image.fromarray(np.random.default_rng(77).integers(0, 90, (5, 7, 3), dtype=np.uint8)).resize(
        (520, 400), Image.Resampling.BICUBIC)
    canvas.paste(photo(13, 260), (220, 90))
    checker = client._copy_checker()
    query = checker.score_candidates([canvas], top_k=5).queries[0]
    box = query.look.pasted
    assert box is not None and np.allclose(box, (220, 90, 480, 350), atol=4), query.look
    check = client.check_copy(canvas)
    assert check.verdict != DISTINCT and check.best.product_id == "p13", check.to_dict()
    centre = np.asarray(check.best.verification.region).mean(axis=0)
    assert np.allclose(centre, (350, 220), atol=15)


def test_uncalibrated_check_says_so_and_finds_an_exact_copy(client) -> None:
    check = client.check_copy(jpeg(photo(5), 90))
    assert not check.calibrated and check.verdict == COPY
    match = next(m for m in check.matches if m.product_id == "p5")
    assert match.verdict == COPY and match.score >= check.score >= 0.9  # verified at the default threshold
    assert match.phash_distance is not None and match.phash_distance <= 4
    assert client._copy_checker().check_many([]) == []  # an empty batch, not a Milvus error


def test_calibrated_checks_copy_vs_distinct(client, tmp_path: Path) -> None:
    result = client.calibrate_copy(precision=0.95, sample=N, seed=1)
    t = result.thresholds
    assert t.calibrated and t.model_version == client.services.embedder.version
    assert t.near_duplicate <= t.copy and set(t.attribute) == {"colour", "shape"}
    path = thresholds_path(client.settings.data_dir, t.model_version)
    assert result.path == path and json.loads(path.read_text())["copy"] == t.copy
    assert CopyThresholds.load(path, t.model_version).copy == t.copy
    assert result.queries == 2 * N and 0 < result.micro_ap <= 1

    # an edited copy (crop, rescale, JPEG) of an indexed image
    original = photo(11)
    edited = jpeg(original.crop((2, 2, 62, 63)).resize((80, 84)), 70)
    check = client.check_copy(edited, top_k=3)
    assert check.calibrated and check.verdict == COPY
    best = check.best
    assert best.product_id == "p11" and best.score == check.score
    assert best.descriptor_similarity > 0.9
    assert set(best.attributes) == {"colour", "shape"}
    assert best.attributes_agreeing == 2
    d = check.to_dict()
    assert d["matches"][0]["product_id"] == "p11" and "attributes_agreeing" in d["matches"][0]
    verification = d["matches"][0]["verification"]
    assert verification["residual"] < 0.3 and len(verification["region"]) == 4

    # the page `agman check-copy --html` writes: the evidence picture of the verified copy
    edited.save(tmp_path / "edited.png")
    page = client.write_copy_check_html(tmp_path / "edited.png", check, tmp_path / "check.html").read_text()
    evidence = re.findall(r'<img src="data:image/jpeg;base64,[^"]+" alt="query \(left\)', page)
    assert len(evidence) == 1 and "p11" in page

    # an unrelated picture
    unrelated = Image.fromarray(np.random.default_rng(999).integers(0, 256, (64, 64, 3), np.uint8))
    check = client.check_copy(unrelated)
    assert check.verdict == DISTINCT, check.to_dict()
    assert all(m.verdict == DISTINCT for m in check.matches)


def test_thresholds_of_another_model_are_not_used(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    CopyThresholds(model_version="other", copy=0.1, calibrated=True).save(path)
    loaded = CopyThresholds.load(path, "mine")
    assert not loaded.calibrated and loaded.model_version == "mine"


def test_a_single_checks_candidates_shared_over_two_threads_verify_as_on_one(client) -> None:
    checker = client._copy_checker()
    edited = jpeg(photo(7).rotate(8, expand=True).resize((70, 70)), 70)
    scored = checker.score_candidates([edited], top_k=5)
    query, candidates = scored.queries[0], scored.candidates[0]
    one = checker.verify_candidates(query, candidates, workers=1)
    two = checker.verify_candidates(query, candidates, workers=2)
    # two at a time, the round of a sure copy is verified whole: at most one more candidate
    verified_one = {k for k, v in enumerate(one) if v is not None}
    verified_two = {k for k, v in enumerate(two) if v is not None}
    assert verified_one <= verified_two and len(verified_two - verified_one) <= 1
    assert len(verified_two) >= 2  # both threads had candidates
    best = max(range(len(one)), key=lambda k: one[k].score if one[k] else -1)
    assert max(range(len(two)), key=lambda k: two[k].score if two[k] else -1) == best
    assert two[best].score == pytest.approx(one[best].score, abs=0.05)
    check = client.check_copy(edited)  # a single check takes this path (two threads here)
    assert check.best.product_id == "p7" and check.best.image_id == candidates[best][0].image_id


def test_a_batch_reads_stored_vectors_in_few_calls_at_the_search_level(client, monkeypatch) -> None:
    """A batch of checks reads its candidates' stored vectors in one Milvus call a collection, at
    the store's search consistency: "Strong" waits for writes to reach a server's query nodes
    (a call a query halved a screening job's speed on a server)."""
    checker = client._copy_checker()
    calls: list[tuple[str, int, str]] = []
    get_vectors = checker.vectors.get_vectors

    def counted(attribute, image_ids, consistency=None):  # noqa: ANN001, ANN202
        ids = list(image_ids)
        calls.append((str(attribute), len(ids), consistency or checker.vectors.search_consistency))
        return get_vectors(attribute, ids, consistency)

    monkeypatch.setattr(checker.vectors, "get_vectors", counted)
    checks = checker.check_many([jpeg(photo(i), 70) for i in range(6)], top_k=3)
    assert [c.best.product_id for c in checks if c.best is not None] == [f"p{i}" for i in range(6)]
    attributes = checker.vectors.schema.names
    assert len(calls) <= 1 + len(attributes), calls  # the voted images' descriptors, then each attribute
    assert {level for _, _, level in calls} == {checker.vectors.search_consistency} != {"Strong"}
