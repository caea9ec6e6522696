"""Would removing predicted lesion components by size or probability raise the mean Dice?

Usage::

    python docs/benchmarks/lesion_strata_1212/components.py RUN_OR_MODEL DATASET

Every labelled case of DATASET is predicted once. Each 26-connected component of the prediction is a true
positive when it touches the reference, a false positive otherwise. The script prints the size, peak and mean
probability of both kinds, then the mean Dice, lesion recall and lesion precision after dropping every
component under a minimum size, peak or mean probability, with the paired difference in Dice (and its
standard error) against keeping every component. Such rules are what nnU-Net's post-processing chooses
among on validation data; here they are only measured, not chosen.
"""

from __future__ import annotations

import sys

import numpy as np
from scipy import ndimage as ndi

from irisseg.data.datasets import load_dataset
from irisseg.lesion import LesionPredictor, case_metrics

RULES = [("size >= %g voxels", 0, v) for v in (3, 5, 10, 20)] + \
        [("peak >= %g", 1, v) for v in (0.6, 0.7, 0.8, 0.9)] + [("mean >= %g", 2, v) for v in (0.6, 0.7)]


def main(argv: list[str]) -> None:
    predictor = LesionPredictor(argv[0])
    dataset = load_dataset(argv[1])
    cases = []  # (component labels, [(voxels, peak, mean, true positive)], reference, spacing)
    for case in [c for c in [*dataset.cases, *dataset.test_cases] if c.label_path is not None]:
        channels, label = case.load()
        prob = predictor.predict_probabilities(channels).array
        ref = label.array > 0
        components, n = ndi.label(prob > predictor.threshold, np.ones((3, 3, 3)))
        stats = []
        for k in range(1, n + 1):
            mask = components == k
            stats.append((int(mask.sum()), float(prob[mask].max()), float(prob[mask].mean()), bool(ref[mask].any())))
        cases.append((components, stats, ref, channels[0].spacing_zyx))

    table = np.array([s for _, stats, _, _ in cases for s in stats])
    tp = table[:, 3] > 0
    print(f"{len(table)} predicted components: {tp.sum()} true positive, {(~tp).sum()} false positive\n")
    print("| component | true positives: 10th / 25th / 50th / 75th percentile | false positives |")
    print("|---|---|---|")
    for name, col in (("voxels", 0), ("peak probability", 1), ("mean probability", 2)):
        q = [np.percentile(table[sel, col], [10, 25, 50, 75]) for sel in (tp, ~tp)]
        print(f"| {name} | {' / '.join(f'{v:.3g}' for v in q[0])} | {' / '.join(f'{v:.3g}' for v in q[1])} |")

    def score(keep) -> np.ndarray:  # per case (dice, lesion recall, lesion precision)
        rows = []
        for components, stats, ref, spacing in cases:
            kept = [k + 1 for k, s in enumerate(stats) if keep(s)]
            m = case_metrics(np.isin(components, kept), ref, spacing)
            rows.append((m["dice"], m["lesion_recall"], m["lesion_precision"]))
        return np.array(rows)

    base = score(lambda s: True)
    print("\n| kept components | Dice | paired Dice (SE) | lesion recall | lesion precision |")
    print("|---|---|---|---|---|")
    print(f"| all | {base[:, 0].mean():.4f} | | {base[:, 1].mean():.4f} | {base[:, 2].mean():.4f} |")
    for name, col, value in RULES:
        s = score(lambda c, col=col, value=value: c[col] >= value)
        d = s[:, 0] - base[:, 0]
        print(f"| {name % value} | {s[:, 0].mean():.4f} | {d.mean():+.4f} ({d.std(ddof=1) / np.sqrt(len(d)):.4f}) | "
              f"{s[:, 1].mean():.4f} | {s[:, 2].mean():.4f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
