"""Reading nnU-Net (v1, v2) and Medical Segmentation Decathlon raw datasets, and deterministic splits.

Layouts understood by :func:`load_dataset` (``root`` is the dataset folder):

* **nnU-Net v2** -- ``dataset.json`` with ``channel_names`` (``{"0": "CT"}``), ``labels`` (name -> id,
  ``{"background": 0, "liver": 1}``; region-based datasets give a list of ids for some names),
  ``numTraining`` and ``file_ending`` (``".nii.gz"``, ``".nrrd"``, ``".mha"``...). Images are
  ``imagesTr/{case}_{XXXX}{file_ending}``, one 3D file per channel ``XXXX`` = ``0000``, ``0001``...;
  labels are ``labelsTr/{case}{file_ending}``; ``imagesTs/`` (and a non-standard ``labelsTs/``) are
  optional. An explicit ``"dataset": {case: {"images": [...], "label": ...}}`` entry (paths relative to
  ``root`` or absolute) replaces the folder scan, as in nnU-Net v2.
* **MSD / nnU-Net v1** -- ``dataset.json`` with ``modality`` (``{"0": "MRI"}``), ``labels`` (id -> name,
  ``{"0": "background", "1": "edema"}``), ``training`` (``[{"image": "./imagesTr/x.nii.gz", "label":
  "./labelsTr/x.nii.gz"}]``) and ``test`` (a list of image paths). A listed image that exists is used as
  is: with several channels it is an MSD 4D file (``Case.multichannel_file``), listed fine but refused by
  :meth:`Case.load_image` (irisseg reads 3D volumes only). When only ``x_0000.nii.gz``, ``x_0001.nii.gz``...
  exist (the nnU-Net v1 task layout), the per-channel files are used.
* **No dataset.json** -- the cases are inferred from ``imagesTr``/``labelsTr`` with a warning: channels
  from the ``_XXXX`` suffixes, labels named ``label_1``, ``label_2``... from the values found by reading
  the label files (the only case where loading reads voxel data).

Hidden files and macOS ``._*`` files are ignored everywhere. Loading only looks at file names; problems
(an image without its label or the reverse, a missing channel file, a missing, corrupt or label-less
dataset.json) are raised as one-line :class:`~irisseg.errors.InputError` messages naming the files.
Volumes are read on demand by :meth:`Case.load_image`, :meth:`Case.load_label` and :meth:`Case.load`.

Conventions: a :class:`~irisseg.io.Volume` holds an array ``(D, H, W)`` (SimpleITK ``z, y, x`` order) with
spacing and origin in mm in ``(x, y, z)`` order and a 3x3 direction; multi-channel images come back as one
Volume per channel (same geometry, checked), or stacked as ``(C, D, H, W)`` by :func:`stack_channels`.

Splits are deterministic: :func:`split` (train/val/test) and :func:`kfold` (nnU-Net-style k-fold) sort the
case ids and shuffle them with ``numpy.random.default_rng(seed)``, so the result does not depend on the
order the ids are given in. :func:`save_splits` / :func:`load_splits` write and read nnU-Net v2's
``splits_final.json`` (a list of ``{"train": [...], "val": [...]}``). The folds are not the same as
nnU-Net's own (which uses scikit-learn's KFold with seed 12345), only the format is.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from irisseg.errors import InputError
from irisseg.io import (
    SUFFIXES,
    Volume,
    _short_itk_message,
    check_same_geometry,
    read_mask,
    read_volume,
    volume_suffix,
)

__all__ = [
    "Case",
    "image_cases",
    "Dataset",
    "load_dataset",
    "stack_channels",
    "split",
    "kfold",
    "save_splits",
    "load_splits",
]

#: How many case ids an error message lists before saying "and N more".
_SHOWN = 5

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


# ===================================================================================================
# records
# ===================================================================================================
@dataclass
class Case:
    """One case of a dataset: its image file(s) and, for training cases, its label map.

    Arguments:
      case_id (str): the case identifier, e.g. ``"liver_003"`` (the file name without channel suffix and
        file ending).
      image_paths (list[Path]): one 3D file per channel, in channel order (``_0000``, ``_0001``...); for an
        MSD 4D image (``multichannel_file``), the single file holding every channel.
      label_path (Path | None): the label map (``labelsTr/{case_id}{file_ending}``), None for test cases.
      num_channels (int): number of image channels declared by the dataset.
      multichannel_file (bool): True when all channels are stored in one 4D file (MSD), which
        :meth:`load_image` refuses.
      label_values (tuple[int, ...] | None): label values the label map may hold (background included), from
        dataset.json; None disables the check.
    """

    case_id: str
    image_paths: list[Path]
    label_path: Path | None = None
    num_channels: int = 1
    multichannel_file: bool = False
    label_values: tuple[int, ...] | None = field(default=None, repr=False)

    def load_image(self) -> list[Volume]:
        """Read every channel of the image.

        Returns:
          list[Volume]: one Volume per channel, in channel order, each an array (D, H, W) with spacing and
          origin in mm (x, y, z) and direction (3, 3); all channels share the first one's geometry.

        Raises:
          InputError: a file is missing or unreadable, a channel's geometry differs from channel 0's, or
          the image is an MSD 4D file (convert it to one 3D file per channel first).
        """
        if self.multichannel_file:
            path = self.image_paths[0]
            ending = volume_suffix(path) or ".nii.gz"
            raise InputError(
                f"{path}: holds {self.num_channels} channels in one 4D file, and irisseg reads 3D volumes only; "
                f"convert the dataset to one 3D file per channel ({self.case_id}_0000{ending}, "
                f"{self.case_id}_0001{ending}, ...), e.g. with nnUNetv2_convert_MSD_dataset"
            )
        volumes = [read_volume(path) for path in self.image_paths]
        first = volumes[0]
        for path, volume in zip(self.image_paths[1:], volumes[1:], strict=True):
            check_same_geometry(first, volume, self.image_paths[0], path)
        return volumes

    def image_geometry(self) -> Volume:
        """The geometry of the image (its first file's header; no voxel is read): a Volume whose array is a
        zero-strided dummy of the image's shape (D, H, W), with spacing and origin in mm (x, y, z) and direction.

        Raises:
          InputError: the file is missing, unreadable or not at least 3D.
        """
        return _header_geometry(self.image_paths[0])

    def load_label(self, reference: Volume | None = None) -> Volume:
        """Read the label map and check it against the image and the dataset's declared labels.

        Arguments:
          reference (Volume | None): the case's image (any channel) if already read; otherwise only the
            header of the first image file is read to get the geometry (this also works for MSD 4D files).

        Returns:
          Volume: uint8 label map (int32 above 255), array (D, H, W), with the image's geometry. A label map
          holding only background is accepted.

        Raises:
          InputError: the case has no label file, the file is unreadable or not a label map (negative or
          fractional values), its geometry differs from the image's, or it holds a value dataset.json does
          not declare (the message names the file and the values).
        """
        if self.label_path is None:
            raise InputError(f"case {self.case_id}: no label file ({self.image_paths[0]} is a test image)")
        if reference is None:
            reference = self.image_geometry()
        label = read_mask(
            self.label_path, reference=reference, reference_name=self.image_paths[0], allow_empty=True
        )
        if self.label_values is not None:
            present = np.unique(label.array)
            undeclared = [int(v) for v in present if int(v) not in self.label_values]
            if undeclared:
                declared = ", ".join(map(str, self.label_values))
                raise InputError(
                    f"{self.label_path}: label value(s) {', '.join(map(str, undeclared))} not declared in "
                    f"dataset.json (declared: {declared})"
                )
        return label

    def load(self) -> tuple[list[Volume], Volume | None]:
        """Read the image channels and the label map (None for a case without label).

        Returns:
          tuple[list[Volume], Volume | None]: as :meth:`load_image` and :meth:`load_label`; the label is
          checked against the first channel's geometry.
        """
        images = self.load_image()
        label = self.load_label(reference=images[0]) if self.label_path is not None else None
        return images, label


@dataclass
class Dataset:
    """A raw segmentation dataset: its declared channels and labels and its training and test cases.

    Arguments:
      root (Path): the dataset folder (holding dataset.json, imagesTr, labelsTr).
      name (str): dataset.json's ``name``, or the folder name.
      format (str): ``"nnunet_v2"``, ``"msd"`` (MSD / nnU-Net v1 dataset.json) or ``"inferred"`` (no
        dataset.json).
      channel_names (list[str]): channel (modality) names in channel order, e.g. ``["T1", "T2"]``.
      labels (dict[str, int | tuple[int, ...]]): label name -> id, background included. Region-based
        nnU-Net v2 datasets map some names to a tuple of ids (e.g. ``"whole tumor": (1, 2, 3)``).
      label_names (dict[int, str]): id -> name for every declared id; an id used only inside regions is
        named ``label_<id>``.
      file_ending (str): the image file ending, e.g. ``".nii.gz"``.
      cases (list[Case]): training cases (with labels), sorted by case id.
      test_cases (list[Case]): test cases (``imagesTs``), sorted by case id; their ``label_path`` is set
        only when a ``labelsTs`` file exists.
      metadata (dict): the raw dataset.json content (empty when inferred).
      extra (dict[str, dict]): per-case records of an optional ``cases.json`` (irisseg synthetic datasets:
        seed, geometry, labels present, ``findings`` multi-hot list...), keyed by case id.
    """

    root: Path
    name: str
    format: str
    channel_names: list[str]
    labels: dict[str, int | tuple[int, ...]]
    label_names: dict[int, str]
    file_ending: str
    cases: list[Case] = field(default_factory=list)
    test_cases: list[Case] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    extra: dict[str, dict] = field(default_factory=dict)

    @property
    def case_ids(self) -> list[str]:
        """Ids of the training cases, sorted."""
        return [case.case_id for case in self.cases]

    @property
    def num_channels(self) -> int:
        """Number of image channels."""
        return len(self.channel_names)

    @property
    def label_values(self) -> tuple[int, ...]:
        """Every declared label id (background included), sorted."""
        return tuple(sorted(self.label_names))

    @property
    def is_region_based(self) -> bool:
        """True when some label name maps to several ids (nnU-Net v2 region-based training)."""
        return any(isinstance(v, tuple) for v in self.labels.values())

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self) -> Iterator[Case]:
        return iter(self.cases)

    def __getitem__(self, key: int | str) -> Case:
        """A training case by position (int, negative allowed) or by case id (str); InputError otherwise."""
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            return self.cases[key]
        for case in self.cases:
            if case.case_id == key:
                return case
        raise InputError(f"{self.root}: no training case {key!r} (cases: {_listing(self.case_ids)})")

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, format={self.format!r}, cases={len(self.cases)}, "
            f"test_cases={len(self.test_cases)}, channels={self.channel_names}, labels={self.labels})"
        )


# ===================================================================================================
# loading
# ===================================================================================================
def load_dataset(root: str | os.PathLike) -> Dataset:
    """Load the description of an nnU-Net v1/v2 or MSD raw dataset (file names only, no voxel data).

    Arguments:
      root (str | os.PathLike): the dataset folder, or its dataset.json.

    Returns:
      Dataset: channels, labels, training cases (image and label paths) and test cases. Volumes are read
      later with :meth:`Case.load_image`, :meth:`Case.load_label` or :meth:`Case.load`.

    Raises:
      InputError: one line naming the file and the problem: no such folder; dataset.json unreadable, not
      valid JSON, without ``labels`` or channels, or with malformed entries; training images without labels
      or labels without images (a few case ids listed and their count); missing or undeclared channel
      files; image files without the ``_XXXX`` channel suffix; no case at all.

    Warns:
      UserWarning: when there is no dataset.json and the cases are inferred, when ``numTraining`` differs
      from the number of cases found, and when test images listed in an MSD dataset.json are missing.
    """
    root = Path(root)
    if root.is_file() and root.name == "dataset.json":
        root = root.parent
    if not root.is_dir():
        raise InputError(f"{root}: no such dataset folder")
    json_path = root / "dataset.json"
    if not json_path.exists():
        dataset = _load_inferred(root)
    else:
        meta = _read_json(json_path)
        if not isinstance(meta, dict):
            raise InputError(f"{json_path}: expected a JSON object, got {type(meta).__name__}")
        if "labels" not in meta:
            raise InputError(
                f'{json_path}: no \'labels\' entry (e.g. "labels": {{"background": 0, "tumour": 1}})'
            )
        if "channel_names" in meta:
            dataset = _load_v2(root, json_path, meta)
        elif "modality" in meta:
            dataset = _load_v1(root, json_path, meta)
        else:
            raise InputError(
                f'{json_path}: declares no channels: add \'channel_names\' (nnU-Net v2, e.g. {{"0": "CT"}}) '
                "or 'modality' (MSD / nnU-Net v1)"
            )
        declared = meta.get("numTraining")
        if isinstance(declared, int) and declared != len(dataset.cases):
            warnings.warn(
                f"{json_path}: numTraining is {declared} but {len(dataset.cases)} training cases were found",
                UserWarning,
                stacklevel=2,
            )
    dataset.extra = _read_extra(root)
    return dataset


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _read_extra(root: Path) -> dict[str, dict]:
    """Per-case records of ``cases.json``: ``{"cases": [{"case": id, ...}]}`` or ``{id: {...}}``."""
    path = root / "cases.json"
    if not path.exists():
        return {}
    content = _read_json(path)
    records = content.get("cases") if isinstance(content, dict) else None
    if isinstance(records, list):
        if not all(isinstance(r, dict) and isinstance(r.get("case"), str) for r in records):
            raise InputError(f"{path}: every entry of 'cases' must be an object with a 'case' id")
        return {r["case"]: r for r in records}
    if isinstance(content, dict) and all(isinstance(v, dict) for v in content.values()):
        return dict(content)
    raise InputError(f'{path}: expected {{"cases": [{{"case": id, ...}}]}} or an object keyed by case id')


def _visible_files(folder: Path) -> list[Path]:
    """Plain files of ``folder`` that are not hidden (``.x``, macOS ``._x``), sorted; [] if no folder."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())


def _strip_ending(name: str, ending: str) -> str | None:
    """``name`` without ``ending`` (case-insensitive), or None when it does not end with it."""
    return name[: -len(ending)] if ending and name.lower().endswith(ending.lower()) else None


def _listing(ids: Sequence[str]) -> str:
    ids = list(ids)
    shown = ", ".join(ids[:_SHOWN])
    return shown + (f" ... ({len(ids) - _SHOWN} more)" if len(ids) > _SHOWN else "")


def _problem(count_what: str, ids: Sequence[str]) -> str:
    return f"{len(ids)} {count_what}: {_listing(sorted(ids))}"


def _raise_problems(root: Path, problems: list[str]) -> None:
    if problems:
        raise InputError(f"{root}: " + "; ".join(problems))


def _parse_v2_labels(json_path: Path, raw) -> tuple[dict[str, int | tuple[int, ...]], dict[int, str]]:
    if not isinstance(raw, dict) or not raw:
        raise InputError(f"{json_path}: 'labels' must be a non-empty object of name -> id")
    labels: dict[str, int | tuple[int, ...]] = {}
    for name, value in raw.items():
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise InputError(
                f"{json_path}: label {name!r} must map to a non-negative integer id (or a list of ids), got {value!r}"
            )
        labels[str(name)] = tuple(values) if isinstance(value, list) else value
    return labels, _names_of(labels)


def _names_of(labels: Mapping[str, int | tuple[int, ...]]) -> dict[int, str]:
    """id -> name: names of plain ids first, ``label_<id>`` for ids used only in regions; 0 is background."""
    names: dict[int, str] = {}
    for name, value in labels.items():
        if isinstance(value, int):
            names.setdefault(value, name)
    for value in labels.values():
        for v in value if isinstance(value, tuple) else ():
            names.setdefault(v, f"label_{v}")
    names.setdefault(0, "background")
    return dict(sorted(names.items()))


def _parse_v1_labels(json_path: Path, raw) -> tuple[dict[str, int], dict[int, str]]:
    if not isinstance(raw, dict) or not raw:
        raise InputError(f"{json_path}: 'labels' must be a non-empty object of id -> name")
    names: dict[int, str] = {}
    for key, name in raw.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            raise InputError(f'{json_path}: label ids must be integers ("0", "1"...), got {key!r}') from None
        if value < 0:
            raise InputError(f"{json_path}: label ids must be non-negative, got {key!r}")
        names[value] = str(name)
    names.setdefault(0, "background")
    names = dict(sorted(names.items()))
    return {name: value for value, name in names.items()}, names


def _parse_channels(json_path: Path, raw, key: str) -> list[str]:
    if not isinstance(raw, dict) or not raw:
        raise InputError(f'{json_path}: \'{key}\' must be a non-empty object like {{"0": "CT"}}')
    try:
        indexed = {int(k): str(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise InputError(f'{json_path}: \'{key}\' keys must be channel indices "0", "1"...') from None
    if sorted(indexed) != list(range(len(indexed))):
        raise InputError(
            f"{json_path}: '{key}' must number channels 0 to {len(indexed) - 1}, got {sorted(indexed)}"
        )
    return [indexed[i] for i in range(len(indexed))]


def _scan_channel_files(folder: Path, ending: str) -> tuple[dict[str, dict[int, Path]], list[str]]:
    """Group ``{case}_{XXXX}{ending}`` files of ``folder`` by case; also the names lacking the suffix."""
    cases: dict[str, dict[int, Path]] = {}
    unsuffixed = []
    for path in _visible_files(folder):
        stem = _strip_ending(path.name, ending)
        if stem is None:
            continue
        match = _CHANNEL_RE.match(stem)
        if match is None:
            unsuffixed.append(path.name)
            continue
        cases.setdefault(match["case"], {})[int(match["channel"])] = path
    return cases, unsuffixed


def _channel_problems(
    folder: Path, found: Mapping[str, Mapping[int, Path]], n_channels: int, ending: str, problems: list[str]
) -> dict[str, list[Path]]:
    """Check every case has exactly channels 0..n-1; return case -> channel paths (in order)."""
    missing, extra = [], []
    out = {}
    for case_id, channels in found.items():
        lacking = [c for c in range(n_channels) if c not in channels]
        beyond = sorted(c for c in channels if c >= n_channels)
        if lacking:
            missing.append(f"{case_id}_{lacking[0]:04d}{ending}")
        if beyond:
            extra.append(f"{case_id}_{beyond[0]:04d}{ending}")
        if not lacking:
            out[case_id] = [channels[c] for c in range(n_channels)]
    if missing:
        problems.append(
            _problem(f"image(s) in {folder.name} lack a channel file ({n_channels} declared), e.g.", missing)
        )
    if extra:
        problems.append(
            _problem(f"image(s) in {folder.name} have a channel beyond the {n_channels} declared", extra)
        )
    return out


def _infer_ending(folder: Path) -> str:
    endings = [volume_suffix(p) for p in _visible_files(folder)]
    endings = [e for e in endings if e]
    if not endings:
        raise InputError(f"{folder}: no image file (expected one of {', '.join(SUFFIXES)})")
    return max(sorted(set(endings)), key=endings.count)


def _pair_cases(
    images: Mapping[str, list[Path]],
    image_ids_seen: Iterable[str],
    labels_dir: Path,
    ending: str,
    n_channels: int,
    label_values: tuple[int, ...] | None,
    problems: list[str],
) -> list[Case]:
    """Training cases from channel files and ``labelsTr/{case}{ending}``; reports unpaired files."""
    label_files = {}
    for path in _visible_files(labels_dir):
        stem = _strip_ending(path.name, ending)
        if stem is not None:
            label_files[stem] = path
    seen = set(image_ids_seen)
    no_label = sorted(seen - set(label_files))
    no_image = sorted(set(label_files) - seen)
    if no_label:
        problems.append(_problem(f"training image(s) without a label labelsTr/<case>{ending}", no_label))
    if no_image:
        problems.append(_problem(f"label(s) without an image imagesTr/<case>_0000{ending}", no_image))
    return [
        Case(cid, paths, label_files[cid], n_channels, False, label_values)
        for cid, paths in sorted(images.items())
        if cid in label_files
    ]


def _test_cases_from_folder(
    root: Path, ending: str, n_channels: int, label_values: tuple[int, ...] | None, problems: list[str]
) -> list[Case]:
    found, _ = _scan_channel_files(root / "imagesTs", ending)
    images = _channel_problems(root / "imagesTs", found, n_channels, ending, problems)
    cases = []
    for cid, paths in sorted(images.items()):
        label = root / "labelsTs" / f"{cid}{ending}"
        cases.append(Case(cid, paths, label if label.is_file() else None, n_channels, False, label_values))
    return cases


def _check_no_unsuffixed(folder: Path, unsuffixed: list[str], ending: str) -> None:
    if unsuffixed:
        stem = _strip_ending(unsuffixed[0], ending)
        raise InputError(
            f"{folder / unsuffixed[0]}: image name lacks the channel suffix _XXXX (nnU-Net v2 expects "
            f"{stem}_0000{ending}); {len(unsuffixed)} such file(s) in {folder.name}"
        )


def image_cases(path: str | os.PathLike, n_channels: int = 1) -> list[tuple[str, list[Path]]]:
    """The cases to predict in a file or folder, grouping nnU-Net channel files.

    Arguments:
      path: an image file, or a folder of image files (e.g. ``imagesTs``). Channel files follow nnU-Net's
        ``<case>_<XXXX><ending>`` naming; with ``n_channels`` 1 a file without the suffix is a case by itself.
        Given a channel file ``<case>_0000<ending>``, its sibling channels are found next to it.
      n_channels (int): image channels the model expects.

    Returns:
      list[tuple[str, list[Path]]]: ``(case id, channel paths in channel order)``, sorted by case id.

    Raises:
      InputError: no such file or folder, no image in it, a case lacking a channel file or with one too
        many, (with several channels) a file without the channel suffix, two files of one case, or image
        files of several formats in one folder.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_file():
        ending = volume_suffix(path)
        if not ending:
            raise InputError(f"{path}: not an image file (expected one of {', '.join(SUFFIXES)})")
        stem = path.name[: -len(ending)]
        match = _CHANNEL_RE.match(stem)
        if match is None or (n_channels == 1 and match["channel"] != "0000"):
            if n_channels != 1:
                raise InputError(f"{path}: the model expects {n_channels} channels: name the files "
                                 f"<case>_0000{ending} ... <case>_{n_channels - 1:04d}{ending}")
            return [(stem, [path])]
        case_id = match["case"]
        paths = [path.with_name(f"{case_id}_{c:04d}{ending}") for c in range(n_channels)]
        for p in paths:
            if not p.is_file():
                raise InputError(f"{p}: missing channel file (the model expects {n_channels} channel(s))")
        extra = path.with_name(f"{case_id}_{n_channels:04d}{ending}")
        if extra.is_file():
            raise InputError(f"{extra}: extra channel file (the model expects {n_channels} channel(s), "
                             f"{case_id}_0000{ending} ... {case_id}_{n_channels - 1:04d}{ending})")
        return [(case_id, paths)]
    ending = _infer_ending(path)
    others = sorted(p.name for p in _visible_files(path) if volume_suffix(p) not in ("", ending))
    if others:
        raise InputError(f"{path}: mixes {ending} images with other formats ({_listing(others)}); keep one "
                         f"file format per folder")
    found, unsuffixed = _scan_channel_files(path, ending)
    if n_channels != 1:
        _check_no_unsuffixed(path, unsuffixed, ending)
    problems: list[str] = []
    grouped = _channel_problems(path, found, n_channels, ending, problems)
    _raise_problems(path, problems)
    cases = [(cid, paths) for cid, paths in grouped.items()]
    for name in unsuffixed:
        case_id = _strip_ending(name, ending)
        if case_id in grouped:
            raise InputError(f"{path}: {name} and {grouped[case_id][0].name} are both case {case_id!r} (one "
                             f"file, or nnU-Net channel files {case_id}_0000{ending} ..., per case)")
        cases.append((case_id, [path / name]))
    if not cases:
        raise InputError(f"{path}: no image file ending in {ending}")
    return sorted(cases)


def _load_v2(root: Path, json_path: Path, meta: dict) -> Dataset:
    channels = _parse_channels(json_path, meta["channel_names"], "channel_names")
    labels, label_names = _parse_v2_labels(json_path, meta["labels"])
    values = tuple(label_names)
    ending = meta.get("file_ending")
    if ending is not None and (not isinstance(ending, str) or not ending.startswith(".")):
        raise InputError(f"{json_path}: 'file_ending' must be a string like \".nii.gz\", got {ending!r}")
    problems: list[str] = []
    if "dataset" in meta:
        ending = ending or ".nii.gz"
        cases = _explicit_v2_cases(root, json_path, meta["dataset"], len(channels), values, problems)
    else:
        images_dir = root / "imagesTr"
        if not images_dir.is_dir():
            raise InputError(f"{root}: no imagesTr folder (and dataset.json has no 'dataset' file list)")
        ending = ending or _infer_ending(images_dir)
        found, unsuffixed = _scan_channel_files(images_dir, ending)
        _check_no_unsuffixed(images_dir, unsuffixed, ending)
        if not found:
            others = sorted({volume_suffix(p) for p in _visible_files(images_dir)} - {"", ending})
            hint = f" (found {', '.join(others)} files: check file_ending)" if others else ""
            raise InputError(f"{images_dir}: no image named <case>_0000{ending}{hint}")
        images = _channel_problems(images_dir, found, len(channels), ending, problems)
        cases = _pair_cases(images, found, root / "labelsTr", ending, len(channels), values, problems)
    test_cases = _test_cases_from_folder(root, ending, len(channels), values, problems)
    _raise_problems(root, problems)
    return Dataset(
        root=root,
        name=str(meta.get("name") or root.name),
        format="nnunet_v2",
        channel_names=channels,
        labels=labels,
        label_names=label_names,
        file_ending=ending,
        cases=cases,
        test_cases=test_cases,
        metadata=meta,
    )


def _explicit_v2_cases(
    root: Path, json_path: Path, entries, n_channels: int, values: tuple[int, ...], problems: list[str]
) -> list[Case]:
    """Cases from nnU-Net v2's ``"dataset": {case: {"images": [...], "label": path}}`` entry."""
    if not isinstance(entries, dict):
        raise InputError(
            f'{json_path}: \'dataset\' must be an object of case id -> {{"images": [...], "label": ...}}'
        )
    cases, missing, wrong_count = [], [], []
    for cid, entry in sorted(entries.items()):
        images = entry.get("images") if isinstance(entry, dict) else None
        label = entry.get("label") if isinstance(entry, dict) else None
        if (
            not isinstance(images, list)
            or not all(isinstance(p, str) for p in images)
            or not isinstance(label, str)
        ):
            raise InputError(
                f'{json_path}: \'dataset\' entry {cid!r} needs "images" (a list of paths) and "label"'
            )
        paths = [root / p for p in images]  # an absolute p replaces root
        if len(paths) != n_channels:
            wrong_count.append(cid)
            continue
        absent = [p for p in [*paths, root / label] if not p.is_file()]
        if absent:
            missing.append(f"{absent[0]}")
            continue
        cases.append(Case(str(cid), paths, root / label, n_channels, False, values))
    if wrong_count:
        problems.append(_problem(f"'dataset' entries without exactly {n_channels} image(s)", wrong_count))
    if missing:
        problems.append(_problem("file(s) listed in 'dataset' missing", missing))
    return cases


def _v1_case_id(path: str) -> str:
    name = Path(path).name
    ending = volume_suffix(name)
    return name[: -len(ending)] if ending else name.split(".", 1)[0]


def _resolve_v1_image(root: Path, relpath: str, n_channels: int) -> tuple[list[Path], bool, list[str]]:
    """Image files of an MSD/v1 entry: (paths, multichannel_file, names of missing channel files)."""
    path = root / relpath
    if path.is_file():
        return [path], n_channels > 1, []
    ending = volume_suffix(path) or ".nii.gz"
    stem = _strip_ending(path.name, ending) or path.name
    channels = [path.parent / f"{stem}_{c:04d}{ending}" for c in range(n_channels)]
    present = [p.is_file() for p in channels]
    if not any(present):
        return [], False, []
    return channels, False, [p.name for p, ok in zip(channels, present, strict=True) if not ok]


def _load_v1(root: Path, json_path: Path, meta: dict) -> Dataset:
    channels = _parse_channels(json_path, meta["modality"], "modality")
    labels, label_names = _parse_v1_labels(json_path, meta["labels"])
    values = tuple(label_names)
    training = meta.get("training")
    if not isinstance(training, list) or not all(
        isinstance(e, dict) and isinstance(e.get("image"), str) and isinstance(e.get("label"), str)
        for e in training
    ):
        raise InputError(
            f'{json_path}: \'training\' must be a list of {{"image": "./imagesTr/x.nii.gz", '
            '"label": "./labelsTr/x.nii.gz"}}'
        )
    if not training:
        raise InputError(f"{json_path}: 'training' lists no case")
    problems: list[str] = []
    ending = volume_suffix(training[0]["image"]) or ".nii.gz"
    cases, no_label, no_image, listed_missing, missing_channels, seen = [], [], [], [], [], set()
    for entry in training:
        cid = _v1_case_id(entry["image"])
        if cid in seen:
            raise InputError(f"{json_path}: case {cid!r} is listed twice in 'training'")
        seen.add(cid)
        paths, multi, lacking = _resolve_v1_image(root, entry["image"], len(channels))
        label = root / entry["label"]
        if lacking:
            missing_channels.append(lacking[0])
        if not paths and not label.is_file():
            listed_missing.append(cid)
        elif not paths:
            no_image.append(cid)
        elif not label.is_file():
            no_label.append(cid)
        elif not lacking:
            cases.append(Case(cid, paths, label, len(channels), multi, values))
    # label files that no training entry names and whose image is absent
    for path in _visible_files(root / "labelsTr"):
        stem = _strip_ending(path.name, volume_suffix(path.name))
        if (
            stem
            and stem not in seen
            and not _resolve_v1_image(root, f"imagesTr/{path.name}", len(channels))[0]
        ):
            no_image.append(stem)
    if no_label:
        problems.append(_problem("training image(s) without a label", no_label))
    if no_image:
        problems.append(_problem("label(s) without an image", no_image))
    if listed_missing:
        problems.append(
            _problem("case(s) listed in dataset.json 'training' with neither image nor label", listed_missing)
        )
    if missing_channels:
        problems.append(
            _problem(f"image(s) lack a channel file ({len(channels)} declared), e.g.", missing_channels)
        )

    test_cases, test_missing = [], []
    for relpath in meta.get("test") or []:
        relpath = relpath.get("image") if isinstance(relpath, dict) else relpath
        if not isinstance(relpath, str):
            raise InputError(f"{json_path}: 'test' must be a list of image paths")
        paths, multi, lacking = _resolve_v1_image(root, relpath, len(channels))
        if not paths or lacking:
            test_missing.append(relpath)
            continue
        test_cases.append(Case(_v1_case_id(relpath), paths, None, len(channels), multi, values))
    if test_missing:
        warnings.warn(
            f"{json_path}: {len(test_missing)} test image(s) listed but missing, skipped: {_listing(test_missing)}",
            UserWarning,
            stacklevel=3,
        )
    _raise_problems(root, problems)
    return Dataset(
        root=root,
        name=str(meta.get("name") or root.name),
        format="msd",
        channel_names=channels,
        labels=labels,
        label_names=label_names,
        file_ending=ending,
        cases=sorted(cases, key=lambda c: c.case_id),
        test_cases=sorted(test_cases, key=lambda c: c.case_id),
        metadata=meta,
    )


def _load_inferred(root: Path) -> Dataset:
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise InputError(
            f"{root / 'dataset.json'}: no such file, and no imagesTr/labelsTr folders to infer the dataset from"
        )
    ending = _infer_ending(images_dir)
    found, unsuffixed = _scan_channel_files(images_dir, ending)
    _check_no_unsuffixed(images_dir, unsuffixed, ending)
    if not found:
        raise InputError(f"{images_dir}: no image named <case>_0000{ending}")
    n_channels = max(max(channels) for channels in found.values()) + 1
    problems: list[str] = []
    images = _channel_problems(images_dir, found, n_channels, ending, problems)
    cases = _pair_cases(images, found, labels_dir, ending, n_channels, None, problems)
    test_cases = _test_cases_from_folder(root, ending, n_channels, None, problems)
    _raise_problems(root, problems)
    # Label names are unknown: read the label maps to find which ids occur.
    values = {0}
    for case in cases:
        values.update(int(v) for v in np.unique(read_mask(case.label_path, allow_empty=True).array))
    label_names = {v: ("background" if v == 0 else f"label_{v}") for v in sorted(values)}
    for case in cases:
        case.label_values = tuple(label_names)
    warnings.warn(
        f"{root}: no dataset.json; inferred {len(cases)} cases with {n_channels} channel(s) and labels "
        f"{', '.join(label_names.values())} from the files in imagesTr/labelsTr",
        UserWarning,
        stacklevel=3,
    )
    return Dataset(
        root=root,
        name=root.name,
        format="inferred",
        channel_names=[f"channel_{c}" for c in range(n_channels)],
        labels={name: v for v, name in label_names.items()},
        label_names=label_names,
        file_ending=ending,
        cases=cases,
        test_cases=test_cases,
    )


# ===================================================================================================
# volumes
# ===================================================================================================
def _header_geometry(path: Path) -> Volume:
    """The geometry of the first three axes of ``path`` from its header, as a Volume with a dummy array."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{path}: cannot read image ({_short_itk_message(exc)})") from None
    dim = reader.GetDimension()
    if dim < 3:
        raise InputError(f"{path}: expected a 3D volume, got a {dim}D image")
    size = reader.GetSize()[:3]
    direction = np.asarray(reader.GetDirection(), dtype=float).reshape(dim, dim)[:3, :3]
    dummy = np.broadcast_to(np.zeros((), np.uint8), tuple(reversed(size)))
    return Volume(dummy, reader.GetSpacing()[:3], reader.GetOrigin()[:3], direction)


def stack_channels(images: Sequence[Volume], dtype=np.float32) -> np.ndarray:
    """Stack the channels of one image into a single array.

    Arguments:
      images (Sequence[Volume]): the channels, each (D, H, W), as returned by :meth:`Case.load_image`.
      dtype: output dtype (float32 by default).

    Returns:
      np.ndarray: array (C, D, H, W); its geometry is that of ``images[0]``.
    """
    if not images:
        raise InputError("stack_channels: no channel given")
    shapes = {v.shape for v in images}
    if len(shapes) != 1:
        raise InputError(f"stack_channels: channels have different shapes {sorted(shapes)}")
    return np.stack([np.asarray(v.array, dtype=dtype) for v in images])


# ===================================================================================================
# splits
# ===================================================================================================
def _ids(dataset_or_case_ids: Dataset | Iterable[str]) -> list[str]:
    """Sorted case ids; duplicates and non-strings are rejected."""
    if isinstance(dataset_or_case_ids, Dataset):
        ids = dataset_or_case_ids.case_ids
    elif isinstance(dataset_or_case_ids, str):
        raise InputError("expected a list of case ids, got a single string")
    else:
        ids = list(dataset_or_case_ids)
    if not all(isinstance(i, str) for i in ids):
        raise InputError("case ids must be strings")
    duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
    if duplicates:
        raise InputError(f"duplicate case ids: {_listing(duplicates)}")
    return sorted(ids)


def _split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` by ``fractions`` (largest remainder), giving every non-zero fraction a case if n allows."""
    raw = [f * n for f in fractions]
    counts = [int(np.floor(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    for i, f in enumerate(fractions):
        if f > 0 and counts[i] == 0:
            donor = max(range(len(counts)), key=lambda j: counts[j])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] += 1
    return counts


def split(
    dataset_or_case_ids: Dataset | Iterable[str],
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> dict[str, list[str]]:
    """Deterministic train/val/test split of case ids.

    The ids are sorted, shuffled with ``numpy.random.default_rng(seed)`` and cut by ``fractions`` (counts
    rounded by largest remainder; a split with a non-zero fraction gets at least one case when there are
    enough cases). The result does not depend on the order the ids are given in.

    Arguments:
      dataset_or_case_ids (Dataset | Iterable[str]): a dataset (its training cases) or case ids (unique).
      fractions (Sequence[float]): (train, val, test) fractions, each >= 0, summing to 1.
      seed (int): shuffling seed.

    Returns:
      dict[str, list[str]]: ``{"train": [...], "val": [...], "test": [...]}``, each list sorted; every id is
      in exactly one list.
    """
    ids = _ids(dataset_or_case_ids)
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise InputError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    out, start = {}, 0
    for key, count in zip(("train", "val", "test"), _split_counts(len(ids), fractions), strict=True):
        out[key] = sorted(order[start : start + count])
        start += count
    return out


def kfold(
    dataset_or_case_ids: Dataset | Iterable[str], k: int = 5, seed: int = 0
) -> list[tuple[list[str], list[str]]]:
    """Deterministic k-fold cross-validation folds (like nnU-Net's 5-fold, not its exact folds).

    The sorted ids are shuffled with ``numpy.random.default_rng(seed)`` and cut into ``k`` near-equal
    parts (sizes differ by at most one); fold ``i`` validates on part ``i`` and trains on the rest.

    Arguments:
      dataset_or_case_ids (Dataset | Iterable[str]): a dataset (its training cases) or case ids (unique).
      k (int): number of folds, 2 <= k <= number of cases.
      seed (int): shuffling seed.

    Returns:
      list[tuple[list[str], list[str]]]: ``k`` pairs ``(train_ids, val_ids)``, each list sorted; every id is
      a validation case in exactly one fold.
    """
    ids = _ids(dataset_or_case_ids)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 2 <= k <= len(ids):
        raise InputError(f"kfold needs 2 <= k <= number of cases ({len(ids)}), got k={k!r}")
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = []
    for part in np.array_split(order, int(k)):
        val = set(part.tolist())
        folds.append((sorted(ids[i] for i in range(len(ids)) if i not in val), sorted(ids[i] for i in val)))
    return folds


def save_splits(path: str | os.PathLike, folds) -> Path:
    """Write folds as nnU-Net v2's ``splits_final.json`` (atomically).

    Arguments:
      path (str | os.PathLike): destination file, usually ``<preprocessed dataset>/splits_final.json``.
      folds: a list of ``(train_ids, val_ids)`` pairs (as :func:`kfold` returns), a list of mappings with
        ``"train"`` and ``"val"``, or one mapping such as :func:`split` returns (written as a single fold,
        keeping its ``"test"`` list too).

    Returns:
      Path: ``path``, holding ``[{"train": [...], "val": [...]}, ...]``.
    """
    path = Path(path)
    folds = [folds] if isinstance(folds, Mapping) else list(folds)
    records = []
    for i, fold in enumerate(folds):
        if isinstance(fold, Mapping):
            record = {key: list(fold[key]) for key in fold}
        else:
            train, val = fold
            record = {"train": list(train), "val": list(val)}
        _check_fold(record, f"fold {i}")
        records.append(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _check_fold(record: Mapping, where: str) -> None:
    if not {"train", "val"} <= set(record):
        raise InputError(f"{where}: needs 'train' and 'val' lists")
    lists = list(record.values())
    if not all(isinstance(v, list) and all(isinstance(i, str) for i in v) for v in lists):
        raise InputError(f"{where}: 'train', 'val' (and 'test') must be lists of case ids")
    both = sorted(set(record["train"]) & set(record["val"]))
    if both:
        raise InputError(f"{where}: case(s) in both train and val: {_listing(both)}")


def load_splits(
    path: str | os.PathLike, case_ids: Iterable[str] | None = None
) -> list[tuple[list[str], list[str]]]:
    """Read an nnU-Net v2 ``splits_final.json``.

    Arguments:
      path (str | os.PathLike): the JSON file, a list of ``{"train": [...], "val": [...]}``.
      case_ids (Iterable[str] | None): if given (e.g. ``dataset.case_ids``), every id in the file must be one
        of them.

    Returns:
      list[tuple[list[str], list[str]]]: ``(train_ids, val_ids)`` per fold, in file order.

    Raises:
      InputError: the file is missing, not valid JSON, not in that format, has a case in both train and
      val of a fold, or names a case not in ``case_ids``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    content = _read_json(path)
    if not isinstance(content, list) or not content or not all(isinstance(f, dict) for f in content):
        raise InputError(f'{path}: expected a non-empty list of {{"train": [...], "val": [...]}}')
    known = None if case_ids is None else set(case_ids)
    folds = []
    for i, record in enumerate(content):
        _check_fold(record, f"{path}: fold {i}")
        if known is not None:
            unknown = sorted({*record["train"], *record["val"]} - known)
            if unknown:
                raise InputError(f"{path}: fold {i} names {_problem('unknown case(s)', unknown)}")
        folds.append((list(record["train"]), list(record["val"])))
    return folds
