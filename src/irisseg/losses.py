"""Segmentation losses on logits, with MONAI's call shapes: ``loss(logits (B, N, ...), target (B, N, ...))``.

Every loss takes raw logits (before the sigmoid) and a target of the same shape with values in [0, 1]
(one channel per class, not one-hot over a softmax), and reduces over the spatial dimensions per
(batch item, class) before the ``reduction`` over batch and classes:

* ``"mean"`` (default): a scalar, the mean over the (B, N) entries;
* ``"sum"``: a scalar, their sum;
* ``"none"``: a (B, N) tensor.

Losses are computed in float32 whatever the input dtype (bf16 logits from autocast included).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["soft_dice_loss", "dice_bce_loss"]

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
    _check(logits, target)
    prob = torch.sigmoid(logits.float())
    tgt = target.float()
    dims = tuple(range(2, logits.ndim))
    intersection = (prob * tgt).sum(dims)
    denominator = prob.sum(dims) + tgt.sum(dims)
    loss = 1.0 - (2.0 * intersection + smooth_nr) / (denominator + smooth_dr)
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
