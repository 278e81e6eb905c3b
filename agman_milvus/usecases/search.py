"""Attribute-specific search: "products that look like this, in terms of <attribute>".

A query image is embedded for one attribute (or several, fused), searched in that attribute's
Milvus collection with the metadata filters applied inside Milvus, one hit per product, and
joined with the product metadata from SQL. SQL is the source of truth: a hit whose image or
product is no longer indexed (deleted, failed, re-queued) is dropped, and the search fetches
more so a lagging Milvus delete never leaks into, or shortens, the results.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from agman_milvus.core.errors import AgmanError
from agman_milvus.core.images import ImageSource
from agman_milvus.services.store.catalog import ImageInfo, ImageStatus
from agman_milvus.services.store.filters import FilterValue
from agman_milvus.services.store.vectors import MAX_TOP_K, Hit
from agman_milvus.usecases.base import UseCase

__all__ = [
    "Filters", "Fusion", "ProductNotFoundError", "SearchHit", "SearchService",
]

log = logging.getLogger(__name__)

Filters = Mapping[str, FilterValue]
Fusion = Literal["weighted", "rrf"]
RRF_K = 60  # the usual reciprocal-rank-fusion constant (Cormack et al. 2009; Milvus' RRFRanker)


class ProductNotFoundError(AgmanError, LookupError):
    """No live, indexed product with that external id."""


@dataclass(frozen=True)
class SearchHit:
    """One product in a result list, best image first.

    ``product_id`` is the product's external id (the one it was ingested with); ``score`` is the
    cosine similarity in the attribute's space (or the fused score of a multi-attribute search);
    ``metadata`` holds the product's metadata from SQL.
    """

    product_id: str
    score: float
    image_id: int
    metadata: dict[str, Any] = field(default_factory=dict)
    source_uri: str | None = None
    scores: dict[str, float] = field(default_factory=dict)  # per attribute (multi search)

    def to_dict(self) -> dict[str, Any]:
        return {"product_id": self.product_id, "score": self.score, "image_id": self.image_id,
                "metadata": dict(self.metadata), "source_uri": self.source_uri,
                "scores": dict(self.scores)}


def _live(info: ImageInfo | None) -> bool:
    return info is not None and info.status == ImageStatus.indexed and not info.product_deleted


class SearchService(UseCase):
    """The search use case over an :class:`Embedder`, a :class:`VectorStore` and a :class:`Catalog`."""

    @property
    def schema(self):  # noqa: ANN201 - AttributeSchema
        return self.vectors.schema

    # -- single attribute ----------------------------------------------------------------------
    def search(
        self, image: ImageSource, attribute: str | int, top_k: int = 10,
        filters: Filters | None = None,
    ) -> list[SearchHit]:
        """Products most similar to ``image`` with respect to ``attribute``, best first.

        Raises :class:`~agman_milvus.core.schema.UnknownAttributeError` (listing the known attributes)
        before any image work when ``attribute`` is unknown.
        """
        attr = self.schema[self.schema.resolve(attribute)].name
        _check_top_k(top_k)
        vector = self.embedder.embed([self.load_image(image)], attr)[0]
        return self.search_vectors(attr, [vector], top_k, filters)

    def search_vectors(
        self, attribute: str, vectors: Sequence[np.ndarray], top_k: int = 10,
        filters: Filters | None = None, exclude_products: Sequence[int] = (),
    ) -> list[SearchHit]:
        """Products nearest to any of ``vectors`` (max over vectors), live rows only.

        ``exclude_products`` are internal product ids left out of the result.
        """
        excluded = set(exclude_products)
        limit = min(MAX_TOP_K, top_k + len(excluded) + max(4, top_k // 2))
        while True:
            raw = self.vectors.search(attribute, np.asarray(vectors, np.float32), limit, filters,
                                      one_per_product=True)
            best: dict[int, Hit] = {}
            exhausted = True
            for hits in raw:
                exhausted &= len(hits) < limit
                for hit in hits:
                    if hit.product_id not in best or hit.score > best[hit.product_id].score:
                        best[hit.product_id] = hit
            ranked = sorted((h for h in best.values() if h.product_id not in excluded),
                            key=lambda h: -h.score)
            infos = self.catalog.images.info([h.image_id for h in ranked])
            live = [h for h in ranked if _live(infos.get(h.image_id))]
            if len(live) >= top_k or exhausted or limit >= MAX_TOP_K:
                if len(live) < len(ranked):
                    log.debug("dropped %d hits whose rows are not indexed", len(ranked) - len(live))
                return [_hit(h, infos[h.image_id]) for h in live[:top_k]]
            limit = min(MAX_TOP_K, limit * 2)

    def search_similar(
        self, product_id: str, attribute: str | int, top_k: int = 10,
        filters: Filters | None = None,
    ) -> list[SearchHit]:
        """"More like this": products nearest to the stored vectors of ``product_id``'s images.

        A product with several images scores each candidate by its best match to any of them;
        the product itself is excluded.
        """
        attr = self.schema[self.schema.resolve(attribute)].name
        _check_top_k(top_k)
        product = self.catalog.products.get(product_id)
        if product is None or product.deleted:
            raise ProductNotFoundError(f"no product with id {product_id!r}")
        image_ids = self.catalog.images.indexed_ids(product.id)
        stored = self.vectors.get_vectors(attr, image_ids)
        missing = [i for i in image_ids if i not in stored]
        if missing:  # indexed a moment ago, not yet seen at the search level
            stored |= self.vectors.get_vectors(attr, missing, "Strong")
        if not stored:
            raise ProductNotFoundError(
                f"product {product_id!r} has no indexed image yet (ingest it, or wait for indexing)"
            )
        return self.search_vectors(attr, list(stored.values()), top_k, filters,
                                   exclude_products=[product.id])

    # -- several attributes ----------------------------------------------------------------------
    def search_multi(
        self, image: ImageSource, weights: Mapping[str, float], top_k: int = 10,
        filters: Filters | None = None, fusion: Fusion = "weighted", candidates: int | None = None,
    ) -> list[SearchHit]:
        """Products similar in several attributes at once, e.g. ``{"colour": 2, "neckline": 1}``.

        ``fusion="weighted"`` ranks products by ``max over their images of
        sum_a w_a * cos_a(query, image)`` and the result is *exact*, not an approximation of
        that score. Per attribute the ``k'`` nearest images (``candidates``, default
        ``max(10 * top_k, 100)``) are fetched from Milvus with the filters applied; every image
        found in any list gets its missing per-attribute similarities from its stored vectors, so
        its fused score is exact. An image absent from every list has, in each attribute, a
        similarity no higher than that list's last one, so its score is bounded by
        ``T = sum_a w_a * last_a``. When the ``top_k``-th product's score is below ``T``, an
        unseen image could still beat it, so ``k'`` is doubled and the search repeated; lists
        shorter than ``k'`` are complete, which makes ``T`` irrelevant. Weights must be positive.

        ``fusion="rrf"`` is reciprocal-rank fusion over the per-attribute product rankings
        (``sum_a w_a / (60 + rank_a)``): scale-free and robust, but rank-based by design.
        """
        if not weights:
            raise ValueError("search_multi needs at least one attribute weight")
        resolved: dict[str, float] = {}
        for name, w in weights.items():
            attr = self.schema[self.schema.resolve(name)].name
            if not np.isfinite(w) or w <= 0:
                raise ValueError(f"weight of {attr!r} must be a positive number, got {w!r}")
            resolved[attr] = resolved.get(attr, 0.0) + float(w)
        if fusion not in ("weighted", "rrf"):
            raise ValueError(f"unknown fusion {fusion!r}; use 'weighted' or 'rrf'")
        _check_top_k(top_k)
        encoded = self.embedder.encode([self.load_image(image)]).embeddings[0]  # [K, D]
        queries = {a: encoded[self.schema.index(a)] for a in resolved}
        k_prime = candidates or max(10 * top_k, 100)
        if fusion == "rrf":
            return self._rrf(queries, resolved, top_k, filters, k_prime)
        return self._weighted(queries, resolved, top_k, filters, k_prime)

    def _weighted(
        self, queries: dict[str, np.ndarray], weights: dict[str, float], top_k: int,
        filters: Filters | None, k_prime: int,
    ) -> list[SearchHit]:
        while True:
            k_prime = min(MAX_TOP_K, k_prime)
            lists = {a: self.vectors.search(a, [q], k_prime, filters, one_per_product=False)[0]
                     for a, q in queries.items()}
            complete = all(len(hits) < k_prime for hits in lists.values())
            bound = sum(weights[a] * (hits[-1].score if hits else -1.0) for a, hits in lists.items())
            sims: dict[int, dict[str, float]] = {}
            product_of: dict[int, int] = {}
            for a, hits in lists.items():
                for h in hits:
                    sims.setdefault(h.image_id, {})[a] = h.score
                    product_of[h.image_id] = h.product_id
            infos = self.catalog.images.info(list(sims))
            live = {i for i in sims if _live(infos.get(i))}
            for a, q in queries.items():
                missing = [i for i in live if a not in sims[i]]
                for image_id, vec in self.vectors.get_vectors(a, missing).items():
                    sims[image_id][a] = float(np.dot(vec, q))
            best: dict[int, tuple[float, int]] = {}
            for i in live:
                if len(sims[i]) < len(queries):
                    continue  # vectors vanished meanwhile (concurrent delete)
                score = sum(weights[a] * sims[i][a] for a in queries)
                p = product_of[i]
                if p not in best or score > best[p][0]:
                    best[p] = (score, i)
            ranked = sorted(best.values(), key=lambda t: -t[0])[:top_k]
            kth = ranked[-1][0] if len(ranked) == top_k else -np.inf
            if complete or kth >= bound or k_prime >= MAX_TOP_K:
                if not (complete or kth >= bound):
                    log.warning("multi-attribute search hit Milvus' top-k limit; result approximate")
                return [_hit(Hit(i, product_of[i], s), infos[i],
                             {a: sims[i][a] for a in queries}) for s, i in ranked]
            log.debug("weighted fusion: k'=%d not enough (kth %.4f < bound %.4f)", k_prime, kth, bound)
            k_prime *= 2

    def _rrf(
        self, queries: dict[str, np.ndarray], weights: dict[str, float], top_k: int,
        filters: Filters | None, k_prime: int,
    ) -> list[SearchHit]:
        fused: dict[str, float] = {}
        per_attr: dict[str, dict[str, float]] = {}
        best: dict[str, SearchHit] = {}
        for a, q in queries.items():
            hits = self.search_vectors(a, [q], min(k_prime, MAX_TOP_K), filters)
            for rank, hit in enumerate(hits, start=1):
                key = hit.product_id
                fused[key] = fused.get(key, 0.0) + weights[a] / (RRF_K + rank)
                per_attr.setdefault(key, {})[a] = hit.score
                if key not in best or hit.score > best[key].score:
                    best[key] = hit
        ranked = sorted(fused.items(), key=lambda kv: -kv[1])[:top_k]
        return [SearchHit(product_id=k, score=score, image_id=best[k].image_id,
                          metadata=best[k].metadata, source_uri=best[k].source_uri,
                          scores=per_attr[k]) for k, score in ranked]


def _hit(hit: Hit, info: ImageInfo, scores: Mapping[str, float] | None = None) -> SearchHit:
    return SearchHit(product_id=info.external_id, score=float(hit.score), image_id=hit.image_id,
                     metadata=info.metadata(), source_uri=info.source_uri,
                     scores=dict(scores or {}))


def _check_top_k(top_k: int) -> None:
    if not 1 <= top_k <= MAX_TOP_K:
        raise ValueError(f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
