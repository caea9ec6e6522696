"""Domain-randomised synthetic 3D volumes (SynthSeg-style generator, written from scratch).

Every case is built in three steps:

1. **Label map.** A random scene of "tissues": background, an outer body (or a head with scalp, skull,
   CSF, cortex and white matter), unlabelled "clutter" regions that partition the body, unlabelled
   distractor shapes, and the target structures drawn from named *shape families* (:data:`FAMILIES`).
   Each tissue has a label id (0 for everything that is not a target). The tissue map is then warped by a
   smooth random displacement field (nearest-neighbour resampling), so labels stay crisp.
2. **Rendering.** Label-conditional random intensities: each tissue gets a random mean and standard
   deviation (a Gaussian mixture), with targets pushed a random amount above *or* below the tissue they
   sit in, and a smooth texture for some tissues; then a multiplicative smooth bias field, Gaussian
   blur, an optional simulated thick-slice acquisition along a random axis (blur, downsample, upsample),
   additive noise, normalisation to [0, 1] and a random gamma. Nothing about contrast or shape is
   fixed, so a model trained on these cases cannot rely on one contrast or one shape.
3. **Geometry.** A random anisotropic voxel spacing (in-plane 0.6-1.2 mm, slice 1-3 mm along a random
   axis), a random origin and, optionally, a random oblique direction cosine matrix (a rotation).

Modes (:func:`generate_case`): ``multiclass`` (1-5 labelled structures for in-context training),
``lesion`` (a brain-like host with 1-8 small lesions, severe foreground imbalance), ``territories`` (a
brain split into two complementary territories imaged through several perfusion-like channels) and
``findings`` (a body carrying a random subset of named finding types with fixed label ids and a multi-hot
vector, for retrieval). :func:`generate_dataset` writes N cases as an nnU-Net v2 raw dataset.

Tasks (:func:`generate_task`): for episodic in-context training, one multiclass-style scene and one set of
tissue intensities define a *task*; its V views are different "patients" of that task, each with its own
random affine, smooth deformation, target reshaping, slightly jittered intensities and its own bias field,
blur, thick slices, noise and gamma (:class:`SyntheticTask`, images (V, D, H, W)). :func:`preview_task`
draws the views side by side (``docs/synthetic_task.png``).

Conventions: arrays are ``(D, H, W)`` (SimpleITK ``z, y, x``); spacing and origin are in mm in ``(x, y,
z)`` order; sizes of shapes are in voxels. Everything is deterministic given the seed; per-case seeds of
a dataset come from :func:`case_seed` (``numpy.random.SeedSequence`` of ``(seed, index)``), so case ``i``
is the same whatever the number of cases.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import fft as sfft
from scipy import ndimage as ndi

from irisseg.errors import InputError

__all__ = [
    "MODES",
    "FAMILIES",
    "FAMILY_FUNCTIONS",
    "FINDINGS",
    "FINDING_FAMILIES",
    "LESION_PROTOCOLS",
    "PART_MAIN",
    "PART_CORE",
    "PART_LUMEN",
    "SyntheticCase",
    "blobs",
    "ellipsoids",
    "tubes",
    "vessels",
    "shells",
    "nested",
    "smooth_noise",
    "resolve_families",
    "case_seed",
    "mode_options",
    "mode_label_names",
    "generate_case",
    "generate_dataset",
    "SyntheticTask",
    "task_options",
    "generate_task",
    "preview_task",
]

#: Generation modes of :func:`generate_case`.
MODES = ("multiclass", "lesion", "territories", "findings")

#: Part values in the uint8 maps returned by the shape-family functions.
PART_MAIN = 1  #: the labelled structure (for ``nested``: its outer part)
PART_CORE = 2  #: the inner core of a ``nested`` structure (labelled separately)
PART_LUMEN = 3  #: the unlabelled inside of a ``shells`` structure (its own tissue, label 0)

#: Minimum lesion size in voxels (6-connected components), after the deformation.
MIN_LESION_VOXELS = 3

_MIN_SIDE = 16
_RAD = math.pi / 180.0


# ===================================================================================================
# small numerical helpers
# ===================================================================================================
def _as_shape(shape: int | Sequence[int]) -> tuple[int, int, int]:
    """``shape`` as a (D, H, W) tuple of ints >= 16, or an InputError."""
    if isinstance(shape, (int, np.integer)):
        out = (int(shape),) * 3
    else:
        try:
            out = tuple(int(s) for s in shape)
        except (TypeError, ValueError):
            raise InputError(f"shape must be an int or three ints (D, H, W), got {shape!r}") from None
    if len(out) != 3 or min(out) < _MIN_SIDE:
        raise InputError(f"shape must be an int or three ints (D, H, W), each >= {_MIN_SIDE}, got {shape!r}")
    return out  # type: ignore[return-value]


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _standardise(field: np.ndarray) -> np.ndarray:
    field = field - field.mean()
    std = float(field.std())
    return field / std if std > 1e-12 else field


def _interp_axis(array: np.ndarray, axis: int, positions: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``array`` along ``axis`` at fractional ``positions`` (index units)."""
    n = array.shape[axis]
    positions = np.clip(np.asarray(positions, dtype=np.float64), 0, n - 1)
    i0 = np.minimum(np.floor(positions).astype(np.intp), max(n - 2, 0))
    i1 = np.minimum(i0 + 1, n - 1)
    w_shape = [1] * array.ndim
    w_shape[axis] = len(positions)
    w = (positions - i0).astype(array.dtype).reshape(w_shape)
    return np.take(array, i0, axis=axis) * (1 - w) + np.take(array, i1, axis=axis) * w


def _gaussian_noise_fft(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """White noise low-pass filtered by a Gaussian of ``sigma`` voxels through the FFT (padded, cropped)."""
    pad = int(math.ceil(2.0 * sigma))
    padded = tuple(sfft.next_fast_len(s + pad, real=True) for s in shape)
    white = rng.standard_normal(padded, dtype=np.float32)
    spectrum = sfft.rfftn(white)
    transfer = None
    for axis, n in enumerate(padded):
        freqs = sfft.rfftfreq(n) if axis == len(padded) - 1 else sfft.fftfreq(n)
        h = np.exp(-2.0 * (math.pi * sigma * freqs) ** 2).astype(np.float32)
        h = h.reshape([-1 if a == axis else 1 for a in range(len(padded))])
        transfer = h if transfer is None else transfer * h
    field = sfft.irfftn(spectrum * transfer, s=padded)
    return np.ascontiguousarray(field[tuple(slice(0, s) for s in shape)], dtype=np.float32)


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma: float) -> np.ndarray:
    """A smooth Gaussian random field with zero mean and unit standard deviation.

    Small ``sigma`` is filtered at full resolution through the FFT; large ``sigma`` is drawn on a coarser
    grid and upsampled linearly (the field is already smooth there), which is much cheaper than a large
    Gaussian filter at full resolution.

    Arguments:
      rng (np.random.Generator): random source.
      shape (Sequence[int]): output shape, 3 axes (D, H, W) (any number of axes works).
      sigma (float): correlation length in voxels (the std of the Gaussian low-pass filter), > 0.

    Returns:
      np.ndarray: float32 array of ``shape``, mean 0, std 1.
    """
    shape = tuple(int(s) for s in shape)
    step = max(1, int(sigma / 2.5))
    if step == 1:
        return _standardise(_gaussian_noise_fft(rng, shape, sigma))
    low_shape = tuple(max(2, -(-s // step) + 1) for s in shape)
    field = _gaussian_noise_fft(rng, low_shape, sigma / step)
    for axis, n_out in enumerate(shape):
        scale = (n_out - 1) / step  # covered low-res extent; the rest is margin
        field = _interp_axis(field, axis, np.linspace(0.0, scale, n_out) if n_out > 1 else np.zeros(1))
    return _standardise(field.astype(np.float32, copy=False))


def _rotation(rng: np.random.Generator, max_angle_deg: float = 180.0) -> np.ndarray:
    """A random rotation matrix (det +1) about a random axis, angle uniform in [-max, max] degrees."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis) + 1e-12
    angle = rng.uniform(-max_angle_deg, max_angle_deg) * _RAD
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / (np.linalg.norm(v) + 1e-12)


@dataclass
class _Box:
    """A sub-block of the volume around a centre: slices and local coordinates (voxels, from the centre)."""

    slices: tuple[slice, slice, slice]
    z: np.ndarray  # (d, 1, 1)
    y: np.ndarray  # (1, h, 1)
    x: np.ndarray  # (1, 1, w)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.z.shape[0], self.y.shape[1], self.x.shape[2])


def _box(centre: np.ndarray, half: np.ndarray | float, shape: tuple[int, int, int]) -> _Box:
    centre = np.asarray(centre, dtype=np.float64)
    half = np.broadcast_to(np.asarray(half, dtype=np.float64), (3,))
    lo = np.maximum(np.floor(centre - half).astype(int), 0)
    hi = np.minimum(np.ceil(centre + half).astype(int) + 1, shape)
    hi = np.maximum(hi, lo + 1)
    slices = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    axes = [np.arange(a, b, dtype=np.float32) - np.float32(c) for a, b, c in zip(lo, hi, centre, strict=True)]
    return _Box(slices, axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])


def _ellipsoid_radius(box: _Box, semi_axes: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Normalised ellipsoid radius q (q <= 1 inside) over ``box``; columns of ``rotation`` are the axes."""
    q2 = np.zeros(box.shape, dtype=np.float32)
    for k in range(3):
        r = rotation[:, k]
        u = box.z * np.float32(r[0]) + box.y * np.float32(r[1]) + box.x * np.float32(r[2])
        q2 += (u / np.float32(semi_axes[k])) ** 2
    return np.sqrt(q2)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    return lab == int(np.argmax(counts))


def _sample_centre(rng: np.random.Generator, region: np.ndarray,
                   preferred: np.ndarray | None = None) -> np.ndarray:
    """A random voxel (float (z, y, x)) of ``preferred & region`` if any, else of ``region``, else the centre."""
    for candidates in ((preferred & region) if preferred is not None else None, region):
        if candidates is None:
            continue
        flat = np.flatnonzero(candidates)
        if flat.size:
            return np.array(np.unravel_index(int(flat[rng.integers(flat.size)]), region.shape), dtype=np.float64)
    return (np.array(region.shape, dtype=np.float64) - 1) / 2


def _paste(shape: tuple[int, int, int], box: _Box, local: np.ndarray, region: np.ndarray) -> np.ndarray:
    """A full-size uint8 part map holding ``local`` (box-sized) at the box, restricted to ``region``."""
    out = np.zeros(shape, dtype=np.uint8)
    out[box.slices] = local
    out[~region] = 0
    return out


# ===================================================================================================
# shape families: each returns a uint8 part map (0 outside, PART_MAIN, PART_CORE, PART_LUMEN)
# ===================================================================================================
def _solid(rng: np.random.Generator, shape: tuple[int, int, int], centre: np.ndarray, size: float,
           kind: str, margin: float = 2.0) -> tuple[_Box, np.ndarray]:
    """A solid ellipsoid or blob of radius ~``size`` voxels in a box around ``centre`` (box, local bool)."""
    semi = size * rng.uniform(0.55, 1.25, 3) if kind == "ellipsoid" else size * rng.uniform(0.75, 1.25, 3)
    semi = np.maximum(semi, 0.75)
    rot = _rotation(rng)
    reach = float(semi.max()) * (1.0 if kind == "ellipsoid" else 1.6) + margin
    box = _box(centre, reach, shape)
    q = _ellipsoid_radius(box, semi, rot)
    if kind == "ellipsoid":
        return box, q <= 1.0
    amplitude = rng.uniform(0.2, 0.55)
    noise = smooth_noise(rng, box.shape, max(1.0, 0.4 * size))
    inside = _largest_component((q + np.float32(amplitude) * noise) <= 1.0)
    if not inside.any():
        inside = q <= 1.0
    return box, inside


def ellipsoids(rng: np.random.Generator, region: np.ndarray, size: float, centre: Sequence[float] | None = None,
               preferred: np.ndarray | None = None) -> np.ndarray:
    """An ellipsoid with random semi-axes (0.55-1.25 x ``size``) and a random rotation.

    Arguments:
      rng (np.random.Generator): random source.
      region (np.ndarray): bool (D, H, W), where the shape may lie; the result is clipped to it.
      size (float): typical semi-axis in voxels.
      centre (Sequence[float] | None): centre in voxel coordinates (z, y, x); random in ``region`` if None.
      preferred (np.ndarray | None): bool (D, H, W), where a random centre is preferably drawn.

    Returns:
      np.ndarray: uint8 (D, H, W) part map, ``PART_MAIN`` inside the ellipsoid, 0 elsewhere.
    """
    c = _sample_centre(rng, region, preferred) if centre is None else np.asarray(centre, float)
    box, inside = _solid(rng, region.shape, c, size, "ellipsoid")
    return _paste(region.shape, box, inside.astype(np.uint8) * PART_MAIN, region)


def blobs(rng: np.random.Generator, region: np.ndarray, size: float, centre: Sequence[float] | None = None,
          preferred: np.ndarray | None = None) -> np.ndarray:
    """A smooth irregular blob: an ellipsoidal falloff plus smoothed noise, thresholded (largest component).

    Arguments:
      rng (np.random.Generator): random source.
      region (np.ndarray): bool (D, H, W), where the shape may lie; the result is clipped to it.
      size (float): typical radius in voxels (lobes reach ~1.5 x further).
      centre (Sequence[float] | None): centre in voxel coordinates (z, y, x); random in ``region`` if None.
      preferred (np.ndarray | None): bool (D, H, W), where a random centre is preferably drawn.

    Returns:
      np.ndarray: uint8 (D, H, W) part map, ``PART_MAIN`` inside the blob, 0 elsewhere.
    """
    c = _sample_centre(rng, region, preferred) if centre is None else np.asarray(centre, float)
    box, inside = _solid(rng, region.shape, c, size, "blob")
    return _paste(region.shape, box, inside.astype(np.uint8) * PART_MAIN, region)


def _random_walk(rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, length: float,
                 curl: float, jitter: float, shape: tuple[int, int, int], region: np.ndarray | None = None,
                 step: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Points of a smooth random path (step ``step`` voxels); stops on leaving the volume or ``region``.

    The direction turns about a random fixed axis (``curl`` radians per voxel) plus a random jitter, so the
    path is a smooth curve rather than Brownian. Returns (points (n, 3) float, final direction).
    """
    omega = _unit(rng.standard_normal(3)) * curl
    p, d = np.asarray(start, float).copy(), _unit(np.asarray(direction, float))
    upper = np.array(shape) - 1
    points = []
    for _ in range(max(1, int(length / step))):
        p = p + step * d
        if np.any(p < 0) or np.any(p > upper):
            break
        if region is not None and not region[tuple(np.round(p).astype(int))]:
            break
        points.append(p)
        d = _unit(d + step * np.cross(omega, d) + jitter * math.sqrt(step) * rng.standard_normal(3))
    return (np.array(points) if points else np.zeros((0, 3))), d


def _render_centrelines(shape: tuple[int, int, int], points: np.ndarray, radii: np.ndarray,
                        region: np.ndarray) -> np.ndarray:
    """Bool (D, H, W): voxels within ``radii[j]`` (voxels) of their nearest centreline point ``j``."""
    out = np.zeros(shape, dtype=bool)
    if len(points) == 0:
        return out
    reach = float(radii.max()) + 2.0
    lo = np.maximum(np.floor(points.min(0) - reach).astype(int), 0)
    hi = np.minimum(np.ceil(points.max(0) + reach).astype(int) + 1, shape)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    idx = np.clip(np.round(points).astype(int), 0, np.array(shape) - 1) - lo
    centre = np.zeros(tuple(hi - lo), dtype=bool)
    radius = np.zeros(tuple(hi - lo), dtype=np.float32)
    centre[tuple(idx.T)] = True
    np.maximum.at(radius, tuple(idx.T), radii.astype(np.float32))
    dist, nearest = ndi.distance_transform_edt(~centre, return_indices=True)
    out[sl] = dist <= radius[tuple(nearest)]
    out &= region
    return out


def tubes(rng: np.random.Generator, region: np.ndarray, size: float, centre: Sequence[float] | None = None,
          preferred: np.ndarray | None = None, radius: float | None = None) -> np.ndarray:
    """A thick curved tube along a smooth random path through ``centre``.

    Arguments:
      rng (np.random.Generator): random source.
      region (np.ndarray): bool (D, H, W), where the shape may lie; the result is clipped to it.
      size (float): half the path length is 1.3-2.3 x ``size`` voxels.
      centre (Sequence[float] | None): a point of the path (z, y, x); random in ``region`` if None.
      preferred (np.ndarray | None): bool (D, H, W), where a random centre is preferably drawn.
      radius (float | None): tube radius in voxels; 0.22-0.4 x ``size`` (at least 1) if None.

    Returns:
      np.ndarray: uint8 (D, H, W) part map, ``PART_MAIN`` inside the tube, 0 elsewhere.
    """
    c = _sample_centre(rng, region, preferred) if centre is None else np.asarray(centre, float)
    r = max(1.0, size * rng.uniform(0.22, 0.4)) if radius is None else float(radius)
    d = _unit(rng.standard_normal(3))
    half = size * rng.uniform(1.3, 2.3)
    curl = rng.uniform(0.0, 1.2) / max(size, 1.0)
    fwd, _ = _random_walk(rng, c, d, half, curl, 0.05, region.shape)
    bwd, _ = _random_walk(rng, c, -d, half, curl, 0.05, region.shape)
    points = np.concatenate([bwd[::-1], c[None], fwd])
    return _render_centrelines(region.shape, points, np.full(len(points), r), region).astype(np.uint8) * PART_MAIN


def vessels(rng: np.random.Generator, region: np.ndarray, size: float, centre: Sequence[float] | None = None,
            preferred: np.ndarray | None = None, max_depth: int | None = None) -> np.ndarray:
    """A thin branching vessel tree grown by random walks from a root at ``centre``.

    Each segment walks with a persistent, slowly turning direction; at its end it splits in two children
    (angles 25-60 degrees, radius x 0.65-0.85). Branches stop where they leave ``region``.

    Arguments:
      rng (np.random.Generator): random source.
      region (np.ndarray): bool (D, H, W), where the tree may grow; the result is clipped to it.
      size (float): overall extent of the tree in voxels (root segment 0.6-1 x ``size``, root radius
        0.09-0.16 x ``size``, 0.7-2.5 voxels).
      centre (Sequence[float] | None): root position (z, y, x); random in ``region`` if None.
      preferred (np.ndarray | None): bool (D, H, W), where a random root is preferably drawn.
      max_depth (int | None): number of branching levels; 3-5 if None.

    Returns:
      np.ndarray: uint8 (D, H, W) part map, ``PART_MAIN`` on the vessels (1-4 voxels thick), 0 elsewhere.
    """
    c = _sample_centre(rng, region, preferred) if centre is None else np.asarray(centre, float)
    depth_max = int(rng.integers(3, 6)) if max_depth is None else int(max_depth)
    r0 = float(np.clip(size * rng.uniform(0.09, 0.16), 0.7, 2.5))
    stack = [(c, _unit(rng.standard_normal(3)), r0, size * rng.uniform(0.6, 1.0), 0)]
    points, radii = [c[None]], [np.array([r0])]
    while stack:
        start, d, r, length, depth = stack.pop()
        seg, d_end = _random_walk(rng, start, d, length, rng.uniform(0.0, 0.8) / max(length, 1.0), 0.15,
                                  region.shape, region)
        if len(seg) == 0:
            continue
        points.append(seg)
        radii.append(np.full(len(seg), r))
        if depth < depth_max and r * 0.7 >= 0.35:
            normal = _unit(np.cross(d_end, rng.standard_normal(3)))
            for sign in (1.0, -1.0):
                angle = rng.uniform(25, 60) * _RAD
                child = _unit(math.cos(angle) * d_end + sign * math.sin(angle) * normal)
                stack.append((seg[-1], child, r * rng.uniform(0.65, 0.85), length * rng.uniform(0.65, 0.95),
                              depth + 1))
    mask = _render_centrelines(region.shape, np.concatenate(points), np.concatenate(radii), region)
    return mask.astype(np.uint8) * PART_MAIN


def shells(rng: np.random.Generator, region: np.ndarray, size: float, centre: Sequence[float] | None = None,
           preferred: np.ndarray | None = None, thickness: float | None = None) -> np.ndarray:
    """A thin shell: the wall of a hollow ellipsoid or blob; its inside is an unlabelled lumen.

    Arguments:
      rng (np.random.Generator): random source.
      region (np.ndarray): bool (D, H, W), where the shape may lie; the result is clipped to it.
      size (float): typical outer radius in voxels.
      centre (Sequence[float] | None): centre (z, y, x); random in ``region`` if None.
      preferred (np.ndarray | None): bool (D, H, W), where a random centre is preferably drawn.
      thickness (float | None): wall thickness in voxels; 1-2.2 if None.

    Returns:
      np.ndarray: uint8 (D, H, W) part map: ``PART_MAIN`` on the wall, ``PART_LUMEN`` inside, 0 elsewhere.
    """
    c = _sample_centre(rng, region, preferred) if centre is None else np.asarray(centre, float)
    t = rng.uniform(1.0, 2.2) if thickness is None else float(thickness)
    box, inside = _solid(rng, region.shape, c, max(size, 2.0), "ellipsoid" if rng.random() < 0.5 else "blob")
    depth = ndi.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1, 1:-1]
    local = np.where(inside, np.where(depth <= t, PART_MAIN, PART_LUMEN), 0).astype(np.uint8)
    return _paste(region.shape, box, local, region)


def nested(rng: np.random.Generator, region: np.ndarray, size: float, centre: Sequence[float] | None = None,
           preferred: np.ndarray | None = None) -> np.ndarray:
    """A structure with an inner core: an ellipsoid/blob whose off-centre inner ellipsoid is a second part.

    Arguments:
      rng (np.random.Generator): random source.
      region (np.ndarray): bool (D, H, W), where the shape may lie; the result is clipped to it.
      size (float): typical outer radius in voxels (core 0.35-0.6 x that).
      centre (Sequence[float] | None): centre (z, y, x); random in ``region`` if None.
      preferred (np.ndarray | None): bool (D, H, W), where a random centre is preferably drawn.

    Returns:
      np.ndarray: uint8 (D, H, W) part map: ``PART_MAIN`` on the outer part, ``PART_CORE`` on the core.
    """
    c = _sample_centre(rng, region, preferred) if centre is None else np.asarray(centre, float)
    size = max(size, 2.0)
    box, outer = _solid(rng, region.shape, c, size, "ellipsoid" if rng.random() < 0.5 else "blob")
    core_semi = np.maximum(size * rng.uniform(0.35, 0.6, 3), 0.75)
    offset = rng.uniform(-0.25, 0.25, 3) * size
    shifted = _Box(box.slices, box.z - np.float32(offset[0]), box.y - np.float32(offset[1]),
                   box.x - np.float32(offset[2]))
    core = (_ellipsoid_radius(shifted, core_semi, _rotation(rng)) <= 1.0) & outer
    if not core.any() or core.sum() == outer.sum():  # keep both parts non-empty
        depth = ndi.distance_transform_edt(np.pad(outer, 1))[1:-1, 1:-1, 1:-1]
        core = depth >= max(2.0, 0.6 * float(depth.max()))
    local = np.where(core, PART_CORE, np.where(outer, PART_MAIN, 0)).astype(np.uint8)
    return _paste(region.shape, box, local, region)


#: Shape families by name (the order of :data:`FAMILIES`); each ``fn(rng, region, size, centre=None,
#: preferred=None, ...) -> uint8 part map (D, H, W)``.
FAMILY_FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "blobs": blobs,
    "ellipsoids": ellipsoids,
    "tubes": tubes,
    "vessels": vessels,
    "shells": shells,
    "nested": nested,
}

#: Names of the shape families.
FAMILIES: tuple[str, ...] = tuple(FAMILY_FUNCTIONS)

#: Size multipliers per family so that the structures of one case have comparable visual weight.
_FAMILY_SIZE = {"blobs": 1.0, "ellipsoids": 1.0, "tubes": 0.9, "vessels": 2.2, "shells": 1.3, "nested": 1.3}


def resolve_families(families: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                     default: Sequence[str] = FAMILIES) -> tuple[str, ...]:
    """The shape families to use: ``families`` (or ``default``) minus ``exclude``, in :data:`FAMILIES` order.

    Arguments:
      families (Iterable[str] | None): families to include; None means ``default``.
      exclude (Iterable[str] | None): families to hold out.
      default (Sequence[str]): the families used when ``families`` is None.

    Returns:
      tuple[str, ...]: the selected family names, non-empty.

    Raises:
      InputError: an unknown family name (the message lists the valid ones), or nothing left.
    """
    if isinstance(families, str):
        families = [families]
    if isinstance(exclude, str):
        exclude = [exclude]
    chosen = list(default) if families is None else [str(f) for f in families]
    dropped = [] if exclude is None else [str(f) for f in exclude]
    unknown = [f for f in chosen + dropped if f not in FAMILY_FUNCTIONS]
    if unknown:
        raise InputError(f"unknown shape family {unknown[0]!r}; valid families: {', '.join(FAMILIES)}")
    out = tuple(f for f in FAMILIES if f in chosen and f not in dropped)
    if not out:
        raise InputError(f"no shape family left after families={chosen} and exclude={dropped}")
    return out


# ===================================================================================================
# scenes: tissue maps with a label per tissue
# ===================================================================================================
@dataclass
class _Contrast:
    hosts: np.ndarray  # tissues whose (weighted) mean this one is defined against
    weights: np.ndarray  # their weights, summing to 1
    sign: int  # +1 brighter, -1 darker, 0 random
    low: float
    high: float


class _Scene:
    """A tissue map (int16, (D, H, W)) and, per tissue id, its label, contrast rule and std range."""

    def __init__(self, shape: tuple[int, int, int]):
        self.shape = shape
        self.tissue = np.zeros(shape, dtype=np.int16)  # tissue 0: outside the body
        self.labels: list[int] = [0]
        self.contrast: list[_Contrast | None] = [None]
        self.std: list[tuple[float, float] | None] = [None]
        #: fixed mean intensities of the first ``len(template)`` tissues (an acquisition protocol), or None
        self.template: np.ndarray | None = None
        #: ids of named tissues (the head scene names ``grey_matter``)
        self.named: dict[str, int] = {}

    def paint(self, mask: np.ndarray, label: int = 0, contrast: tuple[float, float] | None = None,
              sign: int = 0, host: int | None = None, std: tuple[float, float] | None = None) -> int:
        """Give the voxels of ``mask`` a new tissue id with ``label``; optionally a contrast rule.

        ``contrast=(low, high)``: the tissue's mean is the mean of its surroundings +- U(low, high)
        (``sign`` fixes the direction); the surroundings are the ``host`` tissue if given, else the tissues
        in a 2-voxel ring around ``mask`` weighted by their share of the ring (so a target differs from
        its neighbours on average, whatever their mix).
        """
        tid = len(self.labels)
        rule = None
        if contrast is not None:
            if host is not None:
                hosts, weights = np.array([host]), np.ones(1)
            else:
                hosts, weights = self._surroundings(mask)
            rule = _Contrast(hosts, weights, sign, *contrast)
        self.tissue[mask] = tid
        self.labels.append(int(label))
        self.contrast.append(rule)
        self.std.append(std)
        return tid

    def paint_parts(self, parts: np.ndarray, labels: dict[int, int], contrast: tuple[float, float],
                    sign: int = 0, std: tuple[float, float] | None = None,
                    core_contrast: tuple[float, float] | None = None, core_sign: int = 0,
                    host: int | None = None) -> dict[int, int]:
        """Paint a family part map: ``labels`` maps part value -> label id. Returns part -> tissue id.

        The main part's contrast is defined against ``host`` if given, else against its surroundings.
        """
        tids: dict[int, int] = {}
        main = parts == PART_MAIN
        if main.any():
            tids[PART_MAIN] = self.paint(main, labels.get(PART_MAIN, 0), contrast, sign, host=host, std=std)
        for part in (PART_CORE, PART_LUMEN):
            sel = parts == part
            if not sel.any():
                continue
            host = tids.get(PART_MAIN)
            rule = core_contrast or (0.1, 0.4)
            tids[part] = self.paint(sel, labels.get(part, 0), rule, core_sign, host=host, std=std)
        return tids

    def _surroundings(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tissue ids in a 2-voxel ring around ``mask`` and their voxel shares."""
        found = ndi.find_objects(mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8))
        if not found or found[0] is None:
            return np.zeros(1, dtype=int), np.ones(1)
        box = tuple(slice(max(sl.start - 2, 0), sl.stop + 2) for sl in found[0])
        local = mask[box]
        ring = ndi.binary_dilation(local, iterations=2) & ~local
        counts = np.bincount(self.tissue[box][ring], minlength=1).astype(float)
        if counts.sum() == 0:
            counts = np.bincount(self.tissue[box][local], minlength=1).astype(float)
        hosts = np.flatnonzero(counts)
        return hosts, counts[hosts] / counts[hosts].sum()

    def label_lut(self) -> np.ndarray:
        return np.asarray(self.labels, dtype=np.uint8)


def _implicit_ellipsoid(rng: np.random.Generator, shape: tuple[int, int, int], semi: np.ndarray,
                        wobble: float, max_tilt: float = 12.0) -> np.ndarray:
    """Normalised radius field (float32 (D, H, W), 1 on the surface) of a wobbly ellipsoid at the centre."""
    centre = (np.array(shape) - 1) / 2 + rng.uniform(-0.03, 0.03, 3) * np.array(shape)
    box = _box(centre, np.array(shape, float), shape)
    q = _ellipsoid_radius(box, semi, _rotation(rng, max_tilt))
    if wobble > 0:
        q += np.float32(wobble) * smooth_noise(rng, shape, min(shape) / 6)
    return q


def _clutter(rng: np.random.Generator, scene: _Scene, region: np.ndarray, n_regions: int, warp: float) -> None:
    """Partition ``region`` into ``n_regions`` unlabelled tissues: a Voronoi diagram on warped coordinates."""
    flat = np.flatnonzero(region)
    if flat.size == 0 or n_regions < 1:
        return
    seeds = np.array(np.unravel_index(rng.choice(flat, size=min(n_regions, flat.size), replace=False),
                                      region.shape), dtype=np.float32).T
    grids = np.ogrid[tuple(slice(0, s) for s in region.shape)]
    sigma = min(region.shape) / rng.uniform(5.0, 8.0)
    warped = [g.astype(np.float32) + np.float32(warp) * smooth_noise(rng, region.shape, sigma) for g in grids]
    best = np.full(region.shape, np.inf, dtype=np.float32)
    owner = np.zeros(region.shape, dtype=np.int16)
    for k, s in enumerate(seeds):
        d = (warped[0] - s[0]) ** 2 + (warped[1] - s[1]) ** 2 + (warped[2] - s[2]) ** 2
        closer = d < best
        best[closer] = d[closer]
        owner[closer] = k
    for k in range(len(seeds)):
        scene.paint(region & (owner == k), 0, std=(0.01, 0.06))


def _trunk_scene(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[_Scene, np.ndarray, np.ndarray]:
    """A body: background, skin/fat ring, muscle ring and clutter organs.

    Returns (scene, interior (bool, where structures go), deep (bool, interior away from the wall)).
    """
    scene = _Scene(shape)
    k = _scaled(shape)
    semi = (np.array(shape) / 2) * rng.uniform(0.74, 0.93, 3)
    q = _implicit_ellipsoid(rng, shape, semi, wobble=rng.uniform(0.02, 0.06))
    per_voxel = 1.0 / float(semi.mean())  # q units per voxel
    skin = max(1.3, rng.uniform(1.5, 4.0) * k) * per_voxel
    muscle = rng.uniform(0.0, 4.0) * k * per_voxel
    scene.paint(_largest_component(q < 1.0), 0, std=(0.01, 0.05))  # fat / skin
    if muscle > 1.3 * per_voxel:
        scene.paint(_largest_component(q < 1.0 - skin), 0, std=(0.01, 0.05))
    else:
        muscle = 0.0
    interior = _largest_component(q < 1.0 - skin - muscle)
    _clutter(rng, scene, interior, int(rng.integers(3, 9)), warp=rng.uniform(0.1, 0.3) * min(shape))
    deep = interior & (q < 0.75 * (1.0 - skin - muscle))
    return scene, interior, deep


def _head_scene(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[_Scene, dict[str, np.ndarray]]:
    """A brain-like head: scalp, skull, CSF ring, folded cortex, white matter, deep nuclei, ventricles.

    Returns (scene, masks) with masks ``brain`` (inside the skull), ``parenchyma`` (cortex, white matter,
    nuclei) and ``white`` (white matter), all bool (D, H, W) before deformation. Brain tissues are
    labelled 1 in the scene (used by the territories mode; the lesion mode relabels to 0).
    """
    scene = _Scene(shape)
    n, k = min(shape), _scaled(shape)
    outer = (np.array(shape) / 2) * rng.uniform(0.72, 0.88) * rng.uniform(0.9, 1.06, 3)  # scalp surface
    skull, scalp = max(1.5, rng.uniform(2.0, 4.5) * k), max(1.5, rng.uniform(1.5, 3.5) * k)  # voxels
    semi = outer - skull - scalp
    per_voxel = 1.0 / float(semi.mean())  # q units per voxel
    q = _implicit_ellipsoid(rng, shape, semi, wobble=rng.uniform(0.01, 0.04))
    scene.paint(_largest_component(q < 1.0 + (skull + scalp) * per_voxel), 0, std=(0.01, 0.05))  # scalp
    scene.paint(_largest_component(q < 1.0 + skull * per_voxel), 0, std=(0.005, 0.03))  # skull
    brain = _largest_component(q < 1.0)
    csf_t = max(1.2, rng.uniform(1.0, 2.5) * k) * per_voxel
    scene.paint(brain, 1, std=(0.005, 0.03))  # CSF ring
    cortex_t = max(2.0, rng.uniform(2.5, 5.0) * k) * per_voxel
    folds = smooth_noise(rng, shape, max(1.2, n / 26))
    cortex_inner = 1.0 - csf_t - np.float32(cortex_t) * (1.0 + 0.8 * folds)
    parenchyma = brain & (q < 1.0 - csf_t)
    scene.named["grey_matter"] = scene.paint(parenchyma, 1, std=(0.01, 0.05))
    white = parenchyma & (q < cortex_inner)
    scene.paint(white, 1, std=(0.01, 0.04))
    # deep nuclei: a mirrored pair of ellipsoids near the centre
    centre = (np.array(shape) - 1) / 2
    lateral = int(rng.integers(3))
    offset = np.zeros(3)
    offset[lateral] = rng.uniform(0.12, 0.2) * semi[lateral]
    nuclei_size = rng.uniform(0.1, 0.16) * float(semi.mean())
    nuclei = np.zeros(shape, dtype=bool)
    for sign in (1, -1):
        nuclei |= ellipsoids(rng, white, nuclei_size, centre=centre + sign * offset * 1.8) > 0
    scene.paint(nuclei, 1, std=(0.01, 0.04))
    ventricles = np.zeros(shape, dtype=bool)
    for sign in (1, -1):
        ventricles |= blobs(rng, white & ~nuclei, rng.uniform(0.08, 0.15) * float(semi.mean()),
                            centre=centre + sign * offset * 0.6) > 0
    scene.paint(ventricles, 1, std=(0.005, 0.03))
    return scene, {"brain": brain, "parenchyma": parenchyma & ~ventricles, "white": white & ~nuclei & ~ventricles}


def _place(rng: np.random.Generator, family: str, free: np.ndarray, size: float,
           preferred: np.ndarray | None = None, **kwargs) -> np.ndarray:
    """Run a family function in the free region; returns its part map (may be empty)."""
    return FAMILY_FUNCTIONS[family](rng, free, size, preferred=preferred, **kwargs)


# ===================================================================================================
# deformation, rendering, geometry
# ===================================================================================================
def _deform(rng: np.random.Generator, tissue: np.ndarray, max_displacement: float) -> np.ndarray:
    """Warp an integer map by a smooth random displacement field (max ~``max_displacement`` voxels), nearest."""
    if max_displacement <= 0:
        return tissue
    shape = tissue.shape
    amplitude = np.float32(rng.uniform(0.3, 1.0) * max_displacement / 2.5)  # fields have std 1: ~2.5 std max
    grids = np.indices(shape, dtype=np.float32)
    for axis in range(3):
        grids[axis] += amplitude * smooth_noise(rng, shape, min(shape) / rng.uniform(4, 7))
    return ndi.map_coordinates(tissue, grids, order=0, mode="nearest")


def _simulate_thick_slices(image: np.ndarray, axis: int, factor: float) -> np.ndarray:
    """Simulate a thick-slice acquisition along ``axis``: blur, downsample by ``factor``, upsample back."""
    image = ndi.gaussian_filter1d(image, sigma=0.42 * factor, axis=axis, mode="nearest")
    n = image.shape[axis]
    m = max(2, int(round(n / factor)))
    low = _interp_axis(image, axis, np.linspace(0, n - 1, m))
    return _interp_axis(low, axis, np.linspace(0, m - 1, n))


def _sample_means(rng: np.random.Generator, scene: _Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-tissue random means, stds and contrast offsets (float32 arrays over tissue ids).

    A tissue with a contrast rule gets ``mean = (weighted mean of its hosts) + offset``; its signed
    ``offset`` is returned (0 for tissues without a rule) so that :func:`_jitter_means` can re-derive the
    means of a re-rendered view from jittered host means while keeping each target's contrast.
    """
    n = len(scene.labels)
    means = rng.uniform(0.0, 1.0, n)
    if rng.random() < 0.85:  # outside the body is usually dark (air), sometimes anything
        means[0] = rng.uniform(0.0, 0.12)
    if scene.template is not None:  # a fixed protocol: the template's means, +-0.05 per case
        k = len(scene.template)
        means[:k] = scene.template + rng.uniform(-0.05, 0.05, k)
    stds = np.empty(n)
    offsets = np.zeros(n)
    for t in range(n):
        low, high = scene.std[t] or (0.005, 0.04)
        stds[t] = rng.uniform(low, high)
        rule = scene.contrast[t]
        if rule is None:
            continue
        delta = rng.uniform(rule.low, rule.high)
        sign = rule.sign or (1 if rng.random() < 0.5 else -1)
        base = float(np.dot(means[rule.hosts], rule.weights))
        value = base + sign * delta
        if rule.sign == 0 and not 0.0 <= value <= 1.0:
            flipped = base - sign * delta
            if abs(flipped - 0.5) < abs(value - 0.5):
                value = flipped
        means[t] = value
        offsets[t] = value - base
    return means.astype(np.float32), stds.astype(np.float32), offsets.astype(np.float32)


def _jitter_means(rng: np.random.Generator, scene: _Scene, means: np.ndarray, stds: np.ndarray,
                  offsets: np.ndarray, jitter: float) -> tuple[np.ndarray, np.ndarray]:
    """Means and stds of one view of a task: the task's values, slightly perturbed.

    Tissues without a contrast rule move by up to ``0.3 * jitter`` (intensity units, about ``jitter`` of a
    typical contrast); a tissue with a rule keeps its rule: the (jittered) mean of its hosts plus its task
    offset scaled by ``1 +- jitter``. Stds are scaled by ``1 +- 2 * jitter``. Host ids are always smaller
    than the tissue's own id (hosts are painted first), so one forward pass resolves every rule.
    """
    n = len(means)
    out = means.astype(np.float64) + rng.uniform(-0.3, 0.3, n) * jitter
    scale = 1.0 + rng.uniform(-1.0, 1.0, n) * jitter
    for t in range(n):
        rule = scene.contrast[t]
        if rule is not None:
            out[t] = float(np.dot(out[rule.hosts], rule.weights)) + float(offsets[t]) * scale[t]
    view_stds = stds * (1.0 + rng.uniform(-2.0, 2.0, n) * jitter)
    return out.astype(np.float32), np.maximum(view_stds, 1e-4).astype(np.float32)


def _sample_texture(rng: np.random.Generator, n: int) -> np.ndarray:
    """Per-tissue amplitude of a smooth within-tissue texture (float32 (n,)): U(0, 0.08) for about half."""
    return (rng.uniform(0.0, 0.08, n) * (rng.random(n) < 0.5)).astype(np.float32)


def _render(rng: np.random.Generator, tissue: np.ndarray, means: np.ndarray, stds: np.ndarray,
            acquisition: tuple[int, float, float], gain: np.ndarray | None = None,
            texture: np.ndarray | None = None, record: dict | None = None) -> np.ndarray:
    """Render a tissue map: GMM sampling (+ texture), bias field, blur, thick slices, noise, [0, 1], gamma.

    ``acquisition`` is (slice axis, slice/in-plane spacing ratio, probability of a thick-slice simulation);
    the simulated slice thickness is 0.8-1.5 x that ratio (1.5-4 voxels). ``texture`` (per-tissue texture
    amplitudes, see :func:`_sample_texture`) is drawn here when None; the texture field itself, the bias
    field, blur, thick slices, noise and gamma are always drawn here. ``record``, when given, receives what
    was drawn (see :data:`ACQUISITION_KEYS`); recording draws nothing, so the arrays are the same either way.
    """
    slice_axis, ratio, thick_slice = acquisition
    shape = tissue.shape
    image = means[tissue] + stds[tissue] * rng.standard_normal(shape, dtype=np.float32)
    if texture is None:
        texture = _sample_texture(rng, len(means))
    if texture.max() > 0.005:  # smooth within-tissue texture for about half the tissues
        image += texture[tissue] * smooth_noise(rng, shape, rng.uniform(0.8, 2.5))
    if gain is not None:
        image *= gain
    # what was applied, set where it is applied (for ``record``)
    drawn = {"bias_field": 0.0, "blur_sigma": [0.0, 0.0, 0.0], "slice_axis": "xyz"[2 - slice_axis],
             "slice_thickness": 1.0, "noise_std": 0.0}
    bias = rng.uniform(0.0, 0.35)
    if bias > 0.02:
        image *= np.exp(np.float32(bias) * smooth_noise(rng, shape, min(shape) / rng.uniform(2.0, 4.0)))
        drawn["bias_field"] = round(float(bias), 4)
    blur = rng.uniform(0.0, 1.0, 3)
    if blur.max() > 0.3:
        image = ndi.gaussian_filter(image, sigma=tuple(blur), mode="nearest", truncate=3.0)
        drawn["blur_sigma"] = [round(float(b), 3) for b in reversed(blur)]  # array axes (z, y, x) -> x, y, z
    if rng.random() < thick_slice:
        factor = min(max(ratio * rng.uniform(0.8, 1.5), 1.5), 4.0, shape[slice_axis] / 6)
        if factor > 1.2:
            image = _simulate_thick_slices(image, slice_axis, factor)
            drawn["slice_thickness"] = round(float(factor), 3)
    noise = rng.uniform(0.0, 0.04)
    if noise > 0.002:
        image = image + np.float32(noise) * rng.standard_normal(shape, dtype=np.float32)
        drawn["noise_std"] = round(float(noise), 4)
    lo, hi = np.percentile(image, [0.1, 99.9])
    image = np.clip((image - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    gamma = math.exp(rng.normal(0.0, 0.3))
    if record is not None:
        record.update(drawn, gamma=round(gamma, 4))
    return np.power(image, np.float32(gamma), dtype=np.float32)


#: What :attr:`SyntheticCase.attributes` ``["acquisition"]`` records of an image's acquisition: ``bias_field``
#: (amplitude of the multiplicative log-bias field, 0: none), ``blur_sigma`` (Gaussian widths in voxels along
#: x, y, z, zeros: no blur), ``slice_axis`` (``"x"``, ``"y"`` or ``"z"``, the thick-slice axis of the grid),
#: ``slice_thickness`` (the simulated slice thickness in voxels, 1.0: none), ``noise_std`` (additive noise,
#: intensity units before the final [0, 1] rescale) and ``gamma`` (the final intensity exponent).
ACQUISITION_KEYS = ("bias_field", "blur_sigma", "slice_axis", "slice_thickness", "noise_std", "gamma")


def _random_geometry(rng: np.random.Generator, oblique: float) -> tuple[tuple, np.ndarray, tuple, int, float]:
    """Random (spacing (x, y, z) mm, direction 3x3, origin (x, y, z) mm, slice array axis, slice/in-plane)."""
    slice_axis = int(rng.choice(3, p=[0.6, 0.2, 0.2]))  # array axis (0 = z)
    in_plane = rng.uniform(0.6, 1.2)
    zyx = [in_plane, in_plane, in_plane]
    zyx[slice_axis] = rng.uniform(1.0, 3.0)
    spacing = tuple(round(float(s), 4) for s in reversed(zyx))
    direction = _rotation(rng, 30.0) if rng.random() < oblique else np.eye(3)
    origin = tuple(round(float(o), 2) for o in rng.uniform(-150.0, 150.0, 3))
    return spacing, direction, origin, slice_axis, zyx[slice_axis] / in_plane


# ===================================================================================================
# public case type and options
# ===================================================================================================
@dataclass
class SyntheticCase:
    """One generated case.

    Attributes:
      image (np.ndarray): float32 in [0, 1], (D, H, W), or (C, D, H, W) for ``territories``.
      label (np.ndarray): uint8 label map (D, H, W); 0 is background.
      spacing (tuple[float, float, float]): voxel size in mm, (x, y, z).
      direction (np.ndarray): (3, 3) direction cosines, row-major as SimpleITK (a rotation, det +1).
      origin (tuple[float, float, float]): position of voxel [0, 0, 0] in mm, (x, y, z).
      label_names (dict[int, str]): name of every label present in ``label``.
      families (dict[int, str]): shape family of every label present (lesions of several families: names
        joined with "+"; territories: "territory").
      findings (np.ndarray | None): ``findings`` mode only: uint8 multi-hot vector over :data:`FINDINGS`,
        1 where that finding (label ``index + 1``) is present in ``label``.
      mode (str): the generation mode.
      seed (int): the seed that reproduces this case with :func:`generate_case`.
      attributes (dict): what made this case easy or hard, for stratified evaluation: ``acquisition``
        (the image's draws, :data:`ACQUISITION_KEYS`; ``territories``: a list, one per channel) and, in the
        ``lesion`` mode, ``lesion_contrast``: ``"low"`` (a quarter of the cases: every lesion 0.05-0.15
        from its host tissue, on the [0, 1] intensity scale before gamma) or ``"normal"`` (0.12-0.45).
    """

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    direction: np.ndarray
    origin: tuple[float, float, float]
    label_names: dict[int, str]
    families: dict[int, str]
    findings: np.ndarray | None
    mode: str
    seed: int
    attributes: dict = field(default_factory=dict)

    @property
    def channels(self) -> int:
        """Number of image channels (1 unless the image is (C, D, H, W))."""
        return self.image.shape[0] if self.image.ndim == 4 else 1


# ===================================================================================================
# findings table
# ===================================================================================================
@dataclass(frozen=True)
class _FindingSpec:
    family: str
    size: tuple[float, float]  # radius range in voxels at 64^3 (scaled with the volume)
    count: tuple[int, int]  # instances per case
    sign: int  # +1 hyper-, -1 hypo-intense, 0 either
    contrast: tuple[float, float]
    std: tuple[float, float]
    extra: tuple[tuple[str, tuple[float, float]], ...] = ()  # family keyword -> range (voxels at 64^3)


_FINDING_SPECS: dict[str, _FindingSpec] = {
    "nodule": _FindingSpec("blobs", (2.0, 4.0), (1, 3), +1, (0.15, 0.4), (0.01, 0.04)),
    "mass": _FindingSpec("nested", (6.0, 9.5), (1, 1), 0, (0.12, 0.3), (0.04, 0.09)),
    "cyst": _FindingSpec("ellipsoids", (3.5, 7.0), (1, 2), -1, (0.2, 0.45), (0.003, 0.012)),
    "calcification": _FindingSpec("tubes", (2.0, 4.0), (1, 3), +1, (0.5, 0.8), (0.01, 0.03),
                                  (("radius", (0.7, 1.1)),)),
    "vessel_tree": _FindingSpec("vessels", (14.0, 22.0), (1, 1), +1, (0.25, 0.45), (0.01, 0.04)),
    "effusion_shell": _FindingSpec("shells", (7.0, 11.0), (1, 1), 0, (0.15, 0.35), (0.01, 0.03),
                                   (("thickness", (1.2, 2.5)),)),
}

#: Finding types of the ``findings`` mode; finding ``FINDINGS[k]`` always has label id ``k + 1``.
FINDINGS: tuple[str, ...] = tuple(_FINDING_SPECS)

#: Shape family of each finding type.
FINDING_FAMILIES: dict[str, str] = {name: spec.family for name, spec in _FINDING_SPECS.items()}


#: Acquisition protocols of the ``lesion`` mode: name -> (mean intensity of the head tissues outside,
#: scalp, skull, CSF, grey matter, white matter, deep nuclei, ventricles; lesion sign), or None for
#: ``random`` (every tissue's mean drawn in [0, 1] and the lesion sign per case, as the in-context
#: modes). A real lesion dataset comes from one protocol, so its tissue order and lesion polarity are
#: fixed: ``flair`` (dark CSF, grey matter above white matter, hyperintense lesions, as MS lesions on
#: FLAIR), ``t1`` (dark CSF, white matter above grey matter, hypointense lesions, as chronic stroke
#: lesions on T1w, the ATLAS dataset); the lesion contrast is then measured from grey matter (brighter
#: than grey matter on FLAIR, darker on T1w). Each case moves every mean by up to +-0.05 and draws its own
#: bias field, blur, slice thickness, noise and gamma.
LESION_PROTOCOLS: dict[str, tuple[tuple[float, ...], int] | None] = {
    "flair": ((0.03, 0.55, 0.08, 0.12, 0.50, 0.38, 0.45, 0.10), +1),
    "t1": ((0.03, 0.60, 0.10, 0.15, 0.45, 0.65, 0.50, 0.15), -1),
    "random": None,
}

_COMMON_OPTIONS = {"oblique": 0.3, "thick_slice": 0.4, "deform": 0.04}
_MODE_OPTIONS = {
    "multiclass": {"min_structures": 1, "max_structures": 5, "distractors": 3},
    "lesion": {"min_lesions": 1, "max_lesions": 8, "protocol": "flair"},
    "territories": {"channels": 4},
    "findings": {"min_findings": 1, "max_findings": len(FINDINGS)},
}


def mode_options(mode: str, **options) -> dict:
    """The full option dict of ``mode``: defaults updated with ``options``, validated.

    Common options: ``oblique`` (probability of an oblique direction matrix, 0.3), ``thick_slice``
    (probability of a simulated thick-slice acquisition, 0.4), ``deform`` (maximum displacement of the
    random deformation as a fraction of the smallest side, 0.04). Per mode: multiclass ``min_structures``
    (1), ``max_structures`` (5), ``distractors`` (max unlabelled look-alike shapes, 3); lesion
    ``min_lesions`` (1), ``max_lesions`` (8); territories ``channels`` (4); findings ``min_findings`` (1,
    0 allows empty cases), ``max_findings`` (6).

    Arguments:
      mode (str): one of :data:`MODES`.
      **options: overrides.

    Returns:
      dict: the options.

    Raises:
      InputError: unknown mode, unknown option or a value out of range.
    """
    if mode not in _MODE_OPTIONS:
        raise InputError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    merged = {**_COMMON_OPTIONS, **_MODE_OPTIONS[mode]}
    unknown = sorted(set(options) - set(merged))
    if unknown:
        raise InputError(f"unknown option {unknown[0]!r} for mode {mode!r}; valid options: {', '.join(merged)}")
    merged.update(options)
    for key in ("oblique", "thick_slice"):
        if not 0.0 <= float(merged[key]) <= 1.0:
            raise InputError(f"option {key} must be a probability in [0, 1], got {merged[key]!r}")
    if not 0.0 <= float(merged["deform"]) <= 0.2:
        raise InputError(f"option deform must be in [0, 0.2], got {merged['deform']!r}")
    ranges = (("min_structures", "max_structures", 1, 5), ("min_lesions", "max_lesions", 1, 50),
              ("min_findings", "max_findings", 0, len(FINDINGS)))
    for lo_key, hi_key, lo_min, hi_max in ranges:
        if lo_key in merged:
            lo, hi = int(merged[lo_key]), int(merged[hi_key])
            if not lo_min <= lo <= hi <= hi_max or hi < 1:
                raise InputError(f"options {lo_key}/{hi_key} must satisfy {lo_min} <= {lo_key} <= {hi_key} "
                                 f"<= {hi_max} and {hi_key} >= 1, got {lo}/{hi}")
    if "protocol" in merged and merged["protocol"] not in LESION_PROTOCOLS:
        raise InputError(f"option protocol must be one of {', '.join(LESION_PROTOCOLS)}, got {merged['protocol']!r}")
    if "channels" in merged and not 1 <= int(merged["channels"]) <= 16:
        raise InputError(f"option channels must be in 1..16, got {merged['channels']!r}")
    if "distractors" in merged and not 0 <= int(merged["distractors"]) <= 10:
        raise InputError(f"option distractors must be in 0..10, got {merged['distractors']!r}")
    return merged


def mode_label_names(mode: str, options: dict | None = None) -> dict[int, str]:
    """Every label id a mode can produce and its name (the nnU-Net ``labels`` of a dataset, minus background).

    Arguments:
      mode (str): one of :data:`MODES`.
      options (dict | None): mode options (``max_structures`` matters for multiclass).

    Returns:
      dict[int, str]: label id -> name, ids ascending.
    """
    options = mode_options(mode, **(options or {}))
    if mode == "multiclass":
        return {i: f"structure_{i}" for i in range(1, int(options["max_structures"]) + 1)}
    if mode == "lesion":
        return {1: "lesion"}
    if mode == "territories":
        return {1: "territory_1", 2: "territory_2"}
    return {i + 1: name for i, name in enumerate(FINDINGS)}


# ===================================================================================================
# modes
# ===================================================================================================
def _scaled(shape: tuple[int, int, int]) -> float:
    """Linear scale of a volume relative to 64^3."""
    return float(np.cbrt(np.prod(shape))) / 64.0


def _erase_small(tissue: np.ndarray, lut: np.ndarray, label: int, min_voxels: int) -> np.ndarray:
    """Give 6-connected components of ``label`` smaller than ``min_voxels`` the surrounding tissue."""
    mask = lut[tissue] == label
    comp, n = ndi.label(mask)
    if n == 0:
        return tissue
    sizes = np.bincount(comp.ravel())
    for k, sl in enumerate(ndi.find_objects(comp), start=1):
        if sizes[k] >= min_voxels:
            continue
        grown = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in sl)
        local = tissue[grown]
        around = local[lut[local] != label]
        tissue[grown][comp[grown] == k] = int(np.bincount(around).argmax()) if around.size else 0
    return tissue


def _multiclass(rng: np.random.Generator, shape, allowed: tuple[str, ...], opts: dict):
    scene, families, _, _ = _multiclass_scene(rng, shape, allowed, (int(opts["min_structures"]),
                                           int(opts["max_structures"])), int(opts["distractors"]))
    return scene, families


def _multiclass_scene(rng: np.random.Generator, shape: tuple[int, int, int], allowed: tuple[str, ...],
                      count: tuple[int, int], distractors: int, exact: bool = False, min_voxels: int = 1
                      ) -> tuple[_Scene, dict[int, str], list[list[int]], np.ndarray]:
    """A body with clutter organs, ``count`` (random in [lo, hi]) labelled structures and distractors.

    Shared by the ``multiclass`` mode and :func:`generate_task`. A ``nested`` structure takes two
    consecutive labels (outer, core); with ``exact=False`` it is only drawn while two labels are left
    (nested-only: the count is made even), with ``exact=True`` a nested structure drawn for the last label
    gets one label for both parts (so exactly ``count`` labels can always be reached). A drawn structure
    with a labelled part of fewer than ``min_voxels`` voxels is discarded and drawn again.

    Returns (scene, label -> family, the tissue ids of each placed structure in placement order, and
    ``under``: the final tissue map (int16 (D, H, W)) with every structure replaced by the tissue it was
    painted over). Fewer labels than asked are placed when the free space runs out.
    """
    scene, interior, deep = _trunk_scene(rng, shape)
    n_target = int(rng.integers(count[0], count[1] + 1))
    if allowed == ("nested",) and not exact:
        n_target = max(2, n_target - n_target % 2)
    free = interior.copy()
    before = scene.tissue.copy()
    families: dict[int, str] = {}
    structures: list[list[int]] = []
    base = min(shape)
    next_label = 1
    attempts = 0
    while next_label <= n_target and attempts < 4 * n_target:
        attempts += 1
        choices = [f for f in allowed if f != "nested" or next_label < n_target or exact]
        if not choices:
            break
        family = str(rng.choice(choices))
        size = base * rng.uniform(0.07, 0.16) * _FAMILY_SIZE[family]
        parts = _place(rng, family, free, size, preferred=deep)
        ids = {PART_MAIN: next_label}
        if family == "nested":
            ids[PART_CORE] = min(next_label + 1, n_target)
        if not all(np.count_nonzero(parts == p) >= max(1, min_voxels) for p in set(ids)):
            continue
        tids = scene.paint_parts(parts, ids, contrast=(0.1, 0.5), core_contrast=(0.1, 0.4))
        structures.append(sorted(tids.values()))
        for lab in ids.values():
            families[lab] = family
        free &= parts == 0
        next_label = max(ids.values()) + 1
    for _ in range(int(rng.integers(0, distractors + 1))):
        family = str(rng.choice(allowed))
        parts = _place(rng, family, free, base * rng.uniform(0.05, 0.14) * _FAMILY_SIZE[family])
        scene.paint_parts(parts, {}, contrast=(0.05, 0.4))
        free &= parts == 0
    is_structure = np.zeros(len(scene.labels), dtype=bool)
    is_structure[[t for tids in structures for t in tids]] = True
    under = np.where(is_structure[scene.tissue], before, scene.tissue)
    return scene, families, structures, under


def _lesion_scene(rng: np.random.Generator, shape, allowed: tuple[str, ...], opts: dict):
    scene, masks = _head_scene(rng, shape)
    scene.labels = [0] * len(scene.labels)  # the host organ is background here
    volume_scale = float(np.prod(shape)) / 64.0**3
    free = masks["parenchyma"].copy()
    n_lesions = int(rng.integers(int(opts["min_lesions"]), int(opts["max_lesions"]) + 1))
    case_sign = int(rng.choice([-1, 1])) if rng.random() < 0.8 else 0
    protocol = LESION_PROTOCOLS[opts.get("protocol", "random")]
    host = None  # random protocol: contrast against the lesion's surroundings
    if protocol is not None:  # against grey matter, the parenchyma tissue nearest the lesion's intensity
        scene.template = np.asarray(protocol[0], dtype=np.float64)
        case_sign, host = protocol[1], scene.named["grey_matter"]
    low_contrast = rng.random() < 0.25
    attributes = {"lesion_contrast": "low" if low_contrast else "normal"}
    used: list[str] = []
    for _ in range(n_lesions):
        voxels = math.exp(rng.uniform(math.log(6.0), math.log(350.0))) * volume_scale
        radius = max(0.9, (3.0 * voxels / (4.0 * math.pi)) ** (1.0 / 3.0))
        family = str(rng.choice(allowed))
        parts = _place(rng, family, free, radius, preferred=masks["white"])
        if not parts.any():
            continue
        contrast = (0.05, 0.15) if low_contrast else (0.12, 0.45)
        scene.paint_parts(parts, {PART_MAIN: 1, PART_CORE: 1}, contrast=contrast, sign=case_sign,
                          std=(0.005, 0.04), core_contrast=(0.05, 0.2), host=host)
        free &= parts == 0
        used.append(family)
    return scene, ({1: "+".join(f for f in FAMILIES if f in used)} if used else {}), attributes


def _findings_scene(rng: np.random.Generator, shape, allowed: tuple[str, ...], opts: dict):
    scene, interior, deep = _trunk_scene(rng, shape)
    available = [name for name in FINDINGS if FINDING_FAMILIES[name] in allowed]
    lo = int(opts["min_findings"])
    hi = min(int(opts["max_findings"]), len(available))
    k = int(rng.integers(min(lo, hi), hi + 1))
    chosen = sorted(rng.choice(len(available), size=k, replace=False).tolist()) if k else []
    scale = _scaled(shape)
    free = interior.copy()
    families: dict[int, str] = {}
    for index in rng.permutation(chosen) if chosen else []:
        name = available[int(index)]
        spec = _FINDING_SPECS[name]
        label = FINDINGS.index(name) + 1
        for _ in range(int(rng.integers(spec.count[0], spec.count[1] + 1))):
            size = rng.uniform(*spec.size) * scale
            extra = {key: rng.uniform(*rng_range) * max(scale, 0.7) for key, rng_range in spec.extra}
            parts = _place(rng, spec.family, free, size, preferred=deep, **extra)
            if not parts.any():
                continue
            core = (0.15, 0.35) if name == "mass" else (0.1, 0.4)
            scene.paint_parts(parts, {PART_MAIN: label, PART_CORE: label}, contrast=spec.contrast,
                              sign=spec.sign, std=spec.std, core_contrast=core, core_sign=-1)
            free &= parts == 0
            families[label] = spec.family
    return scene, families


def _territory_gain(rng: np.random.Generator, label: np.ndarray, channels: int) -> list[np.ndarray]:
    """Per-channel multiplicative gain maps: channel c mostly "feeds" territory 1 (c even) or 2 (c odd)."""
    gains = []
    for c in range(channels):
        fed = 1 + c % 2
        if c >= 2 and rng.random() < 0.5:
            fed = int(rng.integers(1, 3))
        values = np.ones(3, dtype=np.float32)
        values[fed] = rng.uniform(0.85, 1.15)
        values[3 - fed] = rng.uniform(0.15, 0.75)  # sometimes subtle, sometimes nearly unperfused
        gain = values[label]
        gain = ndi.gaussian_filter(gain, sigma=rng.uniform(0.5, 2.0), mode="nearest")  # watershed mixing
        gains.append(gain.astype(np.float32))
    return gains


def _split_territories(rng: np.random.Generator, brain: np.ndarray) -> np.ndarray:
    """Split a mask in two complementary territories (1 and 2) along a wavy surface across one axis."""
    shape = brain.shape
    axis = int(rng.integers(3))
    coords = np.indices(shape, dtype=np.float32)
    inside = np.argwhere(brain)
    centre = inside.mean(0)
    extent = inside.max(0) - inside.min(0) + 1
    s = coords[axis] - np.float32(centre[axis] + rng.uniform(-0.1, 0.1) * extent[axis])
    for other in range(3):
        if other != axis:  # a random tilt
            s += np.float32(rng.uniform(-0.25, 0.25)) * (coords[other] - np.float32(centre[other]))
    s += np.float32(rng.uniform(0.04, 0.1) * extent[axis]) * smooth_noise(rng, shape, min(shape) / 7)
    out = np.where(s < 0, 1, 2).astype(np.uint8)
    out[~brain] = 0
    for t in (1, 2):  # islands of one territory inside the other go to the other
        part = out == t
        main = _largest_component(part)
        out[part & ~main] = 3 - t
    return out


def generate_case(mode: str, shape: int | Sequence[int] = 64, seed: int = 0,
                  families: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                  **options) -> SyntheticCase:
    """Generate one domain-randomised synthetic case.

    Modes:
      * ``multiclass``: a body with clutter organs and look-alike unlabelled distractors, plus 1-5
        non-overlapping labelled structures (labels 1..n; a ``nested`` structure takes two consecutive
        labels, outer and core); ``families`` maps every label to its shape family.
      * ``lesion``: a brain-like head (host, label 0) with 1-8 small lesions (label 1), each 3 to a few
        hundred voxels at 64^3, hyper- or hypo-intense, sometimes with low contrast. Default lesion
        families: blobs and ellipsoids (``families=[...]`` picks others).
      * ``territories``: a brain mask split into two adjacent complementary territories (labels 1 and 2)
        along a wavy surface across a random axis; the image has ``channels`` (default 4) perfusion-like
        channels, (C, D, H, W), each feeding mainly one territory. Shape families are not used.
      * ``findings``: a body with a random non-empty subset of :data:`FINDINGS`, label ``k + 1`` for
        ``FINDINGS[k]`` in every case; ``findings`` is the multi-hot vector of the labels present. Finding
        types whose family is held out never appear.

    Arguments:
      mode (str): one of :data:`MODES`.
      shape (int | Sequence[int]): volume shape (D, H, W) in voxels, or one int for a cube; each >= 16.
      seed (int): non-negative seed; the same seed gives identical arrays.
      families (Iterable[str] | None): shape families to draw from (default: all, lesions: blobs and
        ellipsoids); see :data:`FAMILIES`.
      exclude (Iterable[str] | None): shape families to hold out.
      **options: mode options, see :func:`mode_options`.

    Returns:
      SyntheticCase: image float32 in [0, 1] ((D, H, W) or (C, D, H, W)), uint8 label (D, H, W), random
      spacing (x, y, z) mm, direction, origin, names and families of the labels, findings vector.

    Raises:
      InputError: unknown mode, family or option, bad shape or seed.
    """
    opts = mode_options(mode, **options)
    shape = _as_shape(shape)
    seed = _check_seed(seed)
    if mode == "lesion" and families is None:
        allowed = resolve_families(None, exclude, default=("blobs", "ellipsoids"))
    else:
        allowed = resolve_families(families, exclude)
    if mode == "findings" and not any(FINDING_FAMILIES[n] in allowed for n in FINDINGS):
        raise InputError(f"no finding type left: every finding family is held out (families {allowed})")
    rng = np.random.default_rng(np.random.SeedSequence([seed, MODES.index(mode)]))
    spacing, direction, origin, slice_axis, ratio = _random_geometry(rng, float(opts["oblique"]))
    acquisition = (slice_axis, ratio, float(opts["thick_slice"]))
    max_disp = float(opts["deform"]) * min(shape)

    attributes: dict = {}
    for _attempt in range(20):
        if mode == "multiclass":
            scene, fam = _multiclass(rng, shape, allowed, opts)
        elif mode == "lesion":
            scene, fam, attributes = _lesion_scene(rng, shape, allowed, opts)
        elif mode == "findings":
            scene, fam = _findings_scene(rng, shape, allowed, opts)
        else:
            scene, _ = _head_scene(rng, shape)
            fam = {1: "territory", 2: "territory"}
        lut = scene.label_lut()
        tissue = _deform(rng, scene.tissue, max_disp)
        if mode == "lesion":
            tissue = _erase_small(tissue, lut, 1, MIN_LESION_VOXELS)
        label = lut[tissue]
        if mode == "territories":
            label = _split_territories(rng, label == 1)
        present = [int(v) for v in np.unique(label) if v != 0]
        if mode == "multiclass":
            min_voxels = max(8, int(2e-4 * np.prod(shape)))
            counts = np.bincount(label.ravel(), minlength=256)
            dropped = [v for v in present if counts[v] < min_voxels]
            if dropped:  # too small after the deformation: give them back to the surroundings
                for v in dropped:
                    tissue = _erase_small(tissue, lut, v, min_voxels)
                label = lut[tissue]
                present = [v for v in present if v not in dropped]
            remap = np.zeros(256, dtype=np.uint8)
            remap[present] = np.arange(1, len(present) + 1)
            label = remap[label]
            fam = {i + 1: fam[v] for i, v in enumerate(present)}
            present = list(range(1, len(present) + 1))
        if mode == "territories" and present != [1, 2]:
            continue
        if not present and not (mode == "findings" and int(opts["min_findings"]) == 0):
            continue
        break
    else:  # pragma: no cover - 20 failed attempts would be a generator bug
        raise RuntimeError(f"could not generate a valid {mode} case for seed {seed}")

    if mode == "territories":  # one acquisition per channel, each with its own contrast and gains
        images, records = [], []
        for gain in _territory_gain(rng, label, int(opts["channels"])):
            means, stds, _ = _sample_means(rng, scene)
            records.append({})
            images.append(_render(rng, tissue, means, stds, acquisition, gain, record=records[-1]))
        image = np.stack(images)
        attributes["acquisition"] = records
    else:
        means, stds, _ = _sample_means(rng, scene)
        attributes["acquisition"] = {}
        image = _render(rng, tissue, means, stds, acquisition, record=attributes["acquisition"])

    names = mode_label_names(mode, opts) if mode != "multiclass" else {v: f"structure_{v}" for v in present}
    findings = None
    if mode == "findings":
        findings = np.zeros(len(FINDINGS), dtype=np.uint8)
        findings[[v - 1 for v in present]] = 1
    return SyntheticCase(
        image=np.ascontiguousarray(image, dtype=np.float32),
        label=np.ascontiguousarray(label, dtype=np.uint8),
        spacing=spacing,
        direction=direction,
        origin=origin,
        label_names={v: names[v] for v in present},
        families={v: fam[v] for v in present if v in fam},
        findings=findings,
        mode=mode,
        seed=seed,
        attributes=attributes,
    )


# ===================================================================================================
# tasks: several "patients" showing the same kind of structure (in-context episodes)
# ===================================================================================================
_TASK_OPTIONS = {"oblique": 0.3, "thick_slice": 0.4, "distractors": 3, "deform": 0.1, "rotate": 15.0,
                 "scale": 0.15, "translate": 0.08, "reshape": 0.15, "jitter": 0.1, "crop": None}
_TASK_TAG = 1000  # seed-sequence tag of tasks (generate_case uses the mode index, 0..3)
_TASK_ATTEMPTS = 8  # task resamples (new scene) before giving up on the size window
_VIEW_TRIES = 4  # draws of a view's warp before the task is resampled
_VIEW_SIZE_WINDOW = (0.6, 1.65)  # accepted voxel count of a target in a view / in the task's base scene


def task_options(**options) -> dict:
    """The full option dict of :func:`generate_task`: defaults updated with ``options``, validated.

    Options (defaults in brackets):

    * ``oblique`` [0.3], ``thick_slice`` [0.4], ``distractors`` [3]: as for :func:`generate_case`
      (``thick_slice`` is the probability per view).
    * ``deform`` [0.1]: maximum displacement of each view's smooth random deformation, as a fraction of
      the smallest side (~3 voxels at 32^3, ~6 at 64^3); in [0, 0.2].
    * ``rotate`` [15.0]: maximum rotation of each view's random affine, degrees, in [0, 45].
    * ``scale`` [0.15]: each view is scaled by U(1 - scale, 1 + scale) per axis, in [0, 0.3].
    * ``translate`` [0.08]: maximum shift per axis, fraction of the side, in [0, 0.2].
    * ``reshape`` [0.15]: extra per-view deformation of the targets only: each structure is resized by
      U(1 - reshape, 1 + reshape) per axis about its centre and its outline perturbed by a local random
      field (std up to ``0.1 * reshape * min side`` voxels), so views are not mere warps of each other;
      in [0, 0.3].
    * ``jitter`` [0.1]: per-view change of the tissue intensities: means of plain tissues +- 0.3 x jitter,
      target-to-surroundings contrast x (1 +- jitter), stds x (1 +- 2 jitter); in [0, 0.5].
    * ``crop`` [None]: (d, h, w) (or one int): views are generated at ``shape`` and cropped to this size
      at a per-view random offset that keeps every target (see :func:`generate_task`).

    Arguments:
      **options: overrides.

    Returns:
      dict: the options (``crop`` as given; it is checked against the shape by :func:`generate_task`).

    Raises:
      InputError: an unknown option or a value out of range.
    """
    unknown = sorted(set(options) - set(_TASK_OPTIONS))
    if unknown:
        raise InputError(f"unknown task option {unknown[0]!r}; valid options: {', '.join(_TASK_OPTIONS)}")
    merged = {**_TASK_OPTIONS, **options}
    limits = {"oblique": 1.0, "thick_slice": 1.0, "deform": 0.2, "rotate": 45.0, "scale": 0.3,
              "translate": 0.2, "reshape": 0.3, "jitter": 0.5}
    for key, high in limits.items():
        try:
            value = float(merged[key])
        except (TypeError, ValueError):
            value = -1.0
        if not 0.0 <= value <= high:
            raise InputError(f"task option {key} must be in [0, {high:g}], got {merged[key]!r}")
        merged[key] = value
    if isinstance(merged["distractors"], bool) or not 0 <= int(merged["distractors"]) <= 10:
        raise InputError(f"task option distractors must be in 0..10, got {merged['distractors']!r}")
    merged["distractors"] = int(merged["distractors"])
    return merged


@dataclass
class SyntheticTask:
    """Several views ("patients") of one synthetic segmentation task.

    Every view shows the same labelled structures (label ``i`` is the same structure, of family
    ``families[i]``, in every view) in the same kind of body with the same kind of contrast, but each view
    is independently deformed, resized, reshaped and re-rendered, as two patients' scans differ.

    Attributes:
      images (np.ndarray): float32 in [0, 1], (V, D, H, W): the V views.
      labels (np.ndarray): uint8 (V, D, H, W): label maps, labels 1..N (0 is background), every label
        present in every view.
      families (dict[int, str]): shape family of every label (a ``nested`` structure has two labels, outer
        and core, unless it was drawn for the last label: then one).
      label_names (dict[int, str]): ``structure_<i>`` for every label.
      spacing (tuple[float, float, float]): voxel size in mm, (x, y, z), shared by the views.
      direction (np.ndarray): (3, 3) direction cosines (row-major, det +1), shared by the views.
      origin (tuple[float, float, float]): position of voxel [0, 0, 0] in mm, (x, y, z), shared.
      seed (int): the seed that reproduces this task with :func:`generate_task`.
    """

    images: np.ndarray
    labels: np.ndarray
    families: dict[int, str]
    label_names: dict[int, str]
    spacing: tuple[float, float, float]
    direction: np.ndarray
    origin: tuple[float, float, float]
    seed: int

    @property
    def n_views(self) -> int:
        """Number of views V."""
        return int(self.images.shape[0])


@dataclass
class _TaskBase:
    """The task-level scene and appearance that every view is rendered from."""

    scene: _Scene
    tissue: np.ndarray  # int16 (D, H, W): the base tissue map
    under: np.ndarray  # int16 (D, H, W): the same without the target structures (what they cover)
    lut: np.ndarray  # uint8 label of every tissue id
    is_target: np.ndarray  # bool per tissue id: part of a labelled structure (shell lumens included)
    centres: list[np.ndarray]  # (z, y, x) centre of each structure, voxels
    radii: list[float]  # half of the largest bounding-box side of each structure, voxels
    counts: np.ndarray  # int64 (N,): voxels of labels 1..N in the base scene
    families: dict[int, str]
    means: np.ndarray
    stds: np.ndarray
    offsets: np.ndarray
    texture: np.ndarray


def _task_base(rng: np.random.Generator, shape: tuple[int, int, int], allowed: tuple[str, ...],
               n_classes: int | None, distractors: int, min_voxels: int) -> _TaskBase | None:
    """Draw a task's scene (exactly n_classes labels, each >= min_voxels) and appearance; None on failure."""
    count = (n_classes, n_classes) if n_classes is not None else (1, 3)
    scene, families, structures, under = _multiclass_scene(rng, shape, allowed, count, distractors, exact=True,
                                                           min_voxels=min_voxels)
    lut = scene.label_lut()
    n = len(families)
    if n == 0 or sorted(families) != list(range(1, n + 1)) or (n_classes is not None and n != n_classes):
        return None
    counts = np.bincount(lut[scene.tissue].ravel(), minlength=n + 1)[1:n + 1]
    if counts.min() < min_voxels:
        return None
    is_target = np.zeros(len(lut), dtype=bool)
    centres, radii = [], []
    for tids in structures:
        is_target[tids] = True
        found = ndi.find_objects(np.isin(scene.tissue, tids).view(np.uint8))[0]
        lo = np.array([sl.start for sl in found], dtype=np.float64)
        hi = np.array([sl.stop for sl in found], dtype=np.float64) - 1
        centres.append((lo + hi) / 2)
        radii.append(float((hi - lo).max()) / 2 + 0.5)
    means, stds, offsets = _sample_means(rng, scene)
    texture = _sample_texture(rng, len(lut))
    return _TaskBase(scene, scene.tissue, under, lut, is_target, centres, radii, counts.astype(np.int64),
                     families, means, stds, offsets, texture)


def _view_coordinates(rng: np.random.Generator, shape: tuple[int, int, int], opts: dict) -> np.ndarray:
    """Where each voxel of a view samples the base scene: a random affine plus a smooth deformation.

    The affine rotates (up to ``rotate`` degrees about a random axis), scales (U(1 - scale, 1 + scale) per
    axis; > 1 enlarges) and shifts (up to ``translate`` of the side) about the volume centre. Returns
    float32 (3, D, H, W) base-space coordinates (z, y, x) in voxels.
    """
    centre = (np.array(shape, dtype=np.float64) - 1) / 2
    matrix = _rotation(rng, opts["rotate"]) / rng.uniform(1 - opts["scale"], 1 + opts["scale"], 3)[None, :]
    offset = centre - matrix @ centre + rng.uniform(-1.0, 1.0, 3) * opts["translate"] * np.array(shape)
    amplitude = opts["deform"] * min(shape) / 2.5 * rng.uniform(0.6, 1.0)  # fields have std 1, max ~2.5
    sigma = min(shape) / rng.uniform(4.0, 7.0)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    grid = [g.astype(np.float32) for g in grid]
    coords = np.empty((3,) + shape, dtype=np.float32)
    for i in range(3):
        coords[i] = (np.float32(matrix[i, 0]) * grid[0] + np.float32(matrix[i, 1]) * grid[1]
                     + np.float32(matrix[i, 2]) * grid[2] + np.float32(offset[i]))
        if amplitude > 0:
            coords[i] += np.float32(amplitude) * smooth_noise(rng, shape, sigma)
    return coords


def _reshape_displacement(rng: np.random.Generator, coords: np.ndarray, base: _TaskBase, reshape: float
                          ) -> np.ndarray:
    """Extra displacement (float32 (3, D, H, W), voxels) applied to the targets only.

    Each structure is resized by U(1 - reshape, 1 + reshape) per axis about its centre, with a Gaussian
    weight of ~1.5 x its radius (so neighbours are barely touched), and every outline is perturbed by a
    smooth field of correlation length min side / 10 and std up to ``0.1 * reshape * min side`` voxels
    (~1 voxel at 64^3), small enough not to tear thin walls.
    """
    shape = coords.shape[1:]
    disp = np.zeros_like(coords)
    for centre, radius in zip(base.centres, base.radii, strict=True):
        factor = (1.0 / rng.uniform(1 - reshape, 1 + reshape, 3) - 1.0).astype(np.float32)
        rel = coords - centre.astype(np.float32)[:, None, None, None]
        width = 1.5 * radius + 2.0
        weight = np.exp(-(rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2) / np.float32(2 * width * width))
        disp += rel * weight[None] * factor[:, None, None, None]
    amplitude = 0.1 * reshape * min(shape) * rng.uniform(0.5, 1.0)
    sigma = max(2.0, min(shape) / 10)
    if amplitude > 0:
        for i in range(3):
            disp[i] += np.float32(amplitude) * smooth_noise(rng, shape, sigma)
    return disp


def _crop_offset(rng: np.random.Generator, labels: np.ndarray, crop: tuple[int, int, int], n: int,
                 tries: int = 8) -> tuple[int, int, int]:
    """A random crop offset keeping every label 1..n (all of it if the labels' bounding box fits)."""
    shape = labels.shape
    fg = labels > 0
    bounds = []
    for axis in range(3):
        hit = np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != axis)))
        bounds.append((int(hit[0]), int(hit[-1]) + 1) if hit.size else (0, shape[axis]))
    total = np.maximum(np.bincount(labels.ravel(), minlength=n + 1)[1:n + 1], 1)
    best: tuple[float, tuple[int, int, int]] | None = None
    for _ in range(tries):
        offset = []
        for (lo, hi), size, side in zip(bounds, crop, shape, strict=True):
            a, b = (hi - size, lo) if hi - lo <= size else (lo, hi - size)
            a, b = max(a, 0), min(b, side - size)
            offset.append(int(rng.integers(a, b + 1)) if a <= b else int(np.clip((lo + hi - size) // 2, 0,
                                                                                   side - size)))
        sub = labels[tuple(slice(o, o + c) for o, c in zip(offset, crop, strict=True))]
        kept = float((np.bincount(sub.ravel(), minlength=n + 1)[1:n + 1] / total).min())
        if best is None or kept > best[0]:
            best = (kept, tuple(offset))  # type: ignore[assignment]
        if kept >= 0.999:
            break
    return best[1]  # type: ignore[index]


def _task_view(rng: np.random.Generator, base: _TaskBase, shape: tuple[int, int, int], opts: dict,
               crop: tuple[int, int, int] | None, acquisition: tuple[int, float, float], min_voxels: int,
               strict: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """One view of a task: warp (up to _VIEW_TRIES draws), optional crop, jittered rendering.

    A draw is accepted when every label keeps at least ``min_voxels`` and its voxel count stays within
    :data:`_VIEW_SIZE_WINDOW` of the base scene's (after the crop). With ``strict=False`` the draw closest
    to the window is used when none is inside it (only an empty label fails). Returns (image, label) or
    None.
    """
    n = len(base.counts)
    best = None
    for _ in range(_VIEW_TRIES):
        coords = _view_coordinates(rng, shape, opts)
        if opts["reshape"] > 0:
            tissue = ndi.map_coordinates(base.under, coords, order=0, mode="constant", cval=0)
            moved = ndi.map_coordinates(base.tissue, coords + _reshape_displacement(rng, coords, base,
                                        opts["reshape"]), order=0, mode="constant", cval=0)
            on_target = base.is_target[moved]
            tissue[on_target] = moved[on_target]
        else:
            tissue = ndi.map_coordinates(base.tissue, coords, order=0, mode="constant", cval=0)
        label = base.lut[tissue]
        region = (slice(None),) * 3
        if crop is not None:
            offset = _crop_offset(rng, label, crop, n)
            region = tuple(slice(o, o + c) for o, c in zip(offset, crop, strict=True))
        counts = np.bincount(label[region].ravel(), minlength=n + 1)[1:n + 1]
        if counts.min() < min_voxels:
            continue
        ratio = counts / base.counts
        if _VIEW_SIZE_WINDOW[0] <= ratio.min() and ratio.max() <= _VIEW_SIZE_WINDOW[1]:
            best = (0.0, tissue, label, region)
            break
        error = float(np.abs(np.log(ratio)).max())
        if best is None or error < best[0]:
            best = (error, tissue, label, region)
    else:
        if strict or best is None:
            return None
    _, tissue, label, region = best
    means, stds = _jitter_means(rng, base.scene, base.means, base.stds, base.offsets, opts["jitter"])
    image = _render(rng, tissue, means, stds, acquisition, texture=base.texture)
    return image[region], label[region]


def generate_task(shape: int | Sequence[int] = 32, seed: int = 0, n_views: int = 4,
                  families: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                  n_classes: int | None = None, **options) -> SyntheticTask:
    """Generate one in-context task: ``n_views`` different "patients" with the same labelled structures.

    The task is a multiclass-style scene (a body with clutter organs, unlabelled look-alike distractors and
    ``n_classes`` labelled structures from the allowed shape families) with task-level appearance: one
    set of per-tissue intensity means and stds, i.e. one contrast of every target against its
    surroundings, and one slice axis. Each view is then made the way two patients differ:

    * geometry: a random affine of the tissue map (rotation up to ``rotate`` = 15 degrees, scale 0.85-1.15
      per axis, shift up to 8% of the side) composed with an independent smooth random deformation (up to
      ``deform`` = 10% of the side, ~3 voxels at 32^3), resampled nearest-neighbour before rendering; the
      targets get an extra per-view deformation (``reshape``: resized +-15% per axis about their centre and
      a perturbed outline), so views are not warps of one another;
    * appearance: the task's tissue means jittered a little (``jitter``), then its own bias field, blur,
      thick-slice simulation, noise and gamma (:func:`_render`, as in :func:`generate_case`).

    Every label is present in every view with at least max(8, 2e-4 x the voxel count) voxels, and its
    count stays within 0.6-1.65 x its count in the task's undeformed scene (so within ~0.36-2.75 x between
    views): a view whose draw misses that is redrawn (up to 4 times), then the whole task is redrawn (up
    to 8 times; a 9th task draw takes each view's closest draw, which may leave the size window but never
    drops a label). All of this is deterministic given the seed; each view has its own random stream, so
    view ``v`` is the same whatever ``n_views``, unless a later view forced a task redraw.

    With ``crop=(d, h, w)`` the views are generated at ``shape`` and each is cropped to ``(d, h, w)`` at
    its own random offset; the offset keeps all of every target when the targets' bounding box fits in the
    crop (otherwise the best of 8 random offsets, and the size window above still applies to what is
    kept).

    Arguments:
      shape (int | Sequence[int]): generation shape (D, H, W) in voxels, or one int for a cube; each >= 16.
      seed (int): non-negative seed; the same seed gives identical arrays.
      n_views (int): number of views V, >= 1.
      families (Iterable[str] | None): shape families to draw from (default: all), see :data:`FAMILIES`.
      exclude (Iterable[str] | None): shape families to hold out (never drawn, not even as distractors).
      n_classes (int | None): number of labels N, 1..5 (a ``nested`` structure gives two labels, or one
        when drawn for the last label); random in 1..3 if None.
      **options: see :func:`task_options` (``deform``, ``rotate``, ``scale``, ``translate``, ``reshape``,
        ``jitter``, ``crop``, ``oblique``, ``thick_slice``, ``distractors``).

    Returns:
      SyntheticTask: images float32 (V, D, H, W) in [0, 1] and labels uint8 (V, D, H, W) (D, H, W = the
      crop if given), label families and names, task-level spacing (x, y, z) mm, direction and origin.

    Raises:
      InputError: bad shape, seed, n_views, n_classes, family, option or crop.
    """
    opts = task_options(**options)
    shape = _as_shape(shape)
    seed = _check_seed(seed)
    allowed = resolve_families(families, exclude)
    if isinstance(n_views, bool) or not isinstance(n_views, (int, np.integer)) or int(n_views) < 1:
        raise InputError(f"n_views must be a positive integer, got {n_views!r}")
    if n_classes is not None and (isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer))
                                  or not 1 <= int(n_classes) <= 5):
        raise InputError(f"n_classes must be an integer in 1..5 or None, got {n_classes!r}")
    crop = opts["crop"]
    if crop is not None:
        try:
            crop = (int(crop),) * 3 if isinstance(crop, (int, np.integer)) else tuple(int(c) for c in crop)
        except (TypeError, ValueError):
            crop = ()
        if len(crop) != 3 or not all(8 <= c <= s for c, s in zip(crop, shape, strict=True)):
            raise InputError(f"crop must be three ints (d, h, w), each in 8..the shape {shape}, "
                             f"got {opts['crop']!r}")
    n_views = int(n_views)
    n_classes = None if n_classes is None else int(n_classes)
    min_voxels = max(8, int(2e-4 * np.prod(shape)))

    for attempt in range(_TASK_ATTEMPTS + 1):
        strict = attempt < _TASK_ATTEMPTS
        rng = np.random.default_rng(np.random.SeedSequence([seed, _TASK_TAG, attempt]))
        spacing, direction, origin, slice_axis, ratio = _random_geometry(rng, opts["oblique"])
        acquisition = (slice_axis, ratio, opts["thick_slice"])
        base = _task_base(rng, shape, allowed, n_classes, opts["distractors"], min_voxels)
        if base is None:
            continue
        views = []
        for v in range(n_views):
            view_rng = np.random.default_rng(np.random.SeedSequence([seed, _TASK_TAG, attempt, 1 + v]))
            view = _task_view(view_rng, base, shape, opts, crop, acquisition, min_voxels, strict)
            if view is None:
                break
            views.append(view)
        if len(views) == n_views:
            break
    else:  # pragma: no cover - every attempt failing would be a generator bug
        raise RuntimeError(f"could not generate a valid task for seed {seed}")

    n = len(base.counts)
    return SyntheticTask(
        images=np.ascontiguousarray(np.stack([im for im, _ in views]), dtype=np.float32),
        labels=np.ascontiguousarray(np.stack([lab for _, lab in views]), dtype=np.uint8),
        families={i: base.families[i] for i in range(1, n + 1)},
        label_names={i: f"structure_{i}" for i in range(1, n + 1)},
        spacing=spacing,
        direction=direction,
        origin=origin,
        seed=seed,
    )


# ===================================================================================================
# datasets
# ===================================================================================================
def case_seed(seed: int, index: int) -> int:
    """The seed of case ``index`` of a dataset generated with ``seed`` (independent of the case count).

    Arguments:
      seed (int): dataset seed, >= 0.
      index (int): case index, >= 0.

    Returns:
      int: a 32-bit seed from ``numpy.random.SeedSequence([seed, index])``.
    """
    return int(np.random.SeedSequence([_check_seed(seed), int(index)]).generate_state(1, np.uint32)[0])


_CASE_FILE = re.compile(r"case_\d{4,}(_\d{4})?\.nii\.gz")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _write_json_atomic(path: Path, payload) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def generate_dataset(out_dir: str | os.PathLike, mode: str, cases: int, shape: int | Sequence[int] = 64,
                     seed: int = 0, families: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                     **options) -> Path:
    """Write ``cases`` synthetic cases as an nnU-Net v2 raw dataset.

    Layout: ``imagesTr/case_XXXX_CCCC.nii.gz`` (one file per channel), ``labelsTr/case_XXXX.nii.gz``,
    ``cases.json`` (per case: seed, spacing, origin, direction, label names and families, findings vector)
    and ``dataset.json`` (``channel_names``, ``labels``, ``numTraining``, ``file_ending`` and an ``irisseg``
    block with mode, seed, shape, families, options and, for findings, the finding names). dataset.json is
    removed first and written last (atomically), so an interrupted run never leaves a dataset.json that
    claims missing cases. Case ``i`` uses seed :func:`case_seed` ``(seed, i)``.

    Arguments:
      out_dir (str | os.PathLike): output folder (created; existing case files are overwritten).
      mode (str): one of :data:`MODES`.
      cases (int): number of cases, >= 1.
      shape (int | Sequence[int]): volume shape (D, H, W) in voxels, or one int for a cube.
      seed (int): dataset seed, >= 0.
      families (Iterable[str] | None): shape families to use (see :func:`generate_case`).
      exclude (Iterable[str] | None): shape families to hold out.
      **options: mode options (see :func:`mode_options`).

    Returns:
      Path: ``out_dir``.

    Raises:
      InputError: bad mode, family, option, shape, seed or case count.
    """
    from irisseg.io import Volume, write_volume

    opts = mode_options(mode, **options)
    shape = _as_shape(shape)
    seed = _check_seed(seed)
    if isinstance(cases, bool) or not isinstance(cases, (int, np.integer)) or int(cases) < 1:
        raise InputError(f"cases must be a positive integer, got {cases!r}")
    if mode == "lesion" and families is None:
        allowed = resolve_families(None, exclude, default=("blobs", "ellipsoids"))
    else:
        allowed = resolve_families(families, exclude)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.json").unlink(missing_ok=True)  # from here on, no dataset.json claims any case
    (out / "cases.json").unlink(missing_ok=True)
    images_dir, labels_dir = out / "imagesTr", out / "labelsTr"
    images_dir.mkdir(exist_ok=True)
    labels_dir.mkdir(exist_ok=True)

    records = []
    written: set[Path] = set()
    channels = 1
    for index in range(int(cases)):
        case = generate_case(mode, shape, case_seed(seed, index), families=families, exclude=exclude, **opts)
        name = f"case_{index:04d}"
        planes = case.image if case.image.ndim == 4 else case.image[None]
        channels = planes.shape[0]
        for c, plane in enumerate(planes):
            path = images_dir / f"{name}_{c:04d}.nii.gz"
            write_volume(Volume(plane, case.spacing, case.origin, case.direction), path)
            written.add(path)
        path = labels_dir / f"{name}.nii.gz"
        write_volume(Volume(case.label, case.spacing, case.origin, case.direction), path)
        written.add(path)
        records.append({
            "case": name,
            "seed": case.seed,
            "spacing": list(case.spacing),
            "origin": list(case.origin),
            "direction": case.direction.reshape(-1).tolist(),
            "labels": {str(k): v for k, v in case.label_names.items()},
            "families": {str(k): v for k, v in case.families.items()},
            "findings": None if case.findings is None else case.findings.tolist(),
            "voxels": {str(k): int(v) for k, v in enumerate(np.bincount(case.label.ravel())) if k and v},
            "attributes": case.attributes,
        })
    # case files of an earlier, larger run in the same folder would be picked up by nnU-Net: remove them
    for folder in (images_dir, labels_dir):
        for stale in folder.glob("case_*.nii.gz"):
            if stale not in written and _CASE_FILE.fullmatch(stale.name):
                stale.unlink()
    _write_json_atomic(out / "cases.json", {"mode": mode, "cases": records})

    if mode == "territories":
        channel_names = {str(c): f"perfusion_{c}" for c in range(channels)}
    else:
        channel_names = {"0": "synthetic"}
    labels = {"background": 0, **{name: lab for lab, name in mode_label_names(mode, opts).items()}}
    block = {
        "mode": mode,
        "seed": seed,
        "shape": list(shape),
        "families": list(allowed) if mode != "territories" else [],
        "exclude": [exclude] if isinstance(exclude, str) else sorted(str(f) for f in exclude or []),
        "options": opts,
        "case_seeds": "numpy.random.SeedSequence([seed, index]).generate_state(1, uint32)[0]",
    }
    if mode == "findings":
        block["findings"] = list(FINDINGS)
        block["finding_families"] = dict(FINDING_FAMILIES)
    dataset = {
        "name": f"irisseg_synthetic_{mode}",
        "description": f"irisseg synthetic {mode} cases (domain-randomised)",
        "channel_names": channel_names,
        "labels": labels,
        "numTraining": int(cases),
        "file_ending": ".nii.gz",
        "irisseg": block,
    }
    _write_json_atomic(out / "dataset.json", dataset)
    return out


def preview(mode: str, out_png: str | os.PathLike, seeds: Sequence[int] = (0, 1), shape: int | Sequence[int] = 64,
            families: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
            channels_shown: int = 2, physical_aspect: bool = False, **options) -> Path:
    """Write a PNG of tri-planar mid-slices of a few generated cases (one row per case, or per channel).

    Arguments:
      mode (str): one of :data:`MODES`.
      out_png (str | os.PathLike): output PNG path.
      seeds (Sequence[int]): seeds of the cases shown (one row each).
      shape (int | Sequence[int]): volume shape (D, H, W) in voxels.
      families, exclude: shape families, as in :func:`generate_case`.
      channels_shown (int): for multi-channel cases, how many channels get a row each.
      physical_aspect (bool): draw voxels with their physical aspect ratio (the generator's shapes live on
        the voxel grid, so anisotropic spacing stretches them); default: square voxels.
      **options: mode options (see :func:`mode_options`).

    Returns:
      Path: ``out_png``.
    """
    from irisseg.viz import triplanar_overlays

    panels = []
    for s in seeds:
        case = generate_case(mode, shape, s, families=families, exclude=exclude, **options)
        names = {k: f"{v} ({case.families.get(k, '?')})" if mode == "multiclass" else v
                 for k, v in case.label_names.items()}
        sp = ", ".join(f"{v:.2f}" for v in case.spacing)
        rows = range(min(channels_shown, case.channels)) if case.image.ndim == 4 else [None]
        centre = None
        if mode == "lesion":  # cut through the biggest lesion rather than the lesions' common centre
            comp, n = ndi.label(case.label > 0)
            if n:
                biggest = int(np.argmax(np.bincount(comp.ravel())[1:])) + 1
                centre = tuple(int(round(v)) for v in np.argwhere(comp == biggest).mean(0))
        for c in rows:
            head = f"seed {s}" + (f" ch {c}" if c is not None else "") + f"\nspacing ({sp}) mm"
            panels.append({"image": case.image if c is None else case.image[c], "masks": case.label,
                           "label_names": names, "spacing": case.spacing if physical_aspect else None,
                           "row_title": head, "fill": mode in ("multiclass", "findings"), "alpha": 0.25,
                           "centre": centre})
    size = "x".join(str(v) for v in _as_shape(shape))
    grid = "physical aspect" if physical_aspect else "voxel grid, square voxels"
    return triplanar_overlays(panels, out_png, title=f"irisseg synthetic: {mode} ({size}, {grid})")
def preview_task(out_png: str | os.PathLike, seed: int = 0, shape: int | Sequence[int] = 64, n_views: int = 4,
                 families: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                 n_classes: int | None = None, **options) -> Path:
    """Write a PNG of the views of one task side by side: per view, the axial slice through the targets.

    Top row: the image alone (so the target's contrast can be judged); bottom row: the same slice with the
    label contours. The slice is the axial plane (array axis 0) through the centre of mass of label 1 in
    that view, so every column cuts the same structure.

    Arguments:
      out_png (str | os.PathLike): output PNG path (parent folders are created; written atomically).
      seed (int): task seed. shape (int | Sequence[int]): generation shape (D, H, W).
      n_views (int): views shown (one column each).
      families, exclude, n_classes, **options: as :func:`generate_task`.

    Returns:
      Path: ``out_png``.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from irisseg.viz import COLOURS

    task = generate_task(shape, seed, n_views, families=families, exclude=exclude, n_classes=n_classes, **options)
    fig = Figure(figsize=(2.3 * task.n_views, 5.0), dpi=110)
    axes = fig.subplots(2, task.n_views, squeeze=False)
    for v in range(task.n_views):
        image, label = task.images[v], task.labels[v]
        z = int(round(float(np.argwhere(label == 1)[:, 0].mean())))
        counts = np.bincount(label.ravel(), minlength=len(task.families) + 1)[1:]
        for row in range(2):
            ax = axes[row, v]
            ax.imshow(image[z], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            if row == 1:
                for lab in task.families:
                    m = label[z] == lab
                    if m.any() and not m.all():
                        ax.contour(m.astype(np.float32), levels=[0.5], colors=[COLOURS[(lab - 1) % len(COLOURS)]],
                                   linewidths=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, v].set_title(f"view {v} (axial z={z})", fontsize=8)
        axes[1, v].set_xlabel("voxels: " + ", ".join(str(int(c)) for c in counts), fontsize=7)
    handles = [Patch(color=COLOURS[(lab - 1) % len(COLOURS)], label=f"{lab}: {fam}")
               for lab, fam in task.families.items()]
    axes[1, -1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7, frameon=False)
    size = "x".join(str(s) for s in task.images.shape[1:])
    fig.suptitle(f"irisseg synthetic task: seed {seed}, {task.n_views} views ({size}), one task = same structures "
                 "and contrast, different 'patients'", fontsize=9)
    fig.tight_layout()
    from irisseg.viz import save_figure

    return save_figure(fig, out_png)
