"""Case findings of a collection (label maps or findings.csv) and the retrieval network's input grid."""

from __future__ import annotations

import numpy as np
import pytest

from irisseg.data.datasets import load_dataset
from irisseg.data.findings import load_findings, retrieval_input
from irisseg.data.synthetic import generate_dataset
from irisseg.errors import InputError


@pytest.fixture(scope="module")
def findings_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("findings")
    generate_dataset(root, "findings", 5, shape=24, seed=3)
    return root


def test_findings_from_label_maps_match_the_generator(findings_data):
    table = load_findings(findings_data)
    extra = load_dataset(findings_data).extra
    assert table.source == "label maps" and len(table) == 5
    assert table.names == ["nodule", "mass", "cyst", "calcification", "vessel_tree", "effusion_shell"]
    np.testing.assert_array_equal(table.labels, [extra[c]["findings"] for c in table.case_ids])
    sub = table.subset(table.case_ids[::-1][:2])
    np.testing.assert_array_equal(sub.labels, table.labels[::-1][:2])
    assert sub.findings_of(0) == [n for n, v in zip(table.names, table.labels[-1]) if v]


def test_findings_csv_overrides_and_is_checked(findings_data, tmp_path):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(findings_data, root)
    ids = load_findings(root).case_ids
    (root / "findings.csv").write_text("case,a,b\n" + "".join(f"{c},{i % 2},1\n" for i, c in enumerate(ids)))
    table = load_findings(root)
    assert table.source == "findings.csv" and table.names == ["a", "b"]
    np.testing.assert_array_equal(table.labels[:, 0], [i % 2 for i in range(len(ids))])
    (root / "findings.csv").write_text("case,a\n" + f"{ids[0]},2\n")
    with pytest.raises(InputError, match="not 0 or 1"):
        load_findings(root)
    (root / "findings.csv").write_text("case,a\n" + f"{ids[0]},1\n")
    with pytest.raises(InputError, match="no row for case"):
        load_findings(root)


def test_retrieval_input_grid_and_normalisation(findings_data):
    case = load_dataset(findings_data).cases[0]
    x = retrieval_input(case.load_image(), (16, 20, 12))
    assert x.shape == (1, 16, 20, 12) and x.dtype == np.float32
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05  # z-scored, then resampled


def test_synth_findings_option_sets_how_many_findings_per_case(tmp_path):
    from irisseg.cli import main

    root = tmp_path / "two"
    assert main(["synth", "--mode", "findings", "--cases", "6", "--shape", "16", "--seed", "3", "--findings", "1-2",
                 "--out", str(root)]) == 0
    counts = load_findings(root).labels.sum(1)
    assert counts.min() >= 1 and counts.max() <= 2
