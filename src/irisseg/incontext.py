"""Segmentation by example: load a trained IRIS model, show it labelled supports, segment queries.

Following segment-anything's predictor, the expensive part (encoding the support set into a
:class:`~irisseg.models.task_encoding.TaskEmbedding`) runs once in :meth:`InContextSegmenter.set_support`
and is cached; every :meth:`InContextSegmenter.segment` call then costs one query encoding and decoding.

Four inference strategies (the IRIS paper's), chosen by name:

* ``one-shot``: the task embedding of the first support only;
* ``ensemble``: the embedding averaged over all supports (default);
* ``tune``: the ensemble embedding, refined on the supports by in-context tuning
  (:func:`irisseg.models.tuner.tune_task`, model frozen);
* ``memory``: no support at all; the embeddings stored for named classes in the model's class memory bank
  (``memory.safetensors`` beside the weights), chosen with :meth:`InContextSegmenter.set_memory`.

Any strategy with supports can add mirror test-time augmentation (``tta=True``, ``--tta``): supports and query
mirrored together along the 8 axis combinations, probabilities averaged (as nnU-Net mirrors its inputs).

Geometry: supports and queries may have any shape, spacing, origin and direction. Each is taken to the
model grid (``model.config.image_size``, D, H, W) by :class:`~irisseg.preprocess.Preprocessor` (clip
0.5-99.5 percentiles, z-score, resample the whole field of view), and every prediction goes back to its
query's exact geometry through the recorded inverse.

Example::

    model = load_model("runs/iris/best")
    seg = InContextSegmenter(model, strategy="ensemble")
    seg.set_support([read_volume("a.nii.gz")], [read_mask("a_mask.nii.gz")])
    liver = seg.segment(read_volume("b.nii.gz"))       # uint8 Volume in b's geometry
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from irisseg.errors import InputError
from irisseg.io import Volume, check_same_geometry, mask_channels
from irisseg.models.blocks import autocast_for
from irisseg.models.iris import CONFIGS, IrisModel, build_iris
from irisseg.models.task_encoding import TaskEmbedding
from irisseg.models.tuner import tune_task
from irisseg.preprocess import PreprocessConfig, Preprocessor

__all__ = [
    "STRATEGIES",
    "STARTER_DIR",
    "load_model",
    "resolve_model_dir",
    "is_starter_dir",
    "resolve_device",
    "InContextSegmenter",
]

#: Inference strategy names, in the order of the IRIS paper.
STRATEGIES = ("one-shot", "ensemble", "tune", "memory")
#: Mirror test-time augmentation: every combination of the grid axes of a (B, C, D, H, W) tensor, the
#: identity first.
MIRROR_AXES: tuple[tuple[int, ...], ...] = ((), (-3,), (-2,), (-1,), (-3, -2), (-3, -1), (-2, -1), (-3, -2, -1))

#: Where the packaged starter weights live (``config.json`` + ``model.safetensors``), when installed.
STARTER_DIR = Path(__file__).resolve().parent / "weights" / "starter"


# ---------------------------------------------------------------------------------------------------
# models and devices
# ---------------------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device = "cpu") -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"`` (CUDA when available) as a ``torch.device``.

    Raises:
      InputError: CUDA asked for but not available, or an unknown device name.
    """
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {device!r} (use cpu, cuda or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r}: CUDA is not available on this machine (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device {device!r} is not supported (use cpu, cuda or auto)")
    return dev


def is_starter_dir(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is the packaged starter-weights folder (which irisseg never modifies)."""
    try:
        return Path(folder).resolve() == STARTER_DIR
    except OSError:
        return False


def resolve_model_dir(name_or_dir: str | os.PathLike = "starter") -> Path:
    """The model folder (``config.json`` + ``model.safetensors``) that ``name_or_dir`` names.

    Arguments:
      name_or_dir: ``"starter"`` (the packaged weights, :data:`STARTER_DIR`), a model folder, or a training
        run folder whose ``best/`` (else ``last/``) sub-folder holds the model.

    Returns:
      Path: a folder holding ``config.json`` and ``model.safetensors``.

    Raises:
      InputError: starter weights not installed; a registry name (``iris-small``: an architecture with no
        trained weights); a missing folder or one that holds no model.
    """
    text = str(name_or_dir)
    if text == "starter":
        if not (STARTER_DIR / "config.json").is_file() or not (STARTER_DIR / "model.safetensors").is_file():
            raise InputError(
                f"starter weights are not installed ({STARTER_DIR} is missing or incomplete); "
                "pass a trained model folder instead (e.g. --model runs/iris/best)"
            )
        return STARTER_DIR
    folder = Path(name_or_dir)
    if not folder.exists():
        if text in CONFIGS:
            raise InputError(
                f"{text!r} is a model architecture, not trained weights: a fresh {text} is randomly "
                "initialised and segments nothing; pass a trained model folder (config.json + model.safetensors)"
            )
        raise InputError(f"{folder}: no such model folder")
    if not folder.is_dir():
        raise InputError(f"{folder}: not a model folder (expected a folder with config.json and model.safetensors)")
    if not (folder / "config.json").is_file():
        for sub in ("best", "last"):
            if (folder / sub / "config.json").is_file():
                return folder / sub
    return folder


def load_model(
    name_or_dir: str | os.PathLike = "starter",
    device: str | torch.device = "cpu",
    allow_random: bool = False,
) -> IrisModel:
    """Load a trained IRIS model (weights, config and class memory bank) for inference.

    Arguments:
      name_or_dir: ``"starter"`` (the packaged starter weights, ``irisseg/weights/starter/``), a folder
        written by :meth:`IrisModel.save` (``config.json`` + ``model.safetensors`` [+ ``memory.safetensors``]),
        or a training run folder (its ``best/``, else ``last/``, is used). A registry name such as
        ``"iris-small"`` is refused, because it has no trained weights, unless ``allow_random``.
      device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
      allow_random (bool): with a registry name, return a randomly initialised model (for tests and
        benchmarks only; it segments nothing useful).

    Returns:
      IrisModel: in eval mode, on ``device``; ``model.config.image_size`` is its (D, H, W) grid.

    Raises:
      InputError: missing starter weights, an untrained registry name, a missing or unreadable folder.
    """
    dev = resolve_device(device)
    text = str(name_or_dir)
    if allow_random and text in CONFIGS and not Path(text).exists():
        model = build_iris(text)
    else:
        model = IrisModel.load(resolve_model_dir(name_or_dir), map_location="cpu")
    return model.to(dev).eval()


# ---------------------------------------------------------------------------------------------------
# the predictor
# ---------------------------------------------------------------------------------------------------
def _check_finite(volume: Volume, name: str) -> None:
    if volume.array.dtype.kind == "f":
        n_bad = int((~np.isfinite(volume.array)).sum())
        if n_bad:
            raise InputError(f"{name}: image contains {n_bad} NaN or infinite intensities")


def _label_dtype(labels: Sequence[int]) -> np.dtype:
    top = max(labels, default=1)
    return np.dtype(np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.int32)


class InContextSegmenter:
    """Segment queries by example with a cached task embedding (segment-anything predictor style).

    Arguments:
      model (IrisModel): a trained model (see :func:`load_model`); moved to ``device`` and put in eval mode.
      device: ``"cpu"``, ``"cuda"`` (bf16 autocast) or ``"auto"``.
      strategy (str): ``"one-shot"``, ``"ensemble"`` (default), ``"tune"`` or ``"memory"`` (see the module
        docstring).
      tune_steps (int): Adam steps of the ``tune`` strategy (10).
      threshold (float): probability above which a voxel is foreground, in (0, 1) (0.5).
      tune_lr (float): Adam learning rate of the ``tune`` strategy (1e-3).
      matching (bool): use the model's dense matching (support masks propagated to the query by feature
        attention) when it has one (True); False segments from the embedding alone, as the ``memory``
        strategy must (an ablation).
      tta (bool): mirror test-time augmentation (False). The supports and the query are mirrored *together*
        along each of the 8 combinations of the three grid axes (so left stays left), each combination is
        encoded and decoded, and the probabilities are averaged after mirroring back; the ``tune`` strategy
        tunes once and applies the same correction to every mirrored embedding. About 8x the support and
        query time. Ignored by the ``memory`` strategy (a stored embedding has no support to mirror).

    Attributes:
      task (TaskEmbedding | None): the cached task (batch 1, N classes), float32 on ``device``.
      labels (list[int]): the output label value of each of the N classes.
      timings (dict[str, float]): seconds of the last ``support`` encoding (preprocessing included),
        ``tune`` (in-context tuning; 0 for other strategies) and ``query`` (the last :meth:`segment`:
        preprocessing, decoding and mapping back to the query geometry).
    """

    def __init__(
        self,
        model: IrisModel,
        device: str | torch.device = "cpu",
        strategy: str = "ensemble",
        tune_steps: int = 10,
        threshold: float = 0.5,
        tune_lr: float = 1e-3,
        matching: bool = True,
        tta: bool = False,
    ):
        if strategy not in STRATEGIES:
            raise InputError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
        if not 0.0 < float(threshold) < 1.0:
            raise InputError(f"threshold must be between 0 and 1 (exclusive), got {threshold}")
        if int(tune_steps) < 0:
            raise InputError(f"tune steps must be >= 0, got {tune_steps}")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.strategy = strategy
        self.tune_steps = int(tune_steps)
        self.tune_lr = float(tune_lr)
        self.matching = bool(matching)
        self.threshold = float(threshold)
        self.grid = tuple(int(s) for s in model.config.image_size)
        self.preprocessor = Preprocessor(PreprocessConfig(target_shape=self.grid))
        self.tta = bool(tta)
        self._task: TaskEmbedding | None = None
        self._mirrored: list[tuple[tuple[int, ...], TaskEmbedding]] = []
        self.labels: list[int] = []
        self.class_names: list[str] | None = None
        self.timings: dict[str, float] = {"support": 0.0, "tune": 0.0, "query": 0.0}

    # -- task --------------------------------------------------------------------------------------------
    @property
    def task(self) -> TaskEmbedding | None:
        """The cached task embedding: tokens (1, N, m+1, C), prototypes (1, N, 2, C_s); None before a task is set."""
        return self._task

    @property
    def num_classes(self) -> int:
        """N, the number of classes of the cached task (0 before one is set)."""
        return 0 if self._task is None else self._task.num_classes

    def _support_channels(
        self, image: Volume, mask: Volume, labels: list[int] | None, image_name: str, mask_name: str
    ) -> list[np.ndarray]:
        """Check one support pair; return one binary (D, H, W) uint8 array per class, in the image geometry."""
        _check_finite(image, image_name)
        check_same_geometry(image, mask, image_name, mask_name)
        return mask_channels(mask, mask_name, labels)

    def _to_grid(self, image: Volume, channels: list[np.ndarray], mask_name: str) -> tuple[np.ndarray, np.ndarray]:
        """Image (1, D, H, W) float32 and masks (N, D, H, W) float32 {0, 1} on the model grid.

        Masks go through the image's GridRecord with nearest neighbour; a structure too small to keep a
        voxel that way is taken as the model-grid voxels at least half as covered as the most covered one
        (linear resampling), so a present class never vanishes.
        """
        pre = self.preprocessor(image, masks=[image.with_array(c) for c in channels])
        grid_masks = []
        for label_index, (channel, on_grid) in enumerate(zip(channels, pre.masks, strict=True)):
            arr = on_grid.array.astype(np.float32)
            if not arr.any():
                soft = pre.record.apply(image.with_array(channel.astype(np.float32)), kind="linear").array
                if soft.max() <= 0:
                    raise InputError(f"{mask_name}: structure {label_index + 1} vanishes on the model grid {self.grid}")
                arr = (soft >= 0.5 * soft.max()).astype(np.float32)
            grid_masks.append(arr)
        return pre.image.astype(np.float32), np.stack(grid_masks)

    def set_support(
        self,
        images: Sequence[Volume],
        masks: Sequence[Volume],
        labels: Sequence[int] | None = None,
        names: Sequence[str | tuple[str, str]] | None = None,
    ) -> TaskEmbedding:
        """Encode a support set (K labelled examples) into the cached task embedding.

        Each image is taken to the model grid (clip, z-score, resample its whole field of view to
        ``model.config.image_size``), its mask through the same steps (nearest neighbour). Then, by strategy:
        ``one-shot`` encodes the first support only, ``ensemble`` averages the embedding over all K, ``tune``
        refines the ensemble embedding on the K supports (``tune_steps`` Adam steps).

        Arguments:
          images (Sequence[Volume]): K support images, each (D_k, H_k, W_k) with its own geometry.
          masks (Sequence[Volume]): K masks, each in exactly its image's geometry (shape, spacing, origin,
            direction). Without ``labels``: a binary mask (one non-zero value: foreground = non-zero).
            With ``labels``: a label map holding every requested label.
          labels (Sequence[int] | None): the labels to segment, one class each (N = len(labels)); their
            values label the output of :meth:`segment`. Default: one class, output label 1.
          names (Sequence[str | tuple[str, str]] | None): how to name support k in error messages: the mask's
            file name, or an (image name, mask name) pair. Default ``support image k`` / ``support mask k``.

        Returns:
          TaskEmbedding: the cached task, tokens (1, N, m+1, C) and prototypes (1, N, 2, C_s), float32.

        Raises:
          InputError: the ``memory`` strategy (it takes no support), no support, image/mask count
            mismatch, a mask not matching its image's geometry, a non-label-map, empty or (without
            ``labels``) non-binary mask, a requested label absent from a mask, NaN intensities.
        """
        if self.strategy == "memory":
            raise InputError("strategy 'memory' takes no support: choose classes with set_memory(class_names)")
        images, masks = list(images), list(masks)
        if not images:
            raise InputError("no support given: pass at least one support image and its mask")
        if len(images) != len(masks):
            raise InputError(f"{len(images)} support images but {len(masks)} support masks: give one mask per image")
        if labels is not None:
            labels = [int(v) for v in labels]
            if not labels:
                labels = None
            elif len(set(labels)) != len(labels) or min(labels) <= 0:
                raise InputError(f"labels must be distinct positive integers, got {labels}")
        if names is not None and len(names) != len(images):
            raise InputError(f"{len(names)} names for {len(images)} supports")

        t0 = time.perf_counter()
        checked = []  # every support is checked, even those the one-shot strategy leaves out
        for k, (image, mask) in enumerate(zip(images, masks, strict=True)):
            image_name, mask_name = f"support image {k + 1}", f"support mask {k + 1}"
            if names is not None:
                given = names[k]
                if isinstance(given, (tuple, list)):
                    image_name, mask_name = str(given[0]), str(given[1])
                else:
                    mask_name = str(given)
            checked.append((image, self._support_channels(image, mask, labels, image_name, mask_name), mask_name))
        if self.strategy == "one-shot":
            checked = checked[:1]
        grid_images, grid_masks = [], []
        for image, channels, mask_name in checked:
            img, msk = self._to_grid(image, channels, mask_name)
            grid_images.append(img)
            grid_masks.append(msk)
        support_images = torch.from_numpy(np.stack(grid_images))[None].to(self.device)  # (1, K, 1, D, H, W)
        support_masks = torch.from_numpy(np.stack(grid_masks))[None].to(self.device)  # (1, K, N, D, H, W)
        task = self._encode(support_images, support_masks)
        mirrored = [(axes, self._encode(support_images.flip(axes), support_masks.flip(axes)))
                    for axes in (MIRROR_AXES[1:] if self.tta else ())]
        self.timings["support"] = time.perf_counter() - t0

        self.timings["tune"] = 0.0
        if self.strategy == "tune" and self.tune_steps > 0:
            t0 = time.perf_counter()
            start = task
            task = tune_task(self.model, task, support_images, support_masks, steps=self.tune_steps, lr=self.tune_lr)
            # The mirrored embeddings get the same correction as the unmirrored one (tuning each of them
            # would cost 8x); the correction lives in token / prototype space, which mirroring barely moves.
            delta = [b - a for a, b in zip(start.tensors(), task.tensors(), strict=True)]
            mirrored = [(axes, TaskEmbedding.from_tensors([t + d for t, d in zip(m.tensors(), delta, strict=True)],
                                                          m.keys, m.values)) for axes, m in mirrored]
            self.timings["tune"] = time.perf_counter() - t0
        self._task = task.detach()
        self._mirrored = [(axes, m.detach()) for axes, m in mirrored]
        self.labels = list(labels) if labels is not None else [1]
        self.class_names = None
        return self._task

    def _encode(self, support_images: torch.Tensor, support_masks: torch.Tensor) -> TaskEmbedding:
        """Encode grid supports (1, K, 1, D, H, W) / (1, K, N, D, H, W) into a float32 task, honouring ``matching``."""
        with torch.inference_mode(), autocast_for(self.device):
            task = self.model.encode_task(support_images, support_masks)
        task = task.map(lambda t: t.float())
        return task if self.matching else task.without_matching()

    def set_memory(self, class_names: Sequence[str], labels: Sequence[int] | None = None) -> TaskEmbedding:
        """Use the class memory bank's stored embeddings of named classes as the task (no support).

        Arguments:
          class_names (Sequence[str]): N class names stored in ``model.memory`` (see ``irisseg memory list``).
          labels (Sequence[int] | None): output label of each class (default 1..N).

        Returns:
          TaskEmbedding: the cached task, tokens (1, N, m+1, C) and prototypes (1, N, 2, C_s).

        Raises:
          InputError: no class name, a name not in the bank, or labels not matching the names.
        """
        names = [str(n) for n in class_names]
        if not names:
            raise InputError("the memory strategy needs at least one class name (--class NAME)")
        if len(set(names)) != len(names):
            raise InputError(f"class names repeat: {', '.join(names)}")
        out_labels = [int(v) for v in labels] if labels else list(range(1, len(names) + 1))
        if len(out_labels) != len(names):
            raise InputError(f"{len(out_labels)} labels for {len(names)} classes: give one label per class")
        if len(set(out_labels)) != len(out_labels) or min(out_labels) <= 0:
            raise InputError(f"labels must be distinct positive integers, got {out_labels}")
        t0 = time.perf_counter()
        task = self.model.memory.get(names)
        self._task = task.map(lambda t: t.detach().float().to(self.device))
        self._mirrored = []
        self.timings.update(support=time.perf_counter() - t0, tune=0.0)
        self.labels = out_labels
        self.class_names = names
        return self._task

    # -- queries -----------------------------------------------------------------------------------------
    def predict_probabilities(self, volume: Volume, name: str = "query") -> list[Volume]:
        """Per-class foreground probabilities of a query, in the query's exact geometry.

        Arguments:
          volume (Volume): the query image (D, H, W), any geometry.
          name (str): how to name the query in error messages.

        Returns:
          list[Volume]: N float32 volumes with values in [0, 1], in the order of :attr:`labels`, each with
          exactly the query's shape, spacing, origin and direction (model-grid probabilities mapped back
          with linear interpolation).
        """
        if self._task is None:
            if self.strategy == "memory":
                raise InputError("the memory strategy needs class names: call set_memory([...]) (--class NAME)")
            raise InputError("no task yet: call set_support(images, masks) first")
        _check_finite(volume, name)
        t0 = time.perf_counter()
        pre = self.preprocessor(volume)
        query = torch.from_numpy(pre.image)[None].to(self.device)  # (1, 1, D, H, W)
        passes = [((), self._task), *self._mirrored]
        with torch.inference_mode(), autocast_for(self.device):
            total = None
            for axes, task in passes:  # mirrored passes: query mirrored like its supports, result mirrored back
                logits = self.model.decode(query.flip(axes) if axes else query, task)  # (1, N, D, H, W)
                p = torch.sigmoid(logits.float())
                p = p.flip(axes) if axes else p
                total = p if total is None else total + p
            probs = (total / len(passes))[0].cpu().numpy()
        out = []
        for channel in probs:
            back = pre.record.invert(channel.astype(np.float32), kind="linear")
            out.append(back.with_array(np.clip(back.array, 0.0, 1.0).astype(np.float32, copy=False)))
        self.timings["query"] = time.perf_counter() - t0
        return out

    def labels_from_probabilities(self, probabilities: Sequence[Volume]) -> Volume:
        """Threshold per-class probabilities into a label map.

        Arguments:
          probabilities (Sequence[Volume]): N float volumes in one geometry, ordered as :attr:`labels`.

        Returns:
          Volume: label map in the same geometry (uint8 for labels up to 255): 0 where no class exceeds the
          threshold, else the label of the most probable class (``labels[argmax]``).
        """
        stack = np.stack([p.array for p in probabilities])  # (N, D, H, W)
        values = np.asarray(self.labels, dtype=_label_dtype(self.labels))
        out = np.where(stack.max(0) > self.threshold, values[stack.argmax(0)], 0).astype(values.dtype)
        return probabilities[0].with_array(out)

    def segment(self, volume: Volume, return_probabilities: bool = False, name: str = "query") -> Volume | list[Volume]:
        """Segment a query with the cached task.

        The query is taken to the model grid (clip, z-score, resample), decoded under
        ``torch.inference_mode()`` (bf16 autocast on CUDA), and the sigmoid probabilities are mapped back
        to the query's geometry (linear interpolation) before thresholding there.

        Arguments:
          volume (Volume): the query image (D, H, W); any shape, spacing (mm), origin and direction.
          return_probabilities (bool): return probabilities instead of the label map.
          name (str): how to name the query in error messages.

        Returns:
          Volume | list[Volume]: by default the label map, exactly the query's shape, spacing, origin and
          direction; uint8 (for labels up to 255); values 0 and the task's :attr:`labels` (1 for a binary
          task): a voxel gets the label of its most probable class when that probability exceeds the
          threshold. With ``return_probabilities``: for one class a float32 Volume in [0, 1]; for N > 1
          classes a list of N such Volumes, ordered as :attr:`labels` (a Volume holds one 3D array).

        Raises:
          InputError: no task set yet (or the memory strategy without class names), NaN intensities.
        """
        probs = self.predict_probabilities(volume, name=name)
        if return_probabilities:
            return probs[0] if len(probs) == 1 else probs
        return self.labels_from_probabilities(probs)
