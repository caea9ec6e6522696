"""Intensity normalisation and model-grid resampling, with an exact inverse.

Models see tensors on their own grid; users get results in their own geometry. A :class:`Preprocessor`
takes a :class:`~irisseg.io.Volume` (or several channels sharing one geometry) to the model grid and
returns a :class:`GridRecord` of every geometric step it took. ``record.invert(prediction)`` maps a
prediction on the model grid back to the input's exact shape, spacing, origin and direction;
``record.apply(mask)`` sends another volume in the input geometry (e.g. a support mask) to the model grid.

Steps, in the order a :class:`Preprocessor` applies them:

1. crop to foreground (optional): the bounding box of non-zero voxels (of the raw image, or a mask), plus
   a margin in voxels;
2. reorient (default on): permute and flip the array axes, without interpolation, so that the direction
   is as close as possible to the identity (array axes W, H, D along patient x, y, z, increasing): the
   same anatomy then reaches the model the same way whatever axis order or flips its file was stored with
   (an oblique grid stays oblique; only its axes are relabelled);
3. intensity: CT windowing (optional) or percentile clipping (default 0.5 to 99.5), then z-score;
4. resample (optional) to a target spacing (mm) or a target shape (D, H, W), keeping the physical extent:
   linear interpolation for images and probabilities, nearest neighbour for label maps;
5. crop or pad (optional), centred, to a fixed shape (D, H, W).

Every geometric step also updates the volume's origin and spacing, so a volume on the model grid still
sits at the right place in patient space.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import SimpleITK as sitk

from irisseg.errors import InputError
from irisseg.io import Volume, same_geometry

__all__ = [
    "CT_WINDOWS",
    "canonical_axes",
    "canonical_arrays",
    "model_grid_record",
    "inverse_axes",
    "reorient_case",
    "reorient",
    "PreprocessConfig",
    "Preprocessor",
    "GridRecord",
    "clip_percentiles",
    "zscore",
    "ct_window",
    "resample",
    "crop_or_pad",
    "foreground_bbox",
    "crop_to_bbox",
    "grid_image",
]

Kind = Literal["image", "label", "linear"]

#: Common CT windows as (level, width) in Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "soft_tissue": (50.0, 350.0),
    "liver": (60.0, 160.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "mediastinum": (50.0, 350.0),
}


# ---------------------------------------------------------------------------------------------------
# intensity (numpy arrays, any shape)
# ---------------------------------------------------------------------------------------------------
def clip_percentiles(
    array: np.ndarray, lower: float = 0.5, upper: float = 99.5, mask: np.ndarray | None = None
) -> np.ndarray:
    """Clip intensities to the ``[lower, upper]`` percentiles.

    Arguments:
      array (np.ndarray): intensities, any shape, e.g. (D, H, W).
      lower, upper (float): percentiles in [0, 100], ``lower < upper``.
      mask (np.ndarray | None): same shape as ``array``; when given, percentiles are taken over the
        voxels where it is non-zero (e.g. the body), otherwise over all voxels.

    Returns:
      np.ndarray: float32 array of the same shape, clipped.
    """
    if not 0.0 <= lower < upper <= 100.0:
        raise InputError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {lower}, {upper}")
    values = array[mask != 0] if mask is not None else array
    if values.size == 0:
        values = array
    lo, hi = np.percentile(values, [lower, upper])
    return np.clip(array, lo, hi).astype(np.float32, copy=False)


def zscore(array: np.ndarray, mask: np.ndarray | None = None, eps: float = 1e-8) -> np.ndarray:
    """Z-score normalisation: subtract the mean, divide by the standard deviation.

    Arguments:
      array (np.ndarray): intensities, any shape.
      mask (np.ndarray | None): same shape; statistics over its non-zero voxels when given.
      eps (float): floor of the standard deviation (a constant image becomes all zeros).

    Returns:
      np.ndarray: float32 array of the same shape with mean 0 and standard deviation 1 (over the mask).
    """
    values = array[mask != 0] if mask is not None else array
    if values.size == 0:
        values = array
    values = values.astype(np.float64, copy=False)
    mean, std = float(values.mean()), float(values.std())
    return ((array - mean) / max(std, eps)).astype(np.float32, copy=False)


def ct_window(array: np.ndarray, level: float, width: float) -> np.ndarray:
    """CT windowing: clip Hounsfield units to ``[level - width/2, level + width/2]`` and scale to [0, 1].

    Arguments:
      array (np.ndarray): intensities in HU, any shape.
      level, width (float): window centre and width in HU (see :data:`CT_WINDOWS` for presets).

    Returns:
      np.ndarray: float32 array of the same shape with values in [0, 1].
    """
    if width <= 0:
        raise InputError(f"CT window width must be positive, got {width}")
    lo = level - width / 2.0
    return ((np.clip(array, lo, lo + width) - lo) / width).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------------
# geometry (Volumes)
# ---------------------------------------------------------------------------------------------------
def _interpolator(kind: Kind) -> int:
    if kind == "label":
        return sitk.sitkNearestNeighbor
    if kind in ("image", "linear"):
        return sitk.sitkLinear
    raise ValueError(f"kind must be 'image', 'label' or 'linear', got {kind!r}")


def _resample_onto(volume: Volume, reference: Volume, kind: Kind) -> Volume:
    """Resample ``volume`` onto ``reference``'s grid (shape, spacing, origin, direction) in physical space."""
    source = volume
    if kind != "label" and volume.array.dtype.kind != "f":
        source = volume.with_array(volume.array.astype(np.float32))
    out = sitk.Resample(
        source.to_sitk(),
        grid_image(reference),
        sitk.Transform(),
        _interpolator(kind),
        0.0,
    )
    result = Volume.from_sitk(out)
    # Return exactly the reference geometry (no float round trip through ITK).
    return Volume(result.array, reference.spacing, reference.origin, reference.direction.copy())


def grid_image(reference: Volume) -> sitk.Image:
    """An empty (uint8) image carrying ``reference``'s grid, cheaper to build than the full volume."""
    image = sitk.Image([int(s) for s in reference.size_xyz], sitk.sitkUInt8)
    image.SetSpacing(reference.spacing)
    image.SetOrigin(reference.origin)
    image.SetDirection(tuple(reference.direction.reshape(-1)))
    return image


def _resampled_grid(volume: Volume, spacing=None, shape=None) -> Volume:
    """The grid covering ``volume``'s physical extent with the new spacing (x, y, z) or shape (D, H, W)."""
    old_size = np.asarray(volume.size_xyz, dtype=float)
    old_spacing = np.asarray(volume.spacing, dtype=float)
    extent = old_size * old_spacing
    if shape is not None:
        new_size = np.asarray(tuple(reversed(tuple(int(s) for s in shape))), dtype=float)
        if len(new_size) != 3 or new_size.min() < 1:
            raise InputError(f"target shape must be 3 positive integers (D, H, W), got {shape}")
    elif spacing is not None:
        target = np.asarray(spacing, dtype=float)
        if target.shape != (3,) or target.min() <= 0:
            raise InputError(f"target spacing must be 3 positive numbers (x, y, z) in mm, got {spacing}")
        new_size = np.maximum(np.round(extent / target), 1)
    else:
        raise ValueError("give a target spacing or a target shape")
    new_spacing = extent / new_size  # exactly the same physical extent
    # Voxel corners stay aligned: the first centre moves by half the change in voxel size.
    origin = np.asarray(volume.origin) + volume.direction @ ((new_spacing - old_spacing) / 2.0)
    grid_shape = tuple(int(s) for s in reversed(new_size))
    return _GridOnly(grid_shape, tuple(new_spacing), tuple(origin), volume.direction.copy())


def canonical_axes(direction: np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """The axis relabelling that brings a grid's direction closest to the identity.

    Arguments:
      direction (np.ndarray): (3, 3) direction cosines, column ``j`` the patient direction of image axis
        ``j`` (x, y, z order), as :class:`~irisseg.io.Volume`.

    Returns:
      (order, flips): new image axis ``j`` is old axis ``order[j]`` (x, y, z order), reversed where
      ``flips[j]``; the order maximises ``sum_j |direction[j, order[j]]|`` (ties: the identity first).
    """
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    order = max(itertools.permutations(range(3)), key=lambda p: sum(abs(direction[j, p[j]]) for j in range(3)))
    return tuple(order), tuple(bool(direction[j, order[j]] < 0) for j in range(3))


def inverse_axes(order: Sequence[int], flips: Sequence[bool]) -> tuple[list[int], list[bool]]:
    """The ``(order, flips)`` that undoes :func:`reorient` with ``(order, flips)``."""
    inverse = [int(np.argsort(order)[i]) for i in range(3)]
    return inverse, [bool(flips[inverse[i]]) for i in range(3)]


def _reoriented_grid(grid: Volume, order: Sequence[int], flips: Sequence[bool]) -> _GridOnly:
    size = [grid.size_xyz[o] for o in order]
    spacing = [grid.spacing[o] for o in order]
    direction = grid.direction[:, list(order)].astype(float)
    origin = np.asarray(grid.origin, dtype=float)
    for j in range(3):
        if flips[j]:  # the first voxel along a reversed axis is the old last one
            origin = origin + direction[:, j] * spacing[j] * (size[j] - 1)
            direction[:, j] = -direction[:, j]
    return _GridOnly(tuple(reversed(size)), tuple(spacing), tuple(origin), direction)


def reorient(volume: Volume, order: Sequence[int], flips: Sequence[bool]) -> Volume:
    """Relabel a volume's axes (no interpolation): new axis ``j`` (x, y, z order) is old axis ``order[j]``,
    reversed where ``flips[j]``; every voxel keeps its patient-space position (see :func:`canonical_axes`).

    Arguments:
      volume (Volume): array (D, H, W) with its geometry.
      order (Sequence[int]): a permutation of (0, 1, 2), x, y, z axes. flips (Sequence[bool]): per new axis.

    Returns:
      Volume: the permuted (and flipped) array with the matching spacing, origin and direction.
    """
    array = np.transpose(volume.array, [2 - order[2 - a] for a in range(3)])  # array axes are (z, y, x)
    flipped = tuple(2 - j for j in range(3) if flips[j])
    if flipped:
        array = np.flip(array, axis=flipped)
    grid = _reoriented_grid(volume, order, flips)
    return Volume(np.ascontiguousarray(array), grid.spacing, grid.origin, grid.direction)


def model_grid_record(reference: Volume, reorient: bool = True,
                      spacing: Sequence[float] | None = None) -> GridRecord:
    """The :class:`GridRecord` from ``reference``'s grid to a model's voxel grid: the axes relabelled towards
    the identity direction (:func:`canonical_axes`, no interpolation; when ``reorient`` and needed), then
    resampled to ``spacing`` (when given and the grid at that spacing differs from the current one).

    Arguments:
      reference (Volume): the input grid, (D, H, W) with spacing, origin and direction (its array is not read).
      reorient (bool): relabel the axes.
      spacing (Sequence[float] | None): target voxel size in mm, (x, y, z) order of the reoriented grid;
        None: keep the voxel grid.

    Returns:
      GridRecord: ``apply`` sends volumes of that geometry to the model grid, ``invert`` brings arrays back.
    """
    return Preprocessor(PreprocessConfig(reorient=reorient, target_spacing=spacing)).plan(reference)


def reorient_case(channels: Sequence[Volume], label: Volume, enabled: bool = True) -> tuple[list[Volume], Volume]:
    """A training case's channels and label map (one geometry) with their axes relabelled towards the
    identity direction (:func:`canonical_axes` of the first channel; unchanged when not ``enabled``)."""
    record = model_grid_record(channels[0], enabled)
    return [record.apply(v, kind="image") for v in channels], record.apply(label)


def canonical_arrays(channels: Sequence[Volume], enabled: bool = True, spacing: Sequence[float] | None = None):
    """The channels' arrays on the model grid (:func:`model_grid_record` of the first channel: axes relabelled
    towards the identity direction, then resampled to ``spacing`` if given, linearly), and the function that
    takes an array on that grid back to the channels' own grid.

    Arguments:
      channels (Sequence[Volume]): (D, H, W) volumes of one geometry.
      enabled (bool): relabel the axes (False: as stored).
      spacing (Sequence[float] | None): target voxel size in mm (x, y, z); None: no resampling.

    Returns:
      (arrays, back): ``arrays`` a list of (D', H', W') arrays; ``back(a)`` for ``a`` of shape (..., D', H', W')
      returns (..., D, H, W) on the first channel's own grid (linear interpolation where it was resampled).
    """
    record = model_grid_record(channels[0], enabled, spacing)
    shape = tuple(record.model_geometry()["shape"])

    def back(array: np.ndarray) -> np.ndarray:
        flat = np.asarray(array).reshape(-1, *shape)
        out = [record.invert(a, kind="linear").array for a in flat]
        return np.stack(out).reshape(*np.shape(array)[:-3], *channels[0].shape)

    return [record.apply(c, kind="image").array for c in channels], back


class _GridOnly(Volume):
    """A Volume-shaped description of a grid whose array is never materialised (only its shape)."""

    def __init__(self, shape, spacing, origin, direction):  # noqa: D107 - internal
        super().__init__(np.broadcast_to(np.zeros((), np.uint8), tuple(shape)), spacing, origin, direction)

    @classmethod
    def of(cls, volume: Volume) -> _GridOnly:
        return cls(volume.shape, volume.spacing, volume.origin, volume.direction.copy())

    def crop(self, start: Sequence[int], stop: Sequence[int]) -> _GridOnly:
        """The grid of ``crop_to_bbox(self, start, stop)``, without touching any array."""
        shape = [int(b) - int(a) for a, b in zip(start, stop)]
        return _GridOnly(shape, self.spacing, _shift_origin(self, start), self.direction.copy())


def resample(
    volume: Volume,
    *,
    spacing: Sequence[float] | None = None,
    shape: Sequence[int] | None = None,
    kind: Kind = "image",
) -> Volume:
    """Resample a volume to a new voxel spacing or array shape, keeping its physical extent.

    Arguments:
      volume (Volume): array (D, H, W) with its geometry.
      spacing (Sequence[float] | None): target voxel size in mm, (x, y, z) order. The shape becomes
        ``round(extent / spacing)`` and the spacing is then adjusted so the extent is unchanged.
      shape (Sequence[int] | None): target array shape (D, H, W); takes precedence over ``spacing``.
      kind: ``"image"`` or ``"linear"`` (linear interpolation, float32 out) or ``"label"`` (nearest
        neighbour, dtype kept).

    Returns:
      Volume: the resampled volume; same direction, origin moved so voxel corners stay aligned.
    """
    return _resample_onto(volume, _resampled_grid(volume, spacing, shape), kind)


def _center_box(shape: Sequence[int], target: Sequence[int]) -> tuple[list[int], list[int]]:
    """Index box ``(start, stop)`` of size ``target`` centred on an array of ``shape`` (may exceed it)."""
    start = [-((int(t) - int(s)) // 2) if t >= s else (int(s) - int(t)) // 2 for s, t in zip(shape, target)]
    return start, [a + int(t) for a, t in zip(start, target)]


def _shift_origin(volume: Volume, index_zyx: Sequence[int]) -> tuple[float, float, float]:
    """Origin of a grid whose voxel [0,0,0] sits at array index ``index_zyx`` of ``volume``."""
    index_xyz = np.asarray(tuple(reversed(tuple(index_zyx))), dtype=float)
    return tuple(np.asarray(volume.origin) + volume.direction @ (np.asarray(volume.spacing) * index_xyz))


def crop_to_bbox(volume: Volume, start: Sequence[int], stop: Sequence[int], pad_value: float = 0) -> Volume:
    """Crop (or pad, where the box extends past the array) to the index box ``[start, stop)``.

    Arguments:
      volume (Volume): array (D, H, W).
      start, stop (Sequence[int]): box corners in array index order (D, H, W); may lie outside the array,
        in which case the outside is filled with ``pad_value``.
      pad_value (float): value for voxels outside the input.

    Returns:
      Volume: array of shape ``stop - start`` whose voxel [0, 0, 0] is the input's voxel ``start``, with the
      origin moved accordingly (spacing and direction unchanged).
    """
    start = np.asarray(start, dtype=int)
    stop = np.asarray(stop, dtype=int)
    shape = np.asarray(volume.shape)
    out = np.full(tuple(stop - start), pad_value, dtype=volume.array.dtype)
    src_lo, src_hi = np.maximum(start, 0), np.minimum(stop, shape)
    if np.all(src_hi > src_lo):
        dst_lo = src_lo - start
        dst_hi = dst_lo + (src_hi - src_lo)
        out[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))] = volume.array[
            tuple(slice(a, b) for a, b in zip(src_lo, src_hi))
        ]
    return Volume(out, volume.spacing, _shift_origin(volume, start), volume.direction.copy())


def crop_or_pad(volume: Volume, shape: Sequence[int], pad_value: float = 0) -> Volume:
    """Centre-crop and/or pad a volume to ``shape`` (D, H, W), keeping it in place in patient space.

    Arguments:
      volume (Volume): array (D, H, W).
      shape (Sequence[int]): target shape (D, H, W).
      pad_value (float): fill value for padding.

    Returns:
      Volume: array of shape ``shape``; the origin moves so untouched voxels keep their physical position.
    """
    return crop_to_bbox(volume, *_center_box(volume.shape, shape), pad_value)


def foreground_bbox(array: np.ndarray, margin: int = 0) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Index bounding box ``(start, stop)`` of the non-zero voxels, grown by ``margin`` voxels.

    Arguments:
      array (np.ndarray): (D, H, W); non-zero marks foreground.
      margin (int): voxels added on every side (clamped to the array).

    Returns:
      (start, stop): tuples in (D, H, W) index order; the whole array when there is no foreground.
    """
    nz = np.nonzero(array)
    if nz[0].size == 0:
        return (0,) * array.ndim, tuple(array.shape)
    start = tuple(max(int(ix.min()) - margin, 0) for ix in nz)
    stop = tuple(min(int(ix.max()) + 1 + margin, s) for ix, s in zip(nz, array.shape))
    return start, stop


# ---------------------------------------------------------------------------------------------------
# pipeline with inverse
# ---------------------------------------------------------------------------------------------------
@dataclass
class PreprocessConfig:
    """What a :class:`Preprocessor` does. All fields optional; the default is clip 0.5-99.5 + z-score.

    Attributes:
      clip_percentiles: (lower, upper) percentiles, or None for no clipping. Ignored with ``ct_window``.
      normalize: ``"zscore"`` or ``"none"``.
      ct_window: (level, width) in HU or a preset name from :data:`CT_WINDOWS`; replaces clipping and
        z-score with a [0, 1] window.
      crop_foreground: crop to the bounding box of non-zero raw intensities (or of a given mask).
      foreground_margin: voxels kept around the foreground box.
      reorient: relabel the array axes so the direction is closest to the identity (:func:`canonical_axes`).
      target_spacing: resample to this spacing, mm, (x, y, z).
      target_shape: resample to this shape (D, H, W) (takes precedence over ``target_spacing``).
      pad_shape: centre crop/pad to this shape (D, H, W) after resampling.
    """

    clip_percentiles: tuple[float, float] | None = (0.5, 99.5)
    normalize: Literal["zscore", "none"] = "zscore"
    ct_window: tuple[float, float] | str | None = None
    crop_foreground: bool = False
    foreground_margin: int = 0
    reorient: bool = True
    target_spacing: tuple[float, float, float] | None = None
    target_shape: tuple[int, int, int] | None = None
    pad_shape: tuple[int, int, int] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GridRecord:
    """The geometric steps from an input geometry to the model grid, and their inverse.

    Attributes:
      source (dict): the input geometry (``Volume.geometry()``: shape (D, H, W), spacing, origin, direction).
      steps (list[dict]): JSON-friendly steps in the order applied, each with its ``before`` and ``after``
        geometry: ``{"op": "crop", "start", "stop"}``, ``{"op": "reorient", "order", "flips"}``,
        ``{"op": "resample"}``.
    """

    source: dict
    steps: list[dict] = field(default_factory=list)

    @staticmethod
    def _grid(geometry: dict) -> Volume:
        return _GridOnly(geometry["shape"], geometry["spacing"], geometry["origin"],
                         np.asarray(geometry["direction"]).reshape(3, 3))

    def apply(self, volume: Volume, kind: Kind = "label") -> Volume:
        """Send a volume in the source geometry (e.g. a mask) to the model grid with the same steps.

        Arguments:
          volume (Volume): array (D, H, W) in the source geometry.
          kind: ``"label"`` (nearest, default) or ``"image"``/``"linear"`` (linear) for resampling steps.

        Returns:
          Volume: on the model grid.
        """
        if tuple(volume.shape) != tuple(self.source["shape"]):
            raise InputError(f"volume shape {volume.shape} does not match the recorded {tuple(self.source['shape'])}")
        for step in self.steps:
            if step["op"] == "crop":
                volume = crop_to_bbox(volume, step["start"], step["stop"])
            elif step["op"] == "reorient":
                volume = reorient(volume, step["order"], step["flips"])
            else:
                volume = _resample_onto(volume, self._grid(step["after"]), kind)
        return volume

    def invert(self, prediction: Volume | np.ndarray, kind: Kind = "label") -> Volume:
        """Map a prediction on the model grid back to the exact source geometry.

        Arguments:
          prediction (Volume | np.ndarray): (D, H, W) on the model grid (a label map, or probabilities).
          kind: ``"label"`` (nearest neighbour, dtype kept) or ``"linear"`` (float32, for probabilities).

        Returns:
          Volume: the source shape, spacing, origin and direction exactly; voxels outside the cropped
          region get 0 (background).
        """
        if not isinstance(prediction, Volume):
            model_grid = self.model_geometry()
            prediction = Volume(np.asarray(prediction), model_grid["spacing"], model_grid["origin"],
                                np.asarray(model_grid["direction"]).reshape(3, 3))
        if tuple(prediction.shape) != tuple(self.model_geometry()["shape"]):
            raise InputError(
                f"prediction shape {prediction.shape} does not match the model grid {tuple(self.model_geometry()['shape'])}"
            )
        volume = prediction
        for step in reversed(self.steps):
            if step["op"] == "crop":
                before = step["before"]["shape"]
                start = [-s for s in step["start"]]
                stop = [a + b for a, b in zip(start, before)]
                volume = crop_to_bbox(volume, start, stop)
            elif step["op"] == "reorient":
                volume = reorient(volume, *inverse_axes(step["order"], step["flips"]))
            else:
                volume = _resample_onto(volume, self._grid(step["before"]), kind)
        src = self.source
        return Volume(volume.array, src["spacing"], src["origin"], np.asarray(src["direction"]).reshape(3, 3))

    def model_geometry(self) -> dict:
        """Geometry of the model grid (the last step's output), as ``Volume.geometry()``."""
        return self.steps[-1]["after"] if self.steps else self.source

    def to_dict(self) -> dict:
        return {"source": self.source, "steps": self.steps}

    @classmethod
    def from_dict(cls, data: dict) -> GridRecord:
        return cls(source=data["source"], steps=list(data["steps"]))


@dataclass
class Preprocessed:
    """Output of :class:`Preprocessor`.

    Attributes:
      image (np.ndarray): float32 (C, D, H, W) on the model grid.
      volume (Volume): the first channel as a Volume on the model grid (its geometry in patient space).
      masks (list[Volume]): the given masks on the model grid (nearest neighbour).
      record (GridRecord): how to send more volumes there and predictions back.
    """

    image: np.ndarray
    volume: Volume
    masks: list[Volume]
    record: GridRecord


class Preprocessor:
    """Take an image (one or more channels in one geometry) to the model grid, remembering how.

    Example::

        pre = Preprocessor(PreprocessConfig(target_shape=(64, 64, 64)))
        out = pre(read_volume("ct.nii.gz"))
        logits = model(torch.from_numpy(out.image)[None])              # (1, N, 64, 64, 64)
        seg = out.record.invert(pred_labels)                           # Volume in the CT's geometry
    """

    def __init__(self, config: PreprocessConfig | None = None, **overrides):
        config = config or PreprocessConfig()
        if overrides:
            config = PreprocessConfig(**{**config.to_dict(), **overrides})
        self.config = config

    def normalize(self, array: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Intensity steps only (windowing or clipping, then z-score) on one channel, any shape."""
        cfg = self.config
        if cfg.ct_window is not None:
            level, width = CT_WINDOWS[cfg.ct_window] if isinstance(cfg.ct_window, str) else cfg.ct_window
            return ct_window(array, level, width)
        out = array.astype(np.float32, copy=False)
        if cfg.clip_percentiles is not None:
            out = clip_percentiles(out, *cfg.clip_percentiles, mask=mask)
        if cfg.normalize == "zscore":
            out = zscore(out, mask=mask)
        elif cfg.normalize != "none":
            raise InputError(f"normalize must be 'zscore' or 'none', got {cfg.normalize!r}")
        return out

    def plan(self, volume: Volume, foreground: Volume | None = None) -> GridRecord:
        """The geometric steps this config takes from ``volume``'s geometry to the model grid, computed from
        the grid alone (no voxel is moved); ``record.apply`` then sends any volume of that geometry there.

        Arguments:
          volume (Volume): (D, H, W) in the input geometry (its array is only read for the foreground crop).
          foreground (Volume | None): a mask whose bounding box is the foreground crop (default: the
            non-zero voxels of ``volume``); used only with ``crop_foreground``.
        """
        cfg = self.config
        record = GridRecord(source=volume.geometry())
        grid = _GridOnly.of(volume)

        def add_step(op: str, after: _GridOnly, **params) -> _GridOnly:
            record.steps.append({"op": op, **params, "before": grid.geometry(), "after": after.geometry()})
            return after

        if cfg.crop_foreground:
            fg = (foreground if foreground is not None else volume).array != 0
            start, stop = foreground_bbox(fg, cfg.foreground_margin)
            grid = add_step("crop", grid.crop(start, stop), start=list(start), stop=list(stop))
        if cfg.reorient:
            order, flips = canonical_axes(grid.direction)
            if order != (0, 1, 2) or any(flips):
                grid = add_step("reorient", _reoriented_grid(grid, order, flips), order=list(order), flips=list(flips))
        if cfg.target_shape is not None or cfg.target_spacing is not None:
            resampled = _resampled_grid(grid, cfg.target_spacing, cfg.target_shape)
            if not same_geometry(resampled, grid, tol=1e-9):  # already the target grid: nothing to interpolate
                grid = add_step("resample", resampled)
        if cfg.pad_shape is not None:
            start, stop = _center_box(grid.shape, cfg.pad_shape)
            grid = add_step("crop", grid.crop(start, stop), start=start, stop=stop)
        return record

    def __call__(
        self,
        image: Volume | Sequence[Volume],
        masks: Sequence[Volume] = (),
        foreground: Volume | None = None,
    ) -> Preprocessed:
        """Preprocess an image and, with the same geometric steps, its masks.

        Arguments:
          image (Volume | Sequence[Volume]): one volume (D, H, W), or several channels sharing one geometry.
          masks (Sequence[Volume]): label maps (D, H, W) in the same geometry, resampled with nearest neighbour.
          foreground (Volume | None): a mask whose bounding box defines the foreground crop (default: non-zero
            voxels of any channel of the raw image).

        Returns:
          Preprocessed: the (C, D, H, W) float32 model-grid image, the masks there, and the GridRecord.
        """
        channels = [image] if isinstance(image, Volume) else list(image)
        if not channels:
            raise InputError("no image given")
        ref = channels[0]
        for ch in channels[1:]:
            if ch.shape != ref.shape:
                raise InputError(f"channels differ in shape: {ref.shape} vs {ch.shape}")
        if foreground is None and self.config.crop_foreground and len(channels) > 1:
            foreground = ref.with_array(np.any([c.array != 0 for c in channels], axis=0))  # of any channel
        record = self.plan(ref, foreground)
        channels = [ch.with_array(self.normalize(ch.array)) for ch in channels]
        on_grid = [record.apply(ch, kind="image") for ch in channels]
        image_array = np.stack([v.array.astype(np.float32, copy=False) for v in on_grid])
        return Preprocessed(
            image=image_array,
            volume=on_grid[0],
            masks=[record.apply(m, kind="label") for m in masks],
            record=record,
        )
