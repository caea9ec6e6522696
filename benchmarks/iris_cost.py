"""Cost of the IRIS models: parameters, forward GFLOPs and CPU wall time, plus the iris-base shape check.

Usage::

    python benchmarks/iris_cost.py                      # everything (iris-base timing included, ~1-2 min)
    python benchmarks/iris_cost.py --no-base-timing     # skip the heavy iris-base CPU timing
    python benchmarks/iris_cost.py --runs 5 --threads 2 --markdown

What is measured:

* parameters per top-level component (``encoder``, ``task_encoder``, ``decoder``, ``matcher``; the class memory bank
  holds no parameters) and in total, from :func:`irisseg.models.iris.count_parameters`;
* forward FLOPs of ``encode_task`` (one support, K = 1, one class, N = 1) and of ``decode`` (one query,
  N = 1) at the config's ``image_size``, counted by ``torch.utils.flop_counter.FlopCounterMode`` on the
  ``meta`` device (shapes only, no memory, no arithmetic: exact for the counted ops, i.e. convolutions
  and matrix products incl. attention and einsums; normalisations and activations are not counted).
  1 multiply-add = 2 FLOPs. ``--check-flops`` also counts iris-small on real CPU tensors: convolutions
  and linear layers count the same; attention (a few MFLOPs) is counted on meta only, since on CPU it runs
  in a fused SDPA kernel that FlopCounterMode does not see;
* CPU wall time (median of ``--runs`` after one warm-up) of ``encode_task`` and ``decode`` under
  ``torch.inference_mode()`` with random weights and inputs, for iris-small at 64^3 and iris-base at
  128^3 (the peak resident memory is printed; tens of seconds per call on 2 cores);
* the seed's default shapes for iris-base, on the meta device: deep features 256 x 16^3, skips
  32 x 128^3, 64 x 64^3, 128 x 32^3, task tokens (B, N, 9, 256), logits (B, N, 128, 128, 128).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from irisseg.models.iris import build_iris, count_parameters

NAMES = ("iris-small", "iris-base")


def _inputs(size, device, B=1, K=1, N=1):
    images = torch.randn(B, K, 1, *size, device=device)
    masks = torch.zeros(B, K, N, *size, device=device)
    d, h, w = size
    masks[..., d // 4: 3 * d // 4, h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 1.0
    query = torch.randn(B, 1, *size, device=device)
    return images, masks, query


def count_flops(name: str, device: str = "meta") -> dict:
    """Forward FLOPs of encode_task (K=1, N=1) and decode (N=1) at the config's image_size."""
    with torch.device(device):
        model = build_iris(name)
    size = tuple(model.config.image_size)
    images, masks, query = _inputs(size, device)
    # Not under no_grad: FlopCounterMode's module tracker needs autograd (free on the meta device).
    counter = FlopCounterMode(display=False)
    with counter:
        task = model.encode_task(images, masks)
    encode = counter.get_total_flops()
    counter = FlopCounterMode(display=False)
    with counter:
        logits = model.decode(query, task)
    decode = counter.get_total_flops()
    return {"size": size, "encode_task": encode, "decode": decode, "logits": tuple(logits.shape)}


def time_cpu(name: str, runs: int) -> dict:
    """Median CPU wall time (s) of encode_task (K=1, N=1) and decode (N=1), random weights and inputs."""
    torch.manual_seed(0)
    model = build_iris(name).eval()
    size = tuple(model.config.image_size)
    images, masks, query = _inputs(size, "cpu")
    enc_t, dec_t = [], []
    with torch.inference_mode():
        for i in range(runs + 1):  # the first run is a warm-up
            t0 = time.perf_counter()
            task = model.encode_task(images, masks)
            t1 = time.perf_counter()
            model.decode(query, task)
            t2 = time.perf_counter()
            if i:
                enc_t.append(t1 - t0)
                dec_t.append(t2 - t1)
    return {"encode_task": statistics.median(enc_t), "decode": statistics.median(dec_t), "runs": runs}


def check_base_shapes() -> list[tuple[str, tuple, tuple, bool]]:
    """The seed's default shapes for iris-base (B=2, K=1, N=3 on the meta device)."""
    B, N = 2, 3
    with torch.device("meta"):
        model = build_iris("iris-base")
    size = tuple(model.config.image_size)
    images, masks, query = _inputs(size, "meta", B=B, K=1, N=N)
    feats = model.encoder(query)
    task = model.encode_task(images, masks)
    logits = model.decode(query, task)
    expected = [
        ("deep features", (B, 256, 16, 16, 16), tuple(feats[3].shape)),
        ("skip 0", (B, 32, 128, 128, 128), tuple(feats[0].shape)),
        ("skip 1", (B, 64, 64, 64, 64), tuple(feats[1].shape)),
        ("skip 2", (B, 128, 32, 32, 32), tuple(feats[2].shape)),
        ("task tokens", (B, N, 9, 256), tuple(task.tokens.shape)),
        ("logits", (B, N, 128, 128, 128), tuple(logits.shape)),
    ]
    return [(what, exp, got, exp == got) for what, exp, got in expected]


def _fmt_int(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median), after a warm-up")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--no-base-timing", action="store_true", help="skip the CPU timing of iris-base at 128^3")
    ap.add_argument("--check-flops", action="store_true", help="also count iris-small FLOPs on real CPU tensors")
    ap.add_argument("--markdown", action="store_true", help="print markdown tables")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for name in NAMES:
        params = count_parameters(build_iris(name))
        t0 = time.perf_counter()
        flops = count_flops(name)
        flop_seconds = time.perf_counter() - t0
        timing = None
        if name == "iris-small" or not args.no_base_timing:
            timing = time_cpu(name, args.runs)
        rows.append((name, params, flops, timing, flop_seconds))

    sep = "|" if args.markdown else " "
    header = ["model", "grid", "encoder", "task_encoder", "decoder", "matcher", "total", "GFLOPs encode_task", "GFLOPs decode",
              "CPU s encode_task", "CPU s decode"]
    lines = [header]
    for name, params, flops, timing, _ in rows:
        lines.append([
            name, "x".join(map(str, flops["size"])),
            _fmt_int(params["encoder"]), _fmt_int(params["task_encoder"]), _fmt_int(params["decoder"]),
            _fmt_int(params.get("matcher", 0)), _fmt_int(params["total"]),
            f"{flops['encode_task'] / 1e9:.1f}", f"{flops['decode'] / 1e9:.1f}",
            f"{timing['encode_task']:.2f}" if timing else "skipped",
            f"{timing['decode']:.2f}" if timing else "skipped",
        ])
    print(f"IRIS cost (torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"median of {args.runs} runs; FLOPs on the meta device, K=1 support, N=1 class, 1 multiply-add = 2 FLOPs)")
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for line in lines[1:]:
            print("| " + " | ".join(line) + " |")
    else:
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
        for line in lines:
            print(sep.join(str(c).rjust(w) for c, w in zip(line, widths)))
    for name, _, _, _, secs in rows:
        print(f"  FLOP count of {name} on meta took {secs:.2f} s")
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux
    print(f"  peak resident memory of this process: {peak_gb:.1f} GiB")

    if args.check_flops:
        real = count_flops("iris-small", device="cpu")
        meta = rows[0][2]
        diff = (meta["encode_task"] + meta["decode"]) - (real["encode_task"] + real["decode"])
        print(f"iris-small FLOPs on real CPU tensors: encode_task {real['encode_task'] / 1e9:.3f} G, decode "
              f"{real['decode'] / 1e9:.3f} G; the meta count is {diff / 1e6:+.1f} MFLOPs "
              f"({100 * diff / max(real['encode_task'] + real['decode'], 1):+.3f} %) higher: on CPU tensors, "
              "attention runs in a fused SDPA kernel that FlopCounterMode does not count, on meta it is "
              "decomposed into counted matrix products")

    print("\niris-base default shapes (meta device, B=2, K=1, N=3):")
    ok = True
    for what, exp, got, good in check_base_shapes():
        ok &= good
        print(f"  {what:14s} expected {str(exp):28s} got {str(got):28s} {'ok' if good else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
