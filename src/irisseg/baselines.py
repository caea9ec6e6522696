"""Baselines: what a user would do without an in-context model.

Two classic ways to segment a new image from a handful of labelled examples ("supports"):

* **Atlas propagation** (:func:`atlas_propagation`, :func:`atlas_propagation_multi`): register each support
  image to the query with SimpleITK (centred initialisation, affine Mattes mutual information, then a
  B-spline free-form deformation) and warp its mask onto the query grid with nearest neighbour; with
  several supports, a per-voxel majority vote.
* **A small U-Net trained from scratch on the supports** (:func:`train_unet_on_supports`): a compact
  residual 3D U-Net (:class:`irisseg.models.unet.ResidualUNet`) trained with Dice + BCE and flip /
  intensity augmentation for a time budget, then applied to the query.

Both return a uint8 mask :class:`~irisseg.io.Volume` in the query's exact geometry (shape, spacing, origin,
direction), so they can be compared voxel for voxel with an in-context prediction and scored with
:mod:`irisseg.metrics` using ``query.spacing_zyx``.

Geometry conventions are those of :mod:`irisseg.io`: arrays ``(D, H, W)``, spacing / origin in mm in
``(x, y, z)`` order, ``direction`` a row-major 3x3 matrix.

Determinism: registration is bit-for-bit reproducible given ``seed`` with ``threads=1`` (the default: the
metric's random voxel sample is seeded with a non-zero seed, since SimpleITK reads 0 as "use the wall
clock", and SimpleITK's global default thread count is set to 1 for the call). With more ITK threads it is
faster, but the metric's per-thread partial sums make results vary run to run in the last bits, which the
optimiser sometimes amplifies into visibly different alignments (Dice differences ~0.01 seen). The
U-Net is deterministic given ``seed`` and ``max_steps`` on a fixed number of torch threads; with only a
wall-clock budget, the number of steps (and thus the result) depends on the machine's speed.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn

from irisseg.errors import InputError
from irisseg.io import Volume, check_same_geometry
from irisseg.models.unet import ResidualUNet, UNetConfig
from irisseg.preprocess import Preprocessor, clip_percentiles, grid_image

__all__ = [
    "atlas_propagation",
    "atlas_propagation_multi",
    "register",
    "majority_vote",
    "train_unet_on_supports",
    "SmallUNet",
]


# ===================================================================================================
# helpers
# ===================================================================================================
def _check_pair(image: Volume, mask: Volume, what: str) -> None:
    if not isinstance(image, Volume) or not isinstance(mask, Volume):
        raise InputError(f"{what}: image and mask must be irisseg.io.Volume objects")
    check_same_geometry(image, mask, f"{what} image", f"{what} mask", tol=1e-3)
    if not mask.is_label_map:
        raise InputError(f"{what} mask: not a label map (values must be non-negative integers)")


def _float_image(volume: Volume) -> sitk.Image:
    """The volume as a float32 SimpleITK image, intensities clipped to the 0.5-99.5 percentiles."""
    array = clip_percentiles(np.asarray(volume.array, dtype=np.float32), 0.5, 99.5)
    return volume.with_array(array).to_sitk()


def _itk_seed(seed: int) -> int:
    """A non-zero ITK seed (SimpleITK reads seed 0 as "seed from the wall clock", i.e. not reproducible)."""
    return int(seed) % (2**31 - 2) + 1


@contextlib.contextmanager
def _itk_threads(threads: int | None):
    """Temporarily set SimpleITK's global default thread count (the registration metric uses it)."""
    if threads is None:
        yield
        return
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ===================================================================================================
# atlas propagation
# ===================================================================================================
def _shrink_schedule(size_xyz: Sequence[int], factors: Sequence[int], min_side: int = 12) -> list[int]:
    """The shrink factors that leave at least ``min_side`` voxels on the smallest side ([1] if none does)."""
    kept = [int(f) for f in factors if int(f) == 1 or min(size_xyz) / int(f) >= min_side]
    return kept or [1]


def _index_aligned_affine(fixed: sitk.Image, moving: sitk.Image) -> sitk.AffineTransform:
    """Affine that maps each fixed point to the moving point at the same *relative* array position.

    It assumes both arrays frame the same field of view (e.g. volumes cropped to the same anatomy),
    whatever their spacing, origin and direction: fixed continuous index ``u`` (x, y, z) maps to moving
    index ``u * (n_m / n_f)`` with voxel corners aligned.
    """

    def index_to_physical(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
        d = np.asarray(img.GetDirection()).reshape(3, 3)
        return d @ np.diag(img.GetSpacing()), np.asarray(img.GetOrigin())

    a_f, o_f = index_to_physical(fixed)
    a_m, o_m = index_to_physical(moving)
    n_f, n_m = np.asarray(fixed.GetSize(), float), np.asarray(moving.GetSize(), float)
    scale = np.diag(n_m / n_f)
    # moving index = scale @ (fixed index + 0.5) - 0.5  (corner-aligned)
    shift = 0.5 * (np.diag(scale) - 1.0)
    # x_f -> u_f = a_f^-1 (x_f - o_f) -> u_m = scale u_f + shift -> x_m = a_m u_m + o_m
    matrix = a_m @ scale @ np.linalg.inv(a_f)
    translation = a_m @ (shift - scale @ np.linalg.inv(a_f) @ o_f) + o_m
    centre = o_f + a_f @ ((n_f - 1) / 2.0)
    tx = sitk.AffineTransform(3)
    tx.SetCenter(tuple(centre))
    tx.SetMatrix(tuple(matrix.reshape(-1)))
    # With a centre c: T(x) = M (x - c) + c + t  =>  t = M c + translation - c
    tx.SetTranslation(tuple(matrix @ centre + translation - centre))
    return tx


def _same_affine(a: sitk.Transform, b: sitk.Transform, tol: float = 1e-6) -> bool:
    """Whether two affine transforms map points identically (same matrix and same image of the origin)."""
    a, b = sitk.AffineTransform(a), sitk.AffineTransform(b)
    same_matrix = np.allclose(a.GetMatrix(), b.GetMatrix(), atol=tol)
    return bool(same_matrix and np.allclose(a.TransformPoint((0.0, 0.0, 0.0)), b.TransformPoint((0.0, 0.0, 0.0)), atol=1e-3))


def _level_sampling(sampling: float, shrink: Sequence[int]) -> list[float]:
    """Metric sampling fraction per pyramid level: ``sampling * f**2`` at shrink ``f`` (capped at 1).

    A shrunk level has ``f**3`` times fewer voxels, so this keeps a few thousand samples at the coarse levels
    while the expensive full-resolution level uses only ``sampling``.
    """
    return [min(1.0, float(sampling) * int(f) ** 2) for f in shrink]


def _mattes(reg: sitk.ImageRegistrationMethod, *, bins: int, sampling: Sequence[float], seed: int,
            threads: int | None) -> None:
    if threads is not None:
        reg.SetNumberOfThreads(int(threads))
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(bins))
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentagePerLevel([float(p) for p in sampling], _itk_seed(seed))
    reg.SetInterpolator(sitk.sitkLinear)


def _affine_stage(fixed, moving, initial: sitk.Transform, shrink: Sequence[int], *, iterations: int,
                  sampling: float, seed: int, threads: int | None, bins: int) -> sitk.Transform:
    """Affine Mattes-MI registration on the pyramid ``shrink`` (smoothing sigma ``f // 2`` voxels)."""
    reg = sitk.ImageRegistrationMethod()
    _mattes(reg, bins=bins, sampling=_level_sampling(sampling, shrink), seed=seed, threads=threads)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=int(iterations), relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-6,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel([f // 2 for f in shrink])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(initial, inPlace=False)
    return _as_affine(reg.Execute(fixed, moving))


def _as_affine(transform: sitk.Transform) -> sitk.AffineTransform:
    """The affine inside a one-transform composite (what ``Execute`` returns), as an AffineTransform."""
    if transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        if composite.GetNumberOfTransforms() != 1:
            raise RuntimeError("expected a single affine transform")
        transform = composite.GetNthTransform(0)
    return sitk.AffineTransform(transform)


def _evaluate_metric(fixed, moving, transform, *, sampling: float, seed: int, threads: int | None,
                     bins: int) -> float:
    """Mattes MI (lower is better) of ``transform`` at full resolution on a fixed random sample of at least
    20 % of the fixed voxels (the same sample for every transform, so values are comparable)."""
    reg = sitk.ImageRegistrationMethod()
    _mattes(reg, bins=bins, sampling=[min(1.0, max(float(sampling), 0.2))], seed=seed, threads=threads)
    reg.SetInitialTransform(transform, inPlace=False)
    return float(reg.MetricEvaluate(fixed, moving))


def register(
    fixed: Volume,
    moving: Volume,
    *,
    bspline: bool = True,
    seed: int = 0,
    init: str = "auto",
    affine_iterations: int = 100,
    bspline_iterations: int = 20,
    mesh_size: int = 4,
    bspline_shrink: Sequence[int] = (2,),
    sampling: float = 0.05,
    bins: int = 32,
    threads: int | None = 1,
) -> tuple[sitk.Transform, dict]:
    """Register ``moving`` to ``fixed`` (affine Mattes mutual information, then an optional B-spline).

    Arguments:
      fixed (Volume): the reference image (D, H, W), any intensity range; its physical space is the output.
      moving (Volume): the image to align (D', H', W'), any geometry.
      bspline (bool): refine the affine with a cubic B-spline free-form deformation.
      seed (int): seed of the metric's random voxel sample.
      init (str): the starting transform. ``"geometry"``: align the physical centres of the two images
        (SimpleITK's centred initialiser); ``"moments"``: align the intensity centres of mass;
        ``"index"``: map equal relative array positions onto each other (both arrays frame the same field
        of view, whatever their spacing, origin and direction); ``"auto"``: run the coarsest affine level
        from ``"geometry"`` and from ``"index"`` (when they differ) and continue from the one with the lower
        metric.
      affine_iterations (int): regular-step gradient descent iterations per resolution level of the affine
        stage (levels: shrink 4, 2, 1, dropping levels that would leave fewer than 12 voxels on a side;
        smoothing sigma ``shrink // 2`` voxels).
      bspline_iterations (int): L-BFGS-B iterations per level of the B-spline stage.
      mesh_size (int): B-spline mesh intervals per axis over the query's extent (cubic: ``mesh_size + 3``
        control points per axis, ``3 * (mesh_size + 3)**3`` parameters).
      bspline_shrink (Sequence[int]): pyramid of the B-spline stage (default: half resolution only, which
        a 4-interval mesh does not need more than and which is ~10x cheaper than full resolution).
      sampling (float): fraction of the fixed voxels sampled for the metric at full resolution, in (0, 1];
        a level shrunk by ``f`` samples ``min(1, sampling * f**2)``. The choice between starts and the
        keep-or-drop test of the B-spline use a fixed sample of ``max(sampling, 0.2)`` at full resolution.
      bins (int): histogram bins of Mattes mutual information.
      threads (int | None): ITK threads during the registration (SimpleITK's global default is set for its
        duration and restored). 1 (default) makes the result bit-for-bit reproducible given ``seed``; more
        threads are faster (about 1.5x with 2) but ITK's multi-threaded metric sums then vary in the last
        bits, which the optimiser can amplify into slightly different alignments. None: leave the global
        default (all cores).

    Returns:
      (sitk.Transform, dict): the transform from ``fixed`` physical points to ``moving`` physical points
      (mm, (x, y, z)), as ``sitk.Resample`` takes it; and info: ``init`` (the start used),
      ``init_metrics`` (per start, after the coarsest level), ``affine_metric``, ``bspline_metric``,
      ``final_metric`` (Mattes MI, lower is better; the B-spline is kept only if it does not raise the
      metric), ``affine_seconds``, ``seconds``.
    """
    if init not in ("auto", "geometry", "moments", "index"):
        raise InputError(f"init must be 'auto', 'geometry', 'moments' or 'index', got {init!r}")
    if not 0.0 < sampling <= 1.0:
        raise InputError(f"sampling must be in (0, 1], got {sampling}")
    with _itk_threads(threads):
        return _register(fixed, moving, bspline=bspline, seed=seed, init=init, affine_iterations=affine_iterations,
                         bspline_iterations=bspline_iterations, mesh_size=mesh_size, bspline_shrink=bspline_shrink,
                         sampling=sampling, bins=bins,
                         threads=threads)


def _register(fixed: Volume, moving: Volume, *, bspline: bool, seed: int, init: str, affine_iterations: int,
              bspline_iterations: int, mesh_size: int, bspline_shrink: Sequence[int], sampling: float, bins: int,
              threads: int | None) -> tuple[sitk.Transform, dict]:
    t0 = time.perf_counter()
    fixed_img, moving_img = _float_image(fixed), _float_image(moving)
    common = dict(sampling=sampling, seed=seed, threads=threads, bins=bins)

    starts: dict[str, sitk.Transform] = {}
    if init in ("auto", "geometry"):
        starts["geometry"] = sitk.CenteredTransformInitializer(
            fixed_img, moving_img, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.GEOMETRY)
    if init == "moments":
        starts["moments"] = sitk.CenteredTransformInitializer(
            fixed_img, moving_img, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS)
    if init in ("auto", "index"):
        index_start = _index_aligned_affine(fixed_img, moving_img)
        if not (init == "auto" and _same_affine(index_start, starts["geometry"])):
            starts["index"] = index_start

    # Coarsest level from every start, keep the best, then the finer levels from there.
    schedule = _shrink_schedule(fixed_img.GetSize(), (4, 2, 1))
    candidates = []
    for name, start in starts.items():
        coarse = _affine_stage(fixed_img, moving_img, start, schedule[:1], iterations=affine_iterations, **common)
        candidates.append((_evaluate_metric(fixed_img, moving_img, coarse, **common), name, coarse))
    _, used, affine = min(candidates, key=lambda c: c[0])
    if len(schedule) > 1:
        affine = _affine_stage(fixed_img, moving_img, affine, schedule[1:], iterations=affine_iterations, **common)
    affine_metric = _evaluate_metric(fixed_img, moving_img, affine, **common)
    info = {"init": used, "affine_metric": affine_metric, "final_metric": affine_metric,
            "init_metrics": {name: m for m, name, _ in candidates}}
    transform: sitk.Transform = affine
    info["affine_seconds"] = time.perf_counter() - t0

    if bspline:
        mesh = sitk.BSplineTransformInitializer(fixed_img, [int(mesh_size)] * 3, 3)
        shrink = _shrink_schedule(fixed_img.GetSize(), bspline_shrink)
        reg = sitk.ImageRegistrationMethod()
        _mattes(reg, bins=bins, sampling=_level_sampling(sampling, shrink), seed=seed, threads=threads)
        reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=int(bspline_iterations),
                                 maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=2 * int(bspline_iterations),
                                 costFunctionConvergenceFactor=1e7)
        reg.SetShrinkFactorsPerLevel(shrink)
        reg.SetSmoothingSigmasPerLevel([1 if f > 1 else 0 for f in shrink])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        reg.SetMovingInitialTransform(affine)
        reg.SetInitialTransform(mesh, inPlace=True)
        deformation = reg.Execute(fixed_img, moving_img)
        # ITK applies the optimised transform first, then the moving initial transform.
        candidate = sitk.CompositeTransform([affine, deformation])
        final_metric = _evaluate_metric(fixed_img, moving_img, candidate, **common)
        # Keep the deformation only if it did not make the alignment worse on the evaluation sample.
        if final_metric <= affine_metric:
            transform = candidate
            info["final_metric"] = final_metric
        info["bspline_metric"] = final_metric
    info["seconds"] = time.perf_counter() - t0
    return transform, info


def _warp_labels(mask: Volume, transform: sitk.Transform, query: Volume) -> Volume:
    """Nearest-neighbour warp of a label map onto ``query``'s grid; exactly the query geometry, uint8."""
    labels = mask.array
    if labels.dtype.kind == "f":
        labels = np.round(labels)
    if labels.max(initial=0) > 255:
        raise InputError("mask labels must fit in uint8 (<= 255)")
    src = mask.with_array(labels.astype(np.uint8)).to_sitk()
    out = sitk.Resample(src, grid_image(query), transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return Volume(sitk.GetArrayFromImage(out).astype(np.uint8), query.spacing, query.origin, query.direction.copy())


def atlas_propagation(
    support_image: Volume,
    support_mask: Volume,
    query: Volume,
    bspline: bool = True,
    seed: int = 0,
    *,
    return_info: bool = False,
    **registration,
) -> Volume | tuple[Volume, dict]:
    """Segment ``query`` by registering one labelled support ("atlas") to it and warping its mask.

    Registration: moving = support image, fixed = query (see :func:`register`): a centred initial affine
    (physical centres and same-field-of-view starts, the better kept), affine Mattes mutual information on
    a shrink 4, 2, 1 pyramid, then (``bspline=True``) a B-spline free-form deformation (4 intervals, i.e.
    7 control points per axis, L-BFGS-B). The mask is then resampled with nearest neighbour onto the query grid
    (labels outside the support's field of view become 0). About 1-5 s at 64^3 on 2 CPU cores.

    Arguments:
      support_image (Volume): the atlas image (D', H', W') with its geometry.
      support_mask (Volume): its label map (usually binary {0, 1}), same geometry as ``support_image``.
      query (Volume): the image to segment (D, H, W), any geometry (oblique, anisotropic).
      bspline (bool): add the deformable B-spline stage after the affine one.
      seed (int): seed of the metric's voxel sample (see the module notes on determinism).
      return_info (bool): also return the registration info dict of :func:`register`.
      **registration: more options of :func:`register` (``init``, ``threads``, ``sampling``, ...).

    Returns:
      Volume: uint8 label map (D, H, W) with the query's exact shape, spacing, origin and direction
      (with ``return_info``: ``(Volume, info)``).
    """
    _check_pair(support_image, support_mask, "support")
    if not isinstance(query, Volume):
        raise InputError("query must be an irisseg.io.Volume")
    transform, info = register(query, support_image, bspline=bspline, seed=seed, **registration)
    out = _warp_labels(support_mask, transform, query)
    return (out, info) if return_info else out


def majority_vote(masks: Sequence[Volume]) -> Volume:
    """Per-voxel majority vote of label maps sharing one geometry (background counts as a label).

    Arguments:
      masks (Sequence[Volume]): uint8 label maps (D, H, W) in one geometry.

    Returns:
      Volume: uint8 label map, the most frequent label per voxel; ties go to the lowest label (so a 1-1 tie
      between background and foreground is background).
    """
    if not masks:
        raise InputError("majority_vote needs at least one mask")
    ref = masks[0]
    for i, m in enumerate(masks[1:], 1):
        check_same_geometry(ref, m, "mask 0", f"mask {i}")
    stack = np.stack([m.array.astype(np.int64) for m in masks])
    labels = np.unique(stack)
    counts = np.stack([(stack == lab).sum(0) for lab in labels])
    winner = labels[np.argmax(counts, axis=0)]  # argmax takes the first (lowest label) on ties
    return ref.with_array(winner.astype(np.uint8))


def atlas_propagation_multi(
    support_images: Sequence[Volume],
    support_masks: Sequence[Volume],
    query: Volume,
    bspline: bool = True,
    seed: int = 0,
    *,
    return_info: bool = False,
    **registration,
) -> Volume | tuple[Volume, list[dict]]:
    """Multi-atlas segmentation: :func:`atlas_propagation` of every support, then :func:`majority_vote`.

    Arguments:
      support_images (Sequence[Volume]): K atlas images, each with its own geometry.
      support_masks (Sequence[Volume]): their label maps (same geometry as the matching image).
      query (Volume): the image to segment (D, H, W).
      bspline, seed, **registration: as in :func:`atlas_propagation` (support ``k`` uses ``seed + k``).
      return_info (bool): also return the K registration info dicts.

    Returns:
      Volume: uint8 label map in the query's exact geometry (with ``return_info``: ``(Volume, infos)``).
    """
    if len(support_images) != len(support_masks) or not support_images:
        raise InputError(f"need as many support masks as images (>= 1), got {len(support_images)} and {len(support_masks)}")
    warped, infos = [], []
    for k, (image, mask) in enumerate(zip(support_images, support_masks)):
        out, info = atlas_propagation(image, mask, query, bspline=bspline, seed=seed + k, return_info=True,
                                      **registration)
        warped.append(out)
        infos.append(info)
    voted = majority_vote(warped)
    return (voted, infos) if return_info else voted


# ===================================================================================================
# U-Net trained from scratch on the supports
# ===================================================================================================
class SmallUNet(ResidualUNet):
    """A compact residual 3D U-Net for binary segmentation: :class:`irisseg.models.unet.ResidualUNet` with
    channels ``base * 2**i`` (i = 0 .. depth), stride 2 at every step, one residual block per level and no
    deep supervision.

    Encoder: ``ResidualBlock`` stem at full resolution, then ``depth`` stride-2 residual blocks; decoder:
    transposed-conv 2x up-sampling, concatenation with the skip and a residual block per level; a 1x1x1
    head.

    Arguments:
      in_channels (int): image channels. base (int): stem channels. depth (int): down-sampling steps.

    ``forward(x (B, in_channels, D, H, W))`` returns logits ``(B, 1, D, H, W)``; sizes that are not
    multiples of ``2**depth`` are padded internally and cropped back.
    """

    def __init__(self, in_channels: int = 1, base: int = 12, depth: int = 3):
        super().__init__(UNetConfig(name="small-unet", in_channels=in_channels, out_channels=1,
                                    channels=tuple(base * 2**i for i in range(depth + 1))))
        self.stride = 2**depth


def _dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice + BCE: ``irisseg.losses.dice_bce_loss`` when available, else a local soft Dice + BCE."""
    try:
        from irisseg.losses import dice_bce_loss
    except ImportError:
        dice_bce_loss = None
    if dice_bce_loss is not None:
        return dice_bce_loss(logits, target)
    prob = torch.sigmoid(logits)
    dims = tuple(range(2, logits.ndim))
    inter = (prob * target).sum(dims)
    denom = prob.sum(dims) + target.sum(dims)
    dice = 1.0 - (2.0 * inter + 1.0) / (denom + 1.0)
    return dice.mean() + F.binary_cross_entropy_with_logits(logits, target)


def _mask_on_grid(mask: Volume, record, name: str) -> np.ndarray:
    """A binary mask taken to the model grid: linear resampling of the {0, 1} mask thresholded at 0.5 (a
    fair area-weighted downsampling), or, for a structure too small to keep a voxel that way, the grid
    voxels at least half as covered as the most covered one. float32 (D, H, W) in {0, 1}."""
    soft = record.apply(mask.with_array((mask.array > 0).astype(np.float32)), kind="linear").array
    top = float(soft.max(initial=0.0))
    if top <= 0.0:
        raise InputError(f"{name}: mask is empty or vanishes on the model grid")
    return (soft >= min(0.5, 0.5 * top)).astype(np.float32)


def _round_grid(shape: Sequence[int], multiple: int, cap: int | None) -> tuple[int, int, int]:
    out = []
    for s in shape:
        s = int(s) if cap is None else min(int(s), int(cap))
        out.append(max(multiple, int(round(s / multiple)) * multiple))
    return tuple(out)  # type: ignore[return-value]


def _random_patch(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, patch: Sequence[int],
                  fg_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """A (C, *patch) crop of ``image`` and (1, *patch) of ``mask``; centred on foreground with probability ``fg_fraction``."""
    shape = np.asarray(mask.shape[-3:])
    patch = np.asarray(patch)
    fg = np.argwhere(mask[0] > 0) if rng.random() < fg_fraction else np.empty((0, 3))
    if len(fg):
        centre = fg[rng.integers(len(fg))]
        start = np.clip(centre - patch // 2, 0, shape - patch)
    else:
        start = np.array([rng.integers(0, s - p + 1) for s, p in zip(shape, patch)])
    sl = tuple(slice(int(a), int(a + p)) for a, p in zip(start, patch))
    return image[(slice(None), *sl)], mask[(slice(None), *sl)]


def _augment(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Random flips on every axis, intensity scale/shift, gamma-like contrast and Gaussian noise."""
    for axis in (1, 2, 3):
        if rng.random() < 0.5:
            image, mask = np.flip(image, axis), np.flip(mask, axis)
    image = image * rng.uniform(0.85, 1.15) + rng.normal(0.0, 0.1)
    if rng.random() < 0.3:  # monotone non-linear contrast change on the z-scored intensities
        gamma = math.exp(rng.normal(0.0, 0.25))
        lo, hi = float(image.min()), float(image.max())
        image = lo + (hi - lo) * np.power((image - lo) / max(hi - lo, 1e-6), gamma)
    if rng.random() < 0.3:
        image = image + rng.normal(0.0, rng.uniform(0.0, 0.1), image.shape)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(mask, dtype=np.float32)


def _sliding_window(model: nn.Module, image: torch.Tensor, patch: Sequence[int], overlap: float = 0.5) -> torch.Tensor:
    """Logits (1, 1, D, H, W) by Gaussian-weighted sliding-window inference with ``patch``-sized windows."""
    shape = image.shape[-3:]
    if tuple(patch) == tuple(shape):
        return model(image)
    starts = []
    for s, p in zip(shape, patch):
        step = max(1, int(p * (1 - overlap)))
        pos = list(range(0, s - p + 1, step))
        if pos[-1] != s - p:
            pos.append(s - p)
        starts.append(pos)
    sigma = [p / 8.0 for p in patch]
    axes = [torch.exp(-0.5 * ((torch.arange(p, dtype=torch.float32) - (p - 1) / 2) / sg) ** 2) for p, sg in zip(patch, sigma)]
    weight = (axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]).clamp_min(1e-3)
    acc = torch.zeros((1, 1, *shape))
    norm = torch.zeros((1, 1, *shape))
    for z in starts[0]:
        for y in starts[1]:
            for x in starts[2]:
                sl = (slice(None), slice(None), slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
                acc[sl] += model(image[sl]) * weight
                norm[sl] += weight
    return acc / norm


def train_unet_on_supports(
    support_images: Sequence[Volume],
    support_masks: Sequence[Volume],
    query: Volume,
    seconds: float = 60.0,
    seed: int = 0,
    patch: Sequence[int] | int | None = None,
    *,
    grid: Sequence[int] | int | None = None,
    max_grid: int = 32,
    max_steps: int | None = None,
    base: int = 8,
    batch_size: int = 2,
    lr: float = 3e-3,
    fg_fraction: float = 0.6,
    threads: int | None = None,
    clock: str = "wall",
    return_info: bool = False,
) -> Volume | tuple[Volume, dict]:
    """Train a small residual 3D U-Net from scratch on K labelled supports, then segment the query.

    Every volume is taken to one common model grid of shape ``grid`` (D, H, W) with
    :class:`irisseg.preprocess.Preprocessor` (percentile clipping and z-score per volume, linear
    resampling of images and nearest-neighbour resampling of masks, keeping each volume's physical
    extent); the query's prediction (sigmoid probability) is resampled back linearly to the query's exact
    geometry with the recorded inverse and thresholded at 0.5.

    Training: AdamW (``lr``, cosine decay over the budget), Dice + BCE, batches of ``batch_size`` random
    ``patch``-sized crops (centred on a foreground voxel with probability ``fg_fraction``), random flips
    on all three axes, intensity scale / shift, a random monotone contrast change and noise. It stops when
    ``seconds`` are spent (on ``clock``) or after ``max_steps`` steps, whichever comes first. Support masks
    reach the grid by linear resampling thresholded at 0.5 (a structure too small for that keeps the
    grid voxels at least half as covered as the most covered one, so it never vanishes).
    Inference: Gaussian-weighted sliding windows of ``patch`` with 50 % overlap (one pass when the patch
    is the whole grid).

    Arguments:
      support_images (Sequence[Volume]): K images (D_k, H_k, W_k), each with its own geometry.
      support_masks (Sequence[Volume]): their binary masks (non-zero = foreground), same geometry each.
      query (Volume): the image to segment (D, H, W), any geometry.
      seconds (float): training budget in seconds on ``clock`` (excludes preprocessing and inference); 0
        means no time limit (then ``max_steps`` is required).
      seed (int): seed of weights, crops and augmentation (see the module notes on determinism).
      patch (Sequence[int] | int | None): training crop (D, H, W) in grid voxels (rounded to multiples of
        8 and capped at the grid); None (default): the whole grid.
      grid (Sequence[int] | int | None): the model grid (D, H, W); default: the first support's shape with
        each side capped at ``max_grid`` and rounded to a multiple of 8.
      max_grid (int): cap of the default grid's sides. The defaults (a 32^3 grid, whole-volume batches,
        base 8) did best of the settings tried for a 30 s, 1-thread budget on 64^3 synthetic tasks (more
        steps beat more resolution at that budget: ~130 steps at 32^3 against ~120 of 32^3 crops of a
        64^3 grid); with minutes to spare, raise ``max_grid`` and give a ``patch``.
      max_steps (int | None): stop after this many optimiser steps (makes the result reproducible).
      base (int): U-Net stem channels (8-16 is sensible on CPU).
      batch_size (int): crops per step. lr (float): peak learning rate. fg_fraction (float): see above.
      threads (int | None): torch CPU threads while training (None: leave torch's setting).
      clock (str): what ``seconds`` counts: ``"wall"`` (wall-clock, ``time.perf_counter``) or ``"process"``
        (CPU time of this process summed over its threads, ``time.process_time``: on a machine shared with
        other jobs this keeps the amount of computation closer to constant).
      return_info (bool): also return a dict with ``steps``, ``train_seconds``, ``predict_seconds``,
        ``train_cpu_seconds`` (process CPU time of the training), ``final_loss`` (mean of the last 10 steps),
        ``grid``, ``patch``, ``parameters``.

    Returns:
      Volume: uint8 {0, 1} mask with the query's exact shape, spacing, origin and direction (with
      ``return_info``: ``(Volume, info)``).
    """
    if len(support_images) != len(support_masks) or not support_images:
        raise InputError(f"need as many support masks as images (>= 1), got {len(support_images)} and {len(support_masks)}")
    for k, (image, mask) in enumerate(zip(support_images, support_masks)):
        _check_pair(image, mask, f"support {k}")
    if not isinstance(query, Volume):
        raise InputError("query must be an irisseg.io.Volume")
    if seconds <= 0 and not max_steps:
        raise InputError("give a positive time budget (seconds) or max_steps")
    if clock not in ("wall", "process"):
        raise InputError(f"clock must be 'wall' or 'process', got {clock!r}")
    timer = time.perf_counter if clock == "wall" else time.process_time
    depth = 3
    multiple = 2**depth
    if grid is None:
        grid = _round_grid(support_images[0].shape, multiple, max_grid)
    else:
        grid = _round_grid((grid,) * 3 if isinstance(grid, int) else grid, multiple, None)
    if patch is None:
        patch = grid
    patch = _round_grid((patch,) * 3 if isinstance(patch, int) else patch, multiple, None)
    patch = tuple(min(p, g) for p, g in zip(patch, grid))

    pre = Preprocessor(target_shape=grid)
    images, masks = [], []
    for k, (image, mask) in enumerate(zip(support_images, support_masks)):
        out = pre(image)
        images.append(out.image)  # (1, D, H, W) float32
        masks.append(_mask_on_grid(mask, out.record, f"support mask {k}")[None])
    query_pre = pre(query)

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    info: dict = {"grid": list(grid), "patch": list(patch)}
    with _torch_threads(threads):
        model = SmallUNet(1, base=base, depth=depth)
        info["parameters"] = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        model.train()
        losses: list[float] = []
        step = 0
        t0, wall0, cpu0 = timer(), time.perf_counter(), time.process_time()
        while True:
            elapsed = timer() - t0
            if (max_steps is not None and step >= max_steps) or (seconds > 0 and elapsed >= seconds):
                break
            # cosine decay on the fraction of the budget used (time or steps, whichever is nearer its end)
            frac = elapsed / seconds if seconds > 0 else 0.0
            if max_steps:
                frac = max(frac, step / max_steps)
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
            xs, ys = [], []
            for _ in range(batch_size):
                k = int(rng.integers(len(images)))
                x, y = _random_patch(rng, images[k], masks[k], patch, fg_fraction)
                x, y = _augment(rng, x, y)
                xs.append(x)
                ys.append(y)
            logits = model(torch.from_numpy(np.stack(xs)))
            loss = _dice_bce(logits, torch.from_numpy(np.stack(ys)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
        info["steps"] = step
        info["train_seconds"] = time.perf_counter() - wall0
        info["train_cpu_seconds"] = time.process_time() - cpu0
        info["final_loss"] = float(np.mean(losses[-10:])) if losses else float("nan")

        t1 = time.perf_counter()
        model.eval()
        with torch.inference_mode():
            logits = _sliding_window(model, torch.from_numpy(query_pre.image[None]), patch)
        prob = torch.sigmoid(logits)[0, 0].numpy().astype(np.float32)
    back = query_pre.record.invert(prob, kind="linear")
    out = Volume((back.array > 0.5).astype(np.uint8), query.spacing, query.origin, query.direction.copy())
    info["predict_seconds"] = time.perf_counter() - t1
    return (out, info) if return_info else out
