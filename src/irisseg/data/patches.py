"""Lesion-aware patch sampling for supervised lesion segmentation (written from scratch).

Small lesions fill a tiny fraction of a 3D MRI volume, so patches drawn uniformly are almost all empty.
:class:`PatchSampler` draws patches of one case two ways:

* **positive** draws (a fraction ``positive_fraction`` of them) are centred on a lesion voxel. With
  ``component_balanced=True`` (the default) a lesion connected component is picked uniformly first, then
  a voxel inside it, so a 20-voxel lesion is the centre as often as a 20,000-voxel one; with
  ``component_balanced=False`` every lesion voxel is equally likely (large lesions dominate).
* **negative** draws are centred on any voxel of the body/brain mask. The mask is given, or derived from
  the image by :func:`body_mask` (voxels above a low intensity threshold in any channel, holes filled).
  A negative patch may contain lesion by chance; it is "negative" only in how its centre was chosen.
* **hard negatives** (optional, online hard-negative mining): centres given to a sampler with
  :meth:`PatchSampler.set_hard_negatives`, typically one per false-positive component of the current model
  on that training case (:func:`false_positive_centres`). A negative draw on such a case takes one of them
  with probability ``hard_negative_fraction`` (0 by default: never).
* **hard positives** (optional, online hard-positive mining): lesion components given to a sampler with
  :meth:`PatchSampler.set_hard_positives`, typically the ones the current model misses on that training
  case (:func:`missed_components`). A positive draw on such a case picks one of them with probability
  ``hard_positive_fraction`` (0 by default: never), so a missed lesion is drawn more often than one found.

Precomputation (once per case, in :class:`PatchSampler`'s constructor): the lesion connected components
(``scipy.ndimage.label``, 6-connected by default as in :mod:`irisseg.data.synthetic`), the flat indices of
the lesion voxels grouped by component, and the flat indices of the body voxels. Indices are int32 (int64
only for volumes of 2^31 voxels or more), one integer per voxel instead of three coordinates; components
above ``max_component_voxels`` and bodies above ``max_body_voxels`` are randomly subsampled (a fixed
seeded subset), which leaves the draws uniform over the kept voxels and the component weights unchanged
(unbalanced draws weight components by their true size). Drawing a centre is then O(1).

Patch placement (``border``): the window is the box ``[c - p // 2, c - p // 2 + p)`` around the centre
``c``. With ``"shift"`` (default) the window is moved inwards where it would cross the volume's border,
so it lies inside the volume whenever the volume is at least ``p`` long on that axis, and contains the
whole volume otherwise (the centre voxel is always inside the patch, not always at its middle); with
``"pad"`` it is never moved, so the centre voxel is always at index ``p // 2``. Whatever lies outside
the volume is padded: the image with ``pad_value`` (default: each channel's minimum over the case, the
background of raw or z-scored MRI), the label with 0; the ``valid`` mask (1 inside the volume, 0 in the
padding) says which voxels are real, e.g. to mask a loss.

Empty labels: a case without lesion voxels cannot give positive draws; a positive draw then falls back
to a negative one (``PatchSample.positive`` is False), without warning. :class:`LesionPatchDataset`
avoids this across a dataset by picking, for a positive draw, a case among those with lesions, so the
positive fraction holds over the dataset as long as one case has a lesion.

Conventions: images ``(C, D, H, W)`` (a ``(D, H, W)`` array is one channel), labels ``(D, H, W)`` with any
non-zero value counting as lesion, patches ``(C, p0, p1, p2)`` float32 and labels ``(1, p0, p1, p2)``
float32 in {0, 1}. Arrays are used as given: normalise them first (e.g. with
:class:`irisseg.preprocess.Preprocessor`). Every draw takes a ``numpy.random.Generator``, so the same seed
gives the same patches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import ndimage as ndi
from torch.utils.data import IterableDataset, get_worker_info

from irisseg.data.augment import gaussian_blur, random_affine, random_gamma, simulate_low_resolution
from irisseg.errors import InputError
from irisseg.metrics import lesion_components

__all__ = [
    "BORDERS",
    "PatchConfig",
    "PatchAugmentConfig",
    "PatchSample",
    "PatchSampler",
    "LesionPatchDataset",
    "body_mask",
    "false_positive_centres",
    "missed_components",
    "extract_patch",
    "window_start",
    "augment_patch",
]

#: Patch placement modes at the volume border (see the module docstring).
BORDERS = ("shift", "pad")

# SeedSequence tags, so that subsampling and drawing streams never share a seed.
_PREP_TAG = 0x5EED_0001
_STREAM_TAG = 0x5EED_0002


def _triple(value, name: str) -> tuple[int, int, int]:
    """An int or a 3-sequence of ints (e.g. from YAML) -> a tuple of three positive ints."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value),) * 3
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be an int or three ints, got {value!r}") from None
    if len(out) != 3 or min(out) < 1:
        raise InputError(f"{name} must be an int or three ints, each >= 1, got {value!r}")
    return out


# ===================================================================================================
# configs
# ===================================================================================================
@dataclass
class PatchConfig:
    """How :class:`PatchSampler` and :class:`LesionPatchDataset` draw patches.

    Attributes:
      patch_size: patch shape in voxels, one int for a cube or ``(p0, p1, p2)`` along ``(D, H, W)``;
        stored as a tuple after validation.
      positive_fraction: probability that a draw is centred on a lesion voxel, in [0, 1].
      component_balanced: pick a lesion connected component uniformly, then a voxel inside it (True), or
        a lesion voxel uniformly (False).
      connectivity: lesion components: 1 = 6-connected faces, 2 = 18, 3 = 26 (``scipy.ndimage``).
      centre_jitter: move each patch window by a uniform random whole number of voxels in
        ``[-j_a, j_a]`` along axis ``a``, ``j_a = floor(centre_jitter * (p_a // 2))``, so the drawn voxel is not
        always at the patch centre (sliding-window inference sees lesions anywhere in its windows); in
        [0, 1), which keeps the drawn voxel inside the patch. 0 (default): exactly centred.
      border: ``"shift"`` (move the window inside the volume) or ``"pad"`` (keep the centre in the middle
        of the patch, pad whatever is outside); see :data:`BORDERS`.
      pad_value: image value of padded voxels, one for every channel; None = each channel's minimum.
      body_threshold: when no body mask is given, a voxel is body if any channel exceeds
        ``min + body_threshold * (max - min)`` of that channel (0 = above the minimum, "non-zero" for
        images whose background is 0); see :func:`body_mask`.
      fill_body_holes: fill enclosed holes of the derived body mask (dark ventricles, hypo-intense lesions).
      max_body_voxels: keep at most this many body voxels as negative centres (random subset), None = all.
      max_component_voxels: keep at most this many voxels per lesion component as positive centres
        (random subset), None = all.
      hard_negative_fraction: probability that a negative draw on a case with hard-negative centres
        (:meth:`PatchSampler.set_hard_negatives`) is centred on one of them (uniformly) rather than anywhere
        in the body, in [0, 1]; 0 (default) never, and draws then consume no extra randomness.
      hard_positive_fraction: probability that a positive draw on a case with hard-positive lesions
        (:meth:`PatchSampler.set_hard_positives`, typically the lesions a model misses) picks one of them
        (uniformly) rather than any lesion, in [0, 1]; 0 (default) never, with no extra randomness.
    """

    patch_size: int | tuple[int, int, int] = 48
    positive_fraction: float = 0.5
    component_balanced: bool = True
    connectivity: int = 1
    centre_jitter: float = 0.0
    border: str = "shift"
    pad_value: float | None = None
    body_threshold: float = 0.05
    fill_body_holes: bool = True
    max_body_voxels: int | None = 1_000_000
    max_component_voxels: int | None = 100_000
    hard_negative_fraction: float = 0.0
    hard_positive_fraction: float = 0.0

    def __post_init__(self):
        self.patch_size = _triple(self.patch_size, "patch_size")
        for name in ("positive_fraction", "hard_negative_fraction", "hard_positive_fraction"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise InputError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= float(self.centre_jitter) < 1.0:
            raise InputError(f"centre_jitter must be in [0, 1), got {self.centre_jitter}")
        if self.connectivity not in (1, 2, 3):
            raise InputError(f"connectivity must be 1, 2 or 3, got {self.connectivity}")
        if self.border not in BORDERS:
            raise InputError(f"border must be one of {', '.join(BORDERS)}, got {self.border!r}")
        if not 0.0 <= float(self.body_threshold) < 1.0:
            raise InputError(f"body_threshold must be in [0, 1), got {self.body_threshold}")
        for name in ("max_body_voxels", "max_component_voxels"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise InputError(f"{name} must be >= 1 or None, got {value}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PatchAugmentConfig:
    """Cheap tensor augmentation of a patch (:func:`augment_patch`); all randomness from one generator.

    Attributes:
      flip: probability of flipping each spatial axis, independently (image, label and valid mask alike).
      scale: (min, max) multiplicative intensity factor, drawn per channel.
      shift: (min, max) additive intensity offset, drawn per channel (in image units: standard
        deviations for z-scored images).
      intensity_prob: probability of applying the scale and shift.
      noise_std: largest standard deviation of additive Gaussian noise (drawn uniformly in [0, noise_std]).
      noise_prob: probability of adding noise.

    The following (nnU-Net's spatial and acquisition augmentations) are off by default (probability 0):

      spatial_prob: probability of a rotation and isotropic zoom about the patch centre
        (:func:`irisseg.data.augment.random_affine`; label and valid mask by nearest neighbour).
      rotate_deg: largest rotation about each axis, degrees; zoom: (min, max) zoom factor.
      gamma_prob / gamma: probability and (min, max) exponent of a per-channel gamma on the patch's range.
      blur_prob / blur_sigma: probability and (min, max) Gaussian width in voxels, drawn per axis (an
        anisotropic blur imitates thick slices).
      lowres_prob / lowres: probability and (min, max) factor of a down- and up-sampling round trip.

    Order: flips, spatial, blur, low resolution, gamma, intensity scale / shift, noise.
    """

    flip: float = 0.5
    scale: tuple[float, float] = (0.9, 1.1)
    shift: tuple[float, float] = (-0.1, 0.1)
    intensity_prob: float = 1.0
    noise_std: float = 0.05
    noise_prob: float = 0.5
    spatial_prob: float = 0.0
    rotate_deg: float = 15.0
    zoom: tuple[float, float] = (0.85, 1.15)
    gamma_prob: float = 0.0
    gamma: tuple[float, float] = (0.7, 1.5)
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    lowres_prob: float = 0.0
    lowres: tuple[float, float] = (0.5, 1.0)

    def __post_init__(self):
        for name in ("scale", "shift", "zoom", "gamma", "blur_sigma", "lowres"):
            setattr(self, name, tuple(float(v) for v in getattr(self, name)))
        for name in ("flip", "intensity_prob", "noise_prob", "spatial_prob", "gamma_prob", "blur_prob",
                     "lowres_prob"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise InputError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        for name in ("scale", "shift", "zoom", "gamma", "blur_sigma", "lowres"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
                raise InputError(f"{name} must be (min, max) with min <= max, got {lo_hi}")
        for name in ("zoom", "gamma", "lowres"):
            if getattr(self, name)[0] <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lowres[1] > 1 or self.blur_sigma[0] < 0 or self.rotate_deg < 0:
            raise InputError("lowres must lie in (0, 1], blur_sigma and rotate_deg must be >= 0")
        if self.noise_std < 0:
            raise InputError(f"noise_std must be >= 0, got {self.noise_std}")

    def to_dict(self) -> dict:
        return asdict(self)


# ===================================================================================================
# array helpers
# ===================================================================================================
def _as_channels(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise InputError(f"image must be (D, H, W) or (C, D, H, W), got shape {image.shape}")
    return image


def body_mask(image: np.ndarray, threshold: float = 0.05, fill_holes: bool = True) -> np.ndarray:
    """Body/brain mask derived from the intensities: voxels clearly above the background in some channel.

    A voxel is inside when, for at least one channel, its value exceeds ``min + threshold * (max - min)``
    of that channel (a constant channel never counts). With ``threshold=0`` this is "above the minimum",
    i.e. non-zero for images whose background is 0. Works the same on raw and z-scored intensities.

    Arguments:
      image (np.ndarray): (C, D, H, W) or (D, H, W) intensities.
      threshold (float): fraction of each channel's range above its minimum, in [0, 1).
      fill_holes (bool): fill enclosed holes (``scipy.ndimage.binary_fill_holes``).

    Returns:
      np.ndarray: bool (D, H, W); may be empty (e.g. an all-constant image).
    """
    image = _as_channels(image)
    mask = np.zeros(image.shape[1:], dtype=bool)
    for channel in image:
        lo, hi = float(channel.min()), float(channel.max())
        if hi > lo:
            mask |= channel > lo + threshold * (hi - lo)
    if fill_holes and mask.any():
        mask = ndi.binary_fill_holes(mask)
    return mask


def _prob_and_label(prob, label) -> tuple[np.ndarray, np.ndarray]:
    """A prediction's (D, H, W) scores and its reference as a boolean mask, checked to be of one shape."""
    prob, label = np.asarray(prob), np.asarray(label) != 0
    if prob.ndim != 3 or prob.shape != label.shape:
        raise InputError(f"prob and label must be (D, H, W) of one shape, got {prob.shape} and {label.shape}")
    return prob, label


def false_positive_centres(prob: np.ndarray, label: np.ndarray, threshold: float = 0.5, margin: int = 1,
                           connectivity: int = 1, max_centres: int | None = 64) -> np.ndarray:
    """One centre per false-positive component of a prediction: where a model is confidently wrong.

    A false-positive component is a connected component of ``prob > threshold`` outside the lesion mask
    dilated by ``margin`` voxels, so boundary errors of lesions that were found do not count; its centre is
    its most probable voxel. Used for online hard-negative mining (:meth:`PatchSampler.set_hard_negatives`).

    Arguments:
      prob (np.ndarray): (D, H, W) foreground probabilities (or any score compared with ``threshold``).
      label (np.ndarray): (D, H, W) reference; non-zero = lesion.
      threshold (float): probability above which a voxel is predicted lesion.
      margin (int): voxels of dilation (``connectivity``'s structure) of the lesions first; 0 for none.
      connectivity (int): 1, 2 or 3 (6-, 18- or 26-connected components, as ``scipy.ndimage``).
      max_centres (int | None): keep the largest components only (ties: first found); None = all.

    Returns:
      np.ndarray: int64 (n, 3) voxel indices (d, h, w), largest component first.

    Raises:
      InputError: ``prob`` and ``label`` of different shapes, or not 3D.
    """
    prob, label = _prob_and_label(prob, label)
    structure = ndi.generate_binary_structure(3, connectivity)
    near_lesion = ndi.binary_dilation(label, structure, iterations=margin) if margin > 0 and label.any() else label
    components, n = ndi.label((prob > threshold) & ~near_lesion, structure=structure)
    if n == 0:
        return np.zeros((0, 3), dtype=np.int64)
    index = np.arange(1, n + 1)
    peaks = np.array(ndi.maximum_position(prob, components, index), dtype=np.int64).reshape(n, 3)
    order = np.argsort(-np.bincount(components.ravel(), minlength=n + 1)[1:], kind="stable")
    return peaks[order[:max_centres] if max_centres is not None else order]


def missed_components(prob: np.ndarray, label: np.ndarray, threshold: float = 0.5,
                      connectivity: int = 1) -> np.ndarray:
    """The reference lesions a prediction misses: no voxel of the lesion is predicted.

    Lesions are the connected components of ``label`` numbered as :class:`PatchSampler` numbers them (the
    order of ``scipy.ndimage.label`` with the same ``connectivity``), so the result can be given to
    :meth:`PatchSampler.set_hard_positives`. A lesion counts as found when any of its voxels has
    ``prob > threshold``: the rule of lesion recall in :func:`irisseg.metrics.lesion_detection` (default
    ``min_overlap``), applied to the sampler's components. Used for online hard-positive mining.

    Arguments:
      prob (np.ndarray): (D, H, W) foreground probabilities (or any score compared with ``threshold``).
      label (np.ndarray): (D, H, W) reference; non-zero = lesion.
      threshold (float): probability above which a voxel is predicted lesion.
      connectivity (int): 1, 2 or 3 (6-, 18- or 26-connected components, as ``scipy.ndimage``).

    Returns:
      np.ndarray: int64 (n,) 0-based component indices of the missed lesions, ascending.

    Raises:
      InputError: ``prob`` and ``label`` of different shapes, or not 3D.
    """
    prob, label = _prob_and_label(prob, label)
    components, n = ndi.label(label, structure=ndi.generate_binary_structure(3, connectivity))
    found = np.bincount(components[prob > threshold], minlength=n + 1)[1:] > 0
    return np.flatnonzero(~found).astype(np.int64)


def window_start(centre: Sequence[int], shape: Sequence[int], patch_size: Sequence[int],
                 border: str = "shift") -> np.ndarray:
    """Corner of the patch window around a centre voxel (see the module docstring for ``border``).

    Arguments:
      centre (Sequence[int]): (3,) voxel index (d, h, w) inside the volume.
      shape (Sequence[int]): (3,) volume shape (D, H, W).
      patch_size (Sequence[int]): (3,) patch shape (p0, p1, p2).
      border (str): ``"shift"`` or ``"pad"``.

    Returns:
      np.ndarray: int64 (3,) index of the patch's first voxel in volume coordinates; negative or past
      ``shape - patch_size`` where the patch reaches outside the volume (that part is padded).
    """
    centre, shape, size = (np.asarray(v, dtype=np.int64) for v in (centre, shape, patch_size))
    start = centre - size // 2
    if border == "shift":
        room = shape - size  # < 0 where the volume is shorter than the patch
        start = np.clip(start, np.minimum(room, 0), np.maximum(room, 0))
    elif border != "pad":
        raise InputError(f"border must be one of {', '.join(BORDERS)}, got {border!r}")
    return start


def extract_patch(array: np.ndarray, start: Sequence[int], patch_size: Sequence[int],
                  pad_value: float | Sequence[float] | np.ndarray = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Copy the box ``[start, start + patch_size)`` of a multi-channel volume, padding outside it.

    Arguments:
      array (np.ndarray): (C, D, H, W) volume.
      start (Sequence[int]): (3,) first voxel of the box, may be negative.
      patch_size (Sequence[int]): (3,) box shape (p0, p1, p2).
      pad_value (float | Sequence[float] | np.ndarray): value of voxels outside the volume, one for all
        channels or (C,) per channel.

    Returns:
      tuple[np.ndarray, np.ndarray]: the patch (C, p0, p1, p2), a new array of ``array``'s dtype, and the
      valid mask (p0, p1, p2) bool, True where the patch lies inside the volume.
    """
    shape = np.asarray(array.shape[1:], dtype=np.int64)
    size = np.asarray(patch_size, dtype=np.int64)
    start = np.asarray(start, dtype=np.int64)
    stop = start + size
    if (start >= 0).all() and (stop <= shape).all():  # fast path: no padding
        src = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
        return array[(slice(None), *src)].copy(), np.ones(tuple(size), dtype=bool)
    pad = np.asarray(pad_value, dtype=array.dtype).reshape(-1)
    if pad.size not in (1, array.shape[0]):
        raise InputError(f"pad_value must be one value or one per channel ({array.shape[0]}), got {pad.size}")
    patch = np.empty((array.shape[0], *size.tolist()), dtype=array.dtype)
    patch[...] = pad.reshape(-1, 1, 1, 1)
    valid = np.zeros(tuple(size), dtype=bool)
    lo, hi = np.maximum(start, 0), np.minimum(stop, shape)
    if (hi > lo).all():
        src = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        dst = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, start))
        patch[(slice(None), *dst)] = array[(slice(None), *src)]
        valid[dst] = True
    return patch, valid


# ===================================================================================================
# per-case sampler
# ===================================================================================================
@dataclass
class PatchSample:
    """One drawn patch.

    Attributes:
      image (np.ndarray): float32 (C, p0, p1, p2).
      label (np.ndarray): float32 (1, p0, p1, p2) in {0, 1}.
      valid (np.ndarray): float32 (1, p0, p1, p2), 1 inside the volume, 0 in the padding.
      centre (tuple[int, int, int]): the drawn centre voxel (d, h, w) in volume coordinates.
      start (tuple[int, int, int]): the patch's first voxel in volume coordinates (negative when padded),
        so the centre is at ``centre - start`` inside the patch.
      positive (bool): True when the centre was drawn from the lesion voxels.
      component (int): index of the lesion component the centre was drawn from (0-based), -1 for negatives.
    """

    image: np.ndarray
    label: np.ndarray
    valid: np.ndarray
    centre: tuple[int, int, int]
    start: tuple[int, int, int]
    positive: bool
    component: int


def _subsample(index: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    """At most ``limit`` entries of a sorted index array, a random subset kept in order."""
    if limit is None or index.size <= limit:
        return index
    keep = np.sort(rng.choice(index.size, size=int(limit), replace=False))
    return index[keep]


class PatchSampler:
    """Draws lesion-aware patches from one case, after a one-off precomputation.

    Arguments:
      image (np.ndarray): (C, D, H, W) or (D, H, W) intensities (stored as float32, copied only if needed).
      label (np.ndarray): (D, H, W) or (1, D, H, W) label map; non-zero = lesion.
      body (np.ndarray | None): (D, H, W) body/brain mask (non-zero = inside) for negative centres; None
        derives it with :func:`body_mask` (``config.body_threshold``, ``config.fill_body_holes``). An empty
        mask (given or derived) falls back to the whole volume (``body_is_volume`` is then True).
      config (PatchConfig | None): sampling options; None for the defaults.
      rng (np.random.Generator | None): randomness of the one-off subsampling of large bodies and
        components; None = a fixed seed, so the sampler is the same every time it is built.

    Attributes:
      n_components (int): number of lesion connected components.
      component_sizes (np.ndarray): int64 (n_components,) voxel count of every component (before subsampling).
      n_body_voxels (int): voxels of the body mask (before subsampling).

    Raises:
      InputError: wrong dimensions, or label/body shape different from the image's.
    """

    def __init__(self, image: np.ndarray, label: np.ndarray, body: np.ndarray | None = None,
                 config: PatchConfig | None = None, rng: np.random.Generator | None = None):
        self.config = cfg = config if config is not None else PatchConfig()
        rng = rng if rng is not None else np.random.default_rng(np.random.SeedSequence([0, _PREP_TAG]))
        self.image = np.asarray(_as_channels(image), dtype=np.float32)
        self.shape: tuple[int, int, int] = tuple(int(s) for s in self.image.shape[1:])
        label = np.asarray(label)
        if label.ndim == 4 and label.shape[0] == 1:
            label = label[0]
        if label.shape != self.shape:
            raise InputError(f"label shape {label.shape} differs from the image's {self.shape}")
        self.label = label != 0
        if cfg.pad_value is None:
            self.pad_value = self.image.reshape(self.image.shape[0], -1).min(axis=1)
        else:
            self.pad_value = np.full(self.image.shape[0], cfg.pad_value, dtype=np.float32)
        n_voxels = int(np.prod(self.shape))
        index_dtype = np.int32 if n_voxels < 2**31 else np.int64

        # lesion components: flat indices grouped by component (CSR-like: offsets into one array)
        components, n = ndi.label(self.label, structure=ndi.generate_binary_structure(3, cfg.connectivity))
        flat = np.flatnonzero(components)
        ids = components.ravel()[flat]
        del components
        order = np.argsort(ids, kind="stable")
        flat, ids = flat[order], ids[order]
        self.n_components = int(n)
        self.component_sizes = np.bincount(ids, minlength=n + 1)[1:].astype(np.int64)
        bounds = np.concatenate([[0], np.cumsum(self.component_sizes)])
        kept = [_subsample(flat[bounds[k]:bounds[k + 1]], cfg.max_component_voxels, rng) for k in range(n)]
        self.lesion_index = (np.concatenate(kept) if kept else np.zeros(0)).astype(index_dtype)
        self.component_offsets = np.concatenate([[0], np.cumsum([k.size for k in kept])]).astype(np.int64)
        self._size_cdf = np.cumsum(self.component_sizes) / max(int(self.component_sizes.sum()), 1)

        # body voxels (negative centres)
        if body is None:
            body = body_mask(self.image, cfg.body_threshold, cfg.fill_body_holes)
        else:
            body = np.asarray(body)
            if body.ndim == 4 and body.shape[0] == 1:
                body = body[0]
            if body.shape != self.shape:
                raise InputError(f"body mask shape {body.shape} differs from the image's {self.shape}")
        body_flat = np.flatnonzero(body)
        self.body_is_volume = body_flat.size == 0
        if self.body_is_volume:
            limit = cfg.max_body_voxels
            if limit is None or n_voxels <= limit:
                body_flat = np.arange(n_voxels)
            else:
                body_flat = np.sort(rng.choice(n_voxels, size=int(limit), replace=False))
            self.n_body_voxels = n_voxels
        else:
            self.n_body_voxels = int(body_flat.size)
            body_flat = _subsample(body_flat, cfg.max_body_voxels, rng)
        self.body_index = body_flat.astype(index_dtype)
        self.hard_negatives = np.zeros((0, 3), dtype=np.int64)
        self.hard_positives = np.zeros(0, dtype=np.int64)

    def set_hard_negatives(self, centres: np.ndarray | Sequence[Sequence[int]]) -> None:
        """Replace this case's hard-negative centres (e.g. :func:`false_positive_centres` of a model).

        Arguments:
          centres: (n, 3) voxel indices (d, h, w) inside the volume; n = 0 clears them.

        Raises:
          InputError: not (n, 3), or a centre outside the volume.
        """
        centres = np.asarray(centres, dtype=np.int64)
        if centres.size == 0:
            centres = np.zeros((0, 3), dtype=np.int64)
        if centres.ndim != 2 or centres.shape[1] != 3:
            raise InputError(f"hard-negative centres must be (n, 3) voxel indices, got shape {centres.shape}")
        if (centres < 0).any() or (centres >= np.asarray(self.shape)).any():
            raise InputError(f"hard-negative centres must lie inside the volume {self.shape}")
        self.hard_negatives = centres

    def set_hard_positives(self, components: np.ndarray | Sequence[int]) -> None:
        """Replace this case's hard-positive lesions (e.g. :func:`missed_components` of a model).

        Arguments:
          components: (n,) 0-based lesion component indices, in ``[0, n_components)``; n = 0 clears them.

        Raises:
          InputError: not one-dimensional, or an index outside ``[0, n_components)``.
        """
        components = np.asarray(components, dtype=np.int64)
        if components.size == 0:
            components = np.zeros(0, dtype=np.int64)
        if components.ndim != 1:
            raise InputError(f"hard-positive components must be (n,) indices, got shape {components.shape}")
        if (components < 0).any() or (components >= self.n_components).any():
            raise InputError(f"hard-positive components must be in [0, {self.n_components}), got {components.tolist()}")
        self.hard_positives = components

    @property
    def has_lesion(self) -> bool:
        """True when the label holds at least one lesion voxel."""
        return self.n_components > 0

    @property
    def channels(self) -> int:
        """Number of image channels C."""
        return int(self.image.shape[0])

    def draw_centre(self, rng: np.random.Generator, positive: bool | None = None) -> tuple[np.ndarray, bool, int]:
        """Draw a patch centre.

        Arguments:
          rng (np.random.Generator): the randomness of this draw.
          positive (bool | None): force a positive (True) or negative (False) draw; None draws positive with
            probability ``config.positive_fraction``. A positive draw on a case without lesion falls back
            to a negative one.

        Returns:
          tuple[np.ndarray, bool, int]: the centre, int64 (3,) voxel index (d, h, w); whether it is a
          lesion voxel drawn as positive; the component index (-1 for negatives). A negative draw is a
          hard-negative centre with probability ``config.hard_negative_fraction`` when there are any; a
          positive draw is on a hard-positive lesion with probability ``config.hard_positive_fraction``.
        """
        if positive is None:
            positive = bool(rng.random() < self.config.positive_fraction)
        if positive and self.n_components > 0:
            hard = self.config.hard_positive_fraction
            if hard > 0 and len(self.hard_positives) and rng.random() < hard:
                k = int(self.hard_positives[int(rng.integers(len(self.hard_positives)))])
            elif self.config.component_balanced:
                k = int(rng.integers(self.n_components))
            else:  # components weighted by their true size = every lesion voxel equally likely
                k = min(int(np.searchsorted(self._size_cdf, rng.random(), side="right")), self.n_components - 1)
            lo, hi = self.component_offsets[k], self.component_offsets[k + 1]
            flat = self.lesion_index[int(rng.integers(lo, hi))]
            return np.array(np.unravel_index(int(flat), self.shape), dtype=np.int64), True, k
        hard = self.config.hard_negative_fraction
        if hard > 0 and len(self.hard_negatives) and rng.random() < hard:
            return self.hard_negatives[int(rng.integers(len(self.hard_negatives)))].copy(), False, -1
        flat = self.body_index[int(rng.integers(self.body_index.size))]
        return np.array(np.unravel_index(int(flat), self.shape), dtype=np.int64), False, -1

    def extract(self, centre: Sequence[int], positive: bool = False, component: int = -1,
                offset: Sequence[int] = (0, 0, 0)) -> PatchSample:
        """Cut the patch around a centre (placement by ``config.border``, padding as documented).

        Arguments:
          centre (Sequence[int]): (3,) voxel index (d, h, w) inside the volume.
          positive (bool): recorded in the sample. component (int): recorded in the sample.
          offset (Sequence[int]): (3,) voxels by which the window's middle is moved away from ``centre``
            (each ``|offset_a| < p_a // 2`` keeps ``centre`` inside the patch).

        Returns:
          PatchSample: image (C, p0, p1, p2), label and valid (1, p0, p1, p2), all float32.
        """
        size = self.config.patch_size
        start = window_start(np.asarray(centre, dtype=np.int64) + np.asarray(offset, dtype=np.int64), self.shape,
                             size, self.config.border)
        image, valid = extract_patch(self.image, start, size, self.pad_value)
        label, _ = extract_patch(self.label[None], start, size, False)
        return PatchSample(
            image=image,
            label=label.astype(np.float32),
            valid=valid[None].astype(np.float32),
            centre=tuple(int(c) for c in centre),
            start=tuple(int(s) for s in start),
            positive=bool(positive),
            component=int(component),
        )

    def sample(self, rng: np.random.Generator, positive: bool | None = None) -> PatchSample:
        """Draw a centre (:meth:`draw_centre`) and cut its patch (:meth:`extract`), the window moved by a
        random offset of at most ``config.centre_jitter`` of the half patch per axis.

        Arguments:
          rng (np.random.Generator): the randomness of this draw.
          positive (bool | None): as :meth:`draw_centre`.

        Returns:
          PatchSample: image (C, p0, p1, p2) float32, label and valid (1, p0, p1, p2) float32, centre (the
          drawn voxel, inside the patch), start, positive, component.
        """
        centre, positive, component = self.draw_centre(rng, positive)
        offset = (0, 0, 0)
        if self.config.centre_jitter > 0:
            reach = np.floor(self.config.centre_jitter * (np.asarray(self.config.patch_size) // 2)).astype(np.int64)
            offset = rng.integers(-reach, reach + 1)
        return self.extract(centre, positive, component, offset)


# ===================================================================================================
# augmentation and the torch dataset
# ===================================================================================================
def _uniform(gen: torch.Generator, lo_hi: tuple[float, float], shape=(1,)) -> torch.Tensor:
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand(shape, generator=gen)


def augment_patch(image: torch.Tensor, label: torch.Tensor, valid: torch.Tensor, cfg: PatchAugmentConfig,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random flips per axis (all three tensors), the optional spatial / blur / low-resolution / gamma
    augmentations of ``cfg``, then per-channel intensity scale/shift and Gaussian noise.

    Every random number is drawn whatever the outcome, so the stream consumed per patch is fixed (the
    optional augmentations draw only when their probability is above 0). Padded voxels are transformed
    like the others.

    Arguments:
      image (torch.Tensor): float32 (C, p0, p1, p2).
      label (torch.Tensor): float32 (1, p0, p1, p2) in {0, 1}.
      valid (torch.Tensor): float32 (1, p0, p1, p2).
      cfg (PatchAugmentConfig): what to do.
      gen (torch.Generator): the randomness.

    Returns:
      tuple[torch.Tensor, torch.Tensor, torch.Tensor]: image, label, valid with the same shapes; the label
      stays in {0, 1}.
    """
    flips = [d for d, u in zip((1, 2, 3), torch.rand(3, generator=gen).tolist()) if u < cfg.flip]
    if flips:
        image, label, valid = image.flip(flips), label.flip(flips), valid.flip(flips)
    if cfg.spatial_prob > 0:
        do = bool(torch.rand(1, generator=gen) < cfg.spatial_prob)
        g = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
        if do:
            image, masks = random_affine(image, torch.cat([label, valid]), cfg.rotate_deg, cfg.zoom, g)
            label, valid = masks[:1], masks[1:]
    if cfg.blur_prob > 0:
        do = bool(torch.rand(1, generator=gen) < cfg.blur_prob)
        sigmas = _uniform(gen, cfg.blur_sigma, (3,)).tolist()
        if do:
            image = gaussian_blur(image, sigmas)
    if cfg.lowres_prob > 0:
        do = bool(torch.rand(1, generator=gen) < cfg.lowres_prob)
        factor = float(_uniform(gen, cfg.lowres))
        if do:
            image = simulate_low_resolution(image, factor)
    if cfg.gamma_prob > 0:
        do = bool(torch.rand(1, generator=gen) < cfg.gamma_prob)
        g = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
        if do:
            image = random_gamma(image, cfg.gamma, g)
    channels = image.shape[0]
    do_intensity, do_noise = (torch.rand(2, generator=gen) < torch.tensor([cfg.intensity_prob, cfg.noise_prob])).tolist()
    scale = _uniform(gen, cfg.scale, (channels, 1, 1, 1))
    shift = _uniform(gen, cfg.shift, (channels, 1, 1, 1))
    std = float(torch.rand(1, generator=gen)) * cfg.noise_std
    if do_intensity:
        image = image * scale + shift
    if do_noise and std > 0:
        image = image + torch.randn(image.shape, generator=gen) * std
    return image.contiguous(), label.contiguous(), valid.contiguous()


def _stream_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return 0


class LesionPatchDataset(IterableDataset):
    """A stream of lesion-aware training patches from preloaded cases, ready for a DataLoader.

    Each item: a draw is positive with probability ``config.positive_fraction``; a positive draw picks a
    case uniformly among the cases with lesions, a negative one among all cases (if no case has a lesion
    every draw is negative); the case's :class:`PatchSampler` cuts the patch; ``augment`` transforms it.

    Seeding: the stream of worker ``w`` (of a DataLoader; 0 without workers), on distributed rank ``r``,
    in epoch ``e`` depends only on ``(seed, e, r, w)``: different workers and ranks draw different patches,
    and the same seed, epoch and number of workers give the same batches. Call :meth:`set_epoch` before
    each epoch (before the DataLoader starts its iterator; not seen by persistent workers) to get new
    patches; otherwise every iteration repeats the same stream.

    Arguments:
      cases (Sequence): per case a tuple ``(image, label)`` or ``(image, label, body)`` of numpy arrays
        (image (C, D, H, W) or (D, H, W), label and body (D, H, W)), or a ready :class:`PatchSampler`.
        Arrays are kept in memory (once per DataLoader worker with the spawn start method).
      config (PatchConfig | None): patch options for the cases given as arrays, and the positive fraction
        of the stream; None for the defaults.
      augment (PatchAugmentConfig | None): augmentation; None (default) for none.
      seed (int): base seed (also seeds the one-off subsampling of each case's precomputation).
      samples_per_epoch (int | None): patches per iteration, split across workers (so the DataLoader gives
        exactly this many); None for an infinite stream.
      instances (bool): also yield each patch's lesion instances (for :func:`irisseg.losses.blob_loss`).

    Yields:
      dict: ``image`` float32 (C, p0, p1, p2), ``label`` float32 (1, p0, p1, p2) in {0, 1}, ``valid``
      float32 (1, p0, p1, p2), ``positive`` (bool), ``case`` (int, index into ``cases``), ``centre`` int64
      (3,) in volume coordinates; with ``instances``, ``instances`` int16 (1, p0, p1, p2): 0 outside the
      lesions, ``1..n`` on the n lesion components of the (augmented) label patch, 26-connected as the
      lesion metrics count them (:func:`irisseg.metrics.lesion_components`).

    Raises:
      InputError: no case, or cases of different channel counts or patch sizes.
    """

    def __init__(self, cases: Sequence, config: PatchConfig | None = None, augment: PatchAugmentConfig | None = None,
                 seed: int = 0, samples_per_epoch: int | None = None, instances: bool = False):
        super().__init__()
        self.config = config if config is not None else PatchConfig()
        self.augment = augment
        self.instances = bool(instances)
        self.seed = int(seed)
        self.epoch = 0
        if samples_per_epoch is not None and int(samples_per_epoch) < 1:
            raise InputError(f"samples_per_epoch must be >= 1 or None, got {samples_per_epoch}")
        self.samples_per_epoch = None if samples_per_epoch is None else int(samples_per_epoch)
        if len(cases) == 0:
            raise InputError("LesionPatchDataset needs at least one case")
        self.samplers: list[PatchSampler] = []
        for i, case in enumerate(cases):
            if isinstance(case, PatchSampler):
                self.samplers.append(case)
            else:
                prep = np.random.default_rng(np.random.SeedSequence([self.seed, _PREP_TAG, i]))
                self.samplers.append(PatchSampler(*case, config=self.config, rng=prep))
        kinds = {(s.channels, s.config.patch_size) for s in self.samplers}
        if len(kinds) > 1:
            raise InputError(f"cases differ in (channels, patch size): {sorted(kinds)}")
        self.lesion_cases = np.array([i for i, s in enumerate(self.samplers) if s.has_lesion], dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        """Select the stream of this epoch (see the class docstring)."""
        self.epoch = int(epoch)

    def set_hard_negatives(self, case: int, centres) -> None:
        """Give case ``case`` (index into ``cases``) new hard-negative centres (:meth:`PatchSampler.set_hard_negatives`).

        DataLoader workers hold a copy of the dataset: the change reaches them when they are next started
        (every epoch with non-persistent workers).
        """
        self.samplers[int(case)].set_hard_negatives(centres)

    def set_hard_positives(self, case: int, components) -> None:
        """Give case ``case`` (index into ``cases``) new hard-positive lesions (:meth:`PatchSampler.set_hard_positives`);
        workers see the change as for :meth:`set_hard_negatives`."""
        self.samplers[int(case)].set_hard_positives(components)

    def __len__(self) -> int:
        if self.samples_per_epoch is None:
            raise TypeError("an infinite LesionPatchDataset (samples_per_epoch=None) has no length")
        return self.samples_per_epoch

    def draw(self, rng: np.random.Generator, gen: torch.Generator) -> dict:
        """One item of the stream (see the class docstring), from the given generators."""
        positive = bool(rng.random() < self.config.positive_fraction)
        if positive and self.lesion_cases.size:
            case = int(self.lesion_cases[rng.integers(self.lesion_cases.size)])
        else:
            case = int(rng.integers(len(self.samplers)))
        sample = self.samplers[case].sample(rng, positive=positive)
        image, label, valid = (torch.from_numpy(a) for a in (sample.image, sample.label, sample.valid))
        if self.augment is not None:
            image, label, valid = augment_patch(image, label, valid, self.augment, gen)
        item = {"image": image, "label": label, "valid": valid, "positive": sample.positive, "case": case,
                "centre": torch.tensor(sample.centre, dtype=torch.int64)}
        if self.instances:
            components, _ = lesion_components(label[0].numpy() > 0.5)
            item["instances"] = torch.from_numpy(components.astype(np.int16)[None])
        return item

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        numpy_seq, torch_seq = np.random.SeedSequence(
            [self.seed, _STREAM_TAG, self.epoch, _stream_rank(), worker]).spawn(2)
        rng = np.random.default_rng(numpy_seq)
        gen = torch.Generator().manual_seed(int(torch_seq.generate_state(1, dtype=np.uint64)[0] >> 1))
        if self.samples_per_epoch is None:
            while True:
                yield self.draw(rng, gen)
        count = self.samples_per_epoch // workers + int(worker < self.samples_per_epoch % workers)
        for _ in range(count):
            yield self.draw(rng, gen)
