"""Paired check on the first N held-out cases of a dataset: the plain prediction (sliding-window overlap 0.5,
the training config's) against overlap 0.75 and against mirror test-time augmentation (8 flipped passes).

Usage: python tta_overlap_check.py RUN DATA N
Prints each variant's mean Dice and lesion recall, and its paired Dice difference to the plain prediction
with the standard error of that difference (per-case differences, same cases).
"""
import sys

import numpy as np

from irisseg.lesion import LesionPredictor, evaluate_dataset

run, data, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
ids = [f"case_{i:04d}" for i in range(n)]
plain = None
for name, kwargs in [("overlap 0.5", {}), ("overlap 0.75", {"overlap": 0.75}), ("mirror TTA", {"tta": True})]:
    rows = evaluate_dataset(LesionPredictor(run, **kwargs), data, ids)
    dice = np.array([r["dice"] for r in rows])
    recall = np.mean([r["lesion_recall"] for r in rows])
    line = f"{name}: Dice {dice.mean():.4f}, lesion recall {recall:.4f}"
    if plain is None:
        plain = dice
    else:
        diff = dice - plain
        line += f", paired Dice difference {diff.mean():+.4f} (SE {diff.std(ddof=1) / np.sqrt(len(diff)):.4f})"
    print(line, flush=True)
