"""In-context tuning: refine a task embedding on its own supports, with the model frozen.

The IRIS paper's fourth inference strategy. Starting from the (ensemble) task embedding, only the
embedding's tensors (tokens and per-scale prototypes) are optimised with Adam so that decoding every
support image with the embedding reproduces its mask (Dice + BCE, :func:`irisseg.losses.dice_bce_loss`).
The network's weights, their ``requires_grad`` flags and every module's train/eval mode are left exactly
as they were, even when the tuning fails half-way.
"""

from __future__ import annotations

import contextlib

import torch
from einops import rearrange, repeat
from torch import nn

from irisseg.losses import dice_bce_loss
from irisseg.models.blocks import autocast_for
from irisseg.models.task_encoding import TaskEmbedding

__all__ = ["tune_task", "frozen"]


@contextlib.contextmanager
def frozen(model: nn.Module):
    """Freeze ``model`` for the duration of the block: eval mode, no parameter needs a gradient.

    On exit (normal or by an exception) every parameter's ``requires_grad`` flag and every sub-module's
    ``training`` flag are restored individually, so mixed states (one frozen layer, one module in eval
    mode inside a training model) come back unchanged. Parameter values are never touched.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def _crop_to_foreground(features: list[torch.Tensor], target: torch.Tensor, margin: int):
    """Crop every feature map and the target to the foreground box (+ margin) on the coarsest grid.

    features: maps at strides 1, 2, 4, ..., S (S = the encoder's total stride); target: (BK, N, D, H, W).
    """
    stride = target.shape[-1] // features[-1].shape[-1]
    fg = target.amax(dim=(0, 1)) > 0
    if not fg.any():
        return features, target
    m = -(-margin // stride)  # margin in coarse voxels, rounded up
    lo, hi = [], []
    for axis in range(3):
        idx = fg.any(dim=tuple(a for a in range(3) if a != axis)).nonzero()[:, 0]
        n = features[-1].shape[-3 + axis]
        lo.append(max(int(idx.min()) // stride - m, 0))
        hi.append(min(int(idx.max()) // stride + 1 + m, n))

    def crop(t: torch.Tensor, factor: int) -> torch.Tensor:
        return t[..., lo[0] * factor:hi[0] * factor, lo[1] * factor:hi[1] * factor, lo[2] * factor:hi[2] * factor]

    cropped = [crop(f, f.shape[-1] // features[-1].shape[-1]) for f in features]
    return cropped, crop(target, stride)


def _support_readout(model: nn.Module, features: list[torch.Tensor], task: TaskEmbedding, B: int, K: int
                     ) -> torch.Tensor | None:
    """Propagated masks of the supports themselves, (B*K, N, d, h, w), as the query will get them: support
    k reads from the other supports' memory (leave-one-out) when K > 1, from its own when K = 1."""
    matcher = getattr(model, "matcher", None)
    if matcher is None or not task.has_matching:
        return None
    keys = rearrange(task.keys, "b (k l) c -> b k l c", k=K)
    values = rearrange(task.values, "b n (k l) -> b n k l", k=K)
    per_support = rearrange(features[matcher.scale], "(b k) ... -> b k ...", k=K)
    deep = rearrange(features[-1], "(b k) ... -> b k ...", k=K)
    out = []
    for k in range(K):
        others = [j for j in range(K) if j != k] or [k]
        feats = [None] * len(features)
        feats[matcher.scale], feats[-1] = per_support[:, k], deep[:, k]
        out.append(matcher.readout(feats, rearrange(keys[:, others], "b k l c -> b (k l) c"),
                                   rearrange(values[:, :, others], "b n k l -> b n (k l)")))
    return rearrange(torch.stack(out, dim=1), "b k ... -> (b k) ...")


def tune_task(
    model: nn.Module,
    task: TaskEmbedding,
    support_images: torch.Tensor,
    support_masks: torch.Tensor,
    steps: int = 10,
    lr: float = 1e-3,
    history: list[float] | None = None,
    crop_margin: int | None = 8,
) -> TaskEmbedding:
    """Optimise a task embedding on its supports (in-context tuning); the model stays frozen.

    Every support image is decoded as a query with the current embedding; the loss is
    ``dice_bce_loss(logits, support_masks)`` averaged over supports and classes, minimised with Adam over
    ``task.tensors()`` only (fresh leaf copies in float32; the input ``task`` is not modified). The
    supports' encoder features do not depend on the embedding, so they are computed once; each step then
    costs one decoder pass over the K supports (``model.decode(support_k, task)``, except that with dense
    matching support k reads the propagated mask from the other supports' memory when K > 1, as a query
    would; the keys and values themselves are not tuned and come back unchanged).

    Works when called under ``torch.inference_mode()`` or ``torch.no_grad()`` (gradients are enabled
    inside), with inference-mode input tensors, and on CUDA (bf16 autocast for the network, float32 loss
    and float32 embedding tensors).

    Arguments:
      model (nn.Module): an :class:`~irisseg.models.iris.IrisModel` (``encoder`` and ``decoder`` parts).
        Its parameters (values and ``requires_grad`` flags) and modules' ``training`` flags are exactly
        the same afterwards.
      task (TaskEmbedding): the starting embedding, batch B (usually 1): tokens (B, N, m+1, C),
        prototypes (B, N, 2, C_s) per scale.
      support_images (torch.Tensor): (B, K, C_in, D, H, W) normalised support images on the model grid.
      support_masks (torch.Tensor): (B, K, N, D, H, W) in {0, 1}, one channel per class of ``task``.
      steps (int): Adam steps (10); 0 returns a detached copy of ``task``.
      lr (float): Adam learning rate (1e-3).
      history (list[float] | None): when given, receives the loss before each step and, last, the loss
        after the final step (``steps + 1`` values).
      crop_margin (int | None): decode only the box around the supports' foreground, grown by this many
        voxels and aligned to the encoder's stride (features are still computed on the whole images, then
        cropped), which makes each step several times cheaper on large grids; None decodes everything.

    Returns:
      TaskEmbedding: detached float32 tensors on the model's device, same shapes as ``task``. Of the
      embeddings visited (the start, each step's result) the one with the lowest support loss is returned,
      so the tuned embedding never fits the supports worse than the starting one.
    """
    if support_images.ndim != 6 or support_masks.ndim != 6:
        raise ValueError("support_images must be (B, K, C, D, H, W) and support_masks (B, K, N, D, H, W)")
    B, K = support_images.shape[:2]
    if support_masks.shape[:2] != (B, K) or support_masks.shape[2] != task.num_classes:
        raise ValueError(
            f"support masks {tuple(support_masks.shape)} do not match images {tuple(support_images.shape)} "
            f"and a task of {task.num_classes} classes"
        )
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    device = next(model.parameters()).device

    with torch.inference_mode(False), torch.enable_grad(), frozen(model):
        # Plain (non-inference) float32 leaf copies: the only tensors the optimiser sees.
        params = [t.detach().clone().to(device=device, dtype=torch.float32).requires_grad_(True)
                  for t in task.tensors()]
        images = rearrange(support_images.detach().clone().to(device), "b k c d h w -> (b k) c d h w")
        target = rearrange(support_masks.detach().clone().to(device).float(), "b k n d h w -> (b k) n d h w")
        start = task.detach().to(device)
        with torch.no_grad(), autocast_for(device):
            features = [f.detach() for f in model.encoder(images)]
            match = _support_readout(model, features, start, B, K)
        if crop_margin is not None:
            extra = [] if match is None else [match]  # first: the last map must stay the coarsest
            cropped, target = _crop_to_foreground(extra + features, target, crop_margin)
            features, match = (cropped, None) if match is None else (cropped[1:], cropped[0])

        def loss_of(tensors: list[torch.Tensor]) -> torch.Tensor:
            # One task per support: repeat the batch-B embedding K times, (B, ...) -> (B*K, ...).
            emb = TaskEmbedding.from_tensors([repeat(t, "b ... -> (b k) ...", k=K) for t in tensors])
            with autocast_for(device):
                logits = model.decoder(features, emb, match)
            return dice_bce_loss(logits.float(), target)

        best = [p.detach().clone() for p in params]
        best_loss = float("inf")
        optimiser = torch.optim.Adam(params, lr=lr)
        for _ in range(steps):
            optimiser.zero_grad(set_to_none=True)
            loss = loss_of(params)
            value = float(loss.detach())
            if history is not None:
                history.append(value)
            if value < best_loss:
                best_loss, best = value, [p.detach().clone() for p in params]
            loss.backward()
            optimiser.step()
        if steps:
            with torch.no_grad():
                value = float(loss_of(params))
            if history is not None:
                history.append(value)
            if value < best_loss:
                best = [p.detach().clone() for p in params]
    return TaskEmbedding.from_tensors(best, start.keys, start.values)  # the support memory is not tuned
