"""Segmentation losses on logits, with MONAI's call shapes: ``loss(logits (B, N, ...), target (B, N, ...))``.

Every loss takes raw logits (before the sigmoid) and a target of the same shape with values in [0, 1]
(one channel per class, not one-hot over a softmax), and reduces over the spatial dimensions per
(batch item, class) before the ``reduction`` over batch and classes:

* ``"mean"`` (default): a scalar, the mean over the (B, N) entries;
* ``"sum"``: a scalar, their sum;
* ``"none"``: a (B, N) tensor.

Losses are computed in float32 whatever the input dtype (bf16 logits from autocast included).

The overlap losses share one soft core: with ``p = sigmoid(logits)`` and ``g = target`` summed over the
voxels of each (batch item, class), ``TP = sum p g``, ``FP = sum p - TP``, ``FN = sum g - TP`` and the
Tversky index ``(TP + s_nr) / (TP + alpha FP + beta FN + s_dr)``. Soft Dice is its ``alpha = beta = 1/2``
case (with the smoothing halved); :func:`tversky_loss` weighs false negatives more (``beta > alpha``) to
favour recall; :func:`dice_bce_loss` and :func:`focal_dice_loss` add a voxel-wise term to the Dice.
:func:`get_loss` picks one by name (``LOSSES``) and :func:`deep_supervision_loss` applies one to a
network's list of multi-resolution outputs.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from irisseg.errors import InputError

__all__ = [
    "soft_dice_loss",
    "dice_bce_loss",
    "tversky_loss",
    "focal_dice_loss",
    "deep_supervision_loss",
    "get_loss",
    "batch_dice",
    "blob_loss",
    "DEEP_SUPERVISION_TARGETS",
    "finding_map_loss",
    "LOSSES",
    "territory_base_loss",
    "spatial_consistency_loss",
    "complementary_loss",
    "multiscale_spatial_loss",
    "adaptive_spatial_weight",
    "TerritoryLoss",
]

Reduction = Literal["mean", "sum", "none"]


def _reduce(loss: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _check(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    if logits.ndim < 3:
        raise ValueError(f"expected (B, N, *spatial) tensors, got shape {tuple(logits.shape)}")


def _soft_counts(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft true positives, false positives and false negatives per (batch item, class).

    ``TP = sum_v p g``, ``FP = sum_v p - TP``, ``FN = sum_v g - TP`` with ``p = sigmoid(logits)``, each
    (B, N) float32, from (B, N, *spatial) logits and targets of the same shape.
    """
    _check(logits, target)
    prob = torch.sigmoid(logits.float())
    tgt = target.float()
    dims = tuple(range(2, logits.ndim))
    tp = (prob * tgt).sum(dims)
    return tp, prob.sum(dims) - tp, tgt.sum(dims) - tp


def _tversky_core(logits: torch.Tensor, target: torch.Tensor, alpha: float, beta: float, smooth_nr: float,
                  smooth_dr: float) -> torch.Tensor:
    """``1 - (TP + smooth_nr) / (TP + alpha FP + beta FN + smooth_dr)`` per (batch item, class): (B, N)."""
    tp, fp, fn = _soft_counts(logits, target)
    return 1.0 - (tp + smooth_nr) / (tp + alpha * fp + beta * fn + smooth_dr)


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    reduction: Reduction = "mean",
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
) -> torch.Tensor:
    """Soft Dice loss on sigmoid probabilities, per sample and class.

    With ``p = sigmoid(logits)`` and ``g = target``, summing over the spatial voxels ``v`` of each
    (batch item ``b``, class ``n``)::

        dice_loss[b, n] = 1 - (2 * sum_v p * g + smooth_nr) / (sum_v p + sum_v g + smooth_dr)

    This is MONAI's ``DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5, batch=False)`` with the same
    defaults. An empty target with an empty prediction gives a loss near 0 (``smooth_nr / smooth_dr``
    = 1 makes the ratio 1).

    Arguments:
      logits (torch.Tensor): (B, N, *spatial) raw scores, e.g. (B, N, D, H, W).
      target (torch.Tensor): same shape, values in [0, 1] (a binary mask per class).
      reduction: ``"mean"`` | ``"sum"`` | ``"none"`` over the (B, N) entries.
      smooth_nr, smooth_dr (float): smoothing added to the numerator and the denominator.

    Returns:
      torch.Tensor: float32 scalar, or (B, N) with ``reduction="none"``; each entry in [0, 1].
    """
    # 1 - (2 TP + s_nr) / (2 TP + FP + FN + s_dr) = 1 - (TP + s_nr / 2) / (TP + FP / 2 + FN / 2 + s_dr / 2)
    loss = _tversky_core(logits, target, 0.5, 0.5, 0.5 * smooth_nr, 0.5 * smooth_dr)
    return _reduce(loss, reduction)


def dice_bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    reduction: Reduction = "mean",
    smooth: float = 1e-5,
    dice_weight: float = 1.0,
    bce_weight: float = 1.0,
) -> torch.Tensor:
    """Soft Dice plus binary cross-entropy, the loss of the in-context model (training and tuning).

    Per (batch item ``b``, class ``n``), with ``V`` voxels::

        bce[b, n]  = -(1 / V) * sum_v [g * log(sigmoid(x)) + (1 - g) * log(1 - sigmoid(x))]
        loss[b, n] = dice_weight * dice_loss[b, n] + bce_weight * bce[b, n]

    with ``dice_loss`` from :func:`soft_dice_loss` (smooth_nr = smooth_dr = ``smooth``) and the BCE
    computed stably from the logits (``F.binary_cross_entropy_with_logits``).

    Arguments:
      logits (torch.Tensor): (B, N, *spatial) raw scores, e.g. the model's (B, N, D, H, W) output.
      target (torch.Tensor): same shape, values in [0, 1].
      reduction: ``"mean"`` (scalar, default) | ``"sum"`` | ``"none"`` ((B, N)).
      smooth (float): Dice smoothing (1e-5).
      dice_weight, bce_weight (float): weights of the two terms.

    Returns:
      torch.Tensor: float32 scalar, or (B, N) with ``reduction="none"``. A perfect, confident prediction
      (large logits of the right sign) gives a value near 0.
    """
    _check(logits, target)
    dice = soft_dice_loss(logits, target, reduction="none", smooth_nr=smooth, smooth_dr=smooth)
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    bce = bce.flatten(2).mean(-1)  # (B, N)
    return _reduce(dice_weight * dice + bce_weight * bce, reduction)


def tversky_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 0.3,
    beta: float = 0.7,
    reduction: Reduction = "mean",
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
) -> torch.Tensor:
    """Tversky loss on sigmoid probabilities (Salehi et al. 2017), per sample and class.

    With ``p = sigmoid(logits)``, ``g = target`` and sums over the spatial voxels ``v`` of each
    (batch item ``b``, class ``n``)::

        TP = sum_v p * g        FP = sum_v p * (1 - g)        FN = sum_v (1 - p) * g
        tversky_loss[b, n] = 1 - (TP + smooth_nr) / (TP + alpha * FP + beta * FN + smooth_dr)

    ``beta > alpha`` penalises missed foreground more than false alarms, trading precision for recall
    (the default 0.3 / 0.7 is the usual choice for small lesions). ``alpha = beta = 0.5`` gives the soft
    Dice loss of :func:`soft_dice_loss` (exactly so when the smoothing here is half of Dice's). This is
    MONAI's ``TverskyLoss(sigmoid=True, alpha=alpha, beta=beta, smooth_nr=1e-5, smooth_dr=1e-5,
    batch=False)`` with the same defaults for the smoothing.

    Arguments:
      logits (torch.Tensor): (B, N, *spatial) raw scores, e.g. (B, N, D, H, W).
      target (torch.Tensor): same shape, values in [0, 1] (a binary mask per class).
      alpha (float): weight of the false positives. beta (float): weight of the false negatives.
      reduction: ``"mean"`` | ``"sum"`` | ``"none"`` over the (B, N) entries.
      smooth_nr, smooth_dr (float): smoothing added to the numerator and the denominator.

    Returns:
      torch.Tensor: float32 scalar, or (B, N) with ``reduction="none"``; each entry in [0, 1] (near 0 for
      a confident, perfect prediction, also of an empty target).
    """
    return _reduce(_tversky_core(logits, target, alpha, beta, smooth_nr, smooth_dr), reduction)


def _focal_bce(logits: torch.Tensor, target: torch.Tensor, gamma: float, alpha: float | None) -> torch.Tensor:
    """Voxel-wise sigmoid focal loss, (B, N, *spatial) float32 (see :func:`focal_dice_loss`)."""
    x, g = logits.float(), target.float()
    bce = F.binary_cross_entropy_with_logits(x, g, reduction="none")
    # 1 - p_t = sigmoid(-x) where g = 1 and sigmoid(x) where g = 0; in log space for stability
    loss = torch.exp(gamma * F.logsigmoid(-x * (2.0 * g - 1.0))) * bce
    if alpha is not None:
        loss = (alpha * g + (1.0 - alpha) * (1.0 - g)) * loss
    return loss


def focal_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: float | None = None,
    reduction: Reduction = "mean",
    smooth: float = 1e-5,
    dice_weight: float = 1.0,
    focal_weight: float = 1.0,
) -> torch.Tensor:
    """Soft Dice plus the sigmoid focal loss (Lin et al. 2017): "focal-Dice" as MONAI's ``DiceFocalLoss``.

    Per (batch item ``b``, class ``n``), with ``V`` voxels, ``p = sigmoid(x)`` and ``p_t = p`` where
    ``g = 1``, ``1 - p`` where ``g = 0``::

        focal[b, n] = (1 / V) * sum_v a_t * (1 - p_t)**gamma * bce_v
        loss[b, n]  = dice_weight * dice_loss[b, n] + focal_weight * focal[b, n]

    with ``bce_v = -[g log p + (1 - g) log(1 - p)]``, ``a_t = alpha`` where ``g = 1`` and ``1 - alpha``
    where ``g = 0`` (``a_t = 1`` when ``alpha`` is None), and ``dice_loss`` from :func:`soft_dice_loss`
    (smooth_nr = smooth_dr = ``smooth``). The focal factor ``(1 - p_t)**gamma`` turns down the
    cross-entropy of the many easy background voxels, so the few hard (lesion-border, small-lesion)
    voxels dominate the voxel-wise term; ``gamma = 0`` and ``alpha = None`` give :func:`dice_bce_loss`.
    This is MONAI's ``DiceFocalLoss(sigmoid=True, gamma=gamma, alpha=alpha, smooth_nr=smooth,
    smooth_dr=smooth, lambda_dice=dice_weight, lambda_focal=focal_weight)`` with ``reduction="mean"``.

    Arguments:
      logits (torch.Tensor): (B, N, *spatial) raw scores, e.g. (B, N, D, H, W).
      target (torch.Tensor): same shape, values in {0, 1} (a binary mask per class).
      gamma (float): focusing exponent (>= 0; 2 is the usual value).
      alpha (float | None): weight of the foreground voxels in the focal term (background: ``1 - alpha``).
      reduction: ``"mean"`` (scalar, default) | ``"sum"`` | ``"none"`` ((B, N)).
      smooth (float): Dice smoothing (1e-5).
      dice_weight, focal_weight (float): weights of the two terms.

    Returns:
      torch.Tensor: float32 scalar, or (B, N) with ``reduction="none"``; near 0 for a confident, perfect
      prediction.
    """
    if gamma < 0:
        raise ValueError(f"gamma must be non-negative, got {gamma}")
    dice = soft_dice_loss(logits, target, reduction="none", smooth_nr=smooth, smooth_dr=smooth)
    focal = _focal_bce(logits, target, gamma, alpha).flatten(2).mean(-1)  # (B, N)
    return _reduce(dice_weight * dice + focal_weight * focal, reduction)


#: How :func:`deep_supervision_loss` pools a target to a coarser output (its ``mode`` choices).
DEEP_SUPERVISION_TARGETS = ("area", "max")


def _downsample_target(target: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    """``target`` (B, N, *spatial) pooled to (B, N, *size): fraction covered ("area") or any voxel set ("max")."""
    if tuple(target.shape[2:]) == tuple(size):
        return target
    spatial = target.ndim - 2
    pools = {
        "area": {2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d},
        "max": {2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d},
    }
    if mode not in DEEP_SUPERVISION_TARGETS:
        raise ValueError(f"mode must be 'area' or 'max', got {mode!r}")
    if spatial not in (2, 3):
        raise ValueError(f"deep supervision needs 2D or 3D targets, got shape {tuple(target.shape)}")
    return pools[mode][spatial](target.float(), tuple(int(s) for s in size))


def deep_supervision_loss(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    outputs: torch.Tensor | Sequence[torch.Tensor],
    target: torch.Tensor,
    weights: Sequence[float] | None = None,
    mode: str = "area",
) -> torch.Tensor:
    """A loss over a network's multi-resolution outputs (deep supervision), nnU-Net style.

    ``loss = sum_k w_k * loss_fn(outputs[k], target_k)`` where ``target_k`` is ``target`` pooled to the
    spatial size of ``outputs[k]``: ``"area"`` (default) the fraction of each coarse voxel covered by the
    mask (soft targets in [0, 1]), ``"max"`` 1 where any covered voxel is foreground (keeps every small
    lesion visible at coarse scales). Pooling is exact box pooling when the target's size is a multiple of
    the output's (train on patches that are multiples of the network's total stride); otherwise adaptive
    pooling, which is only approximately aligned with :class:`~irisseg.models.unet.ResidualUNet`'s
    end-padding.

    Arguments:
      loss_fn: ``loss_fn(logits, target) -> scalar``, e.g. ``get_loss("tversky")``.
      outputs (torch.Tensor | Sequence[torch.Tensor]): one (B, N, *spatial) logit tensor (then this is just
        ``loss_fn(outputs, target)``) or the list ``[main (B, N, D, H, W), aux_1 (B, N, d1, h1, w1), ...]``
        of a deep-supervised network in training mode.
      target (torch.Tensor): (B, N, D, H, W) full-resolution target, values in [0, 1].
      weights (Sequence[float] | None): one weight per output; None: ``2**-k`` for output ``k``,
        normalised to sum to 1 (nnU-Net's weighting).
      mode (str): ``"area"`` or ``"max"`` (see above).

    Returns:
      torch.Tensor: float32 scalar.
    """
    if isinstance(outputs, torch.Tensor):
        return loss_fn(outputs, target)
    outputs = list(outputs)
    if not outputs:
        raise ValueError("deep_supervision_loss needs at least one output")
    if weights is None:
        raw = [2.0**-k for k in range(len(outputs))]
        weights = [w / sum(raw) for w in raw]
    if len(weights) != len(outputs):
        raise ValueError(f"got {len(weights)} weights for {len(outputs)} outputs")
    total = torch.zeros((), dtype=torch.float32, device=target.device)
    for w, out in zip(weights, outputs):
        if w:
            total = total + w * loss_fn(out, _downsample_target(target, out.shape[2:], mode))
    return total


#: The losses :func:`get_loss` knows, by name (the ``--loss`` choices of ``irisseg lesion train``).
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "dice_bce": dice_bce_loss,
    "tversky": tversky_loss,
    "focal_dice": focal_dice_loss,
}


def batch_dice(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
               ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Make a loss count its overlap over the whole batch at once ("batch Dice", as nnU-Net trains).

    The batch is folded into the voxels: ``(B, N, *spatial)`` becomes ``(1, N, B * prod(spatial))`` before
    ``loss_fn`` sees it, so TP / FP / FN are summed over every patch of the batch per class (MONAI's
    ``DiceLoss(batch=True)``). Voxel-wise terms (BCE, focal) keep the same value. With lesion-aware
    patches this matters: a patch without lesion has no soft Dice to learn from on its own (its loss is
    about 1 whatever the prediction), while in the batch sum its false positives count.

    Arguments:
      loss_fn: any loss of this module (or ``get_loss(...)``), ``(logits, target) -> loss``.

    Returns:
      Callable: ``loss(logits (B, N, *spatial), target (B, N, *spatial)) -> torch.Tensor``.
    """

    def folded(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check(logits, target)
        n = logits.shape[1]
        return loss_fn(logits.transpose(0, 1).reshape(1, n, -1), target.transpose(0, 1).reshape(1, n, -1))

    return folded


def blob_loss(loss_fn: Callable[..., torch.Tensor], logits: torch.Tensor, instances: torch.Tensor) -> torch.Tensor:
    """The instance-wise ("blob") term of Kofler et al., "blob loss" (IPMI 2023): every lesion counts once.

    A global Dice is dominated by the large lesions of a batch: missing a 6-voxel lesion next to a
    600-voxel one costs about 1% of it. Here each instance (connected component) ``k`` of batch item ``b``
    gets the loss on its own: the target is instance ``k``, and the item's other instances are left out
    (their logits set to a large negative value and their targets to 0, so they add nothing to the soft
    overlap and about nothing to a voxel-wise term). The per-instance losses are averaged, so a missed small
    lesion costs as much as a missed large one. Add it to the global loss with a weight (the paper weighs the
    global term 2 and this term 1).

    Arguments:
      loss_fn: a loss of this module taking ``reduction="none"`` (e.g. ``get_loss("dice_bce")``), evaluated
        per (batch item, instance); not wrapped by :func:`batch_dice`.
      logits (torch.Tensor): (B, 1, *spatial) raw scores of one class.
      instances (torch.Tensor): (B, 1, *spatial) integer map: 0 outside the lesions, ``1..n_b`` on the
        ``n_b`` connected components of item ``b`` (e.g. ``scipy.ndimage.label`` of its mask).

    Returns:
      torch.Tensor: float32 scalar, the mean over the instances of the batch; 0 (with a gradient path)
      when the batch has none.
    """
    if logits.ndim < 3 or logits.shape[1] != 1 or instances.shape != logits.shape:
        raise ValueError(f"expected logits and instances of one shape (B, 1, *spatial), got {tuple(logits.shape)} "
                         f"and {tuple(instances.shape)}")
    n = int(instances.max()) if instances.numel() else 0
    if n < 1:
        return logits.float().sum() * 0.0
    ids = torch.arange(1, n + 1, device=instances.device).view(1, n, *([1] * (logits.ndim - 2)))
    inst = instances.long()
    target = inst == ids  # (B, n, *spatial): instance k of each item
    others = (inst > 0) & ~target
    x = logits.float().expand(-1, n, *logits.shape[2:]).masked_fill(others, -1e4)
    per = loss_fn(x, target.float(), reduction="none")  # (B, n)
    present = target.flatten(2).any(-1)
    return per[present].mean()


def finding_map_loss(map_logits: torch.Tensor, finding_map: torch.Tensor) -> torch.Tensor:
    """Dense auxiliary loss of the retrieval network's finding-map head (where each finding is).

    ``target[b, k]`` is 1 where ``finding_map[b] == k + 1``, max-pooled to the logits' size (a coarse voxel
    is positive when any voxel it covers carries finding k, so small findings stay visible); then
    ``loss = dice_bce_loss`` with the overlap counted over the whole batch per finding
    (:func:`batch_dice`), so a finding absent from one case still has a Dice term through the others.

    Arguments:
      map_logits (torch.Tensor): (B, L, d, h, w) logits, e.g. ``EmbeddingNet(...)(x)["maps"]``.
      finding_map (torch.Tensor): (B, D, H, W) integer map, ``k + 1`` where finding k is, 0 elsewhere
        (:func:`irisseg.data.findings.retrieval_map`); D, H, W >= d, h, w.

    Returns:
      torch.Tensor: float32 scalar.
    """
    if map_logits.ndim != 5 or finding_map.ndim != 4 or finding_map.shape[0] != map_logits.shape[0]:
        raise ValueError(f"expected logits (B, L, d, h, w) and a map (B, D, H, W), got {tuple(map_logits.shape)} "
                         f"and {tuple(finding_map.shape)}")
    classes = torch.arange(1, map_logits.shape[1] + 1, device=finding_map.device).view(1, -1, 1, 1, 1)
    target = (finding_map.long()[:, None] == classes).float()
    target = _downsample_target(target, map_logits.shape[2:], "max")
    return batch_dice(dice_bce_loss)(map_logits.float(), target)


def get_loss(name: str, **kwargs) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss called ``name`` with its options bound: ``get_loss("tversky", alpha=0.3, beta=0.7)``.

    Arguments:
      name (str): a key of :data:`LOSSES` (``dice_bce``, ``tversky``, ``focal_dice``; ``-`` is read as ``_``).
      **kwargs: keyword options of that loss (e.g. ``alpha``, ``beta``, ``gamma``, ``reduction``).

    Returns:
      Callable: ``loss(logits (B, N, *spatial), target (B, N, *spatial)) -> torch.Tensor``.

    Raises:
      InputError: an unknown name, or an option the loss does not take.
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in LOSSES:
        raise InputError(f"unknown loss {name!r} (choose from {', '.join(LOSSES)})")
    fn = LOSSES[key]
    params = inspect.signature(fn).parameters
    bad = sorted(k for k in kwargs if k not in params or k in ("logits", "target"))
    if bad:
        options = ", ".join(k for k in params if k not in ("logits", "target"))
        raise InputError(f"loss {key!r} takes no option(s) {', '.join(bad)} (options: {options})")
    return functools.partial(fn, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# two-channel territory losses
# ---------------------------------------------------------------------------------------------------------
#
# Two territories predicted as two independent sigmoid channels: channel 0 = territory 1, channel 1 =
# territory 2, logits and targets (B, 2, H, W) or (B, 2, D, H, W), targets in {0, 1}. The territories may
# touch or overlap; the auxiliary terms below only look at how the two channels relate to each other and
# to the two targets. Below ``p1, p2`` are the sigmoid probabilities of the two channels, ``t1, t2`` the
# two targets, and ``mean`` is taken over every voxel of every batch item.


def _check_territory(pred: torch.Tensor, target: torch.Tensor, what: str = "logits") -> None:
    """Both tensors (B, 2, H, W) or (B, 2, D, H, W) and of the same shape, else ValueError."""
    if pred.shape != target.shape:
        raise ValueError(f"{what} {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.ndim not in (4, 5) or pred.shape[1] != 2:
        raise ValueError(f"territory losses need (B, 2, H, W) or (B, 2, D, H, W) tensors, "
                         f"got shape {tuple(pred.shape)}")


def _channels(prob: torch.Tensor, target: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``p1, p2, t1, t2`` as float32 (B, *spatial) tensors after the shape check."""
    _check_territory(prob, target, "prob")
    p, t = prob.float(), target.float()
    return p[:, 0], p[:, 1], t[:, 0], t[:, 1]


def territory_base_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-channel BCE plus soft Dice: the base loss of every territory configuration.

    With ``bce_c`` the binary cross-entropy of channel ``c`` averaged over the batch items and voxels, and
    ``dice_c`` the soft Dice loss of channel ``c`` (:func:`soft_dice_loss`, per batch item, then averaged
    over the batch)::

        base = 0.5 * bce_0 + 0.5 * bce_1 + (dice_0 + dice_1) / 2

    The Dice part is MONAI's ``DiceLoss(sigmoid=True)`` (smooth_nr = smooth_dr = 1e-5, batch=False,
    mean reduction); each BCE is ``torch.nn.BCEWithLogitsLoss()`` on that channel.

    Arguments:
      logits (torch.Tensor): (B, 2, H, W) or (B, 2, D, H, W) raw scores, any float dtype.
      target (torch.Tensor): same shape, values in {0, 1}.

    Returns:
      torch.Tensor: float32 scalar.

    Raises:
      ValueError: shapes differ, or are not (B, 2, *spatial) with 2 or 3 spatial dimensions.
    """
    _check_territory(logits, target)
    x, g = logits.float(), target.float()
    bce = F.binary_cross_entropy_with_logits(x, g, reduction="none").flatten(2).mean(-1).mean(0)  # (2,)
    dice = soft_dice_loss(x, g, reduction="mean")
    return 0.5 * bce[0] + 0.5 * bce[1] + dice


def spatial_consistency_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Penalise overlap, missing coverage and channel swaps between the two territory channels.

    With ``[.]`` the indicator (1 where true, else 0) and every mean over all voxels and batch items::

        overlap     = mean(p1 * p2 * [t1 + t2 <= 1])
        coverage    = mean((clamp(p1 + p2, 0, 1) - clamp(t1 + t2, 0, 1)) ** 2)
        exclusivity = mean(p1 * t2 * (1 - t1) + p2 * t1 * (1 - t2))
        loss        = overlap + coverage + exclusivity

    ``overlap`` is predicted overlap where the targets do not overlap, ``coverage`` the squared error of the
    predicted union against the target union, ``exclusivity`` a channel predicted where only the other
    territory is. Binary probabilities equal to the targets give exactly 0.

    Arguments:
      prob (torch.Tensor): (B, 2, H, W) or (B, 2, D, H, W) sigmoid probabilities in [0, 1].
      target (torch.Tensor): same shape, values in {0, 1}.

    Returns:
      torch.Tensor: float32 scalar, >= 0 (at most 3).

    Raises:
      ValueError: shapes differ, or are not (B, 2, *spatial) with 2 or 3 spatial dimensions.
    """
    p1, p2, t1, t2 = _channels(prob, target)
    overlap = (p1 * p2 * (t1 + t2 <= 1).float()).mean()
    coverage = ((torch.clamp(p1 + p2, 0.0, 1.0) - torch.clamp(t1 + t2, 0.0, 1.0)) ** 2).mean()
    exclusivity = (p1 * t2 * (1.0 - t1) + p2 * t1 * (1.0 - t2)).mean()
    return overlap + coverage + exclusivity


def complementary_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Exclusivity outside both territories plus agreement of the predicted union's volume fraction.

    With ``mean`` over all voxels and batch items, ``mean_v`` over the voxels of one batch item ``b`` and
    ``B`` batch items::

        exclusivity = mean(p1 * p2 * (1 - t1) * (1 - t2))
        coverage    = (1 / B) * sum_b (mean_v max(p1, p2) - mean_v max(t1, t2)) ** 2
        loss        = exclusivity + coverage

    ``exclusivity`` is both channels on where neither target is; ``coverage`` compares the fraction of each
    volume covered by the predicted union with the target's. Binary probabilities equal to the targets give
    exactly 0.

    Arguments:
      prob (torch.Tensor): (B, 2, H, W) or (B, 2, D, H, W) sigmoid probabilities in [0, 1].
      target (torch.Tensor): same shape, values in {0, 1}.

    Returns:
      torch.Tensor: float32 scalar, >= 0 (at most 2).

    Raises:
      ValueError: shapes differ, or are not (B, 2, *spatial) with 2 or 3 spatial dimensions.
    """
    p1, p2, t1, t2 = _channels(prob, target)
    exclusivity = (p1 * p2 * (1.0 - t1) * (1.0 - t2)).mean()
    frac_pred = torch.maximum(p1, p2).flatten(1).mean(-1)  # (B,)
    frac_true = torch.maximum(t1, t2).flatten(1).mean(-1)
    coverage = ((frac_pred - frac_true) ** 2).mean()
    return exclusivity + coverage


def _scaled_size(shape: Sequence[int], scale: float) -> tuple[int, ...]:
    """``floor(n * scale)`` per spatial size, at least 1 (a tiny epsilon absorbs float error)."""
    return tuple(max(1, int(math.floor(int(n) * scale + 1e-9))) for n in shape)


def multiscale_spatial_loss(prob: torch.Tensor, target: torch.Tensor,
                            scales: Sequence[float] = (1.0, 0.5, 0.25)) -> torch.Tensor:
    """:func:`spatial_consistency_loss` averaged over several resolutions.

    For each scale ``s`` the spatial size ``n`` of every axis becomes ``max(1, floor(n * s))``;
    probabilities are resized with ``F.interpolate`` (bilinear in 2D, trilinear in 3D,
    ``align_corners=False``), targets with ``mode="nearest"``, and a scale that keeps the size (1.0) uses
    the tensors as they are::

        loss = (1 / S) * sum_{s in scales} spatial_consistency_loss(resize(prob, s), nearest(target, s))

    Binary probabilities equal to the targets give exactly 0 at scale 1; at a coarser scale the
    interpolated probabilities and the nearest-neighbour targets differ near territory borders, so the
    loss of a perfect prediction is small but not 0 (it is 0 when the targets are constant on aligned
    blocks of ``1 / s`` voxels).

    Arguments:
      prob (torch.Tensor): (B, 2, H, W) or (B, 2, D, H, W) sigmoid probabilities in [0, 1].
      target (torch.Tensor): same shape, values in {0, 1}.
      scales (Sequence[float]): positive resize factors (default 1, 1/2, 1/4).

    Returns:
      torch.Tensor: float32 scalar.

    Raises:
      ValueError: bad shapes, no scales, or a scale that is not positive.
    """
    _check_territory(prob, target, "prob")
    scales = [float(s) for s in scales]
    if not scales:
        raise ValueError("multiscale_spatial_loss needs at least one scale")
    if any(not (s > 0 and math.isfinite(s)) for s in scales):
        raise ValueError(f"scales must be positive, got {scales}")
    p, t = prob.float(), target.float()
    mode = "bilinear" if p.ndim == 4 else "trilinear"
    total = torch.zeros((), dtype=torch.float32, device=p.device)
    for s in scales:
        size = _scaled_size(p.shape[2:], s)
        if size == tuple(p.shape[2:]):
            ps, ts = p, t
        else:
            ps = F.interpolate(p, size=size, mode=mode, align_corners=False).float()
            ts = F.interpolate(t, size=size, mode="nearest").float()
        total = total + spatial_consistency_loss(ps, ts)
    return total / len(scales)


def adaptive_spatial_weight(progress: float, start: float = 0.05, end: float = 0.15) -> float:
    """Weight of the spatial term growing linearly over training.

    ``weight = start + (end - start) * clamp(progress, 0, 1)``: 0.05 at the start (progress 0), 0.10
    half-way, 0.15 at the end (progress 1) with the defaults.

    Arguments:
      progress (float): fraction of training done, e.g. ``epoch / max_epochs`` (clamped to [0, 1]).
      start, end (float): the weights at progress 0 and 1.

    Returns:
      float: the weight.
    """
    progress = float(progress)
    if math.isnan(progress):
        raise ValueError("progress is NaN")
    progress = min(1.0, max(0.0, progress))
    return float(start) + (float(end) - float(start)) * progress


@dataclass(frozen=True)
class TerritoryLoss:
    """The loss of one territory configuration: base + weighted spatial and complementary terms.

    With ``p = sigmoid(logits)`` (float32)::

        total = territory_base_loss(logits, target)
                + w_s    * S(p, target)                       if spatial
                + weight * complementary_loss(p, target)      if complementary

    where ``S`` is :func:`multiscale_spatial_loss` when ``multiscale`` else
    :func:`spatial_consistency_loss`, and ``w_s = adaptive_spatial_weight(progress)`` when ``adaptive``
    else ``weight``. ``multiscale`` and ``adaptive`` imply ``spatial`` (set to True when either is).

    Fields:
      spatial, complementary, multiscale, adaptive (bool): which terms are on (all off: base loss only).
      weight (float): weight of the complementary term, and of the spatial term unless ``adaptive``.

    Call: ``loss(logits (B, 2, *spatial), target (B, 2, *spatial), progress=0.0) -> float32 scalar``,
    the same as ``loss.components(...)["total"]``; ``progress`` (training fraction in [0, 1]) only matters
    with ``adaptive``. Computed in float32 whatever the input dtype (bf16 autocast included).
    """

    spatial: bool = False
    complementary: bool = False
    multiscale: bool = False
    adaptive: bool = False
    weight: float = 0.1

    def __post_init__(self) -> None:
        if not (math.isfinite(float(self.weight)) and float(self.weight) >= 0):
            raise ValueError(f"weight must be a finite non-negative number, got {self.weight}")
        if self.multiscale or self.adaptive:
            object.__setattr__(self, "spatial", True)

    def spatial_weight(self, progress: float = 0.0) -> float:
        """Weight of the spatial term at ``progress`` (0 when the term is off). Returns a float."""
        if not self.spatial:
            return 0.0
        return adaptive_spatial_weight(progress) if self.adaptive else float(self.weight)

    def components(self, logits: torch.Tensor, target: torch.Tensor, progress: float = 0.0
                   ) -> dict[str, torch.Tensor]:
        """Every term of the loss, for logging.

        Arguments:
          logits (torch.Tensor): (B, 2, H, W) or (B, 2, D, H, W) raw scores, any float dtype.
          target (torch.Tensor): same shape, values in {0, 1}.
          progress (float): training fraction in [0, 1] (used with ``adaptive``).

        Returns:
          dict[str, torch.Tensor]: float32 scalars ``base``, ``spatial`` and ``complementary`` (the
          unweighted terms; 0 for a term that is off) and ``total`` (the weighted sum, see the class).

        Raises:
          ValueError: shapes differ, or are not (B, 2, *spatial) with 2 or 3 spatial dimensions.
        """
        _check_territory(logits, target)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            x, g = logits.float(), target.float()
            base = territory_base_loss(x, g)
            zero = torch.zeros((), dtype=torch.float32, device=x.device)
            prob = torch.sigmoid(x) if (self.spatial or self.complementary) else None
            spatial = zero
            if self.spatial:
                spatial = multiscale_spatial_loss(prob, g) if self.multiscale else spatial_consistency_loss(prob, g)
            comp = complementary_loss(prob, g) if self.complementary else zero
            total = base + self.spatial_weight(progress) * spatial + float(self.weight) * comp
        return {"base": base, "spatial": spatial, "complementary": comp, "total": total}

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, progress: float = 0.0) -> torch.Tensor:
        """The total loss, a float32 scalar; see the class docstring for the shapes and formula."""
        return self.components(logits, target, progress)["total"]


# ===================================================================================================
# retrieval losses: triplet (metric learning) and soft micro-F1 (multi-label classification)
# ===================================================================================================
#
# A batch of B cases, each with a unit-norm embedding (B, E) and a multi-hot findings vector (B, L). Two
# different cases are a *positive* pair when they share at least one finding, a *negative* pair when they
# share none; a case is never paired with itself. A case without any finding has no positive (it can only
# be somebody's negative).

__all__ += ["TRIPLET_MINING", "pairwise_squared_distances", "triplet_masks", "triplet_loss", "soft_micro_f1_loss"]

#: Triplet mining strategies of :func:`triplet_loss`.
TRIPLET_MINING = ("batch_hard", "semi_hard")


def _check_retrieval_pair(x: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    if x.ndim != 2 or labels.ndim != 2 or x.shape[0] != labels.shape[0]:
        raise ValueError(f"{what} (B, E) and labels (B, L) must be 2-D with the same B, "
                         f"got shapes {tuple(x.shape)} and {tuple(labels.shape)}")


def pairwise_squared_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between the rows of ``embeddings``, in float32.

    ``d(i, j) = |e_i|^2 + |e_j|^2 - 2 e_i . e_j``, clamped at 0, with an exact 0 diagonal. For unit vectors
    this is ``2 - 2 cos(e_i, e_j)``, in [0, 4].

    Arguments:
      embeddings (torch.Tensor): (B, E), any float dtype.

    Returns:
      torch.Tensor: float32 (B, B), symmetric.
    """
    e = embeddings.float()
    sq = (e * e).sum(1)
    d = (sq[:, None] + sq[None, :] - 2.0 * (e @ e.T)).clamp_min(0.0)
    return d * (1.0 - torch.eye(e.shape[0], device=e.device, dtype=d.dtype))


def triplet_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative pairs of a multi-label batch, as :func:`triplet_loss` defines them.

    Arguments:
      labels (torch.Tensor): (B, L) binary (bool or 0/1) findings vectors.

    Returns:
      tuple[torch.Tensor, torch.Tensor]: bool (B, B) ``pos`` (the cases share at least one finding, never a
      case with itself) and ``neg`` (they share none). A batch where no row has both is one in which the
      triplet loss is 0 whatever the embeddings.
    """
    y = (labels != 0).float()
    eye = torch.eye(y.shape[0], dtype=torch.bool, device=y.device)
    shared = (y @ y.T) > 0
    return shared & ~eye, ~shared & ~eye


def triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2,
                 mining: str = "batch_hard") -> torch.Tensor:
    """Online triplet loss for multi-label cases, with batch-hard or semi-hard mining.

    Distance: squared Euclidean, ``d(a, b) = |e_a - e_b|^2``, which for the unit-norm embeddings of
    :class:`~irisseg.models.embedding.EmbeddingNet` is ``2 - 2 cos(e_a, e_b)`` in [0, 4] (so ``margin`` is in
    those units: 0.2 = a cosine gap of 0.1). Positives of anchor ``a``: the other cases sharing at least one
    finding with it; negatives: the cases sharing none (never ``a`` itself).

    * ``batch_hard``: per anchor with at least one positive and one negative, its hardest positive
      ``d_ap = max_p d(a, p)`` and hardest negative ``d_an = min_n d(a, n)``;
      ``loss = mean_a relu(d_ap - d_an + margin)`` over those anchors.
    * ``semi_hard``: per (anchor, positive) pair whose anchor has a negative, the negative with the smallest
      ``d(a, n)`` among those farther than the positive (``d(a, n) > d(a, p)``), or the hardest negative
      ``min_n d(a, n)`` when none is; ``loss = mean_(a, p) relu(d(a, p) - d(a, n) + margin)`` over those pairs.

    The selection is not differentiated (it picks which distances enter the loss); the distances are.

    Arguments:
      embeddings (torch.Tensor): (B, E) embeddings (unit L2 norm expected), any float dtype.
      labels (torch.Tensor): (B, L) binary (bool or 0/1) findings vectors.
      margin (float): the margin, >= 0, in squared-distance units.
      mining (str): ``"batch_hard"`` or ``"semi_hard"``.

    Returns:
      torch.Tensor: float32 scalar; 0 (still attached to the graph, so ``backward`` works) when the batch
      holds no valid anchor / pair, i.e. no case with both a positive and a negative.

    Raises:
      ValueError: wrong shapes, an unknown ``mining``, a negative margin.
    """
    _check_retrieval_pair(embeddings, labels, "embeddings")
    if mining not in TRIPLET_MINING:
        raise ValueError(f"mining must be one of {', '.join(TRIPLET_MINING)}, got {mining!r}")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        d = pairwise_squared_distances(embeddings)
        b = d.shape[0]
        pos, neg = triplet_masks(labels)
        has_neg = neg.any(1)
        inf = torch.tensor(float("inf"), device=d.device)
        hardest_neg = torch.where(neg, d, inf).amin(1)  # (B,), inf without a negative
        zero = embeddings.float().sum() * 0.0 + 0.0  # + 0.0: never -0.0
        if mining == "batch_hard":
            valid = pos.any(1) & has_neg
            if not valid.any():
                return zero
            hardest_pos = torch.where(pos, d, -inf).amax(1)
            return F.relu(hardest_pos[valid] - hardest_neg[valid] + margin).mean()
        valid = pos & has_neg[:, None]  # (A, P)
        if not valid.any():
            return zero
        d_ap = d[:, :, None]  # (A, P, 1)
        d_an = d[:, None, :]  # (A, 1, N)
        farther = neg[:, None, :] & (d_an > d_ap)  # (A, P, N)
        semi = torch.where(farther, d_an, inf).amin(2)  # (A, P)
        chosen = torch.where(farther.any(2), semi, hardest_neg[:, None].expand(b, b))
        return F.relu(d - chosen + margin)[valid].mean()


def soft_micro_f1_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``1 -`` the soft ("graded") micro-F1 of multi-label predictions: probabilities, not thresholds.

    With ``p = sigmoid(logits)`` and ``y = targets``, summed over every element of the batch (all cases and
    all findings together, hence *micro*)::

        TP = sum p y,   FP = sum p (1 - y),   FN = sum (1 - p) y
        F1 = 2 TP / (2 TP + FP + FN + eps),   loss = 1 - F1

    With confident, correct logits ``p -> y`` and the loss goes to 0 (to ``eps / (2 TP + eps)``); a batch
    without any positive target gives ``F1 = 0`` and loss 1 whatever the logits (only BCE can teach "no
    finding" then). Computed in float32.

    Arguments:
      logits (torch.Tensor): (B, L) raw classification scores, any float dtype.
      targets (torch.Tensor): (B, L) values in [0, 1] (binary findings).
      eps (float): keeps the ratio defined when everything is 0.

    Returns:
      torch.Tensor: float32 scalar in [0, 1].

    Raises:
      ValueError: the shapes differ or are not 2-D.
    """
    if logits.shape != targets.shape or logits.ndim != 2:
        raise ValueError(f"logits and targets must both be (B, L), got shapes {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        p = torch.sigmoid(logits.float())
        y = targets.float()
        tp = (p * y).sum()
        fp = (p * (1.0 - y)).sum()
        fn = ((1.0 - p) * y).sum()
        return 1.0 - 2.0 * tp / (2.0 * tp + fp + fn + eps)
