"""Where a lesion model's validation Dice is lost: false-positive components or missed lesions.

For every validation case of a run (``RUN/splits.json``), the best model's mask is compared with the
reference three ways: as predicted; without its false-positive components (26-connected predicted
components that touch no reference voxel); and with every missed reference lesion (a component no
predicted voxel touches) added. The gap between the first and the other two is the Dice those errors
cost; what is left below 1 is boundary error on the lesions that were found.

    python docs/benchmarks/lesion_ablation_5719/error_split.py runs/lesion_ablation_5719/dice_bce data/lesions_5719
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from irisseg.data.datasets import load_dataset
from irisseg.lesion import LesionPredictor
from irisseg.metrics import _components, _hit_components, dice  # the lesion metrics' own component rule


def untouched(mask: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Voxels of the components of ``mask`` that share no voxel with ``other``, and those components' sizes."""
    labels, n = _components(mask)
    hit = _hit_components(labels, n, other, 0.0)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return mask & ~np.concatenate([[True], hit])[labels], sizes[~hit]


def main(run: str, data: str) -> None:
    val = json.loads((Path(run) / "splits.json").read_text())["val"]
    predictor = LesionPredictor(Path(run) / "best")
    cases = {c.case_id: c for c in load_dataset(data).cases}
    rows = []
    print("case        dice  no-FP  no-miss  ref_vox  FP_vox  FP components (voxels)")
    for case_id in val:
        channels, label = cases[case_id].load()
        ref = label.array != 0
        pred = predictor.predict(channels).array != 0
        (false_pos, sizes), (missed, _) = untouched(pred, ref), untouched(ref, pred)
        row = (dice(pred, ref), dice(pred & ~false_pos, ref), dice(pred | missed, ref))
        print(f"{case_id}  {row[0]:.3f}  {row[1]:.3f}  {row[2]:.3f}  {int(ref.sum()):7d}  {int(false_pos.sum()):6d}"
              f"  {sorted(sizes.tolist(), reverse=True)}")
        rows.append(row)
    mean = np.mean(rows, axis=0)
    print(f"mean over {len(rows)} cases: Dice {mean[0]:.3f}, without false-positive components {mean[1]:.3f}, "
          f"with no lesion missed {mean[2]:.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
