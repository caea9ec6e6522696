"""Paired comparison of two `irisseg lesion evaluate` reports of the same cases.

Usage: python paired.py BASELINE.csv OTHER.csv
Prints, for Dice, lesion recall and lesion precision, both means, the mean per-case difference
(OTHER - BASELINE) with its standard error, and on how many cases OTHER is better / worse.
"""
import csv
import sys

import numpy as np


def per_case(path: str) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {r["case"]: r for r in csv.DictReader(f) if r["case"] not in ("mean", "median")}


base, other = per_case(sys.argv[1]), per_case(sys.argv[2])
cases = sorted(set(base) & set(other))
for metric in ("dice", "lesion_recall", "lesion_precision"):
    a = np.array([float(base[c][metric]) for c in cases])
    b = np.array([float(other[c][metric]) for c in cases])
    d = b - a
    print(f"{metric}: {a.mean():.3f} -> {b.mean():.3f}, paired {d.mean():+.3f} (SE {d.std(ddof=1) / np.sqrt(len(d)):.3f}), "
          f"better on {int((d > 1e-9).sum())}, worse on {int((d < -1e-9).sum())} of {len(cases)}")
