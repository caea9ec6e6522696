"""Similar-case retrieval: a FAISS index over the embeddings of a labelled collection, search, evaluation.

A :class:`CaseIndex` holds one unit-norm embedding per case (rows are L2-normalised on the way in, so the
inner product is the cosine similarity) and, per case, its id, its image files (absolute paths, one per
channel) and its multi-hot findings vector over the index's finding names. Two kinds of index:

* ``exact`` (default): ``faiss.IndexFlatIP``, brute force, exact. Right up to a few hundred thousand cases.
* ``ivfpq`` (``approximate=True``): ``faiss.IndexIVFPQ`` (inverted lists over an ``IndexFlatIP`` coarse
  quantizer, inner-product metric, product-quantised codes of 8 bits per sub-vector). It is trained on the
  first cases added: ``nlist = round(4 * sqrt(N))`` lists, capped at ``N // 39`` so k-means has at least 39
  training points per list; ``m`` sub-quantizers, the largest divisor of the dimension that is at most 64
  and leaves at least 4 dimensions per sub-vector; ``nprobe`` (lists visited per query) defaults to
  ``max(1, round(sqrt(nlist)))`` and can be changed (:attr:`CaseIndex.nprobe`). It needs at least 256
  cases (one 8-bit codebook has 256 centroids), otherwise the exact index is the right choice anyway.
  The raw vectors are kept as well (``vectors.npy``), so an approximate index can be evaluated and
  retrained, and its searches are refined: a search for k hits takes the ``refine * k`` (default 4k) best
  candidates of the quantized search and re-ranks them by their exact cosine, so ``ivfpq`` scores are true
  cosines. Its recall@10 against exact search (this refined search) is measured on up to 1000 of its own
  vectors as queries after every :meth:`CaseIndex.add` and stored in the metadata. Cases added after
  training are encoded with the codebooks of the first build: after adding many, build a new index.

On disk an index is a folder (see :meth:`CaseIndex.save`): ``index.faiss`` (``faiss.write_index``),
``cases.json`` (the records), ``meta.json`` (kind, dimension, finding names, model folder and its weights'
SHA-256, grid, recall, irisseg version) and, for ``ivfpq``, ``vectors.npy`` (float32 (N, E)). No pickle.

:func:`build_index` embeds every case of an nnU-Net-style collection (:func:`irisseg.data.findings.load_findings`)
with an :class:`~irisseg.models.embedding.EmbeddingNet` and builds or extends an index folder;
:func:`search_cases` embeds a query image and searches; :func:`evaluate_index` scores the index with
:func:`irisseg.metrics.retrieval_metrics` (leave-one-out over its own cases, or with a query collection).

The retrieval grid: the network sees every image resampled to a fixed grid (D, H, W), read from the model's
config, ``extra["retrieval"]["grid"]`` (written by the retrieval trainer), or (64, 64, 64) when the model
has none (:func:`model_grid`). The grid is stored in the index metadata and used for every query.

Usage::

    index = build_index("runs/retrieval", "Dataset001_Chest", "chest_index")      # embeds, saves
    hits = search_cases(index, None, [read_volume("query_0000.nii.gz")], k=10)[0]
    print(hits[0].case_id, hits[0].score, hits[0].findings)
    print(evaluate_index(index)["map@10"])
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from irisseg.errors import InputError

__all__ = [
    "Hit", "CaseIndex", "build_index", "search_cases", "select_supports", "evaluate_index", "embed_cases",
    "load_embedding_model", "resolve_model_folder", "model_grid", "query_model", "check_index_target",
    "INDEX_FILE", "CASES_FILE", "META_FILE", "VECTORS_FILE", "DEFAULT_GRID", "MIN_APPROXIMATE_CASES",
]

INDEX_FILE = "index.faiss"
CASES_FILE = "cases.json"
META_FILE = "meta.json"
VECTORS_FILE = "vectors.npy"
#: Value of ``meta.json``'s ``format`` entry.
FORMAT = "irisseg-case-index"
FORMAT_VERSION = 1
#: Retrieval grid (D, H, W) of a model whose config names none.
DEFAULT_GRID = (64, 64, 64)
#: Bits per product-quantizer code of the ``ivfpq`` index.
PQ_BITS = 8
#: Fewest cases an ``ivfpq`` index can be trained on (one codebook has ``2 ** PQ_BITS`` centroids).
MIN_APPROXIMATE_CASES = 2 ** PQ_BITS
#: ``ivfpq`` searches re-rank this many times k quantized candidates by their exact cosine.
REFINE = 4
#: At most this many of the index's own vectors are the queries of the recall@10 measurement.
RECALL_QUERIES = 1000


def _faiss():
    try:
        import faiss
    except ImportError:
        raise InputError("similar-case retrieval needs FAISS: pip install 'irisseg[retrieval]' "
                         "(the faiss-cpu package)") from None
    return faiss


@dataclass
class Hit:
    """One retrieved case.

    Attributes:
      case_id (str): the case's id in the index.
      score (float): cosine similarity of the query and the case's embedding (in [-1, 1]).
      rank (int): 1 for the nearest case.
      paths (list[str]): the case's image files, absolute, in channel order.
      findings (list[str]): the names of the case's findings.
      mask (str | None): the case's label map (absolute), None when the index has none for it.
    """

    case_id: str
    score: float
    rank: int
    paths: list[str]
    findings: list[str]
    mask: str | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------------------
def _as_unit_rows(x, dim: int, what: str) -> np.ndarray:
    """(n, dim) float32 C-contiguous rows of unit L2 norm; InputError for wrong shapes, NaN or zero rows."""
    try:
        a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float32)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a numeric (n, {dim}) array") from None
    if a.ndim == 1 and a.shape[0] == dim:
        a = a[None]
    if a.ndim != 2 or a.shape[1] != dim:
        raise InputError(f"{what} must be an (n, {dim}) array (the index's dimension is {dim}), "
                         f"got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{what} hold NaN or infinite values")
    norms = np.sqrt(np.einsum("ij,ij->i", a, a, dtype=np.float64))
    if np.any(norms == 0):
        raise InputError(f"{what}: row(s) {', '.join(map(str, np.flatnonzero(norms == 0)[:5]))} are all zero "
                         f"(no direction to compare)")
    return np.ascontiguousarray(a / norms[:, None].astype(np.float32), dtype=np.float32)


def _as_paths(item, i: int) -> list[str]:
    if isinstance(item, (str, os.PathLike)):
        item = [item]
    try:
        paths = [os.path.abspath(os.fspath(p)) for p in item]
    except TypeError:
        raise InputError(f"paths[{i}] must be a file path or a list of them (one per channel)") from None
    if not paths:
        raise InputError(f"paths[{i}] is empty: give the case's image file(s)")
    return paths


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pq_m(dim: int) -> int:
    """Sub-quantizers of the ``ivfpq`` index: the largest divisor of ``dim`` that is <= 64 and leaves >= 4 dims."""
    good = [m for m in range(1, min(64, dim) + 1) if dim % m == 0 and dim // m >= 4]
    return max(good) if good else 1


def _nlist_for(n: int) -> int:
    """Inverted lists of an ``ivfpq`` index trained on ``n`` vectors: ``round(4 sqrt(n))``, at most ``n // 39``."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // 39))


# ---------------------------------------------------------------------------------------------------------
# the index
# ---------------------------------------------------------------------------------------------------------
class CaseIndex:
    """A FAISS index over unit-norm case embeddings with one record per case (id, image files, findings).

    Arguments:
      dim (int): embedding dimension E.
      names (Sequence[str]): the L finding names (the columns of every label vector).
      approximate (bool): False: exact ``IndexFlatIP``; True: ``IndexIVFPQ``, trained by the first
        :meth:`add` (at least :data:`MIN_APPROXIMATE_CASES` cases), see the module docstring.
      nprobe (int | None): ``ivfpq`` only: inverted lists visited per query (None: ``round(sqrt(nlist))``).
      nlist (int | None): ``ivfpq`` only: override the number of inverted lists (None: from N, as above).
      m (int | None): ``ivfpq`` only: override the number of sub-quantizers (must divide ``dim``).
      refine (int): ``ivfpq`` only: a search for k hits takes the ``refine * k`` best candidates of the
        quantized search and re-ranks them by their exact cosine (from the stored raw vectors).
      model_info (dict | None): where the embeddings come from, saved in ``meta.json``: ``model`` (the model
        folder), ``model_sha256`` (of its weights), ``grid`` ([D, H, W]), ``in_channels``. :func:`build_index`
        fills it; an index built from arbitrary vectors may leave it empty.

    Attributes:
      kind (str): ``"exact"`` or ``"ivfpq"``.
      case_ids (list[str]), paths (list[list[str]]), labels (np.ndarray (N, L) uint8), masks
        (list[str | None]: label map files, absolute): the records, in the order the cases were added
        (FAISS id ``i`` is record ``i``).
      label_values (dict[str, int]): finding name -> its id in the records' label maps (the findings whose
        masks can serve as supports, :func:`select_supports`).
      recall_at_10 (float | None): ``ivfpq``: the measured recall@10 against exact search (None for exact).
    """

    def __init__(self, dim: int, names: Sequence[str], approximate: bool = False, nprobe: int | None = None,
                 nlist: int | None = None, m: int | None = None, refine: int = REFINE,
                 model_info: dict | None = None):
        if int(dim) != dim or int(dim) < 1:
            raise InputError(f"dim must be a positive integer, got {dim}")
        self.dim = int(dim)
        self.names = [str(n) for n in names]
        if len(set(self.names)) != len(self.names):
            raise InputError(f"finding names must be distinct, got {self.names}")
        self.kind = "ivfpq" if approximate else "exact"
        if m is not None and (int(m) < 1 or self.dim % int(m)):
            raise InputError(f"m (sub-quantizers) must divide the dimension {self.dim}, got {m}")
        if nlist is not None and int(nlist) < 1:
            raise InputError(f"nlist must be at least 1, got {nlist}")
        self._m = int(m) if m is not None else None
        self._nlist = int(nlist) if nlist is not None else None
        self._nprobe = None
        if nprobe is not None:
            if self.kind == "exact":
                raise InputError("nprobe applies to an approximate (IVF-PQ) index, not to the exact one")
            self._nprobe = self._check_nprobe(nprobe)
        self.model_info = dict(model_info or {})
        self.case_ids: list[str] = []
        self.paths: list[list[str]] = []
        self.masks: list[str | None] = []
        self.label_values: dict[str, int] = {}
        self.labels = np.zeros((0, len(self.names)), dtype=np.uint8)
        self._position: dict[str, int] = {}
        self._vectors = np.zeros((0, self.dim), dtype=np.float32) if self.kind == "ivfpq" else None
        if isinstance(refine, bool) or int(refine) != refine or int(refine) < 1:
            raise InputError(f"refine must be a positive integer, got {refine}")
        self.refine = int(refine)
        self.recall_at_10: float | None = None
        self.recall_nprobe: int | None = None
        self.recall_queries: int = 0
        self.build_info: dict = {}
        self._index = _faiss().IndexFlatIP(self.dim) if self.kind == "exact" else None

    # -- basic properties ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.case_ids)

    def __contains__(self, case_id: str) -> bool:
        return case_id in self._position

    def __repr__(self) -> str:
        extra = f", nlist={self.nlist}, m={self.m}, nprobe={self.nprobe}" if self.kind == "ivfpq" else ""
        return f"CaseIndex(kind={self.kind!r}, cases={len(self)}, dim={self.dim}{extra})"

    @property
    def faiss_index(self):
        """The underlying FAISS index (None for an ``ivfpq`` index before its first :meth:`add`)."""
        return self._index

    @property
    def nlist(self) -> int | None:
        """``ivfpq``: the number of inverted lists (None before training or for exact)."""
        return None if self.kind == "exact" or self._index is None else int(self._ivf().nlist)

    @property
    def m(self) -> int | None:
        """``ivfpq``: the number of sub-quantizers (None before training or for exact)."""
        return None if self.kind == "exact" or self._index is None else int(self._ivf().pq.M)

    @property
    def nprobe(self) -> int | None:
        """``ivfpq``: inverted lists visited per query (settable, clamped to ``nlist``; None for an exact index)."""
        if self.kind == "exact":
            return None
        return int(self._ivf().nprobe) if self._index is not None else self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self.kind == "exact":
            raise InputError("nprobe applies to an approximate (IVF-PQ) index, not to the exact one")
        self._nprobe = self._check_nprobe(value)
        if self._index is not None:
            self._ivf().nprobe = min(self._nprobe, int(self._ivf().nlist))

    @staticmethod
    def _check_nprobe(value) -> int:
        if isinstance(value, bool) or int(value) != value or int(value) < 1:
            raise InputError(f"nprobe must be a positive integer, got {value}")
        return int(value)

    def _ivf(self):
        return _faiss().downcast_index(self._index)

    def vectors(self) -> np.ndarray:
        """The stored embeddings, (N, E) float32 unit rows in record order (a copy)."""
        if self.kind == "ivfpq":
            return self._vectors.copy()
        if not len(self):
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._index.reconstruct_n(0, len(self))

    def findings_of(self, i: int) -> list[str]:
        """The names of record i's findings."""
        return [n for n, v in zip(self.names, self.labels[i]) if v]

    # -- adding --------------------------------------------------------------------------------------------
    def add(self, embeddings, case_ids: Sequence[str], paths: Sequence, labels, names: Sequence[str] | None = None,
            masks: Sequence | None = None, label_values: dict[str, int] | None = None) -> None:
        """Add cases (all or nothing: every check runs before anything changes).

        Arguments:
          embeddings (np.ndarray | torch.Tensor): (n, E) embeddings (L2-normalised here; zero rows refused).
          case_ids (Sequence[str]): n ids, distinct and not yet in the index.
          paths (Sequence): per case its image file(s): a path or a list of paths (channel order); stored
            as absolute strings.
          labels (np.ndarray): (n, L) binary (0/1 or bool) findings over :attr:`names`.
          names (Sequence[str] | None): the finding names of ``labels``; when given they must equal the
            index's (same names, same order).
          masks (Sequence | None): n label map files (or None entries), stored as absolute strings.
          label_values (dict[str, int] | None): finding name -> id in the label maps; merged into
            :attr:`label_values` (a name already there must keep its id).

        Raises:
          InputError: shapes that do not fit, non-binary labels, ids already present or repeated, other
            finding names, or the first add of an ``ivfpq`` index with fewer than
            :data:`MIN_APPROXIMATE_CASES` cases.
        """
        vectors = _as_unit_rows(embeddings, self.dim, "embeddings")
        n = vectors.shape[0]
        ids = [str(c) for c in case_ids]
        if len(ids) != n:
            raise InputError(f"got {n} embeddings but {len(ids)} case ids")
        repeated = sorted(c for c, times in Counter(ids).items() if times > 1)
        if repeated:
            raise InputError(f"case id(s) given twice: {', '.join(repeated[:5])}")
        present = [c for c in ids if c in self._position]
        if present:
            more = f" and {len(present) - 5} more" if len(present) > 5 else ""
            raise InputError(f"case id(s) already in the index: {', '.join(present[:5])}{more} "
                             f"(ids must be new; remove them from the input or give them another id)")
        paths = list(paths)
        if len(paths) != n:
            raise InputError(f"got {n} embeddings but {len(paths)} path entries")
        paths = [_as_paths(p, i) for i, p in enumerate(paths)]
        if names is not None and [str(x) for x in names] != self.names:
            raise InputError(f"finding names {list(names)} differ from the index's {self.names}")
        lab = np.asarray(labels)
        if lab.shape != (n, len(self.names)):
            raise InputError(f"labels must be an (n, L) = ({n}, {len(self.names)}) array, got shape {lab.shape}")
        if lab.size and not np.isin(lab, (0, 1)).all():
            raise InputError("labels must be binary (0/1 or bool)")
        lab = lab.astype(np.uint8)
        masks = [None] * n if masks is None else [None if m is None else os.path.abspath(m) for m in masks]
        if len(masks) != n:
            raise InputError(f"got {n} embeddings but {len(masks)} mask entries")
        values = {str(k): int(v) for k, v in (label_values or {}).items()}
        unknown = sorted(set(values) - set(self.names))
        if unknown:
            raise InputError(f"label_values name(s) {', '.join(unknown)} that are not findings of the index")
        changed = sorted(k for k, v in values.items() if self.label_values.get(k, v) != v)
        if changed:
            raise InputError(f"label id of {', '.join(changed)} differs from the index's "
                             f"({', '.join(f'{k}={self.label_values[k]}' for k in changed)})")
        if n == 0:
            return
        if self.kind == "ivfpq" and self._index is None:
            self._train(vectors)
        self._index.add(vectors)
        if self._vectors is not None:
            self._vectors = np.concatenate([self._vectors, vectors])
        start = len(self.case_ids)
        self.case_ids.extend(ids)
        self.paths.extend(paths)
        self.masks.extend(masks)
        self.label_values.update(values)
        self.labels = np.concatenate([self.labels, lab])
        self._position.update({c: start + i for i, c in enumerate(ids)})
        if self.kind == "ivfpq":
            self.measure_recall()

    def _train(self, vectors: np.ndarray) -> None:
        faiss = _faiss()
        n = vectors.shape[0]
        _check_trainable(n)
        nlist = min(self._nlist or _nlist_for(n), n)
        m = self._m or _pq_m(self.dim)
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFPQ(quantizer, self.dim, nlist, m, PQ_BITS, faiss.METRIC_INNER_PRODUCT)
        # fewer than 39 points per centroid is allowed on purpose (small collections): no warning on stderr
        index.cp.min_points_per_centroid = 1
        index.pq.cp.min_points_per_centroid = 1
        index.train(vectors)
        index.nprobe = min(self._nprobe or max(1, int(round(math.sqrt(nlist)))), nlist)
        self._quantizer = quantizer  # the IVF index refers to it: keep it alive as long as the index
        self._index = index

    def measure_recall(self, n_queries: int = RECALL_QUERIES, k: int = 10, seed: int = 0) -> float | None:
        """Recall@k of the ``ivfpq`` index against exact search, on up to ``n_queries`` of its own vectors.

        Recall of one query = |approximate top k ∩ exact top k| / k (the query vector itself is in the index,
        as it would be for a leave-one-out search of a stored case); the mean is stored in
        :attr:`recall_at_10` (with the ``nprobe`` it was measured at) and returned. None for an exact index.
        """
        if self.kind == "exact" or not len(self):
            return None
        faiss = _faiss()
        n = len(self)
        kk = min(int(k), n)
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, size=min(int(n_queries), n), replace=False))
        queries = np.ascontiguousarray(self._vectors[rows])
        _, exact = faiss.knn(queries, self._vectors, kk, metric=faiss.METRIC_INNER_PRODUCT)
        approx = self._search_positions(queries, kk, [set() for _ in range(len(rows))])
        hits = [len(set(a.tolist()) & set(e.tolist())) for (a, _), e in zip(approx, exact)]
        self.recall_at_10 = float(np.mean(hits) / kk)
        self.recall_nprobe = self.nprobe
        self.recall_queries = len(rows)
        return self.recall_at_10

    # -- searching -----------------------------------------------------------------------------------------
    def _exclusions(self, exclude, n_queries: int) -> list[set[int]]:
        if exclude is None:
            return [set() for _ in range(n_queries)]
        exclude = list(exclude) if not isinstance(exclude, str) else [exclude]
        if all(isinstance(e, str) for e in exclude):  # one list of ids for every query
            common = {self._position[c] for c in exclude if c in self._position}
            return [common for _ in range(n_queries)]
        if len(exclude) != n_queries:
            raise InputError(f"exclude: give one list of case ids for every query ({n_queries}), "
                             f"or one list for all, got {len(exclude)} entries")
        out = []
        for e in exclude:
            e = [] if e is None else [e] if isinstance(e, str) else list(e)
            out.append({self._position[c] for c in e if c in self._position})
        return out

    def _search_positions(self, queries: np.ndarray, k: int, exclude: list[set[int]]
                          ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query (positions, scores) of its k best records (fewer when the gallery or the probed lists
        hold fewer), best first; ties by smaller position. ``ivfpq``: the ``refine * k`` best candidates of
        the quantized search are re-scored exactly with the stored vectors and the k best kept."""
        n = len(self)
        if n == 0 or k < 1:
            return [(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in range(len(queries))]
        fetch = k * self.refine if self.kind == "ivfpq" else k
        kk = min(n, fetch + max((len(e) for e in exclude), default=0))
        scores, ids = self._index.search(queries, kk)
        out = []
        for q in range(len(queries)):
            keep = [j for j, i in enumerate(ids[q]) if i >= 0 and int(i) not in exclude[q]]
            pos = ids[q, keep].astype(np.int64)
            if self.kind == "ivfpq":
                sc = (self._vectors[pos] @ queries[q]).astype(np.float32)
            else:
                sc = scores[q, keep].astype(np.float32)
            order = np.lexsort((pos, -sc))[:k]
            out.append((pos[order], sc[order]))
        return out

    def search(self, query_embeddings, k: int = 10, exclude=None) -> list[list[Hit]]:
        """The k nearest cases of each query embedding.

        Arguments:
          query_embeddings (np.ndarray | torch.Tensor): (Q, E) or (E,) embeddings (L2-normalised here).
          k (int): hits per query (>= 1); fewer come back when the index holds fewer cases (after
            exclusions), or, for ``ivfpq``, when the probed lists hold fewer.
          exclude: case ids never returned: a list of ids for every query (e.g. ``["case_0003"]``), or one
            list (or None) per query. Ids that are not in the index are ignored.

        Returns:
          list[list[Hit]]: Q lists of hits, best first (rank 1 = largest cosine; ties by insertion order).

        Raises:
          InputError: mis-shaped or non-finite queries, ``k < 1``, or a per-query ``exclude`` of the wrong length.
        """
        if isinstance(k, bool) or int(k) != k or int(k) < 1:
            raise InputError(f"k must be a positive integer, got {k}")
        queries = _as_unit_rows(query_embeddings, self.dim, "query embeddings")
        results = self._search_positions(queries, int(k), self._exclusions(exclude, len(queries)))
        return [[Hit(self.case_ids[p], float(s), r + 1, list(self.paths[p]), self.findings_of(p), self.masks[p])
                 for r, (p, s) in enumerate(zip(pos, sc))] for pos, sc in results]

    # -- persistence ---------------------------------------------------------------------------------------
    def metadata(self) -> dict:
        """What ``meta.json`` holds."""
        from irisseg import __version__

        info = self.model_info
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "dim": self.dim,
            "n_cases": len(self),
            "names": list(self.names),
            "label_values": dict(self.label_values),
            "model": info.get("model"),
            "model_sha256": info.get("model_sha256"),
            "grid": info.get("grid"),
            "in_channels": info.get("in_channels"),
            "metric": "inner product of unit vectors (cosine)",
            "nlist": self.nlist,
            "m": self.m,
            "nbits": PQ_BITS if self.kind == "ivfpq" else None,
            "nprobe": self.nprobe,
            "refine": self.refine if self.kind == "ivfpq" else None,
            "recall_at_10": self.recall_at_10,
            "recall_nprobe": self.recall_nprobe,
            "recall_queries": self.recall_queries if self.kind == "ivfpq" else None,
            "irisseg_version": __version__,
        }

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the index folder atomically: files go to a staging folder beside it, then it is renamed.

        Files: ``index.faiss``, ``cases.json`` (``{"cases": [{"case_id", "paths", "labels", "mask"}]}``),
        ``meta.json`` (:meth:`metadata`) and, for ``ivfpq``, ``vectors.npy``. An existing index folder is
        replaced (moved aside, the new one renamed in, the old one deleted); any other existing non-empty
        folder, or a file, is refused.

        Returns:
          Path: ``folder``.

        Raises:
          InputError: an empty ``ivfpq`` index (never trained), or ``folder`` is a file or a non-empty
            folder that is not a case index.
        """
        faiss = _faiss()
        folder = Path(folder)
        if self._index is None:
            raise InputError("the approximate index holds no case yet (it is trained by its first add): "
                             "nothing to save")
        check_index_target(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.staging-", dir=folder.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the index gets ordinary permissions
        old = None
        try:
            faiss.write_index(self._index, str(staging / INDEX_FILE))
            if self.kind == "ivfpq":
                np.save(staging / VECTORS_FILE, self._vectors, allow_pickle=False)
            records = [{"case_id": c, "paths": p, "labels": lab.tolist(), "mask": m}
                       for c, p, lab, m in zip(self.case_ids, self.paths, self.labels, self.masks)]
            (staging / CASES_FILE).write_text(json.dumps({"cases": records}))
            (staging / META_FILE).write_text(json.dumps(self.metadata(), indent=2))
            if folder.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
                os.replace(folder, old / "index")
            os.replace(staging, folder)
        except BaseException:
            if old is not None and not folder.exists():
                os.replace(old / "index", folder)  # put the previous index back
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> CaseIndex:
        """Read an index folder written by :meth:`save` (no pickle: JSON, ``np.load(allow_pickle=False)``).

        Raises:
          InputError: one line: no such folder, a file missing, unreadable or inconsistent files.
        """
        faiss = _faiss()
        folder = Path(folder)
        if not folder.exists():
            raise InputError(f"{folder}: no such index folder")
        needed = [INDEX_FILE, CASES_FILE, META_FILE]
        missing = [f for f in needed if not (folder / f).is_file()] if folder.is_dir() else needed
        if missing:
            raise InputError(f"{folder}: not a case index ({', '.join(missing)} missing; build one with "
                             f"'irisseg retrieval index')")
        meta = _read_json(folder / META_FILE)
        if meta.get("format") != FORMAT or meta.get("kind") not in ("exact", "ivfpq"):
            raise InputError(f"{folder / META_FILE}: not the metadata of an irisseg case index")
        records = _read_json(folder / CASES_FILE).get("cases")
        try:
            dim, names = int(meta["dim"]), [str(n) for n in meta["names"]]
            ids = [str(r["case_id"]) for r in records]
            paths = [[str(p) for p in r["paths"]] for r in records]
            labels = np.array([r["labels"] for r in records], dtype=np.int64).reshape(len(records), len(names))
            masks = [None if r.get("mask") is None else str(r["mask"]) for r in records]
            label_values = {str(k): int(v) for k, v in (meta.get("label_values") or {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            raise InputError(f"{folder}: {CASES_FILE} or {META_FILE} lacks entries or holds wrong values") from None
        try:
            index = faiss.read_index(str(folder / INDEX_FILE))
        except Exception as exc:  # FAISS raises RuntimeError with a multi-line C++ message
            raise InputError(f"{folder / INDEX_FILE}: unreadable FAISS index "
                             f"({' '.join(str(exc).split())[:160]})") from None
        kind = meta["kind"]
        expected = "IndexFlat" if kind == "exact" else "IndexIVFPQ"
        if (type(index).__name__ not in (expected, expected + "IP") or index.d != dim
                or index.metric_type != faiss.METRIC_INNER_PRODUCT):
            raise InputError(f"{folder / INDEX_FILE}: expected a {kind} inner-product index of dimension {dim}, "
                             f"found {type(index).__name__} of dimension {index.d}")
        if index.ntotal != len(records) or len(set(ids)) != len(ids) or not np.isin(labels, (0, 1)).all():
            raise InputError(f"{folder}: {INDEX_FILE} holds {index.ntotal} vectors but {CASES_FILE} "
                             f"{len(records)} cases, or the records are invalid (rebuild the index)")
        refine = meta.get("refine") or REFINE
        if isinstance(refine, bool) or not isinstance(refine, int) or refine < 1:
            raise InputError(f"{folder / META_FILE}: refine must be a positive integer, got {refine!r}")
        out = cls(dim, names, approximate=kind == "ivfpq", refine=refine,
                  model_info={k: meta.get(k) for k in ("model", "model_sha256", "grid", "in_channels")})
        out._index = index
        if kind == "ivfpq":
            try:
                vectors = np.load(folder / VECTORS_FILE, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise InputError(f"{folder / VECTORS_FILE}: unreadable ({' '.join(str(exc).split())[:160]})"
                                 ) from None
            if vectors.shape != (len(records), dim) or vectors.dtype != np.float32:
                raise InputError(f"{folder / VECTORS_FILE}: expected float32 ({len(records)}, {dim}) vectors, "
                                 f"got {vectors.dtype} {vectors.shape}")
            out._vectors = vectors
            out._nprobe = int(index.nprobe)
            out.recall_at_10 = meta.get("recall_at_10")
            out.recall_nprobe = meta.get("recall_nprobe")
            out.recall_queries = int(meta.get("recall_queries") or 0)
        out.case_ids, out.paths, out.labels = ids, paths, labels.astype(np.uint8)
        out.masks, out.label_values = masks, {k: v for k, v in label_values.items() if k in names}
        out._position = {c: i for i, c in enumerate(ids)}
        return out


def _check_trainable(n: int) -> None:
    if n < MIN_APPROXIMATE_CASES:
        raise InputError(f"an approximate (IVF-PQ) index needs at least {MIN_APPROXIMATE_CASES} cases to train "
                         f"its quantizers, got {n}: use the exact index (drop --approximate / approximate=True), "
                         f"which is also fast at this size")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable JSON ({' '.join(str(exc).split())[:160]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: unreadable (not a JSON object)")
    return data


def check_index_target(folder: str | os.PathLike) -> None:
    """Refuse to write an index over a file or over a non-empty folder that is not a case index.

    Raises:
      InputError: naming ``folder`` and the problem.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a folder (an index is written as a folder)")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / META_FILE).is_file():
        raise InputError(f"{folder}: a non-empty folder that is not a case index: refusing to overwrite it")


# ---------------------------------------------------------------------------------------------------------
# models and embeddings
# ---------------------------------------------------------------------------------------------------------
def resolve_model_folder(path: str | os.PathLike) -> Path:
    """The embedding model folder: ``path`` itself when it holds ``config.json``, else a run folder's ``path/best``.

    Raises:
      InputError: no such folder, or no model in it.
    """
    path = Path(path)
    for folder in (path, path / "best"):
        if (folder / "config.json").is_file():
            return folder
    if not path.exists():
        raise InputError(f"{path}: no such model folder")
    raise InputError(f"{path}: no embedding model here (expected config.json + model.safetensors, "
                     f"or a training run folder with best/)")


def load_embedding_model(path: str | os.PathLike):
    """``(EmbeddingNet, model folder, weights SHA-256)`` for a model folder or a training run folder (``best/``).

    Raises:
      InputError: no model there, not an embedding network, or unloadable weights.
    """
    from irisseg.models.embedding import EmbeddingNet

    folder = resolve_model_folder(path)
    net = EmbeddingNet.load(folder)
    return net, folder, _sha256(folder / "model.safetensors")


def model_grid(model) -> tuple[int, int, int]:
    """The retrieval grid (D, H, W) of a model: ``config.extra["retrieval"]["grid"]``, else :data:`DEFAULT_GRID`.

    Raises:
      InputError: the config names a grid that is not three positive integers.
    """
    extra = getattr(model.config, "extra", None) or {}
    grid = (extra.get("retrieval") or {}).get("grid") if isinstance(extra, dict) else None
    if grid is None:
        return DEFAULT_GRID
    try:
        out = tuple(int(s) for s in grid)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or min(out) < 1:
        raise InputError(f"the model's retrieval grid must be three positive sizes (D, H, W), got {grid}")
    return out


def _resolve_device(device):
    from irisseg.incontext import resolve_device

    return resolve_device(device)


def _model_input(channels, grid, name: str, in_channels: int) -> np.ndarray:
    from irisseg.data.findings import retrieval_input

    if len(channels) != in_channels:
        raise InputError(f"{name}: the model takes {in_channels} channel(s), got {len(channels)} image file(s)")
    x = retrieval_input(channels, grid)
    if not np.all(np.isfinite(x)):
        raise InputError(f"{name}: the image holds NaN or infinite values after normalisation")
    return x


def embed_cases(model, image_paths: Sequence[Sequence], grid: Sequence[int], batch_size: int = 8,
                device="cpu") -> np.ndarray:
    """Embed cases given by their channel files, ``batch_size`` cases at a time (memory holds one batch).

    Arguments:
      model (EmbeddingNet): the network.
      image_paths (Sequence[Sequence[str | Path]]): N cases, each its channel files in channel order.
      grid (Sequence[int]): the retrieval grid (D, H, W).
      batch_size (int): cases read and embedded together.
      device: ``"cpu"``, ``"cuda"`` or ``"auto"``.

    Returns:
      np.ndarray: (N, E) float32 unit rows.

    Raises:
      InputError: a missing or corrupt file (named), a case with the wrong number of channels, NaN images.
    """
    from irisseg.io import read_volume
    from irisseg.models.embedding import embed

    if int(batch_size) < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    device = _resolve_device(device)
    in_channels = int(model.config.in_channels)
    out = [np.zeros((0, model.config.embedding_dim), dtype=np.float32)]
    for start in range(0, len(image_paths), int(batch_size)):
        batch = [_model_input([read_volume(p) for p in paths], grid, str(paths[0]), in_channels)
                 for paths in image_paths[start:start + int(batch_size)]]
        out.append(embed(model, batch, batch_size=len(batch), device=device))
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------------------
# building, searching, evaluating
# ---------------------------------------------------------------------------------------------------------
def build_index(model: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike,
                approximate: bool | None = None, add: bool = False, batch_size: int = 8, device="cpu",
                nprobe: int | None = None, id_prefix: str = "") -> CaseIndex:
    """Embed every labelled case of a collection and build (or extend) the index folder ``out``.

    Arguments:
      model (str | PathLike): an embedding model folder, or a training run folder (its ``best/`` is used).
      data (str | PathLike): nnU-Net-style dataset; findings from ``findings.csv`` or the label maps
        (:func:`irisseg.data.findings.load_findings`).
      out (str | PathLike): the index folder (written atomically; an existing index there is replaced,
        unless ``add``).
      approximate (bool | None): True: IVF-PQ, False: exact, None: exact for a new index, the existing
        kind with ``add``. With ``add`` it must not contradict the existing index's kind.
      add (bool): extend the index at ``out`` (built from scratch when there is none). Duplicates: a case
        whose id *and* image files are already in the index is **skipped** (so re-running on a grown
        collection adds only the new cases); a case whose id is in the index with *other* image files is
        **refused** (InputError naming the ids: give this collection an ``id_prefix``). The model must be
        the one the index was built with (same weights SHA-256), and the finding names the same.
      batch_size (int): cases embedded together.
      device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
      nprobe (int | None): IVF-PQ only: lists visited per query (None: the default, or the existing one).
      id_prefix (str): prepended to every case id of this collection (e.g. ``"siteB/"``).

    Returns:
      CaseIndex: the saved index; its ``build_info`` holds ``added`` (int), ``skipped`` (list of ids
      already indexed), ``seconds`` (whole call) and ``embed_seconds``. Prints nothing.

    Raises:
      InputError: bad model, dataset, files or options (see above), an approximate index over fewer than
        :data:`MIN_APPROXIMATE_CASES` cases, or ``out`` not writable as an index.
    """
    from irisseg.data.findings import load_findings

    t0 = time.perf_counter()
    out = Path(out)
    check_index_target(out)
    existing = CaseIndex.load(out) if add and out.exists() else None
    net, folder, sha = load_embedding_model(model)
    grid = model_grid(net)
    table = load_findings(data)
    in_channels = int(net.config.in_channels)
    wrong = [c for c, p in zip(table.case_ids, table.image_paths) if len(p) != in_channels]
    if wrong:
        raise InputError(f"{data}: the model takes {in_channels} channel(s), case {wrong[0]} has "
                         f"{len(table.image_paths[table.case_ids.index(wrong[0])])}")
    info = {"model": str(folder.absolute()), "model_sha256": sha, "grid": list(grid), "in_channels": in_channels}
    ids = [f"{id_prefix}{c}" for c in table.case_ids]
    paths = [[os.path.abspath(p) for p in ps] for ps in table.image_paths]
    if existing is None:
        index = CaseIndex(net.config.embedding_dim, table.names, approximate=bool(approximate), nprobe=nprobe,
                          model_info=info)
        skipped: list[str] = []
    else:
        index = existing
        if approximate is not None and bool(approximate) != (index.kind == "ivfpq"):
            raise InputError(f"{out}: the index is {index.kind}; --add keeps its kind (rebuild it without --add "
                             f"to change it)")
        known = index.model_info.get("model_sha256")
        if known and known != sha:
            raise InputError(f"{out}: built with the model {index.model_info.get('model')}, whose weights differ "
                             f"from {folder}: embeddings of different models are not comparable (build a new index)")
        if index.dim != net.config.embedding_dim:
            raise InputError(f"{out}: holds {index.dim}-d embeddings, the model gives {net.config.embedding_dim}-d")
        if table.names != index.names:
            raise InputError(f"{data}: finding names {table.names} differ from the index's {index.names}")
        if nprobe is not None:
            index.nprobe = nprobe
        clash = [c for c, p in zip(ids, paths) if c in index and index.paths[index._position[c]] != p]
        if clash:
            more = f" and {len(clash) - 5} more" if len(clash) > 5 else ""
            raise InputError(f"{data}: case id(s) {', '.join(clash[:5])}{more} are already in the index with other "
                             f"image files: give this collection an id prefix (--id-prefix)")
        skipped = [c for c in ids if c in index]
        if not index.model_info.get("model"):
            index.model_info = info
    new = [i for i, c in enumerate(ids) if c not in index]
    if existing is None and index.kind == "ivfpq":
        _check_trainable(len(new))  # before the (slow) embedding
    t_embed = time.perf_counter()
    vectors = embed_cases(net, [table.image_paths[i] for i in new], grid, batch_size=batch_size, device=device)
    embed_seconds = time.perf_counter() - t_embed
    index.add(vectors, [ids[i] for i in new], [paths[i] for i in new], table.labels[new], names=table.names,
              masks=[table.label_paths[i] for i in new], label_values=table.label_values)
    index.save(out)
    index.build_info = {"added": len(new), "skipped": skipped, "seconds": time.perf_counter() - t0,
                        "embed_seconds": embed_seconds}
    return index


def query_model(index: CaseIndex, model):
    """The embedding network that embeds queries of ``index``.

    Arguments:
      index (CaseIndex): the index.
      model (EmbeddingNet | str | PathLike | None): a network (only its embedding dimension is checked), a
        model or run folder (its weights must be those the index was built with, by SHA-256), or None: the
        model folder named in the index metadata.

    Raises:
      InputError: no model named or found, other weights, or another embedding dimension.
    """
    if model is not None and not isinstance(model, (str, os.PathLike)):
        net = model
    else:
        if model is None:
            path = index.model_info.get("model")
            if not path:
                raise InputError("the index names no model (it was built from given embeddings): pass a model")
            if not Path(path).exists():
                raise InputError(f"the index's model {path} is not there any more: pass the model (--model)")
        net, folder, sha = load_embedding_model(model if model is not None else path)
        known = index.model_info.get("model_sha256")
        if known and known != sha:
            raise InputError(f"{folder}: not the model this index was built with ({index.model_info.get('model')}); "
                             f"its embeddings are not comparable")
    if int(net.config.embedding_dim) != index.dim:
        raise InputError(f"the model gives {net.config.embedding_dim}-d embeddings, the index holds {index.dim}-d")
    return net


def _index_grid(index: CaseIndex, net) -> tuple[int, int, int]:
    grid = index.model_info.get("grid")
    return tuple(int(s) for s in grid) if grid else model_grid(net)


def search_cases(index: CaseIndex, model, query, k: int = 10, exclude=None, device="cpu") -> list[list[Hit]]:
    """Embed one query image and search the index.

    Arguments:
      index (CaseIndex): the index.
      model (EmbeddingNet | str | PathLike | None): None: the model folder named in the index metadata
        (checked against the stored weights' SHA-256 when given as a folder too).
      query (Volume | Sequence[Volume]): the query image's channels (same geometry), in channel order.
      k (int): hits wanted.
      exclude: case ids never returned (as :meth:`CaseIndex.search`).
      device: ``"cpu"``, ``"cuda"`` or ``"auto"``.

    Returns:
      list[list[Hit]]: one list (the query's hits, best first), as :meth:`CaseIndex.search`.

    Raises:
      InputError: no usable model, wrong channel count, channels of different geometry, NaN image.
    """
    from irisseg.io import Volume
    from irisseg.models.embedding import embed

    net = query_model(index, model)
    channels = [query] if isinstance(query, Volume) else list(query)
    in_channels = int(net.config.in_channels)
    if len(channels) != in_channels:
        raise InputError(f"the model takes {in_channels} channel(s), got {len(channels)} query image(s): "
                         f"give one file per channel, in channel order")
    x = _model_input(channels, _index_grid(index, net), "query", in_channels)
    vector = embed(net, [x], batch_size=1, device=_resolve_device(device))
    return index.search(vector, k, exclude=[exclude] if exclude is not None else None)


def select_supports(index: CaseIndex, model, query, label: str, shots: int, exclude=None, query_paths=None,
                    device="cpu") -> tuple[list[Hit], int]:
    """The ``shots`` cases of the index most similar to a query that carry finding ``label`` and have a mask:
    the supports of in-context segmentation by retrieval (``irisseg segment --bank INDEX --label NAME``).

    Arguments:
      index (CaseIndex): an index built from a labelled collection (:func:`build_index` stores each case's
        label map and the label ids of ``dataset.json``).
      model (EmbeddingNet | str | PathLike | None): the embedding model (None: the index's, as
        :func:`search_cases`).
      query (Volume | Sequence[Volume]): the query image's channels, any geometry.
      label (str): a finding name of the index (e.g. ``"nodule"``).
      shots (int): supports wanted (K >= 1).
      exclude (Iterable[str] | None): case ids never chosen.
      query_paths (Iterable[str | PathLike] | None): the query's files: a case holding one of them (a query
        taken from the bank itself) is never chosen.
      device: ``"cpu"``, ``"cuda"`` or ``"auto"``.

    Returns:
      tuple[list[Hit], int]: the K hits, most similar first (``hit.paths`` its image channels, ``hit.mask``
      its label map), and the id of ``label`` in those label maps (``mask == value`` is the support mask).

    Raises:
      InputError: an unknown finding, an index without masks or label ids for it, fewer than K eligible
        cases, or a bad query (as :func:`search_cases`).
    """
    from irisseg.io import Volume

    if label not in index.names:
        raise InputError(f"--label {label!r}: not a finding of the index (its findings: {', '.join(index.names)})")
    if label not in index.label_values:
        raise InputError(f"the index knows no label id for {label!r} in its cases' masks (rebuild it with "
                         f"'irisseg retrieval index' from a dataset whose dataset.json declares {label!r})")
    if int(shots) != shots or int(shots) < 1:
        raise InputError(f"--shots must be a positive integer, got {shots}")
    shots = int(shots)
    channels = [query] if isinstance(query, Volume) else list(query)
    own = {os.path.abspath(p) for p in (query_paths or ())}
    k = index.names.index(label)
    excluded = set(exclude or ()) | {c for c, p in zip(index.case_ids, index.paths) if own & set(p)}
    eligible = [i for i in range(len(index)) if index.labels[i, k] and index.masks[i]
                and index.case_ids[i] not in excluded]
    if len(eligible) < shots:
        raise InputError(f"--shots {shots}: only {len(eligible)} case(s) of the index carry {label!r} with a mask")
    net = query_model(index, model)
    # Search deeper until K eligible cases are among the hits (every case at worst).
    depth = min(len(index), max(8 * shots, 32))
    while True:
        hits = search_cases(index, net, channels, k=depth, exclude=sorted(excluded), device=device)[0]
        chosen = [h for h in hits if label in h.findings and h.mask][:shots]
        if len(chosen) == shots or depth >= len(index):
            break
        depth = min(len(index), 4 * depth)
    if len(chosen) < shots:  # an approximate index may miss some cases in its probed lists
        raise InputError(f"--shots {shots}: the search found only {len(chosen)} case(s) with {label!r}; "
                         f"raise the index's nprobe or use an exact index")
    return [Hit(h.case_id, h.score, r + 1, h.paths, h.findings, h.mask) for r, h in enumerate(chosen)], \
        index.label_values[label]


def _ranking(index: CaseIndex, queries: np.ndarray, k: int, excluded: np.ndarray) -> tuple[np.ndarray, int]:
    """(Q, k) positions, best first, never the excluded one; rows an approximate search left short are
    completed by exact order over the stored vectors. Returns the ranking and the number of such rows."""
    results = index._search_positions(queries, k, [{int(e)} if e >= 0 else set() for e in excluded])
    ranking = np.empty((len(queries), k), dtype=np.int64)
    padded = 0
    vectors = None
    for q, (pos, _) in enumerate(results):
        if len(pos) < k:
            padded += 1
            vectors = index.vectors() if vectors is None else vectors
            scores = (vectors @ queries[q]).astype(np.float64)
            if excluded[q] >= 0:
                scores[excluded[q]] = -np.inf
            scores[pos] = -np.inf
            rest = np.argsort(-scores, kind="stable")[:k - len(pos)]
            pos = np.concatenate([pos, rest.astype(np.int64)])
        ranking[q] = pos
    return ranking, padded


def evaluate_index(index: CaseIndex, data: str | os.PathLike | None = None, ks: Iterable[int] = (1, 3, 5, 10, 20),
                   model=None, batch_size: int = 8, device="cpu") -> dict:
    """Retrieval quality of the index: precision, recall, mAP and NDCG at cutoffs k.

    Relevance as in :func:`irisseg.metrics.retrieval_metrics` (sharing at least one finding; NDCG gain =
    Jaccard index of the findings vectors).

    Arguments:
      index (CaseIndex): the gallery.
      data (str | PathLike | None): None: leave-one-out over the index's own cases (each stored vector
        queries all the others; exact index: ``reconstruct_n``, ``ivfpq``: ``vectors.npy``). A dataset
        folder: its cases are embedded (with ``model`` or the index's model) and query the index; the
        gallery item of the same case (same image files, else the same case id) is left out of its ranking.
      ks (Iterable[int]): cutoffs; those above the number of gallery items a query can be matched with are
        dropped.
      model: as in :func:`search_cases` (only used with ``data``).
      batch_size (int), device: for embedding ``data``.

    Returns:
      dict: :func:`~irisseg.metrics.retrieval_metrics` means (``"precision@k"``, ``"recall@k"``, ``"map@k"``,
      ``"ndcg@k"``, ``"n_queries"`` (queries averaged), ``"n_queries_without_relevant"``) plus ``"ks"`` (the
      cutoffs used), ``"mode"`` (``"leave-one-out"`` or ``"queries"``), ``"n_gallery"``, ``"n_queries_total"``
      and ``"n_padded"`` (approximate searches that returned fewer than max(ks) hits, completed exactly).

    Raises:
      InputError: fewer than 2 cases (leave-one-out) or an empty index, finding names that differ, or bad data.
    """
    from irisseg.data.findings import load_findings
    from irisseg.metrics import retrieval_metrics

    n = len(index)
    requested = tuple(dict.fromkeys(int(k) for k in ks))
    if not requested or min(requested) < 1:
        raise InputError(f"ks must hold positive cutoffs, got {list(ks)}")
    if data is None:
        if n < 2:
            raise InputError(f"leave-one-out evaluation needs at least 2 indexed cases, the index holds {n}")
        queries = index.vectors()
        query_labels = index.labels
        excluded = np.arange(n, dtype=np.int64)
        mode = "leave-one-out"
    else:
        if n < 1:
            raise InputError("the index is empty")
        table = load_findings(data)
        if table.names != index.names:
            raise InputError(f"{data}: finding names {table.names} differ from the index's {index.names}")
        net = query_model(index, model)
        queries = embed_cases(net, table.image_paths, _index_grid(index, net), batch_size=batch_size, device=device)
        query_labels = table.labels
        by_paths = {tuple(p): i for i, p in enumerate(index.paths)}
        excluded = np.array([by_paths.get(tuple(os.path.abspath(x) for x in p), index._position.get(c, -1))
                             for c, p in zip(table.case_ids, table.image_paths)], dtype=np.int64)
        mode = "queries"
    available = n - (1 if np.any(excluded >= 0) else 0)
    used = tuple(k for k in requested if k <= available)
    if not used:
        raise InputError(f"no cutoff in {list(requested)} fits a gallery of {available} case(s) per query")
    ranking, padded = _ranking(index, np.ascontiguousarray(queries, dtype=np.float32), max(used), excluded)
    result = retrieval_metrics(query_labels, index.labels, ranking, ks=used, exclude_self=excluded)
    result.update({"ks": list(used), "mode": mode, "n_gallery": n, "n_queries_total": int(len(queries)),
                   "n_padded": padded})
    return result
