"""Case-level findings of a labelled collection, and the fixed-grid input of the retrieval network.

Similar-case retrieval treats every case as a multi-label item: the set of *findings* it carries (the
structures, lesions or abnormalities labelled in it). :func:`load_findings` reads them for an
nnU-Net-style dataset, either from a ``findings.csv`` table in the dataset folder or, by default, from
the label maps (finding ``k`` = label ``k`` of ``dataset.json`` present in the case's label map).
``irisseg synth --mode findings`` writes datasets whose label maps carry a random subset of its six
finding types, so both routes give the same table there.

:func:`retrieval_input` takes an image of any geometry to the retrieval network's fixed grid: the whole
field of view resampled to ``shape`` (D, H, W), each channel clipped to its 0.5-99.5 percentiles and
z-scored (the same preprocessing as the in-context model, :class:`irisseg.preprocess.Preprocessor`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from irisseg.errors import InputError
from irisseg.io import Volume

__all__ = ["FindingsTable", "load_findings", "retrieval_input", "retrieval_map", "FINDINGS_CSV"]

#: Optional table of case findings in a dataset folder: a ``case`` column, then one 0/1 column per finding.
FINDINGS_CSV = "findings.csv"


@dataclass
class FindingsTable:
    """The findings of every case of a collection.

    Attributes:
      root (Path): the dataset folder.
      case_ids (list[str]): N case ids, sorted.
      image_paths (list[list[Path]]): per case, its channel files (``_0000``, ``_0001``...).
      labels (np.ndarray): uint8 (N, L) multi-hot: ``labels[i, k] == 1`` when case i carries finding k.
      names (list[str]): the L finding names.
      source (str): ``"findings.csv"`` or ``"label maps"``.
      label_paths (list[Path | None]): per case its label map (``labelsTr/<case>``), None when it has none.
      label_values (dict[str, int]): finding name -> its id in the label maps, for the findings that
        ``dataset.json`` declares as labels (all of them when the findings come from the label maps; with
        ``findings.csv``, the columns named like a declared label). Support selection for in-context
        segmentation (:func:`irisseg.retrieval.select_supports`) cuts a finding's mask out of a label map
        with it.
    """

    root: Path
    case_ids: list[str]
    image_paths: list[list[Path]]
    labels: np.ndarray
    names: list[str]
    source: str
    label_paths: list[Path | None] = field(default_factory=list)
    label_values: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        if not self.label_paths:
            self.label_paths = [None] * len(self.case_ids)

    def __len__(self) -> int:
        return len(self.case_ids)

    def subset(self, case_ids: Sequence[str]) -> FindingsTable:
        """The table restricted to ``case_ids`` (in that order); unknown ids are an InputError."""
        index = {c: i for i, c in enumerate(self.case_ids)}
        missing = [c for c in case_ids if c not in index]
        if missing:
            raise InputError(f"{self.root}: unknown case id(s) {', '.join(missing[:5])}")
        rows = [index[c] for c in case_ids]
        return FindingsTable(self.root, list(case_ids), [self.image_paths[i] for i in rows],
                             self.labels[rows], list(self.names), self.source,
                             [self.label_paths[i] for i in rows], dict(self.label_values))

    def findings_of(self, i: int) -> list[str]:
        """The names of case i's findings."""
        return [n for n, v in zip(self.names, self.labels[i]) if v]


def _from_csv(path: Path, case_ids: list[str]) -> tuple[np.ndarray, list[str]]:
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the findings table ({exc})") from None
    if not rows or not rows[0] or rows[0][0].strip() != "case" or len(rows[0]) < 2:
        raise InputError(f"{path}: expected a header 'case,<finding 1>,<finding 2>,...'")
    names = [n.strip() for n in rows[0][1:]]
    table: dict[str, list[int]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != len(names) + 1:
            raise InputError(f"{path}: line {line} has {len(row)} fields, expected {len(names) + 1}")
        try:
            values = [int(float(v)) for v in row[1:]]
        except ValueError:
            raise InputError(f"{path}: line {line} holds a value that is not 0 or 1") from None
        if any(v not in (0, 1) for v in values):
            raise InputError(f"{path}: line {line} holds a value that is not 0 or 1")
        table[row[0].strip()] = values
    missing = [c for c in case_ids if c not in table]
    if missing:
        raise InputError(f"{path}: no row for case(s) {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return np.array([table[c] for c in case_ids], dtype=np.uint8).reshape(len(case_ids), len(names)), names


def load_findings(data: str | os.PathLike, min_voxels: int = 1) -> FindingsTable:
    """Read the findings of every labelled case of an nnU-Net-style dataset.

    Arguments:
      data (str | os.PathLike): dataset folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``).
      min_voxels (int): with label maps, a finding counts as present from this many voxels of its label.

    Returns:
      FindingsTable: from ``DATA/findings.csv`` when it exists (header ``case,<name>,...``, one 0/1 row per
      case), otherwise from the label maps: finding names are ``dataset.json``'s labels except background
      (ordered by label id) and ``labels[i, k]`` says whether label ``k``'s id covers at least
      ``min_voxels`` voxels of case i (region-based datasets: the label's first id).

    Raises:
      InputError: an unreadable dataset, table or label map, a case without a row, values other than 0/1.
    """
    from irisseg.data.datasets import load_dataset

    root = Path(data)
    dataset = load_dataset(root)
    cases = sorted(dataset.cases, key=lambda c: c.case_id)
    cases = [c for c in cases if c.label_path is not None]
    if not cases:
        raise InputError(f"{root}: no labelled case")
    ids = [c.case_id for c in cases]
    paths = [list(c.image_paths) for c in cases]
    label_paths = [c.label_path for c in cases]
    items = sorted(((v if isinstance(v, int) else v[0]), k) for k, v in dataset.labels.items()
                   if (v if isinstance(v, int) else v[0]) != 0)
    declared = {name: int(v) for v, name in items}
    table = root / FINDINGS_CSV
    if table.is_file():
        labels, names = _from_csv(table, ids)
        return FindingsTable(root, ids, paths, labels, names, FINDINGS_CSV, label_paths,
                             {n: declared[n] for n in names if n in declared})
    if not items:
        raise InputError(f"{root}: dataset.json declares no label besides background")
    ids_of = np.array([v for v, _ in items])
    labels = np.zeros((len(cases), len(items)), dtype=np.uint8)
    for i, case in enumerate(cases):
        counts = np.bincount(np.asarray(case.load_label().array, dtype=np.int64).ravel().clip(0),
                             minlength=int(ids_of.max()) + 1)
        labels[i] = counts[ids_of] >= int(min_voxels)
    return FindingsTable(root, ids, paths, labels, [n for _, n in items], "label maps", label_paths, declared)


def retrieval_input(image: Volume | Sequence[Volume], shape: Sequence[int] = (64, 64, 64)) -> np.ndarray:
    """The retrieval network's input for an image: whole field of view on a fixed grid, normalised.

    Arguments:
      image (Volume | Sequence[Volume]): one volume (D, H, W) or its channels (same geometry), any
        spacing, origin and direction.
      shape (Sequence[int]): the grid (D, H, W), voxels.

    Returns:
      np.ndarray: float32 (C, *shape): each channel resampled (linear) over its whole extent, clipped to its
      0.5-99.5 percentiles and z-scored.

    Raises:
      InputError: NaN intensities or channels of different geometry.
    """
    from irisseg.preprocess import PreprocessConfig, Preprocessor

    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"retrieval grid must be 3 positive sizes (D, H, W), got {shape}")
    return Preprocessor(PreprocessConfig(target_shape=shape))(image).image.astype(np.float32, copy=False)


def retrieval_map(label: Volume, values: Sequence[int], shape: Sequence[int] = (64, 64, 64)) -> np.ndarray:
    """Where each finding is, on the retrieval network's grid (the training target of its map head).

    Arguments:
      label (Volume): a case's label map (D, H, W), in its image's geometry.
      values (Sequence[int]): the label id of each of the L findings (finding ``k`` = ``values[k]``).
      shape (Sequence[int]): the grid (D, H, W), voxels, as given to :func:`retrieval_input`: the label map's
        whole field of view is resampled (nearest neighbour) exactly as the image is.

    Returns:
      np.ndarray: uint8 (*shape): ``k + 1`` where the label is ``values[k]``, 0 elsewhere.

    Raises:
      InputError: more than 254 findings, or a bad grid.
    """
    from irisseg.preprocess import PreprocessConfig, Preprocessor

    values = [int(v) for v in values]
    if len(values) > 254:
        raise InputError(f"a finding map holds at most 254 findings, got {len(values)}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"retrieval grid must be 3 positive sizes (D, H, W), got {shape}")
    array = np.asarray(label.array)
    coded = np.zeros(array.shape, np.uint8)
    for k, v in enumerate(values):
        coded[array == v] = k + 1
    # the same steps as retrieval_input's Preprocessor(target_shape=shape): reoriented, the whole extent
    record = Preprocessor(PreprocessConfig(target_shape=shape)).plan(label)
    return np.asarray(record.apply(label.with_array(coded), kind="label").array, dtype=np.uint8)
