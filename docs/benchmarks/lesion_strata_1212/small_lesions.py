"""Lesion-wise recall split by lesion size, lesion contrast and simulated thick slices.

Usage::

    irisseg lesion predict --model RUN --input DATASET/imagesTr --out PREDS
    python docs/benchmarks/lesion_strata_1212/small_lesions.py DATASET PREDS

DATASET is an ``irisseg synth --mode lesion`` folder, PREDS the predictions of some or all of its cases
(``PREDS/<case>.nii.gz``, binary). Every reference lesion is a 26-connected component of the label map,
found when any predicted voxel lies on it (``irisseg.metrics.lesion_components``, as
``irisseg.metrics.lesion_detection`` counts it). Prints, per
size bin (voxels), the lesions and the share found, for each of normal / low lesion contrast and without /
with simulated thick slices (the case attributes, as ``strata.py`` reads them).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from irisseg.metrics import lesion_components

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strata import case_attributes  # noqa: E402

BINS = ((1, 10), (10, 30), (30, 100), (100, None))


def main(dataset: Path, preds: Path) -> None:
    attributes = case_attributes(dataset)
    rows = []  # (voxels, low contrast, thick slices, found)
    for path in sorted(preds.glob("*.nii.gz")):
        case = path.name[: -len(".nii.gz")]
        if case not in attributes:
            continue
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / "labelsTr" / path.name))) > 0
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(path))) > 0
        a = attributes[case]
        low = a["lesion_contrast"] == "low"
        thick = float(a["acquisition"]["slice_thickness"]) > 1.0
        components, n = lesion_components(ref)
        sizes = np.bincount(components.ravel(), minlength=n + 1)
        hit = np.bincount(components[pred].ravel(), minlength=n + 1) > 0
        rows += [(int(sizes[k]), low, thick, bool(hit[k])) for k in range(1, n + 1)]
    if not rows:
        raise SystemExit(f"no prediction in {preds} matches a case of {dataset}")
    print(f"{len(rows)} lesions, {np.mean([r[3] for r in rows]):.3f} found\n")
    groups = [(low, thick) for low in (False, True) for thick in (False, True)]
    names = [f"{'low' if low else 'normal'} contrast, {'thick' if thick else 'no thick'} slices" for low, thick in groups]
    print("| lesion voxels | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(groups))
    for lo, hi in BINS:
        cells = []
        for low, thick in groups:
            found = [r[3] for r in rows if r[1] == low and r[2] == thick and r[0] >= lo and (hi is None or r[0] < hi)]
            cells.append(f"{np.mean(found):.2f} of {len(found)}" if found else "-")
        print(f"| {lo}-{hi - 1 if hi else ''} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
