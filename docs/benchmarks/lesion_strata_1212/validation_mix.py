"""How far each fresh seed's validation mix of easy and hard cases predicts its validation Dice.

Usage::

    python docs/benchmarks/lesion_strata_1212/validation_mix.py data/test1212 ../lesion_hardneg_5719/test_report_hardneg.csv

Cells: lesion contrast (low / normal) x simulated thick slices (yes / no). The per-cell mean held-out Dice
of the given report, averaged over a seed's 24 validation cases (the same case ids for every 120-case seed:
split seed 0, taken here from the held-out dataset's case ids), is that seed's predicted validation Dice; the observed ones are the dice_bce rows of the
fresh-seed table in docs/benchmarks/lesion_results.md.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from strata import case_attributes, low_contrast, thick_slices

from irisseg.data.datasets import split
from irisseg.data.synthetic import case_seed, generate_case

OBSERVED = {2468: 0.719, 3690: 0.783, 1357: 0.592, 4826: 0.660, 5719: 0.662, 8219: 0.692, 9517: 0.770,
            6733: 0.768}
def cell(attributes: dict) -> tuple[bool, bool]:
    return low_contrast(attributes), thick_slices(attributes)


def main(argv: list[str]) -> None:
    attributes = case_attributes(Path(argv[0]))
    with open(argv[1], newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["case"] in attributes]
    dice = {}
    for key in ((False, False), (False, True), (True, False), (True, True)):
        dice[key] = np.mean([float(r["dice"]) for r in rows if cell(attributes[r["case"]]) == key])
    validation = split(sorted(attributes), (0.8, 0.2, 0.0), seed=0)["val"]  # as `lesion train` splits 120 cases
    predicted = []
    for seed, observed in OBSERVED.items():
        cells = [cell(generate_case("lesion", 64, case_seed(seed, int(c.split("_")[1]))).attributes)
                 for c in validation]
        predicted.append(np.mean([dice[c] for c in cells]))
        print(f"seed {seed}: {sum(not a and not b for a, b in cells)} clear validation cases, "
              f"predicted {predicted[-1]:.3f}, observed {observed:.3f}")
    print(f"correlation {np.corrcoef(predicted, list(OBSERVED.values()))[0, 1]:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
