"""Speed of irisseg.metrics against MONAI's on one volume (prints a table; medians of repeated runs).

    python benchmarks/metrics_speed.py [--size 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch
from _timing import median_seconds
from monai.metrics import compute_hausdorff_distance, compute_surface_dice

from irisseg import metrics


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n = args.size
    lo, hi = int(n * 0.3), int(n * 0.62)
    pred = np.zeros((n, n, n), bool)
    ref = np.zeros_like(pred)
    pred[lo:hi, lo:hi, lo:hi] = True
    ref[lo + 3 : hi + 3, lo - 2 : hi - 2, lo + 1 : hi + 1] = True
    spacing = (3.0, 0.7, 1.2)
    tp, tr = (torch.from_numpy(a)[None, None].float() for a in (pred, ref))
    rows = [
        ("hd95", lambda: metrics.hd95(pred, ref, spacing),
         lambda: compute_hausdorff_distance(tp, tr, percentile=95, spacing=spacing)),
        ("surface_dice 1mm", lambda: metrics.surface_dice(pred, ref, spacing, 1.0),
         lambda: compute_surface_dice(tp, tr, class_thresholds=[1.0], spacing=spacing, include_background=True)),
        ("dice", lambda: metrics.dice(pred, ref), None),
    ]
    print(f"volume {n}^3, object {hi - lo}^3, spacing {spacing} mm, median of {args.repeats} runs")
    print(f"{'metric':<18}{'irisseg s':>12}{'MONAI s':>12}{'ratio':>8}")
    for name, ours, theirs in rows:
        t_ours = median_seconds(ours, args.repeats)
        t_theirs = median_seconds(theirs, args.repeats) if theirs else float("nan")
        print(f"{name:<18}{t_ours:>12.4f}{t_theirs:>12.4f}{t_theirs / t_ours:>8.1f}")


if __name__ == "__main__":
    main()
