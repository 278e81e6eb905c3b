"""Attribute search through the real Client: Milvus Lite, SQLite, the real ingest pipeline.

The model is a small *constructed* attribute model (no training, which would take minutes on
a shared CPU): a real :class:`AttributeEmbeddingModel` whose ``colour`` head embeds the mean
colour of the foreground and whose ``shape`` head embeds its fill ratio (area / bounding box:
triangle 0.5, circle 0.79, square 1.0). Each head sees only its attribute, which is exactly
what an attribute-specific model learns; the copy descriptor comes from a real (randomly
initialised, seeded) MobileNetV2 trunk. Everything else (Embedder, Milvus, SQL, the search use
case) is the production code.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from agman_milvus.core.model.backbones import build_trunk
from agman_milvus.core.model.base import AttributeEmbeddingModel
from agman_milvus.core.model.layers import l2_normalize
from agman_milvus.core.schema import AttributeSchema, UnknownAttributeError

pytestmark = pytest.mark.timeout(300)

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60)}
SHAPES = ("circle", "square", "triangle")
SCHEMA = AttributeSchema.from_dict({"colour": list(COLOURS), "shape": list(SHAPES)})
SIZE = 64


class ColourShapeModel(AttributeEmbeddingModel):
    """Constructed attribute model: colour head = foreground mean colour, shape head = RBF
    code of the foreground's fill ratio; 8-d unit vectors."""

    model_name = "test_colour_shape"

    def __init__(self, pretrained: str | None = None, image_size: int = SIZE) -> None:
        torch.manual_seed(0)
        super().__init__(SCHEMA, build_trunk("mobilenet_v2", with_top=True, pretrained=pretrained),
                         embed_dim=8, image_size=image_size)
        self.register_buffer("centres", torch.tensor([0.5, 0.785, 1.0]))

    def _features(self, images: torch.Tensor):
        mid = self.trunk.forward_mid(images)
        return (images,), mid, self.trunk.forward_high(mid)

    def _all_heads(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        (x,) = inputs
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        rgb = (x * std + mean).clamp(0, 1)
        fg = ((1 - rgb).amax(dim=1) > 0.25).float()  # [B, H, W], background is near white
        area = fg.sum(dim=(1, 2)).clamp(min=1)
        colour = (rgb * fg[:, None]).sum(dim=(2, 3)) / area[:, None]
        rows, cols = fg.amax(dim=2), fg.amax(dim=1)
        box = rows.sum(1).clamp(min=1) * cols.sum(1).clamp(min=1)
        fill = (area / box)[:, None]
        shape = torch.exp(-((fill - self.centres) ** 2) / (2 * 0.06**2))

        def pad(v: torch.Tensor) -> torch.Tensor:
            return torch.cat([v, torch.full((v.shape[0], 8 - v.shape[1]), 1e-3, device=v.device)], 1)

        return l2_normalize(torch.stack([pad(colour - 0.35), pad(shape)], dim=1))

    def _heads(self, inputs: tuple[torch.Tensor, ...], attribute_ids: torch.Tensor) -> torch.Tensor:
        every = self._all_heads(inputs)
        return every[torch.arange(every.shape[0], device=every.device), attribute_ids]


def draw(colour: str, shape: str, seed: int, size: int = SIZE) -> Image.Image:
    """A coloured shape at a random place and size on a near-white, slightly textured canvas."""
    r = random.Random(seed)
    im = Image.new("RGB", (size, size), (250, 250, 250))
    d = ImageDraw.Draw(im)
    for _ in range(12):  # light texture so photos differ beyond the shape
        x, y = r.randrange(size), r.randrange(size)
        d.point((x, y), fill=(235, 235, 235))
    s = r.randint(size // 5, size // 3)
    cx, cy = r.randint(s + 1, size - s - 2), r.randint(s + 1, size - s - 2)
    c = tuple(max(0, min(255, v + r.randint(-20, 20))) for v in COLOURS[colour])
    if shape == "circle":
        d.ellipse((cx - s, cy - s, cx + s, cy + s), fill=c)
    elif shape == "square":
        d.rectangle((cx - s, cy - s, cx + s, cy + s), fill=c)
    else:
        d.polygon([(cx, cy - s), (cx - s, cy + s), (cx + s, cy + s)], fill=c)
    return im


def make_client(data_dir: Path, **model_kwargs: object):  # noqa: ANN201 - Client
    from agman_milvus.app.client import Client
    from agman_milvus.core.config import Settings
    from agman_milvus.services.container import Services
    from agman_milvus.services.embedding import Embedder

    settings = Settings(data_dir=data_dir, device="cpu", batch_size=16, broker_url=None,
                        milvus_uri=None, database_url=None, collection_prefix="agman")
    return Client(
        services=Services(settings, embedder=Embedder(ColourShapeModel(**model_kwargs), device="cpu"))
    )


CATALOG = [(f"sku-{c}-{s}-{k}", c, s, 100 * i + k)
           for i, (c, s) in enumerate((c, s) for c in COLOURS for s in SHAPES) for k in range(2)]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:  # noqa: F821
    c = make_client(tmp_path_factory.mktemp("search"))
    for sku, colour, shape, seed in CATALOG:
        brand = "acme" if seed % 2 == 0 else "zenith"
        h = c.ingest(sku, draw(colour, shape, seed), {"brand": brand, "colour": colour,
                                                      "category": shape})
        assert h.status == "indexed", h
    yield c
    c.close()


def test_search_ranks_products_sharing_the_queried_attribute_first(client) -> None:
    query = draw("red", "circle", seed=9999)
    by_colour = client.search(query, "colour", top_k=6)
    assert [h.metadata["colour"] for h in by_colour] == ["red"] * 6
    assert {h.metadata["category"] for h in by_colour} == set(SHAPES)  # shape does not matter
    by_shape = client.search(query, "shape", top_k=6)
    assert [h.metadata["category"] for h in by_shape] == ["circle"] * 6
    assert {h.metadata["colour"] for h in by_shape} == set(COLOURS)
    scores = [h.score for h in by_colour]
    assert scores == sorted(scores, reverse=True) and -1.0 <= scores[-1] <= scores[0] <= 1.0001
    hit = by_colour[0]
    assert hit.product_id.startswith("sku-red-") and hit.image_id > 0
    assert hit.metadata["brand"] in ("acme", "zenith")


def test_query_sources_bytes_path_and_pil_agree(client, tmp_path: Path) -> None:
    query = draw("blue", "square", seed=4242)
    path = tmp_path / "q.png"
    query.save(path)
    a = client.search(query, "shape", top_k=3)
    b = client.search(path, "shape", top_k=3)
    c = client.search(path.read_bytes(), "shape", top_k=3)
    assert [h.product_id for h in a] == [h.product_id for h in b] == [h.product_id for h in c]


def test_filters_are_applied_and_one_hit_per_product(client) -> None:
    extra = client.ingest("sku-red-circle-0", draw("red", "circle", seed=7))  # 2nd image
    assert extra.status == "indexed"
    hits = client.search(draw("red", "circle", seed=5), "colour", top_k=18,
                         filters={"brand": "acme"})
    assert hits and all(h.metadata["brand"] == "acme" for h in hits)
    ids = [h.product_id for h in hits]
    assert len(ids) == len(set(ids))  # the product with two images appears once
    everything = client.search(draw("red", "circle", seed=5), "colour", top_k=50)
    assert len(everything) == len(CATALOG)  # every product once, not every image
    only = client.search(draw("red", "circle", seed=5), "shape", top_k=5,
                         filters={"colour": ["blue", "green"], "brand": "zenith"})
    assert only and all(h.metadata["colour"] in ("blue", "green") and h.metadata["brand"] == "zenith"
                        for h in only)


def test_unknown_attribute_is_a_clear_error(client) -> None:
    with pytest.raises(UnknownAttributeError, match="known attributes: colour, shape"):
        client.search(draw("red", "circle", 1), "sleeve", top_k=3)


def test_deleted_products_never_leak_even_when_milvus_lags(client) -> None:
    query = draw("green", "triangle", seed=31337)
    before = client.search(query, "colour", top_k=4)
    victim = before[0].product_id
    # Lagging delete: the SQL rows say deleted but the vectors are still in Milvus.
    client.services.catalog.products.soft_delete(victim)
    after = client.search(query, "colour", top_k=4)
    assert victim not in [h.product_id for h in after]
    assert len(after) == 4
    client.ingest(victim, draw("green", "triangle", seed=31338))  # revive for other tests


def test_search_similar_excludes_the_product_itself(client) -> None:
    hits = client.search_similar("sku-blue-square-0", "shape", top_k=5)
    assert "sku-blue-square-0" not in [h.product_id for h in hits]
    assert hits[0].metadata["category"] == "square"
    colour = client.search_similar("sku-blue-square-0", "colour", top_k=5, filters={"brand": "acme"})
    assert all(h.metadata["colour"] == "blue" for h in colour[:5] if h.score > 0.9)
    assert all(h.metadata["brand"] == "acme" for h in colour)
    from agman_milvus.usecases.search import ProductNotFoundError

    with pytest.raises(ProductNotFoundError):
        client.search_similar("no-such-sku", "shape")


def test_interactive_searches_read_stored_vectors_at_the_search_level(client, monkeypatch) -> None:
    """More-like-this and fused search read stored vectors as their searches do, not "Strong"
    (on a Milvus server a Strong read waits for a time tick: 331 ms against 19 ms a
    more-like-this). An image indexed a moment ago that such a read does not see yet (a server's
    query nodes behind its writes, played here by hiding every vector from non-Strong reads) is
    read again at "Strong", so more-like-this finds it all the same."""
    vectors = client.services.vectors
    get_vectors = vectors.get_vectors
    levels: list[str] = []

    def recorded(attribute, image_ids, consistency=None):  # noqa: ANN001, ANN202
        levels.append(consistency or vectors.search_consistency)
        return get_vectors(attribute, image_ids, consistency)

    monkeypatch.setattr(vectors, "get_vectors", recorded)
    similar = client.search_similar("sku-blue-square-0", "shape", top_k=5)
    from agman_milvus.usecases.search import SearchService

    service = SearchService.from_services(client.services)  # candidates=2: some vectors read back
    service.search_multi(draw("red", "square", seed=2024), {"colour": 2.0, "shape": 1.0}, top_k=5,
                         candidates=2)
    assert levels and "Strong" not in levels and vectors.search_consistency != "Strong"

    def lagging(attribute, image_ids, consistency=None):  # noqa: ANN001, ANN202
        levels.append(consistency or vectors.search_consistency)
        return get_vectors(attribute, image_ids, consistency) if consistency == "Strong" else {}

    levels.clear()
    monkeypatch.setattr(vectors, "get_vectors", lagging)
    again = client.search_similar("sku-blue-square-0", "shape", top_k=5)
    assert [h.product_id for h in again] == [h.product_id for h in similar]
    assert levels == [vectors.search_consistency, "Strong"]


def _brute_force(client, query: Image.Image, weights: dict[str, float], top_k: int,
                 filters: dict | None = None) -> list[tuple[str, float]]:
    """numpy over every live image's stored vectors: max over images of sum_a w_a cos_a."""
    from agman_milvus.services.store.catalog import ImageStatus

    services = client.services
    store, catalog = services.vectors, services.catalog
    ids = [i for i, _ in catalog.images.iter_ids(ImageStatus.indexed)]
    infos = catalog.images.info(ids)
    q = services.embedder.encode([query]).embeddings[0]
    best: dict[str, float] = {}
    for i in ids:
        info = infos[i]
        if info.product_deleted or any(info.metadata().get(k) not in (v if isinstance(v, list) else [v])
                                       for k, v in (filters or {}).items()):
            continue
        score = sum(w * float(np.dot(store.get_vectors(a, [i])[i], q[SCHEMA.index(a)]))
                    for a, w in weights.items())
        best[info.external_id] = max(best.get(info.external_id, -np.inf), score)
    return sorted(best.items(), key=lambda kv: -kv[1])[:top_k]


@pytest.mark.parametrize("candidates", [None, 2])
def test_search_multi_weighted_is_exact(client, candidates: int | None) -> None:
    from agman_milvus.usecases.search import SearchService

    service = SearchService.from_services(client.services)
    query = draw("red", "square", seed=2024)
    weights = {"colour": 2.0, "shape": 1.0}
    # candidates=2 forces the bound check to grow k' until the result is provably exact
    got = service.search_multi(query, weights, top_k=5, candidates=candidates)
    want = _brute_force(client, query, weights, 5)
    assert [h.product_id for h in got] == [p for p, _ in want]
    np.testing.assert_allclose([h.score for h in got], [s for _, s in want], atol=1e-4)
    assert set(got[0].scores) == {"colour", "shape"}
    filtered = service.search_multi(query, weights, top_k=4, filters={"brand": "zenith"})
    want = _brute_force(client, query, weights, 4, {"brand": "zenith"})
    assert [h.product_id for h in filtered] == [p for p, _ in want]


def test_search_multi_rrf_and_validation(client) -> None:
    query = draw("green", "circle", seed=77)
    hits = client.search_multi(query, {"colour": 1, "shape": 1}, top_k=3, fusion="rrf")
    assert hits[0].metadata["colour"] == "green" and hits[0].metadata["category"] == "circle"
    with pytest.raises(ValueError, match="positive"):
        client.search_multi(query, {"colour": -1})
    with pytest.raises(UnknownAttributeError):
        client.search_multi(query, {"texture": 1})
