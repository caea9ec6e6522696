"""Training of the similar-case retrieval network (``irisseg retrieval train``), two ways.

Every case of a labelled collection is a multi-label item: the set of findings it carries
(:func:`irisseg.data.findings.load_findings`). An :class:`~irisseg.models.embedding.EmbeddingNet` maps the
whole field of view, resampled to a fixed grid (:func:`irisseg.data.findings.retrieval_input`), to a
unit-norm embedding; similar cases are those with the largest cosine similarity.

* ``mode="triplet"`` (metric learning): the network has no classification head (``n_classes=0``). Each
  batch is balanced (:class:`BalancedBatchSampler`: ``n_classes_per_batch`` findings x
  ``n_samples_per_class`` cases carrying each) and trained with :func:`irisseg.losses.triplet_loss`
  (positives share a finding, negatives share none; batch-hard or semi-hard mining).
* ``mode="microf1"`` (classification): the network has a head with one logit per finding and is trained
  with :func:`irisseg.losses.soft_micro_f1_loss` plus ``bce_weight`` times the binary cross-entropy on
  plain shuffled batches (:class:`ShuffledBatchSampler`); the embedding is the L2-normalised projection the
  head reads (``EmbeddingNet.features``).

Data. The cases are split once, stratified on the findings (:func:`multilabel_stratified_split`), into
``train`` (gradient updates), ``train_eval`` (held out, scored after every epoch) and ``test`` (never
touched here; for ``irisseg retrieval evaluate``), saved as ``RUN/splits.json`` (case ids). Every case is
preprocessed once into one memory-mapped array, ``RUN/cache/volumes.<dtype>.npy`` (:func:`build_volume_cache`),
so epochs never read NIfTI files; training items are augmented on the fly (small random rotation and
scaling with :func:`irisseg.data.augment.random_affine`, Gaussian noise).

Validation after every epoch: the ``train_eval`` cases are embedded (no augmentation) and retrieved
leave-one-out among themselves (:func:`evaluate_embeddings`: precision, recall, mAP and NDCG at
k = 1, 3, 5, 10, 20, each k capped at ``n - 1``) and, with a head, classified at the 0.5 threshold (micro /
macro F1). The best model is chosen by ``val_select`` = ``micro_f1 + 1e-3 * map@10`` with a head (micro-F1
first, mAP@10 breaking ties), ``map@10`` without one.

A run folder holds ``metrics.csv`` (:data:`METRICS_COLUMNS`, one row per epoch), ``best/`` and ``last/``
(EmbeddingNet folders: ``config.json`` + ``model.safetensors``, with ``extra["retrieval"]`` = mode, grid,
finding names, split, metrics of that epoch; ``extra["train"]`` = the settings), ``splits.json``,
``train_config.yaml``, ``cache/``, ``logs/`` (CSV), ``tensorboard/`` (scalars and, with a head, one PR curve
per finding) and ``checkpoints/last.ckpt`` (``--resume``).

Example::

    run = train_retrieval(RetrievalTrainConfig(mode="triplet", grid=(64, 64, 64)), "data/findings", "runs/r")
    net = EmbeddingNet.load(run / "best")
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from irisseg.errors import InputError
from irisseg.training.engine import AnnealedModule, RunRecorder, YamlConfig, make_trainer, resume_path

__all__ = ["RetrievalTrainConfig", "multilabel_stratified_split", "VolumeCache", "build_volume_cache",
           "encode_volumes", "decode_volumes", "CachedVolumeDataset", "BalancedBatchSampler",
           "ShuffledBatchSampler", "evaluate_embeddings", "RetrievalLightning", "train_retrieval",
           "MODES", "CACHE_DTYPES", "SPLIT_NAMES", "KS", "METRICS_COLUMNS", "UINT8_RANGE"]

#: Training modes of ``irisseg retrieval train --mode``.
MODES = ("triplet", "microf1")
#: Storage types of the volume cache.
CACHE_DTYPES = ("float16", "uint8")
#: Names of the three parts of the split, in the order of ``RetrievalTrainConfig.split``.
SPLIT_NAMES = ("train", "train_eval", "test")
#: Retrieval cutoffs scored after every epoch (each capped at ``n - 1`` for ``n`` train_eval cases).
KS = (1, 3, 5, 10, 20)
#: z-score range stored by a ``uint8`` cache: values are clipped to it and mapped linearly to 0..255.
UINT8_RANGE = (-4.0, 4.0)
_RETRIEVAL_KEYS = tuple(f"{m}@{k}" for m in ("precision", "recall", "map", "ndcg") for k in KS)
#: Columns of ``RUN/metrics.csv`` (one row per epoch; F1 columns empty in triplet mode).
METRICS_COLUMNS = ("epoch", "step", "train_loss", "val_loss", *(f"val_{k}" for k in _RETRIEVAL_KEYS),
                   "val_micro_f1", "val_macro_f1", "val_select", "val_n", "seconds")
_CACHE_FORMAT = 1
_NORMALIZATION = ("whole field of view resampled (linear) to the grid, each channel clipped to its 0.5-99.5 "
                  "percentiles and z-scored (irisseg.data.findings.retrieval_input)")


@dataclass
class RetrievalTrainConfig(YamlConfig):
    """Settings of ``irisseg retrieval train`` (a YAML file with these keys; unknown keys are an error).

    Attributes:
      mode: ``"triplet"`` (metric learning, no classification head) or ``"microf1"`` (classification head
        trained with the soft micro-F1 loss; the embedding is the normalised pre-classifier projection).
      grid: (D, H, W) voxels every case is resampled to (whole field of view), the network's input size.
      channels: EmbeddingNet stage widths, finest first (each later stage halves the resolution).
      embedding_dim: length of the embedding vector. dropout: dropout before the projection, in [0, 1).
      margin: triplet margin, in squared-Euclidean units on unit vectors (``2 - 2 cos``; 0.2 = a cosine gap
        of 0.1). mining: ``"batch_hard"`` or ``"semi_hard"`` (see :func:`irisseg.losses.triplet_loss`).
      n_classes_per_batch, n_samples_per_class: triplet batches hold ``n_classes_per_batch`` distinct
        findings x ``n_samples_per_class`` cases carrying each (:class:`BalancedBatchSampler`); both >= 2.
      batch_size: cases per batch in microf1 mode.
      bce_weight: weight of the binary cross-entropy added to the soft micro-F1 loss (microf1 mode; 0: none).
        The BCE gives every logit a gradient of its own (the micro-F1 alone is one ratio over the batch).
      map_weight: weight of the auxiliary finding-map loss, both modes (0: none). When > 0, the network
        gets a map head on stage ``map_stage`` (:class:`~irisseg.models.embedding.EmbeddingConfig`) trained
        with :func:`irisseg.losses.finding_map_loss` against the cases' label maps on the grid: dense
        supervision of *where* each finding is, which the case-level labels alone give only through one
        number per case. Needs a label map for every case (``labelsTr``) with every finding's label id
        declared in ``dataset.json``. The map head is not used for retrieval.
      map_stage: the stage the map head reads (resolution ``1 / 2 ** map_stage`` of the grid).
      accumulate: batches whose gradients are summed per optimiser step (gradient accumulation).
      lr, weight_decay: AdamW; 20 warm-up steps, then a cosine to 0 over ``epochs`` or ``max_minutes``.
      epochs: most epochs; steps_per_epoch: optimiser steps per epoch (each of ``accumulate`` batches);
        patience: epochs without a better ``val_select`` before stopping early; max_minutes: wall-time
        budget of the whole run in minutes (None: none).
      split: fractions of the cases in (train, train_eval, test), each >= 0 (train and train_eval > 0),
        summing to 1; stratified on the findings (:func:`multilabel_stratified_split`).
      augment: augment training items; augment_prob: probability of each augmentation (affine, noise);
        rotate_deg: largest rotation about each axis, degrees; scale: (min, max) isotropic scale factor;
        noise_std: standard deviation of the additive Gaussian noise, in z-score units.
      eval_batch_size: train_eval cases per forward pass when scoring.
      cache_dtype: ``"float16"`` (the z-scored values, 2 bytes a voxel) or ``"uint8"`` (1 byte a voxel: values
        clipped to [-4, 4] and mapped linearly to 0..255, a step of 8/255 = 0.031).
      num_workers: DataLoader worker processes preparing training items; num_threads: torch threads
        (None: torch's default); seed: split, sampling, augmentation and initialisation seed.
    """

    mode: str = "microf1"
    grid: tuple[int, int, int] = (64, 64, 64)
    channels: tuple[int, ...] = (16, 32, 64, 128)
    embedding_dim: int = 1024
    dropout: float = 0.0
    margin: float = 0.2
    mining: str = "batch_hard"
    n_classes_per_batch: int = 2
    n_samples_per_class: int = 3
    batch_size: int = 8
    bce_weight: float = 0.1
    map_weight: float = 0.0
    map_stage: int = 2
    accumulate: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 30
    steps_per_epoch: int = 50
    patience: int = 10
    max_minutes: float | None = None
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    augment: bool = True
    augment_prob: float = 0.5
    rotate_deg: float = 5.0
    scale: tuple[float, float] = (0.95, 1.05)
    noise_std: float = 0.05
    eval_batch_size: int = 8
    cache_dtype: str = "float16"
    num_workers: int = 0
    num_threads: int | None = None
    seed: int = 0

    def __post_init__(self):
        from irisseg.losses import TRIPLET_MINING

        try:
            self.grid = tuple(int(s) for s in self.grid)
            self.channels = tuple(int(c) for c in self.channels)
            self.split = tuple(float(f) for f in self.split)
            self.scale = tuple(float(s) for s in self.scale)
        except (TypeError, ValueError):
            raise InputError("grid, channels, split and scale must be lists of numbers") from None
        if self.mode not in MODES:
            raise InputError(f"unknown mode {self.mode!r} (choose from {', '.join(MODES)})")
        if self.mining not in TRIPLET_MINING:
            raise InputError(f"unknown mining {self.mining!r} (choose from {', '.join(TRIPLET_MINING)})")
        if self.cache_dtype not in CACHE_DTYPES:
            raise InputError(f"unknown cache_dtype {self.cache_dtype!r} (choose from {', '.join(CACHE_DTYPES)})")
        if len(self.grid) != 3 or min(self.grid) < 1:
            raise InputError(f"grid must be three positive sizes (D, H, W), got {list(self.grid)}")
        if not self.channels or min(self.channels) < 1:
            raise InputError(f"channels must hold at least one positive width, got {list(self.channels)}")
        for name in ("embedding_dim", "batch_size", "accumulate", "epochs", "steps_per_epoch", "patience",
                     "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("n_classes_per_batch", "n_samples_per_class"):
            if int(getattr(self, name)) < 2:
                raise InputError(f"{name} must be at least 2 (a triplet needs a positive and a negative), "
                                 f"got {getattr(self, name)}")
        if len(self.split) != 3 or min(self.split) < 0 or abs(sum(self.split) - 1.0) > 1e-6:
            raise InputError(f"split must be three non-negative fractions (train, train_eval, test) summing "
                             f"to 1, got {list(self.split)}")
        if self.split[0] <= 0 or self.split[1] <= 0:
            raise InputError(f"split: the train and train_eval fractions must be positive, got {list(self.split)}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise InputError(f"scale must be (min, max) with 0 < min <= max, got {list(self.scale)}")
        if float(self.map_weight) > 0 and not 0 <= int(self.map_stage) < len(self.channels):
            raise InputError(f"map_stage must index one of the {len(self.channels)} stages, got {self.map_stage}")
        for name in ("margin", "bce_weight", "map_weight", "rotate_deg", "noise_std", "weight_decay"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value >= 0):
                raise InputError(f"{name} must be a non-negative number, got {getattr(self, name)}")
        if not (math.isfinite(float(self.lr)) and float(self.lr) > 0):
            raise InputError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= float(self.augment_prob) <= 1.0:
            raise InputError(f"augment_prob must be in [0, 1], got {self.augment_prob}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise InputError(f"max_minutes must be positive (or null for none), got {self.max_minutes}")
        if int(self.num_workers) < 0:
            raise InputError(f"num_workers must be >= 0, got {self.num_workers}")


# ---------------------------------------------------------------------------------------------------
# stratified split
# ---------------------------------------------------------------------------------------------------
def _split_sizes(n: int, fractions: Sequence[float]) -> list[int]:
    """``n`` cut by ``fractions`` (largest remainder, ties to the earlier part), then every part with a
    non-zero fraction given at least one item, taken from the largest part, while ``n`` allows."""
    raw = [f * n for f in fractions]
    sizes = [int(math.floor(r)) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: (-(raw[i] - sizes[i]), i))[: n - sum(sizes)]:
        sizes[i] += 1
    for i, f in enumerate(fractions):
        if f > 0 and sizes[i] == 0:
            donor = max(range(len(sizes)), key=lambda j: sizes[j])
            if sizes[donor] > 1:
                sizes[donor] -= 1
                sizes[i] += 1
    return sizes


def multilabel_stratified_split(labels, fractions: Sequence[float] = (0.7, 0.15, 0.15),
                                seed: int = 0) -> list[np.ndarray]:
    """Split multi-label cases into parts that keep every label's share (iterative stratification).

    The idea of Sechidis, Tsoumakas and Vlahavas (2011), with exact part sizes: the part sizes are
    ``fractions * N`` rounded by largest remainder (every part with a non-zero fraction gets a case when
    ``N`` allows), and each part ``j`` *wants* ``fractions[j] * n_l`` cases of label ``l`` (``n_l`` = cases
    carrying it). Repeatedly, the label with the fewest unassigned cases is taken (ties: the lower label
    index) and its unassigned cases, in a random order, each go to the part that still wants that label
    most, among the parts with room left (ties: the part with the most room left, then at random); an
    assigned case lowers every one of its labels' wants of its part. Cases without any label go last, each
    to the part with the most room left (ties at random). Rare labels are thus spread first, while there is
    still freedom to place them.

    Arguments:
      labels (np.ndarray): (N, L) binary (bool or 0/1) label matrix.
      fractions (Sequence[float]): the parts' shares, each >= 0, summing to 1.
      seed (int): seed of the random order and tie-breaking; the same seed gives the same split.

    Returns:
      list[np.ndarray]: one sorted int64 array of row indices per fraction; together they hold every row
      exactly once, and their sizes are the rounded ``fractions * N``.

    Raises:
      InputError: labels that are not a 2-D binary matrix, or fractions that are not non-negative numbers
        summing to 1.
    """
    y = np.asarray(labels)
    if y.ndim != 2 or (y.size and not np.isin(y, (0, 1)).all()):
        raise InputError(f"labels must be an (N, L) matrix of 0/1 values, got shape {y.shape}")
    y = y.astype(bool)
    fr = [float(f) for f in fractions]
    if not fr or min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
        raise InputError(f"split fractions must be non-negative numbers summing to 1, got {fr}")
    n = y.shape[0]
    rng = np.random.default_rng(seed)
    room = np.array(_split_sizes(n, fr), dtype=np.int64)
    wants = np.outer(fr, y.sum(0)).astype(np.float64)  # (S, L)
    part = np.full(n, -1, dtype=np.int64)
    free = np.ones(n, dtype=bool)

    def choose(scores: np.ndarray) -> int:
        open_ = np.flatnonzero(room > 0)
        best = open_[scores[open_] == scores[open_].max()]
        best = best[room[best] == room[best].max()]
        return int(best[rng.integers(best.size)]) if best.size > 1 else int(best[0])

    while True:
        counts = (y & free[:, None]).sum(0)
        active = np.flatnonzero(counts > 0)
        if active.size == 0:
            break
        label = int(active[np.argmin(counts[active])])
        rows = np.flatnonzero(y[:, label] & free)
        for i in rows[rng.permutation(rows.size)]:
            j = choose(wants[:, label])
            part[i], free[i] = j, False
            room[j] -= 1
            wants[j, y[i]] -= 1.0
    for i in rng.permutation(np.flatnonzero(free)):
        j = choose(np.zeros(len(fr)))
        part[i] = j
        room[j] -= 1
    return [np.flatnonzero(part == j).astype(np.int64) for j in range(len(fr))]


# ---------------------------------------------------------------------------------------------------
# volume cache
# ---------------------------------------------------------------------------------------------------
def encode_volumes(x: np.ndarray, dtype: str) -> np.ndarray:
    """Preprocessed (z-scored) values in the cache's storage type.

    ``float16``: the values as they are (relative precision 2^-11, about 0.002 for |x| < 4).
    ``uint8``: ``q = round((clip(x, -4, 4) + 4) * 255 / 8)`` (:data:`UINT8_RANGE`), so every value is kept to
    within 4/255 = 0.016 inside [-4, 4] and values outside are clipped to it.

    Arguments:
      x (np.ndarray): float array of any shape. dtype (str): ``"float16"`` or ``"uint8"``.

    Returns:
      np.ndarray: same shape, of type ``dtype``.
    """
    if dtype == "float16":
        return np.asarray(x, dtype=np.float16)
    if dtype == "uint8":
        lo, hi = UINT8_RANGE
        return np.rint((np.clip(x, lo, hi) - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    raise InputError(f"unknown cache dtype {dtype!r} (choose from {', '.join(CACHE_DTYPES)})")


def decode_volumes(a: np.ndarray) -> np.ndarray:
    """The inverse of :func:`encode_volumes` (``uint8``: ``x = q * 8 / 255 - 4``), as float32 of the same shape."""
    if a.dtype == np.uint8:
        lo, hi = UINT8_RANGE
        return (a.astype(np.float32) * np.float32((hi - lo) / 255.0) + np.float32(lo)).astype(np.float32)
    return np.asarray(a, dtype=np.float32)


class VolumeCache:
    """Every case of a collection preprocessed once, in one memory-mapped ``.npy`` file.

    Attributes:
      path (Path): ``FOLDER/volumes.<dtype>.npy``, shape (N, C, D, H, W), of type ``dtype``.
      case_ids (list[str]): row ``i`` is case ``case_ids[i]``.
      grid (tuple[int, int, int]): (D, H, W). dtype (str): ``"float16"`` or ``"uint8"``. channels (int): C.
      maps_path (Path | None): ``FOLDER/maps.uint8.npy``, (N, D, H, W) finding maps
        (:func:`irisseg.data.findings.retrieval_map`: ``k + 1`` where finding k is), when cached.

    The arrays are opened (read-only, memory-mapped) on first use in each process and never pickled, so
    DataLoader workers share the page cache instead of copying it.
    """

    def __init__(self, path: Path, case_ids: list[str], grid: Sequence[int], dtype: str, channels: int,
                 maps_path: Path | None = None):
        self.path, self.case_ids, self.dtype = Path(path), list(case_ids), dtype
        self.grid, self.channels = tuple(int(s) for s in grid), int(channels)
        self.maps_path = Path(maps_path) if maps_path is not None else None
        self._array = self._maps = None

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None, "_maps": None}

    @property
    def array(self) -> np.ndarray:
        """The (N, C, D, H, W) stored array (memory-mapped, read-only)."""
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def load(self, row: int) -> np.ndarray:
        """Case ``row`` decoded to float32 (C, D, H, W) (:func:`decode_volumes`)."""
        return decode_volumes(np.asarray(self.array[int(row)]))

    def load_map(self, row: int) -> np.ndarray:
        """Case ``row``'s finding map, uint8 (D, H, W) (InputError when the cache holds none)."""
        if self.maps_path is None:
            raise InputError(f"{self.path.parent}: the cache holds no finding maps")
        if self._maps is None:
            self._maps = np.load(self.maps_path, mmap_mode="r")
        return np.asarray(self._maps[int(row)])


def _file_stamps(paths: Sequence[Path]) -> list[list]:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as exc:
            raise InputError(f"{p}: cannot read ({exc.strerror or exc})") from None
        out.append([str(Path(p).absolute()), int(st.st_mtime_ns), int(st.st_size)])
    return out


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def build_volume_cache(table, grid: Sequence[int], dtype: str, folder: str | Path,
                       progress: bool = False, maps: bool = False) -> VolumeCache:
    """The cache of every case of ``table`` on ``grid``: reused when still valid, else (re)built.

    Each case's channels are read (:func:`irisseg.io.read_volume`) and preprocessed with
    :func:`irisseg.data.findings.retrieval_input` once, encoded (:func:`encode_volumes`) and stored in
    ``FOLDER/volumes.<dtype>.npy`` (``np.lib.format.open_memmap``, (N, C, D, H, W)); ``FOLDER/index.json``
    records the case ids, grid, dtype, channel count, the dataset folder and, per channel file, its path,
    modification time (ns) and size. The cache is reused only when all of these still match (a changed,
    added or removed file, another grid or dtype rebuilds it). The array is written to a temporary file and
    renamed, and ``index.json`` is written last, so an interrupted build is never taken for a valid cache.
    With ``maps``, every case's label map is also stored on the grid as a finding map
    (:func:`irisseg.data.findings.retrieval_map`, finding k = its label id in ``table.label_values``) in
    ``FOLDER/maps.uint8.npy`` (N, D, H, W); the label files then count among the recorded files.

    Arguments:
      table (FindingsTable): the cases (:func:`irisseg.data.findings.load_findings`).
      grid (Sequence[int]): (D, H, W) voxels. dtype (str): ``"float16"`` or ``"uint8"``.
      folder (str | Path): the cache folder (created). progress (bool): show a progress bar while building.
      maps (bool): also cache the finding maps (needs a label map for every case and a label id for every
        finding).

    Returns:
      VolumeCache.

    Raises:
      InputError: an unreadable image, channels of different geometry, NaN intensities, a bad grid / dtype,
        cases with different channel counts; with ``maps``, a case without a label map, a finding without a
        label id, a label map whose geometry differs from its image's.
    """
    from irisseg.data.findings import retrieval_input, retrieval_map
    from irisseg.io import check_same_geometry, read_volume

    folder = Path(folder)
    grid = tuple(int(s) for s in grid)
    if dtype not in CACHE_DTYPES:
        raise InputError(f"unknown cache dtype {dtype!r} (choose from {', '.join(CACHE_DTYPES)})")
    counts = {len(p) for p in table.image_paths}
    if len(counts) != 1:
        raise InputError(f"{table.root}: cases have different numbers of image channels ({sorted(counts)})")
    channels = counts.pop()
    map_values = None
    if maps:
        missing = [n for n in table.names if n not in table.label_values]
        if missing:
            raise InputError(f"{table.root}: finding maps need a label id for every finding; dataset.json "
                             f"declares none for {', '.join(missing[:5])}")
        unlabelled = [c for c, p in zip(table.case_ids, table.label_paths, strict=True) if p is None]
        if unlabelled:
            raise InputError(f"{table.root}: finding maps need a label map for every case; "
                             f"{', '.join(unlabelled[:5])} ha{'s' if len(unlabelled) == 1 else 've'} none")
        map_values = [int(table.label_values[n]) for n in table.names]
    index = {"format": _CACHE_FORMAT, "source": str(Path(table.root).absolute()), "case_ids": list(table.case_ids),
             "grid": list(grid), "dtype": dtype, "channels": channels, "uint8_range": list(UINT8_RANGE),
             "files": [_file_stamps(paths) for paths in table.image_paths]}
    if map_values is not None:
        index.update(map_values=map_values, label_files=_file_stamps(table.label_paths))
    path = folder / f"volumes.{dtype}.npy"
    maps_path = folder / "maps.uint8.npy" if map_values is not None else None
    index_path = folder / "index.json"
    shape = (len(table.case_ids), channels, *grid)
    cache = VolumeCache(path, table.case_ids, grid, dtype, channels, maps_path)
    if index_path.is_file() and path.is_file() and (maps_path is None or maps_path.is_file()):
        try:
            same = json.loads(index_path.read_text()) == index
            same = same and tuple(cache.array.shape) == shape and cache.array.dtype == np.dtype(dtype)
        except (OSError, ValueError):
            same = False
        if same:
            return cache
        cache = VolumeCache(path, table.case_ids, grid, dtype, channels, maps_path)
    folder.mkdir(parents=True, exist_ok=True)
    index_path.unlink(missing_ok=True)
    for stale in [*folder.glob("volumes.*.npy"), *folder.glob("maps.*.npy")]:
        stale.unlink()
    tmp = folder / f".volumes.{dtype}.npy.tmp"
    tmp_maps = folder / ".maps.uint8.npy.tmp"
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=shape)
    map_array = (np.lib.format.open_memmap(tmp_maps, mode="w+", dtype=np.uint8, shape=(shape[0], *grid))
                 if maps_path is not None else None)
    rows = range(len(table.case_ids))
    if progress:
        from rich.progress import track

        rows = track(rows, description=f"caching {len(table.case_ids)} cases at {'x'.join(map(str, grid))}")
    for i in rows:
        paths = table.image_paths[i]
        channels_i = [read_volume(p) for p in paths]
        array[i] = encode_volumes(retrieval_input(channels_i, grid), dtype)
        if map_array is not None:
            label = read_volume(table.label_paths[i])
            check_same_geometry(channels_i[0], label, paths[0], table.label_paths[i])
            map_array[i] = retrieval_map(label, map_values, grid)
    array.flush()
    del array
    tmp.replace(path)
    if map_array is not None:
        map_array.flush()
        del map_array
        tmp_maps.replace(maps_path)
    _write_text_atomic(index_path, json.dumps(index, indent=1))
    return cache


# ---------------------------------------------------------------------------------------------------
# dataset and samplers
# ---------------------------------------------------------------------------------------------------
class CachedVolumeDataset(Dataset):
    """Cases of a :class:`VolumeCache` with their findings, augmented on the fly when asked.

    Augmentation (when ``augment`` is a config): with probability ``augment_prob`` a random rotation (up to
    ``rotate_deg`` about each axis) and isotropic scaling (in ``scale``) about the grid centre
    (:func:`irisseg.data.augment.random_affine`, trilinear, border padding); then, with probability
    ``augment_prob``, additive Gaussian noise of standard deviation ``noise_std``. The random numbers come
    from one stream per (seed, epoch, DataLoader worker), read in item order: with the fixed dispatch of
    batches to workers, an epoch's augmentations depend only on the seed and the epoch (call
    :meth:`set_epoch`), and two draws of the same case in one epoch are augmented differently.

    Arguments:
      cache (VolumeCache): the stored volumes.
      rows (Sequence[int]): the cache rows of this dataset's items (item ``i`` = cache row ``rows[i]``).
      labels (np.ndarray): (len(rows), L) binary findings of the items.
      augment (RetrievalTrainConfig | None): augmentation settings (``augment_prob``, ``rotate_deg``,
        ``scale``, ``noise_std``); None: no augmentation.
      seed (int): augmentation seed.
      maps (bool): items carry their finding map too (the cache must hold them), warped with the image.

    Items: ``{"image": float32 (C, D, H, W), "labels": float32 (L,), "index": int}`` and, with ``maps``,
    ``"map": int64 (D, H, W)`` (``k + 1`` where finding k is).
    """

    def __init__(self, cache: VolumeCache, rows: Sequence[int], labels: np.ndarray, augment=None, seed: int = 0,
                 maps: bool = False):
        self.cache, self.rows, self.maps = cache, [int(r) for r in rows], bool(maps)
        self.labels = np.asarray(labels, dtype=np.float32).reshape(len(self.rows), -1)
        self.augment, self.seed, self.epoch = augment, int(seed), 0
        self._gen, self._gen_key = None, None

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_gen": None, "_gen_key": None}

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch``."""
        self.epoch = int(epoch)

    def _generator(self) -> torch.Generator:
        info = torch.utils.data.get_worker_info()
        key = (self.epoch, info.id if info is not None else -1)
        if key != self._gen_key:
            state = np.random.SeedSequence([self.seed, key[0], key[1] + 1]).generate_state(1, dtype=np.uint64)[0]
            self._gen, self._gen_key = torch.Generator().manual_seed(int(state >> np.uint64(1))), key
        return self._gen

    def __getitem__(self, index: int) -> dict:
        from irisseg.data.augment import random_affine

        index = int(index)
        image = torch.from_numpy(self.cache.load(self.rows[index]))
        masks = (torch.from_numpy(self.cache.load_map(self.rows[index]).astype(np.int64))[None] if self.maps
                 else torch.zeros((0, *image.shape[1:])))
        a = self.augment
        if a is not None:
            gen = self._generator()
            draws = torch.rand(2, generator=gen)
            if draws[0] < a.augment_prob and (a.rotate_deg > 0 or a.scale != (1.0, 1.0)):
                image, masks = random_affine(image, masks, a.rotate_deg, a.scale, gen)
            if draws[1] < a.augment_prob and a.noise_std > 0:
                image = image + a.noise_std * torch.randn(image.shape, generator=gen)
        item = {"image": image.contiguous(), "labels": torch.from_numpy(self.labels[index]), "index": index}
        if self.maps:
            item["map"] = masks[0].round().long()
        return item


class BalancedBatchSampler(Sampler):
    """Batches of ``n_classes`` findings x ``n_samples`` cases carrying each, for triplet training.

    Each batch draws ``n_classes`` distinct findings uniformly among those carried by at least one case,
    then, per finding, ``n_samples`` of its cases: without replacement when it has that many, with
    replacement otherwise. A batch is the concatenation of the groups, in draw order (group ``g`` =
    positions ``g * n_samples`` to ``(g + 1) * n_samples - 1``), so it holds exactly ``n_classes *
    n_samples`` indices; a case carrying several drawn findings may appear in several groups. Cases without
    any finding are never drawn (they could only be negatives, and the groups need cases of a finding).
    Batches depend only on ``(seed, epoch)``; call :meth:`set_epoch` before each epoch (Lightning does).

    Arguments:
      labels (np.ndarray): (N, L) binary findings of the dataset's items.
      n_classes (int): findings per batch, >= 1. n_samples (int): cases per finding, >= 1.
      steps (int): batches per epoch. seed (int): base seed.

    Raises:
      InputError: fewer than ``n_classes`` findings carried by any case, or no two drawable cases without
        a finding in common (every batch would then hold no negative, and the triplet loss would be 0
        throughout).
    """

    def __init__(self, labels, n_classes: int, n_samples: int, steps: int, seed: int = 0):
        super().__init__()
        y = np.asarray(labels).astype(bool)
        if y.ndim != 2:
            raise InputError(f"labels must be an (N, L) matrix, got shape {y.shape}")
        self.members = [np.flatnonzero(y[:, k]) for k in range(y.shape[1])]
        self.classes = np.array([k for k, m in enumerate(self.members) if m.size > 0], dtype=np.int64)
        self.n_classes, self.n_samples, self.steps = int(n_classes), int(n_samples), int(steps)
        self.seed, self.epoch = int(seed), 0
        if min(self.n_classes, self.n_samples, self.steps) < 1:
            raise InputError("n_classes, n_samples and steps must be at least 1")
        if self.classes.size < self.n_classes:
            raise InputError(f"a balanced batch needs {self.n_classes} findings carried by training cases, found "
                             f"{self.classes.size} (lower n_classes_per_batch or add cases)")
        from irisseg.losses import triplet_masks

        drawn = torch.from_numpy(y[y.any(1)])
        if not triplet_masks(drawn)[1].any():
            raise InputError(f"every pair of the {len(drawn)} training cases with a finding shares a finding: a "
                             "triplet needs a negative (a case without the anchor's findings); add such cases "
                             "or use mode microf1")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        for _ in range(self.steps):
            batch: list[int] = []
            for k in rng.choice(self.classes, self.n_classes, replace=False):
                cases = self.members[int(k)]
                pick = rng.choice(cases, self.n_samples, replace=cases.size < self.n_samples)
                batch.extend(int(i) for i in pick)
            yield batch


class ShuffledBatchSampler(Sampler):
    """Batches of ``batch_size`` items from consecutive random permutations of ``range(n)`` (microf1 mode).

    An epoch is ``steps`` batches cut from as many permutations as needed (each item once per permutation),
    drawn from ``(seed, epoch)``; call :meth:`set_epoch` before each epoch (Lightning does).

    Arguments:
      n (int): items, >= 1. batch_size (int): items per batch. steps (int): batches per epoch. seed (int).
    """

    def __init__(self, n: int, batch_size: int, steps: int, seed: int = 0):
        super().__init__()
        self.n, self.batch_size, self.steps, self.seed, self.epoch = int(n), int(batch_size), int(steps), int(seed), 0
        if min(self.n, self.batch_size, self.steps) < 1:
            raise InputError("n, batch_size and steps must be at least 1")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        need = self.steps * self.batch_size
        order = np.concatenate([rng.permutation(self.n) for _ in range(-(-need // self.n))])
        for s in range(self.steps):
            yield [int(i) for i in order[s * self.batch_size:(s + 1) * self.batch_size]]


# ---------------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------------
def evaluate_embeddings(embeddings, labels, probabilities=None, threshold: float = 0.5) -> dict:
    """Leave-one-out retrieval scores of a set against itself, and classification F1 when there is a head.

    Every case queries the others (:func:`irisseg.metrics.rank_by_similarity` with ``exclude_self=True``,
    cosine similarity); :func:`irisseg.metrics.retrieval_metrics` scores the rankings (relevant = sharing a
    finding). Each cutoff k of :data:`KS` is capped at ``n - 1`` (the gallery a query sees), so with 6 cases
    ``map@10`` is mAP over the 5 others. Queries without any relevant case are left out of the means (NaN
    when none has one).

    Arguments:
      embeddings (np.ndarray): (n, E) unit-norm embeddings, n >= 2.
      labels (np.ndarray): (n, L) binary findings.
      probabilities (np.ndarray | None): (n, L) head probabilities; None: no classification scores.
      threshold (float): probability threshold of the predictions.

    Returns:
      dict: ``precision@k``, ``recall@k``, ``map@k``, ``ndcg@k`` for k in :data:`KS`; ``micro_f1``,
      ``macro_f1`` (with probabilities); ``select`` (``micro_f1 + 1e-3 * map@10`` with probabilities,
      ``map@10`` without; a NaN mAP counts as 0); ``n`` (cases).

    Raises:
      InputError: fewer than 2 cases or mis-shaped inputs.
    """
    from irisseg.metrics import classification_f1, rank_by_similarity, retrieval_metrics

    emb = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n = emb.shape[0]
    if n < 2 or y.shape[0] != n:
        raise InputError(f"scoring needs at least 2 cases with as many label rows, got {n} embeddings and "
                         f"{y.shape[0]} label rows")
    capped = {k: min(k, n - 1) for k in KS}
    ranking = rank_by_similarity(emb, emb, max(capped.values()), exclude_self=True)
    scores = retrieval_metrics(y, y, ranking, ks=sorted(set(capped.values())), exclude_self=True)
    out: dict = {f"{m}@{k}": float(scores[f"{m}@{capped[k]}"]) for m in ("precision", "recall", "map", "ndcg")
                 for k in KS}
    map10 = out["map@10"] if math.isfinite(out["map@10"]) else 0.0
    if probabilities is not None:
        f1 = classification_f1(np.asarray(probabilities) > threshold, y)
        out["micro_f1"], out["macro_f1"] = float(f1["micro_f1"]), float(f1["macro_f1"])
        out["select"] = out["micro_f1"] + 1e-3 * map10
    else:
        out["select"] = map10
    out["n"] = n
    return out


# ---------------------------------------------------------------------------------------------------
# module
# ---------------------------------------------------------------------------------------------------
class RetrievalLightning(AnnealedModule):
    """LightningModule of both retrieval modes: training on augmented batches, scoring on ``train_eval``.

    Loss: triplet mode :func:`irisseg.losses.triplet_loss` on the embeddings (``cfg.margin``,
    ``cfg.mining``); microf1 mode :func:`irisseg.losses.soft_micro_f1_loss` on the logits plus
    ``cfg.bce_weight`` times the mean binary cross-entropy. Validation embeds the ``train_eval`` cases and
    scores them with :func:`evaluate_embeddings`; ``val_loss`` is the same loss on the whole set (triplet:
    every case an anchor), without the finding-map term that training adds with ``cfg.map_weight``. The optimiser and schedule come from :class:`AnnealedModule`.

    Arguments:
      model (EmbeddingNet): the network (with a head of one logit per finding in microf1 mode).
      cfg (RetrievalTrainConfig): settings. finding_names (Sequence[str]): the L findings (PR-curve tags).
    """

    def __init__(self, model: torch.nn.Module, cfg: RetrievalTrainConfig, finding_names: Sequence[str]):
        super().__init__()
        self.model, self.cfg, self.finding_names = model, cfg, list(finding_names)
        self.best_val = -math.inf
        self._train_losses: list[float] = []
        self._no_triplet = 0  # training batches of this epoch without an anchor having a positive and a negative
        self._val: list[tuple[torch.Tensor, ...]] = []
        self.epoch_summary: dict | None = None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(x)

    def loss(self, out: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """The mode's loss of a batch's model outputs and (B, L) findings; a float32 scalar."""
        from irisseg.losses import soft_micro_f1_loss, triplet_loss

        if self.cfg.mode == "triplet":
            return triplet_loss(out["embedding"], labels, margin=self.cfg.margin, mining=self.cfg.mining)
        logits, target = out["logits"].float(), labels.float()
        loss = soft_micro_f1_loss(logits, target)
        if self.cfg.bce_weight > 0:
            loss = loss + self.cfg.bce_weight * torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        from irisseg.losses import finding_map_loss

        out = self.model(batch["image"])
        loss = self.loss(out, batch["labels"])
        if self.cfg.map_weight > 0:
            loss = loss + self.cfg.map_weight * finding_map_loss(out["maps"], batch["map"])
        self._train_losses.append(float(loss.detach()))
        if self.cfg.mode == "triplet":
            from irisseg.losses import triplet_masks

            pos, neg = triplet_masks(batch["labels"])
            self._no_triplet += int(not (pos.any(1) & neg.any(1)).any())
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self.model(batch["image"])
        logits = out["logits"].float().cpu() if "logits" in out else None
        self._val.append((batch["index"].cpu(), out["embedding"].float().cpu(), batch["labels"].float().cpu(), logits))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        order = torch.cat([v[0] for v in self._val]).argsort()
        emb = torch.cat([v[1] for v in self._val])[order]
        labels = torch.cat([v[2] for v in self._val])[order]
        logits = torch.cat([v[3] for v in self._val])[order] if self._val[0][3] is not None else None
        self._val = []
        out = {"embedding": emb, **({"logits": logits} if logits is not None else {})}
        probs = torch.sigmoid(logits).numpy() if logits is not None else None
        scores = evaluate_embeddings(emb.numpy(), labels.numpy(), probs)
        summary = {"train_loss": float(np.mean(self._train_losses)) if self._train_losses else float("nan"),
                   "val_loss": float(self.loss(out, labels)),
                   **{f"val_{k}": float(v) for k, v in scores.items()}}
        if self._train_losses and self._no_triplet == len(self._train_losses):
            warnings.warn(f"epoch {self.current_epoch}: none of its {self._no_triplet} triplet batches held a case "
                          "with both a positive and a negative (cases sharing a finding / none), so the triplet "
                          "loss was 0 and taught nothing; the cases share findings too widely for triplet "
                          "training (use mode microf1, or add cases without each other's findings)", stacklevel=1)
        self._train_losses, self._no_triplet = [], 0
        self.epoch_summary = summary
        for k, v in summary.items():
            if k.startswith("val_") and math.isfinite(v):
                self.log("val/" + k[4:].replace("@", "_at_"), float(v), prog_bar=k == "val_select", batch_size=1)
        if probs is not None and not self.trainer.sanity_checking:
            self._pr_curves(labels.numpy(), probs)

    def _pr_curves(self, labels: np.ndarray, probs: np.ndarray) -> None:
        """One TensorBoard PR curve per finding (head probabilities on train_eval), when TensorBoard logs."""
        try:
            from lightning.pytorch.loggers import TensorBoardLogger
        except ImportError:  # pragma: no cover
            return
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                with np.errstate(divide="ignore", invalid="ignore"):
                    for k, name in enumerate(self.finding_names):
                        logger.experiment.add_pr_curve(f"pr_curve/{name}", labels[:, k].astype(bool), probs[:, k],
                                                       global_step=self.current_epoch)


class _Epoch(L.Callback):
    """Tell the sampler and the augmentation stream which epoch starts."""

    def __init__(self, *items):
        self.items = items

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        for item in self.items:
            item.set_epoch(trainer.current_epoch)


# ---------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------
def _splits(table, cfg: RetrievalTrainConfig, out: Path, resume: bool) -> dict[str, list[str]]:
    path = out / "splits.json"
    if resume and path.is_file():
        try:
            splits = json.loads(path.read_text())
            splits = {k: [str(c) for c in splits[k]] for k in SPLIT_NAMES}
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{path}: not a retrieval split (expected lists 'train', 'train_eval', 'test')") from None
        unknown = [c for ids in splits.values() for c in ids if c not in set(table.case_ids)]
        if unknown:
            raise InputError(f"{path}: case(s) {', '.join(unknown[:5])} are not in {table.root} any more")
        return splits
    parts = multilabel_stratified_split(table.labels, cfg.split, seed=cfg.seed)
    return {name: [table.case_ids[i] for i in idx] for name, idx in zip(SPLIT_NAMES, parts, strict=True)}


def _check_resumable(cfg: RetrievalTrainConfig, out: Path) -> None:
    """InputError when the run in ``out`` was trained with another architecture or mode than ``cfg``."""
    import yaml

    path = out / "train_config.yaml"
    try:
        before = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        before = None
    if not isinstance(before, dict):
        return
    now = cfg.to_yaml_dict()
    changed = [k for k in ("mode", "grid", "channels", "embedding_dim", "map_weight", "map_stage")
               if k in before and before[k] != now[k]]
    if changed:
        raise InputError(f"{out}: cannot resume with other {', '.join(changed)} than the run was started with "
                         f"({', '.join(f'{k}={before[k]}' for k in changed)}); use a new --out")


def _model_extra(cfg: RetrievalTrainConfig, info: dict, epoch_info: dict) -> dict:
    return {"retrieval": {**info, "epoch": epoch_info["epoch"], "metrics": epoch_info["val"]},
            "train": cfg.to_yaml_dict()}


def train_retrieval(cfg: RetrievalTrainConfig, data: str | Path, out: str | Path, resume: bool = False,
                    device: str = "auto", progress: bool = True, callbacks: list[L.Callback] | None = None) -> Path:
    """Train a retrieval embedding network on a labelled collection; returns the run folder.

    Arguments:
      cfg (RetrievalTrainConfig): settings (``cfg.mode`` picks triplet or micro-F1 training).
      data (str | Path): nnU-Net-style dataset folder (``imagesTr/<case>_0000.nii.gz`` ..., ``labelsTr/``,
        ``dataset.json``, optionally ``findings.csv``; see :func:`irisseg.data.findings.load_findings`).
      out (str | Path): the run folder (content in the module docstring).
      resume (bool): continue from ``out/checkpoints/last.ckpt`` with the same split (and cache).
      device: ``cpu``, ``cuda`` or ``auto`` (bf16 autocast on CUDA).
      progress (bool): progress bars. callbacks: extra Lightning callbacks (tests).

    Returns:
      Path: ``out``.

    Raises:
      InputError: an unreadable dataset or case, no findings, too few cases for the split (train_eval needs
        2), too few findings in the training cases for a balanced batch, a bad device, nothing to resume.
        These are all checked before anything is written.
    """
    import yaml
    from lightning.pytorch.callbacks import EarlyStopping

    from irisseg.data.findings import load_findings
    from irisseg.incontext import resolve_device
    from irisseg.models.embedding import EmbeddingConfig, EmbeddingNet

    out = Path(out)
    ckpt = resume_path(out, resume)
    if ckpt:
        _check_resumable(cfg, out)
    resolve_device(device)
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    table = load_findings(data)
    if not table.names:
        raise InputError(f"{data}: the collection declares no finding")
    splits = _splits(table, cfg, out, resume)
    row_of = {c: i for i, c in enumerate(table.case_ids)}
    rows = {k: [row_of[c] for c in ids] for k, ids in splits.items()}
    if len(rows["train"]) < 1 or len(rows["train_eval"]) < 2:
        raise InputError(f"{data}: {len(table.case_ids)} case(s) give {len(rows['train'])} train and "
                         f"{len(rows['train_eval'])} train_eval case(s); training needs at least 1 and 2 "
                         f"(add cases or raise the train_eval fraction of 'split')")
    train_labels, eval_labels = table.labels[rows["train"]], table.labels[rows["train_eval"]]
    steps = cfg.steps_per_epoch * cfg.accumulate
    if cfg.mode == "triplet":
        sampler = BalancedBatchSampler(train_labels, cfg.n_classes_per_batch, cfg.n_samples_per_class, steps,
                                       seed=cfg.seed)
    else:
        sampler = ShuffledBatchSampler(len(rows["train"]), cfg.batch_size, steps, seed=cfg.seed)

    use_maps = cfg.map_weight > 0
    cache = build_volume_cache(table, cfg.grid, cfg.cache_dtype, out / "cache", progress=progress, maps=use_maps)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    n_findings = len(table.names)
    model = EmbeddingNet(EmbeddingConfig(
        name=f"retrieval-{cfg.mode}", in_channels=cache.channels, channels=cfg.channels,
        embedding_dim=cfg.embedding_dim, n_classes=n_findings if cfg.mode == "microf1" else 0, dropout=cfg.dropout,
        map_classes=n_findings if use_maps else 0, map_stage=cfg.map_stage))
    train_ds = CachedVolumeDataset(cache, rows["train"], train_labels, augment=cfg if cfg.augment else None,
                                   seed=cfg.seed, maps=use_maps)
    eval_ds = CachedVolumeDataset(cache, rows["train_eval"], eval_labels)
    # The first epoch's batches are drawn before any hook runs: give them the (resumed) epoch now.
    first = int(torch.load(ckpt, map_location="cpu", weights_only=True).get("epoch", -1)) + 1 if ckpt else 0
    sampler.set_epoch(first)
    train_ds.set_epoch(first)
    train_dl = DataLoader(train_ds, batch_sampler=sampler, num_workers=cfg.num_workers,
                          worker_init_fn=lambda _: torch.set_num_threads(1))
    val_dl = DataLoader(eval_ds, batch_size=cfg.eval_batch_size, shuffle=False)

    out.mkdir(parents=True, exist_ok=True)
    _write_text_atomic(out / "splits.json", json.dumps(splits, indent=1))
    _write_text_atomic(out / "train_config.yaml", yaml.safe_dump(cfg.to_yaml_dict()))
    info = {"mode": cfg.mode, "grid": list(cfg.grid), "in_channels": cache.channels, "finding_names": list(table.names),
            "findings_source": table.source, "normalization": _NORMALIZATION,
            "embedding": ("L2-normalised projection read by the classification head" if cfg.mode == "microf1"
                          else "L2-normalised projection trained with the triplet loss"),
            "dataset": str(data), "split": splits, "split_fractions": list(cfg.split),
            "selection": "micro_f1 + 1e-3 * map@10" if cfg.mode == "microf1" else "map@10"}
    module = RetrievalLightning(model, cfg, table.names)
    stop = EarlyStopping(monitor="val/select", mode="max", patience=cfg.patience, check_finite=False)
    trainer = make_trainer(
        out, max_epochs=cfg.epochs, device=device, gradient_clip_val=1.0, accumulate_grad_batches=cfg.accumulate,
        callbacks=[stop, _Epoch(sampler, train_ds),
                   RunRecorder(out, METRICS_COLUMNS, "val_select", lambda e: _model_extra(cfg, info, e)),
                   *(callbacks or [])],
        progress=progress, max_time={"minutes": cfg.max_minutes} if cfg.max_minutes else None)
    trainer.fit(module, train_dl, val_dl, ckpt_path=ckpt, weights_only=True)
    return out
