"""Contrast-to-noise ratio of the lesions a model finds and misses, in the low-contrast cases of a dataset.

Usage::

    python docs/benchmarks/lesion_strata_1212/missed_contrast.py RUN_OR_MODEL DATASET

A lesion (26-connected component of the reference) is missed when its peak predicted probability is under
the model's threshold. Its contrast-to-noise ratio is the mean of the normalised image over the lesion minus
the mean over a ring 2-3 voxels around it (other lesions excluded), over the ring's standard deviation
(the image normalised as the model normalises it: z-scored for the current config).
Low-contrast cases are those whose ``lesion_contrast`` attribute is ``low`` (see ``strata.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from strata import case_attributes

from irisseg.data.datasets import load_dataset
from irisseg.lesion import LesionPredictor, normalize_channels


def main(argv: list[str]) -> None:
    model, data = argv[0], Path(argv[1])
    attributes = case_attributes(data)
    predictor = LesionPredictor(model)
    rows = []  # (found, voxels, cnr)
    for case in load_dataset(data).cases:
        if attributes[case.case_id]["lesion_contrast"] != "low":
            continue
        channels, label = case.load()
        ref = label.array > 0
        prob = predictor.predict_probabilities(channels).array
        image = normalize_channels([channels[0].array], normalization=predictor.normalization)[0]
        components, n = ndi.label(ref, np.ones((3, 3, 3)))
        for k in range(1, n + 1):
            lesion = components == k
            ring = ndi.binary_dilation(lesion, iterations=3) & ~ndi.binary_dilation(lesion, iterations=1) & ~ref
            cnr = (image[lesion].mean() - image[ring].mean()) / image[ring].std()
            rows.append((prob[lesion].max() >= predictor.threshold, int(lesion.sum()), float(cnr)))
    table = np.array(rows, float)
    print("| lesions | n | median voxels | CNR 10th / 25th / 50th / 75th percentile |\n|---|---|---|---|")
    for found, name in ((1, "found"), (0, "missed")):
        part = table[table[:, 0] == found]
        q = np.percentile(part[:, 2], [10, 25, 50, 75])
        print(f"| {name} | {len(part)} | {np.median(part[:, 1]):.0f} | {' / '.join(f'{v:.2f}' for v in q)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
