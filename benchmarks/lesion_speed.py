"""Speed of the lesion U-Net on the CPU: one training step, and whole-volume sliding-window inference.

Usage::

    python benchmarks/lesion_speed.py                                   # the configs/lesion_synthetic.yaml net
    python benchmarks/lesion_speed.py --channels 16,32,64,128 --runs 9 --threads 2  # the earlier 4-level net
    python benchmarks/lesion_speed.py --blocks-per-level 2                      # two residual blocks per level

What is measured (median wall time of ``--runs`` calls after two warm-up calls, random weights and inputs):

* one training step of :class:`irisseg.models.unet.ResidualUNet` (deep supervision on) as the lesion
  trainer runs it: forward on ``--batch`` patches of ``--patch``^3 voxels, the configured loss over every
  deep-supervision output, backward and an AdamW step; once with the weights in their default layout
  (the residual blocks turn activations channels-last either way), once with the weights and input
  converted to ``channels_last_3d`` as well, and once compiled (``torch.compile``, as ``compile: true``);
  the plain and the compiled step again under bf16 autocast (``train_precision: bf16``; float32 weights,
  gradients and loss, as Lightning's ``bf16-mixed``);
* sliding-window inference (:func:`irisseg.lesion.sliding_window_logits`, Gaussian weighting, overlap 0.5)
  of one ``--volume``^3 volume with ``--patch``^3 windows, for several ``sw_batch_size`` values, in float32
  and under bf16 autocast (``--precisions``; bf16 is emulated, and slow, on CPUs without AMX).

Run it on an idle machine: the numbers are wall times and move with any other load.

Measured on 2 cores (idle), with the defaults (the ``configs/lesion_synthetic.yaml`` net) and
``--channels 16,32,64,128 --sw-batch 2,4``: channels-last weights made a training step slower, 0.676 s against
0.634 s (0.735 s against 0.662 s with four levels), so the weights keep their default layout;
sliding-window inference of a 64^3 volume took 0.80 s with 4 windows per pass against 1.24 s with 2 and
1.01 s with 8 (1.04 s against 1.33 s with four levels), so 4 is the default ``sw_batch_size``.

Compiled training steps, three runs back to back on a faster 2-core machine (2026-12-06)
(``--runs 15`` once, ``--runs 25`` twice): 0.204 s against 0.223 s, 0.212 s against 0.236 s and 0.232 s against
0.229 s uncompiled (ratios 0.91, 0.90, 1.01). A tenth off at best, and not reliably, so
``configs/lesion_synthetic.yaml`` left ``compile`` off then.

Later that day (``--runs 9``, an idle 2-core Xeon with AMX): a compiled step 0.154 s against 0.196 s (ratio
0.78); sliding-window inference of a 64^3 volume 0.175 s under bf16 autocast against 0.383 s in float32
(sw_batch_size 4; ratio 0.46; ``inference_precision: auto`` uses bf16 on such CPUs). A back-to-back
30-minute training comparison then settled ``compile`` (``docs/benchmarks/lesion_ablation_4110/``: 8665
steps against 7780, held-out Dice +0.009); the config compiles since.

With bf16 training steps (``--runs 9 --sw-batch 4``, the same kind of machine, idle): a compiled step 0.087 s
under bf16 autocast against 0.162 s in float32 (ratio 0.54), an uncompiled one 0.249 s against 0.191 s (1.30:
eager bf16 is slower). So ``train_precision: auto`` uses bf16 on such CPUs only for compiled steps; 30
minutes then fit 14720 steps against 8643 (``docs/benchmarks/lesion_ablation_5821/``).

Two residual blocks per level (``--blocks-per-level 2 --runs 9 --sw-batch 4 --precisions bf16``, then the
same without ``--blocks-per-level``, an idle AMX machine): a compiled bf16 step 0.108 s against 0.066 s; the
30-minute comparison is in ``docs/benchmarks/lesion_fresh_6397/`` (no held-out gain; one block stays).
"""

from __future__ import annotations

import argparse

import torch
from _timing import median_seconds

from irisseg.lesion import sliding_window_logits
from irisseg.losses import deep_supervision_loss
from irisseg.models.unet import ResidualUNet, UNetConfig
from irisseg.training.lesion import LesionTrainConfig, make_loss

#: Training-step variants timed: the weights' default layout, channels-last weights and input, the
#: network compiled with ``torch.compile`` as the trainer does with ``compile: true`` (default layout), and
#: the plain and the compiled network under bf16 autocast.
STEP_VARIANTS = ("contiguous", "channels_last_3d", "torch.compile", "contiguous, bf16", "torch.compile, bf16")


def _unet(channels, blocks: int) -> ResidualUNet:
    """The timed network: one input and one output channel, deep supervision on, seeded weights."""
    torch.manual_seed(0)
    return ResidualUNet(UNetConfig(in_channels=1, out_channels=1, channels=channels, blocks_per_level=blocks,
                                   deep_supervision=True))


def train_step_seconds(channels, patch: int, batch: int, loss: str, variant: str, runs: int, blocks: int = 1) -> float:
    """Median seconds of one training step (forward, loss over every output, backward, AdamW); ``variant``
    is one of :data:`STEP_VARIANTS` (the compile itself happens in the untimed warm-up calls; under bf16
    autocast the loss is computed in float32 from the bf16 outputs, as the trainer's losses do)."""
    model = _unet(channels, blocks)
    x = torch.randn(batch, 1, patch, patch, patch)
    y = (torch.rand(batch, 1, patch, patch, patch) > 0.95).float()
    if variant == "channels_last_3d":
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    net = torch.compile(model, dynamic=False) if variant.startswith("torch.compile") else model
    bf16 = variant.endswith("bf16")
    loss_fn = make_loss(LesionTrainConfig(loss=loss))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(x)
        value = deep_supervision_loss(loss_fn, out, y) if isinstance(out, (list, tuple)) else loss_fn(out, y)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()

    return median_seconds(step, runs, warmup=2)


def inference_seconds(channels, patch: int, volume: int, sw_batch_size: int, runs: int, precision: str,
                      blocks: int = 1) -> float:
    """Median seconds of Gaussian sliding-window inference of one ``volume``^3 volume in ``precision``
    (``fp32`` or ``bf16``)."""
    model = _unet(channels, blocks)
    image = torch.randn(1, 1, volume, volume, volume)
    return median_seconds(lambda: sliding_window_logits(model, image, (patch,) * 3, 0.5,
                                                        sw_batch_size=sw_batch_size, precision=precision),
                          runs, warmup=2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", default="16,32,64", help="U-Net widths, finest first")
    parser.add_argument("--blocks-per-level", type=int, default=1, help="residual blocks per U-Net level")
    parser.add_argument("--patch", type=int, default=32, help="training patch and window side (voxels)")
    parser.add_argument("--batch", type=int, default=4, help="patches per training step")
    parser.add_argument("--volume", type=int, default=64, help="side of the predicted volume (voxels)")
    parser.add_argument("--loss", default="dice_bce", help="dice_bce | tversky | focal_dice")
    parser.add_argument("--sw-batch", default="2,4,8", help="sliding-window batch sizes to time")
    parser.add_argument("--precisions", default="fp32,bf16", help="sliding-window precisions to time")
    parser.add_argument("--runs", type=int, default=7, help="timed calls per row (after 2 warm-up calls)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    channels = tuple(int(c) for c in args.channels.split(","))

    print(f"lesion U-Net {channels} x {args.blocks_per_level} block(s), {args.threads} threads, median of {args.runs} runs\n")
    print("| what | setting | seconds | relative |")
    print("|---|---|---|---|")
    base = None
    for variant in STEP_VARIANTS:
        s = train_step_seconds(channels, args.patch, args.batch, args.loss, variant, args.runs,
                               args.blocks_per_level)
        base = base or s
        print(f"| training step ({args.batch} x {args.patch}^3, {args.loss}) | {variant} | {s:.3f} | {s / base:.2f} |",
              flush=True)
    base = None
    for precision in args.precisions.split(","):
        for sw in (int(v) for v in args.sw_batch.split(",")):
            s = inference_seconds(channels, args.patch, args.volume, sw, args.runs, precision, args.blocks_per_level)
            base = base or s
            print(f"| sliding window ({args.volume}^3 in {args.patch}^3 windows) | sw_batch_size {sw}, {precision} | "
                  f"{s:.3f} | {s / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
