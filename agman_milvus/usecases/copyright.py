"""Copyright near-duplicate checks: is this image an (edited) copy of one in the catalog?

A check has two stages:

1. **Candidates**, from two sources taken alternately. (a) One backbone pass over the query,
   its mirror image, a smoothed copy and, where the query frames a pasted picture, that
   picture alone (:func:`query_views`: flips, pixelation and pastes defeat the plain
   descriptor) gives the query's K attribute vectors and three or four copy descriptors; each
   searches ``{prefix}_copy`` and the union, ranked by the normalised descriptor score
   ``cos - NORM_BETA * cos_k`` (``cos_k``: similarity to the query's ``NORM_K``-th
   neighbour, SSCD/ISC-style), gives ``verify_k`` candidates. (b) The query's SIFT keypoints
   vote for the catalogue images whose stored keypoints are nearest
   (:mod:`agman_milvus.core.copy_vote`, ``{prefix}_keypoints``): ``vote_k`` candidates that
   survive crops, pads, pastes and rotations which move the global descriptor. The first
   descriptor candidate is verified before the vote: a query whose first candidate is already
   a copy beyond doubt is not voted for.
2. **Verification** (:mod:`agman_milvus.core.copy_verify`): SIFT keypoints matched with a
   ratio test and a RANSAC similarity fit (the mirrored query too; when that fails, a dense
   alignment of the thumbnails for the best-ranked candidates, and for a pixelated query,
   whose blocks defeat SIFT, for those of most resembling frame too; and against the pasted
   picture alone), then a photometric residual after alignment: the share of cells that still
   differ once one global brightness/contrast change is allowed. Photos from one shoot (same
   model and pose, another product) align with dozens of inliers; the residual is what tells
   them from a copy. A logistic score over inliers, inlier ratio, matched-region coverage and
   residual is the verification's ``score``; the match's ``score`` (the copy score) weighs it
   against the query's best *other* candidate
   (:func:`agman_milvus.core.copy_scoring.copy_scores`): when several look-alike catalogue
   photos align about equally well, none of them is called the original. Candidates are
   verified best-ranked first until one is a copy beyond doubt (:func:`verify_in_order`). The
   candidates' keypoints are cached on disk by image content
   (:class:`agman_milvus.services.local_features.LocalFeatureCache`).

Supporting evidence is kept with every match: the **pHash hamming distance** (tiny for
re-encoded or resized copies, so ``distance <= phash_copy`` confirms a copy on its own) and
the **attribute agreement** (for each attribute, the cosine of the query's and the match's
attribute embeddings against a per-attribute threshold that 95% of true copies pass).

The verdict of a match is ``copy`` when ``score >= copy`` or its hash distance is at most
``phash_copy``, ``near_duplicate`` when ``score >= near_duplicate``, else ``distinct``. The
thresholds come from :func:`agman_milvus.usecases.copy_calibration.calibrate` (``agman
calibrate``): edited copies of the user's own indexed images go through both stages, and the
thresholds are chosen for a stated precision (99% for ``copy``, 90% for ``near_duplicate`` by
default); the recall they keep is reported.
They are stored as JSON in the data directory, keyed by model version and method.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from agman_milvus.core import copy_evidence, copy_features, copy_scoring, copy_verify, copy_vote
from agman_milvus.core.config import Settings
from agman_milvus.core.images import ImageSource
from agman_milvus.core.pasted import Box, pasted_region
from agman_milvus.core.phash import from_signed64, hamming, phash
from agman_milvus.core.threads import cpu_count, thread_map, thread_pool
from agman_milvus.services.blobs import BlobStore
from agman_milvus.services.embedding import Embedder
from agman_milvus.services.local_features import LocalFeatureCache, cache_root
from agman_milvus.services.store.catalog import Catalog, ImageInfo, ImageStatus
from agman_milvus.services.store.vectors import COPY as COPY_COLLECTION
from agman_milvus.services.store.vectors import Hit, VectorStore, version_tag
from agman_milvus.usecases.base import UseCase

__all__ = [
    "COPY", "DISTINCT", "NEAR_DUPLICATE", "AttributeAgreement", "CopyCheck", "CopyChecker", "CopyMatch",
    "CopyThresholds", "interleave", "is_sure", "stored_phash", "thresholds_path", "verify_in_order",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

COPY, NEAR_DUPLICATE, DISTINCT = "copy", "near_duplicate", "distinct"
_RANK = {COPY: 2, NEAR_DUPLICATE: 1, DISTINCT: 0}
NORM_K = 10
NORM_BETA = 0.5
VERIFY_K = 10  # descriptor candidates verified per query
VOTE_K = 10  # local-feature voting candidates verified per query (beside the descriptor's)
DENSE_K = 3  # candidates that also get the dense alignment when the keypoint fit fails
#: candidates that get the dense alignment when they or the query have few keypoints
DENSE_FEW_K = 6
#: A pixelated query's candidates past the first DENSE_K that get the dense alignment: those
#: whose frames resemble the query's most (:func:`dense_alignments`). Every resembling one was
#: aligned before, 16.6 a pixelated query at about 10 ms each: a pixelated query's verification
#: cost 4.5 times another's (those at 6 + 6 candidates in that run). On bench/copydetect.py
#: (1,000 references, seed 0) the best verification of 48 of the 59 pixelated queries that had
#: one (0.3 or more) was the candidate of most resembling frame, 54 among the first 3; at 2,000
#: references (seed 1) 3 kept 2 fewer pixelated originals at rank 1 than every one, 6 one fewer
#: (docs/benchmarks.md).
PIXELATED_DENSE = 6
#: Identifies what the thresholds apply to; stored thresholds of another method are not used.
METHOD = "vote-sift-ransac-residual-v3"


# -- thresholds ------------------------------------------------------------------------------
@dataclass
class CopyThresholds:
    """Decision thresholds of one model version (see the module docstring)."""

    model_version: str
    #: the lowest threshold (steps of 0.025) with 99% "copy" precision on both halves of two
    #: bench/copydetect.py seeds at 2,000 references (docs/benchmarks.md)
    copy: float = 0.85
    near_duplicate: float = 0.4
    #: -1: off until calibrated (on the edit benchmark, distance <= 4 as a rule on its own cut
    #: the copy verdict's precision from 0.987 to 0.966; docs/benchmarks.md)
    phash_copy: int = -1
    method: str = METHOD
    attribute: dict[str, float] = field(default_factory=dict)
    default_attribute: float = 0.8
    precision: float = 0.99
    near_precision: float = 0.90
    calibrated: bool = False
    calibrated_at: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def attribute_threshold(self, name: str) -> float:
        return self.attribute.get(name, self.default_attribute)

    def verdict(self, score: float, phash_distance: int | None) -> str:
        if score >= self.copy or (phash_distance is not None and phash_distance <= self.phash_copy):
            return COPY
        return NEAR_DUPLICATE if score >= self.near_duplicate else DISTINCT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CopyThresholds:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path, model_version: str) -> CopyThresholds:
        """The thresholds stored at ``path``, or uncalibrated defaults when there are none."""
        if not path.is_file():
            return cls(model_version=model_version)
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("model_version") != model_version or data.get("method") != METHOD:
            log.warning("thresholds in %s are for model %s (%s), not %s (%s); using defaults",
                        path, data.get("model_version"), data.get("method"), model_version, METHOD)
            return cls(model_version=model_version)
        return cls.from_dict(data)


def thresholds_path(data_dir: Path, model_version: str) -> Path:
    """Where the calibrated thresholds of ``model_version`` live."""
    return Path(data_dir) / "calibration" / f"copy_{version_tag(model_version)}.json"


# -- results ---------------------------------------------------------------------------------
@dataclass
class AttributeAgreement:
    similarity: float
    threshold: float
    agrees: bool


@dataclass
class CopyMatch:
    """One catalogue image that the query may copy, with the evidence. ``score`` is the copy
    score (the verification's score weighed against the query's other candidates; 0 when the
    candidate could not be verified), ``candidate_score`` the normalised descriptor score that
    made it a candidate (or would have, for a candidate found by keypoint voting)."""

    product_id: str
    image_id: int
    score: float
    verdict: str
    descriptor_similarity: float
    phash_distance: int | None
    attributes: dict[str, AttributeAgreement] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    source_uri: str | None = None
    candidate_score: float = 0.0
    verification: copy_evidence.Verification | None = None

    @property
    def attributes_agreeing(self) -> int:
        return sum(a.agrees for a in self.attributes.values())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["attributes_agreeing"] = self.attributes_agreeing
        return data


@dataclass
class CopyCheck:
    """The verdict for one query: the best match's verdict and score, and every match."""

    verdict: str
    score: float
    matches: list[CopyMatch]
    calibrated: bool
    model_version: str
    phash: int | None = None

    @property
    def best(self) -> CopyMatch | None:
        return self.matches[0] if self.matches else None

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "score": self.score, "calibrated": self.calibrated,
                "model_version": self.model_version,
                "phash": None if self.phash is None else f"{self.phash:016x}",
                "matches": [m.to_dict() for m in self.matches]}


# -- the checker -----------------------------------------------------------------------------
class CopyChecker(UseCase):
    """Copy checks against the indexed catalogue (see the module docstring)."""

    def __init__(
        self,
        embedder: Embedder,
        vectors: VectorStore,
        catalog: Catalog,
        *,
        settings: Settings | None = None,
        blobs: BlobStore | None = None,
        thresholds: CopyThresholds | None = None,
        features: LocalFeatureCache | None = None,
        verify_k: int = VERIFY_K,
        vote_k: int = VOTE_K,
    ) -> None:
        super().__init__(embedder, vectors, catalog, settings=settings, blobs=blobs)
        self._thresholds = thresholds
        if features is None:
            features = LocalFeatureCache(cache_root(settings.data_dir) if settings is not None else None)
        self.features = features
        self.verify_k = verify_k
        self.vote_k = vote_k

    @property
    def thresholds(self) -> CopyThresholds:
        if self._thresholds is None:
            version = self.vectors.model_version
            if self.settings is not None:
                self._thresholds = CopyThresholds.load(
                    thresholds_path(self.settings.data_dir, version), version)
            else:
                self._thresholds = CopyThresholds(model_version=version)
        return self._thresholds

    @thresholds.setter
    def thresholds(self, value: CopyThresholds) -> None:
        self._thresholds = value

    def check(self, image: ImageSource, top_k: int = 5) -> CopyCheck:
        """Check one image (path, URI, bytes or PIL image); matches best first."""
        return self.check_many([image], top_k)[0]

    def check_many(self, images: Sequence[ImageSource], top_k: int = 5) -> list[CopyCheck]:
        """Check several images with batched inference."""
        if not images:
            return []
        pil = [self.load_image(im) for im in images]
        scored = self.score_candidates(pil, max(top_k, self.verify_k))
        verified = self.verify_scored(scored)
        ids = sorted({h.image_id for cands in scored.candidates for h, _, _ in cands})
        stored = {a: self.vectors.get_vectors(a, ids) for a in self.vectors.schema.names}
        return [self._decide(q, cands, verifications, top_k, stored)
                for q, cands, verifications in zip(scored.queries, scored.candidates, verified, strict=True)]

    # -- internals shared with calibration ------------------------------------------------------
    def score_candidates(
        self, images: Sequence[Image.Image], top_k: int, exclude: Sequence[set[int]] | None = None,
    ) -> _Scored:
        """Stage 1: descriptor candidates of each image's :func:`query_views`, merged, with
        normalised scores, and local-feature voting candidates, taken alternately
        (:func:`interleave`; ``exclude``: image ids to treat as absent from the catalogue, per
        query). A query whose first descriptor candidate is a sure copy (verified here, before
        the vote: :meth:`_verify_first`) gets no voting candidates."""
        images = list(images)
        looks = [inspect_query(im) for im in images]
        views = [query_views(im, look)[1:] for im, look in zip(images, looks, strict=True)]
        encoded = self.embedder.encode([im for extra_views in views for im in extra_views] + images)
        first_view = np.cumsum([0, *map(len, views)])  # each query's extra views' first row
        extra = max(len(e) for e in exclude) if exclude else 0
        limit = max(top_k, NORM_K) + extra + top_k  # room to drop non-live rows
        raw = self.vectors.search_copy(encoded.descriptors, limit)
        base = int(first_view[-1])  # the plain queries' rows come after every extra view
        queries = [_Query(image, encoded.embeddings[base + n], phash(image), looks[n])
                   for n, image in enumerate(images)]
        thread_map(_Query.extract, queries)
        own = [[raw[base + n], *raw[first_view[n]:first_view[n + 1]]] for n in range(len(queries))]
        found = [{h.image_id for hits in hits_of_views for h in hits} for hits_of_views in own]
        infos = self.catalog.images.info(sorted(set().union(*found)))  # every query's at once
        merged = [_best_of_views(own[n], exclude[n] if exclude else set()) for n in range(len(queries))]
        hits = [sorted((h for h in best.values() if _live(infos.get(h.image_id))), key=lambda h: -h.score)
                for best in merged]
        firsts = [h[0] if h and self.verify_k > 0 else None for h in hits]
        first = self._verify_first(queries, firsts, infos)
        unsure = [n for n, known in enumerate(first)
                  if not any(is_sure(v, self.thresholds.copy) for v in known.values())]
        all_voted: list[list[int]] = [[] for _ in queries]
        for n, voted in zip(unsure, self._voted([queries[n] for n in unsure]), strict=True):
            all_voted[n] = voted
        unfound = {i for votes, ids in zip(all_voted, found, strict=True) for i in votes if i not in ids}
        # descriptors of the voted images the descriptor search did not find, for every query at once
        voted_descriptors = self.vectors.get_vectors(COPY_COLLECTION, unfound)
        infos |= self.catalog.images.info(sorted(unfound - infos.keys()))  # voted, found by no query
        candidates = []
        for n in range(len(queries)):
            skip = exclude[n] if exclude else set()
            voted = [i for i in all_voted[n] if i not in skip and _live(infos.get(i))][:self.vote_k]
            by_vote = _vote_hits(voted, merged[n], voted_descriptors, encoded.descriptors[base + n], infos)
            direct = [h for h in raw[base + n] if h.image_id in merged[n] and _live(infos.get(h.image_id))]
            background = direct[min(NORM_K, len(direct)) - 1].score if len(direct) > 1 else 0.0
            candidates.append([(h, h.score - NORM_BETA * background, infos[h.image_id])
                               for h in interleave(hits[n][:self.verify_k], by_vote, hits[n][:top_k],
                                                   _image_id)])
        return _Scored(queries, candidates, first)

    def _verify_first(
        self, queries: Sequence[_Query], firsts: Sequence[Hit | None], infos: dict[int, ImageInfo],
    ) -> list[dict[int, copy_evidence.Verification]]:
        """Stage 2 of each query's first descriptor candidate, before the keypoint vote: a query
        whose first candidate is a sure copy is not voted for (its other candidates would be
        verified only if they showed the same picture). Per query, by image id; empty where there
        is no first candidate or its image cannot be read (``infos``: catalogue images by id)."""

        def verify(n: int) -> dict[int, copy_evidence.Verification]:
            hit = firsts[n]
            if hit is None:
                return {}
            info = infos[hit.image_id]
            features = self._candidate_features(info)
            if features is None:
                return {}
            hashes = {0: stored_phash(info)}
            found = verify_in_order(queries[n].features, {0: features}, hashes,
                                    copy_threshold=self.thresholds.copy)
            return {hit.image_id: found[0]}

        return thread_map(verify, range(len(queries)))

    def _candidate_features(self, info: ImageInfo) -> copy_features.LocalFeatures | None:
        """A candidate's local features (cached by content), or None when its image is not
        stored or cannot be read."""
        if not info.source_uri:
            return None
        try:
            return self.features.get(info.sha256, lambda uri=info.source_uri: self.load_image(uri))
        except Exception as exc:  # noqa: BLE001 - an unreadable catalogue image is not verified
            log.warning("cannot verify image %d (%s): %s", info.image_id, info.source_uri, exc)
            return None

    def _voted(self, queries: Sequence[_Query]) -> list[list[int]]:
        """Per query, image ids by local-feature votes (:mod:`agman_milvus.core.copy_vote`), most
        first; every query's keypoints (extracted) go to Milvus in one search."""
        if self.vote_k <= 0 or not queries:
            return [[] for _ in queries]
        found = copy_vote.vote_many([[q.features] for q in queries], self.vectors.search_keypoints)
        return [sorted(votes, key=lambda i: -votes[i])[:2 * self.vote_k]  # room for non-live ones
                for votes in found]

    @staticmethod
    def copy_scores(
        verifications: Sequence[copy_evidence.Verification | None], infos: Sequence[ImageInfo],
    ) -> list[float]:
        """Copy scores of one query's candidates (:func:`copy_scoring.copy_scores` over their
        stored pHashes; 0 for an unverified one)."""
        verified = [i for i, v in enumerate(verifications) if v is not None]
        hashes = [stored_phash(infos[i]) for i in verified]
        out = [0.0] * len(verifications)
        scored = copy_scoring.copy_scores([verifications[i].score for i in verified], hashes,
                                         smoothed=[verifications[i].smoothed_score for i in verified],
                                         inliers=[verifications[i].inliers for i in verified])
        for i, score in zip(verified, scored, strict=True):
            out[i] = score
        return out

    def verify_candidates(
        self, query: _Query, candidates: Sequence[tuple[Hit, float, ImageInfo]], workers: int = 1,
        known: dict[int, copy_evidence.Verification] | None = None,
    ) -> list[copy_evidence.Verification | None]:
        """Stage 2 for the first ``verify_k + vote_k`` candidates (both sources' share), best-ranked
        first, ``workers`` at a time, until a sure copy (:func:`verify_in_order`); ``known``:
        verifications already made, by image id (:meth:`score_candidates` verifies each query's
        first candidate). None for a candidate past them, not verified after a sure copy, or
        whose image cannot be read."""
        query.extract()
        known = known or {}
        done = {k: known[hit.image_id] for k, (hit, _, _) in enumerate(candidates) if hit.image_id in known}
        readable: dict[int, copy_features.LocalFeatures] = {}
        for k, (_, _, info) in enumerate(candidates[:self.verify_k + self.vote_k]):
            if k not in done:
                features = self._candidate_features(info)
                if features is not None:
                    readable[k] = features
        hashes = {k: stored_phash(candidates[k][2]) for k in (*readable, *done)}
        found = verify_in_order(query.features, readable, hashes, copy_threshold=self.thresholds.copy,
                                workers=workers, known=done)
        return [found.get(k) for k in range(len(candidates))]

    def verify_scored(self, scored: _Scored) -> list[list[copy_evidence.Verification | None]]:
        """Stage 2 for every query of a batch: each query's candidates' verifications, on all
        cores (:func:`thread_map`): queries side by side, or a single query's candidates shared
        out."""
        jobs = list(zip(scored.queries, scored.candidates, scored.verified, strict=True))
        if len(jobs) == 1:
            query, candidates, known = jobs[0]
            return [self.verify_candidates(query, candidates, cpu_count(), known)]
        return thread_map(lambda job: self.verify_candidates(job[0], job[1], known=job[2]), jobs)

    def _decide(self, query: _Query, candidates: list[tuple[Hit, float, ImageInfo]],
                verifications: list[copy_evidence.Verification | None], top_k: int,
                stored: dict[str, dict[int, np.ndarray]]) -> CopyCheck:
        """The query's matches and verdict (``stored``: the candidates' attribute vectors, by
        attribute name and image id, read for the whole batch at once)."""
        t = self.thresholds
        scores = self.copy_scores(verifications, [info for _, _, info in candidates])
        matches = []
        for (hit, candidate_score, info), v, score in zip(candidates, verifications, scores, strict=True):
            stored_hash = stored_phash(info)
            distance = None if stored_hash is None else hamming(query.phash, stored_hash)
            attributes = {}
            for k, name in enumerate(self.vectors.schema.names):
                vec = stored[name].get(hit.image_id)
                if vec is None:
                    continue
                sim = float(np.dot(query.embeddings[k], vec))
                thr = t.attribute_threshold(name)
                attributes[name] = AttributeAgreement(sim, thr, sim >= thr)
            matches.append(CopyMatch(
                product_id=info.external_id, image_id=hit.image_id, score=float(score),
                verdict=t.verdict(score, distance), descriptor_similarity=float(hit.score),
                phash_distance=distance, attributes=attributes, metadata=info.metadata(),
                source_uri=info.source_uri, candidate_score=float(candidate_score), verification=v,
            ))
        matches.sort(key=lambda m: (-_RANK[m.verdict], -m.score, -m.candidate_score))
        best = matches[0] if matches else None
        return CopyCheck(verdict=best.verdict if best else DISTINCT,
                         score=best.score if best else 0.0, matches=matches[:top_k],
                         calibrated=t.calibrated, model_version=t.model_version, phash=query.phash)


def dense_alignments(
    query: copy_features.LocalFeatures, candidates: dict[int, copy_features.LocalFeatures],
    dense_few_k: int = DENSE_FEW_K,
) -> tuple[dict[int, bool], dict[int, bool]]:
    """For each candidate (by its rank in the query's candidate list): whether the dense
    alignment is tried when the keypoint fit fails, and whether when either image has few
    keypoints (:func:`copy_verify.verify_all`'s ``dense`` and ``dense_if_few``). The first
    :data:`DENSE_K` always; for a pixelated query, whose blocks defeat SIFT, also the
    :data:`PIXELATED_DENSE` others whose frames resemble the query's most
    (:func:`copy_verify.frame_correlation`, at least :data:`copy_verify.FRAME_RESEMBLES`)."""
    resembling: set[int] = set()
    if query.block > 0:
        correlation = {k: copy_verify.frame_correlation(query, c)
                       for k, c in candidates.items() if k >= DENSE_K}
        ranked = sorted((k for k, r in correlation.items() if r >= copy_verify.FRAME_RESEMBLES),
                        key=lambda k: -correlation[k])
        resembling = set(ranked[:PIXELATED_DENSE])
    dense = {k: k < DENSE_K or k in resembling for k in candidates}
    return dense, {k: wanted or k < dense_few_k for k, wanted in dense.items()}


def is_sure(verification: copy_evidence.Verification, copy_threshold: float) -> bool:
    """Whether ``verification`` shows a copy beyond doubt: a score of :data:`copy_scoring.SURE`
    and ``copy_threshold`` or more, which the other candidates cannot lower."""
    return verification.score >= max(copy_scoring.SURE, copy_threshold)


def verify_in_order(
    query: copy_features.LocalFeatures, candidates: dict[int, copy_features.LocalFeatures],
    hashes: dict[int, int | None], *, copy_threshold: float, workers: int = 1,
    dense_few_k: int = DENSE_FEW_K, known: dict[int, copy_evidence.Verification] | None = None,
) -> dict[int, copy_evidence.Verification]:
    """Stage 2 for one query: its ``candidates`` (features by rank) verified best-ranked first,
    ``workers`` at a time on one pool (the dense alignments of the best-ranked spread over
    them), until one is a copy beyond doubt (:func:`is_sure`). After it only those showing the
    same picture (``hashes``: pHashes by rank, None where unknown;
    :func:`copy_scoring.same_picture`) are verified, to be called copies too. ``known``:
    verifications of other ranks already made (a sure one among them counts). Returns the
    verifications by rank, ``known`` included."""
    dense, dense_if_few = dense_alignments(query, candidates, dense_few_k)

    def verify(k: int) -> copy_evidence.Verification:
        return copy_verify.verify_all(query, [candidates[k]], dense=[dense[k]],
                                      dense_if_few=[dense_if_few[k]])[0]

    ranks = [k for k in candidates if not known or k not in known]
    found = dict(known or {})
    sure = [hashes.get(k) for k, v in found.items() if is_sure(v, copy_threshold)]
    with thread_pool(workers) as map_items:
        for start in range(0, len(ranks), workers):
            todo = [k for k in ranks[start:start + workers]
                    if not sure or any(copy_scoring.same_picture(hashes.get(k), h) for h in sure)]
            for k, v in zip(todo, map_items(verify, todo), strict=True):
                found[k] = v
                if is_sure(v, copy_threshold):
                    sure.append(hashes.get(k))
    return found


def stored_phash(info: ImageInfo) -> int | None:
    """A catalogue image's stored pHash (unsigned), or None."""
    return from_signed64(info.phash) if info.phash is not None else None


@dataclass(frozen=True)
class QueryLook:
    """What stage 1 finds in a query before embedding it (:func:`inspect_query`)."""

    block: float = 0.0  # its pixel block (copy_features.pixel_block): 0.0 unless pixelated
    pasted: Box | None = None  # the frame of a picture pasted into it (pasted_region), None for most
    pasted_block: float = 0.0  # that picture's own pixel block: 0.0 unless it is pixelated


def inspect_query(image: Image.Image) -> QueryLook:
    """A query's pixel block (:func:`~agman_milvus.core.copy_features.pixel_block`), the frame
    of a picture pasted into it (:func:`~agman_milvus.core.pasted.pasted_region`) and that
    picture's pixel block: a picture pixelated, then pasted into a photo, leaves the photo's
    own edges off the grid."""
    grey = np.asarray(image.convert("L"))
    pasted = pasted_region(grey)
    pasted_block = 0.0
    if pasted is not None:
        left, top, right, bottom = pasted
        pasted_block = copy_features.pixel_block(grey[top:bottom, left:right])
    return QueryLook(copy_features.pixel_block(grey), pasted, pasted_block)


def query_views(image: Image.Image, look: QueryLook = QueryLook()) -> list[Image.Image]:
    """The query and the extra views stage 1 searches with: its mirror image and a smoothed
    copy, blurred (radius 1/75 of the longer side) or, for a pixelated query (``look.block``),
    its blocks scaled down to one pixel each and back up smoothly. A pixelated query's blocks
    otherwise dominate its descriptor: on 400 catalogue photos, true original in the top 10 for
    43% of pixelated queries plain, 75% blurred; on the 53 pixelated queries of
    bench/copydetect.py whose blocks are detected, 57% blurred, 72% with the blocks scaled away
    (docs/benchmarks.md). A query that frames a pasted picture (``look.pasted``) adds that
    picture alone, whose descriptor the surroundings no longer swamp (its blocks scaled away
    too when it is pixelated)."""
    image = image.convert("RGB")
    views = [image, ImageOps.mirror(image), unpixelate(image, look.block) if look.block else blurred(image)]
    if look.pasted is None:
        return views
    picture = image.crop(look.pasted)
    return [*views, unpixelate(picture, look.pasted_block) if look.pasted_block else picture]


def blurred(image: Image.Image) -> Image.Image:
    """``image`` blurred with a radius of 1/75 of its longer side."""
    return image.filter(ImageFilter.GaussianBlur(max(1.0, max(image.size) / 75)))


def unpixelate(image: Image.Image, block: float) -> Image.Image:
    """A pixelated ``image`` with blocks of ``block`` pixels, smoothed: each block averaged to
    one pixel, then scaled back up bicubically."""
    w, h = image.size
    small = (max(1, round(w / block)), max(1, round(h / block)))
    return image.resize(small, Image.Resampling.BOX).resize((w, h), Image.Resampling.BICUBIC)


def _image_id(hit: Hit) -> int:
    return hit.image_id


def _live(info: ImageInfo | None) -> bool:
    return info is not None and info.status == ImageStatus.indexed and not info.product_deleted


@dataclass
class _Query:
    image: Image.Image
    embeddings: np.ndarray  # [K, D]
    phash: int
    look: QueryLook
    features: copy_features.LocalFeatures | None = None

    def extract(self) -> None:
        """Compute the query's local features (once; its mirror image's when first needed)."""
        if self.features is None:
            look = self.look
            self.features = copy_features.extract(self.image, look.block, look.pasted, look.pasted_block)


def _best_of_views(hits_of_views: Sequence[list[Hit]], skip: set[int]) -> dict[int, Hit]:
    """A query's descriptor hits over its views, each image once with its best score, but those
    in ``skip``."""
    best: dict[int, Hit] = {}
    for h in (h for hits in hits_of_views for h in hits):
        if h.image_id not in skip and (h.image_id not in best or h.score > best[h.image_id].score):
            best[h.image_id] = h
    return best


def _vote_hits(voted: list[int], known: dict[int, Hit], stored: dict[int, np.ndarray],
               descriptor: np.ndarray, infos: dict[int, ImageInfo]) -> list[Hit]:
    """Hits for voted images: the descriptor search's (``known``), else one with the stored
    descriptor's similarity to the query's."""
    out = []
    for image_id in voted:
        if image_id in known:
            out.append(known[image_id])
        elif image_id in stored:
            out.append(Hit(image_id, infos[image_id].product_id, float(np.dot(descriptor, stored[image_id]))))
    return out


def interleave(first: Sequence[T], second: Sequence[T], rest: Sequence[T],
               key: Callable[[T], Hashable]) -> list[T]:
    """Stage 1's candidate order: ``first`` and ``second`` alternately, then ``rest``; each
    ``key`` (image) once."""
    out: dict[Hashable, T] = {}
    for pair in zip_longest(first, second):
        for item in pair:
            if item is not None:
                out.setdefault(key(item), item)
    for item in rest:
        out.setdefault(key(item), item)
    return list(out.values())


@dataclass
class _Scored:
    queries: list[_Query]
    candidates: list[list[tuple[Hit, float, ImageInfo]]]
    #: each query's verifications made in stage 1 (its first candidate's), by image id
    verified: list[dict[int, copy_evidence.Verification]]
