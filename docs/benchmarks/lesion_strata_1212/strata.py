"""Per-case lesion metrics split by what made each synthetic case hard.

Usage::

    python docs/benchmarks/lesion_strata_1212/strata.py DATASET REPORT.csv [REPORT.csv ...]

DATASET is an ``irisseg synth --mode lesion`` folder, REPORT a per-case ``irisseg lesion evaluate`` report of
cases of that folder. The strata come from each case's ``attributes`` in ``DATASET/cases.json``; folders
written before those were recorded get them by regenerating each case from its seed (the arrays are
the same, so the attributes are the ones the case was made with). Strata: the lesion contrast class
(``low``: every lesion 0.05-0.15 from grey matter, a quarter of the cases; ``normal``: 0.12-0.45), simulated
thick slices (slice thickness above 1 voxel) or none, and the lesion volume of the case (under 100 voxels
or not). Prints one markdown table per report: cases, mean Dice, lesion recall and lesion precision.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np


def case_attributes(dataset: Path) -> dict[str, dict]:
    """Case id -> attributes (``SyntheticCase.attributes``) plus ``voxels`` (lesion voxels)."""
    info = json.loads((dataset / "dataset.json").read_text())["irisseg"]
    records = json.loads((dataset / "cases.json").read_text())["cases"]
    out = {}
    for r in records:
        attributes = r.get("attributes")
        if attributes is None:  # written before attributes were recorded: the seed makes the same case
            from irisseg.data.synthetic import generate_case

            case = generate_case("lesion", info["shape"], r["seed"], **info.get("options", {}))
            if int((case.label > 0).sum()) != sum(r["voxels"].values()):
                raise SystemExit(f"{dataset}: {r['case']} does not regenerate from its seed with this irisseg")
            attributes = case.attributes
        out[r["case"]] = {**attributes, "voxels": sum(r["voxels"].values())}
    return out


def low_contrast(a: dict) -> bool:
    return a["lesion_contrast"] == "low"


def thick_slices(a: dict) -> bool:
    return a["acquisition"]["slice_thickness"] > 1.0


STRATA = {
    "low lesion contrast": low_contrast,
    "normal lesion contrast": lambda a: not low_contrast(a),
    "thick slices": thick_slices,
    "no thick slices": lambda a: not thick_slices(a),
    "lesion volume < 100 voxels": lambda a: a["voxels"] < 100,
    "lesion volume >= 100 voxels": lambda a: a["voxels"] >= 100,
    "normal contrast, no thick slices": lambda a: not low_contrast(a) and not thick_slices(a),
    "low contrast and thick slices": lambda a: low_contrast(a) and thick_slices(a),
    "all": lambda a: True,
}


def main(argv: list[str]) -> None:
    dataset, reports = Path(argv[0]), argv[1:]
    attributes = case_attributes(dataset)
    for report in reports:
        with open(report, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["case"] in attributes]
        print(f"\n{report}\n\n| cases | n | Dice | lesion recall | lesion precision |\n|---|---|---|---|---|")
        for name, keep in STRATA.items():
            chosen = [r for r in rows if keep(attributes[r["case"]])]
            if chosen:
                mean = {k: np.mean([float(r[k]) for r in chosen]) for k in ("dice", "lesion_recall", "lesion_precision")}
                print(f"| {name} | {len(chosen)} | {mean['dice']:.3f} | {mean['lesion_recall']:.3f} | "
                      f"{mean['lesion_precision']:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
