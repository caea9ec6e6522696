"""Tests of the synthetic generator (irisseg.data.synthetic) and of the tri-planar figures (irisseg.viz)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage as ndi

from irisseg.data import synthetic as syn
from irisseg.errors import InputError

SHAPE = 24


def _case(mode, seed=0, shape=SHAPE, **kw):
    return syn.generate_case(mode, shape, seed, **kw)


# --------------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", syn.MODES)
def test_same_seed_same_case_and_different_seed_differs(mode):
    a, b, c = _case(mode, 3), _case(mode, 3), _case(mode, 4)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.spacing == b.spacing and a.origin == b.origin
    np.testing.assert_array_equal(a.direction, b.direction)
    assert a.families == b.families
    assert not np.array_equal(a.image, c.image)


def test_case_seed_is_independent_of_the_number_of_cases():
    seeds = [syn.case_seed(7, i) for i in range(5)]
    assert seeds[:3] == [syn.case_seed(7, i) for i in range(3)]
    assert len(set(seeds)) == 5
    assert syn.case_seed(8, 0) != seeds[0]


def test_dataset_case_i_does_not_depend_on_n(tmp_path):
    from irisseg.io import read_volume

    small = syn.generate_dataset(tmp_path / "a", "lesion", 1, shape=SHAPE, seed=5)
    large = syn.generate_dataset(tmp_path / "b", "lesion", 2, shape=SHAPE, seed=5)
    for sub in ("imagesTr/case_0000_0000.nii.gz", "labelsTr/case_0000.nii.gz"):
        np.testing.assert_array_equal(read_volume(small / sub).array, read_volume(large / sub).array)


# --------------------------------------------------------------------------------------------------
# shape families
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", syn.FAMILIES)
def test_each_family_gives_a_part_map_inside_the_region(family):
    rng = np.random.default_rng(0)
    region = np.zeros((32, 32, 32), dtype=bool)
    region[4:28, 4:28, 4:28] = True
    parts = syn.FAMILY_FUNCTIONS[family](rng, region, 6.0)
    assert parts.dtype == np.uint8 and parts.shape == region.shape
    assert (parts == syn.PART_MAIN).sum() > 0
    assert not parts[~region].any()
    if family == "nested":
        assert (parts == syn.PART_CORE).any()
    if family == "shells":
        assert (parts == syn.PART_LUMEN).any()


def test_family_hold_out():
    for seed in range(4):
        case = _case("multiclass", seed, exclude=["vessels"])
        assert case.families and "vessels" not in case.families.values()
        only = _case("multiclass", seed, families=["ellipsoids"])
        assert set(only.families.values()) == {"ellipsoids"}
    findings = _case("findings", 1, exclude=["vessels", "tubes"])
    assert findings.findings[syn.FINDINGS.index("vessel_tree")] == 0
    assert findings.findings[syn.FINDINGS.index("calcification")] == 0


def test_unknown_family_mode_and_option_are_input_errors():
    with pytest.raises(InputError, match="valid families: blobs, ellipsoids"):
        _case("multiclass", families=["spirals"])
    with pytest.raises(InputError, match="vesels"):
        _case("multiclass", exclude=["vesels"])
    with pytest.raises(InputError, match="valid modes"):
        _case("brains")
    with pytest.raises(InputError, match="channels"):
        _case("lesion", channels=2)
    with pytest.raises(InputError):
        _case("multiclass", families=["blobs"], exclude=["blobs"])
    with pytest.raises(InputError):
        syn.generate_case("lesion", 4, 0)
    with pytest.raises(InputError):
        syn.generate_case("lesion", SHAPE, -1)


# --------------------------------------------------------------------------------------------------
# modes
# --------------------------------------------------------------------------------------------------
def _check_common(case, shape=(SHAPE,) * 3):
    assert case.label.dtype == np.uint8 and case.label.shape == shape
    assert case.image.dtype == np.float32 and np.isfinite(case.image).all()
    assert 0.0 <= case.image.min() and case.image.max() <= 1.0
    assert len(case.spacing) == 3 and all(0.6 <= s <= 3.0 for s in case.spacing)
    np.testing.assert_allclose(case.direction @ case.direction.T, np.eye(3), atol=1e-9)
    assert np.linalg.det(case.direction) == pytest.approx(1.0)


def test_multiclass_labels_are_1_to_n_with_families():
    for seed in range(4):
        case = _case("multiclass", seed, shape=(24, 28, 32))
        _check_common(case, (24, 28, 32))
        present = [int(v) for v in np.unique(case.label) if v]
        assert present == list(range(1, len(present) + 1)) and 1 <= len(present) <= 5
        assert set(case.families) == set(present) and set(case.label_names) == set(present)
        assert set(case.families.values()) <= set(syn.FAMILIES)
        assert case.findings is None


def test_lesion_foreground_is_small_and_lesions_have_at_least_3_voxels():
    fractions = []
    for seed in range(4):
        case = _case("lesion", seed, shape=32)
        _check_common(case, (32,) * 3)
        assert set(np.unique(case.label)) == {0, 1}
        comp, n = ndi.label(case.label)  # 6-connected components
        assert n >= 1
        assert np.bincount(comp.ravel())[1:].min() >= syn.MIN_LESION_VOXELS
        fractions.append(case.label.mean())
        assert case.label_names == {1: "lesion"}
    assert np.median(fractions) < 0.01


def test_lesions_are_visible_in_the_image():
    case = _case("lesion", 2, shape=32, thick_slice=0.0)
    lesion = case.label == 1
    ring = ndi.binary_dilation(lesion, iterations=2) & ~lesion
    assert abs(case.image[lesion].mean() - case.image[ring].mean()) > 0.02


def test_territories_are_two_adjacent_complementary_labels_with_channels():
    for seed in range(3):
        case = _case("territories", seed, channels=3)
        assert case.image.shape == (3,) + (SHAPE,) * 3 and case.channels == 3
        _check_common(case)
        t1, t2 = case.label == 1, case.label == 2
        assert set(np.unique(case.label)) == {0, 1, 2} and t1.any() and t2.any()
        assert (ndi.binary_dilation(t1) & t2).any()  # they touch
        assert not np.array_equal(case.image[0], case.image[1])
    assert _case("territories", 0).image.shape[0] == 4  # default channels


def test_findings_label_ids_match_the_multi_hot_vector():
    seen = np.zeros(len(syn.FINDINGS), dtype=int)
    for seed in range(5):
        case = _case("findings", seed, shape=32)
        _check_common(case, (32,) * 3)
        assert case.findings.dtype == np.uint8 and case.findings.shape == (len(syn.FINDINGS),)
        present = {int(v) for v in np.unique(case.label) if v}
        assert present == {i + 1 for i in np.flatnonzero(case.findings)}
        assert case.findings.sum() >= 1
        for lab in present:
            assert case.label_names[lab] == syn.FINDINGS[lab - 1]
            assert case.families[lab] == syn.FINDING_FAMILIES[syn.FINDINGS[lab - 1]]
        seen += case.findings
    assert (seen > 0).sum() >= 3  # the subsets vary


def test_oblique_option_gives_rotated_directions():
    straight = _case("lesion", 1, oblique=0.0)
    np.testing.assert_array_equal(straight.direction, np.eye(3))
    tilted = _case("lesion", 1, oblique=1.0)
    assert not np.allclose(tilted.direction, np.eye(3))


# --------------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, channels", [("territories", 2), ("findings", 1)])
def test_generate_dataset_writes_a_readable_nnunet_folder(tmp_path, mode, channels):
    from irisseg.io import read_volume

    options = {"channels": channels} if mode == "territories" else {}
    out = syn.generate_dataset(tmp_path / "ds", mode, 2, shape=SHAPE, seed=1, **options)
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["numTraining"] == 2 and dataset["file_ending"] == ".nii.gz"
    assert len(dataset["channel_names"]) == channels
    assert dataset["labels"]["background"] == 0
    assert dataset["irisseg"]["mode"] == mode and dataset["irisseg"]["seed"] == 1
    if mode == "findings":
        assert dataset["irisseg"]["findings"] == list(syn.FINDINGS)
        assert dataset["labels"]["nodule"] == 1
    records = json.loads((out / "cases.json").read_text())["cases"]
    assert [r["case"] for r in records] == ["case_0000", "case_0001"]
    for record in records:
        label = read_volume(out / "labelsTr" / f"{record['case']}.nii.gz")
        assert set(label.labels()) <= set(dataset["labels"].values())
        assert label.spacing == pytest.approx(tuple(record["spacing"]), abs=1e-4)
        for c in range(channels):
            image = read_volume(out / "imagesTr" / f"{record['case']}_{c:04d}.nii.gz")
            assert image.shape == label.shape == (SHAPE,) * 3
            assert image.spacing == pytest.approx(label.spacing)
            assert image.origin == pytest.approx(label.origin)
            np.testing.assert_allclose(image.direction, label.direction, atol=1e-6)
        if mode == "findings":
            assert {int(k) for k in label.labels()} == {i + 1 for i, v in enumerate(record["findings"]) if v}
    assert not (out / "imagesTr" / f"case_0000_{channels:04d}.nii.gz").exists()


def test_generate_dataset_multiclass_labels_and_families(tmp_path):
    out = syn.generate_dataset(tmp_path / "mc", "multiclass", 1, shape=SHAPE, exclude=["vessels"])
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, **{f"structure_{i}": i for i in range(1, 6)}}
    assert "vessels" not in dataset["irisseg"]["families"]
    record = json.loads((out / "cases.json").read_text())["cases"][0]
    assert record["families"] and set(record["families"].values()) <= set(syn.FAMILIES) - {"vessels"}


def test_generate_dataset_rerun_with_fewer_cases_leaves_no_stale_case(tmp_path):
    syn.generate_dataset(tmp_path / "ds", "lesion", 2, shape=SHAPE)
    (tmp_path / "ds" / "imagesTr" / "notes.txt").write_text("kept")
    out = syn.generate_dataset(tmp_path / "ds", "lesion", 1, shape=SHAPE)
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["case_0000_0000.nii.gz", "notes.txt"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["case_0000.nii.gz"]
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 1


def test_interrupted_dataset_run_leaves_no_dataset_json(tmp_path, monkeypatch):
    import irisseg.io

    out = syn.generate_dataset(tmp_path / "ds", "lesion", 1, shape=SHAPE)
    assert (out / "dataset.json").exists()
    real, calls = irisseg.io.write_volume, []

    def failing(volume, path, **kw):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(volume, path, **kw)

    monkeypatch.setattr(irisseg.io, "write_volume", failing)
    with pytest.raises(KeyboardInterrupt):
        syn.generate_dataset(out, "lesion", 3, shape=SHAPE)
    assert not (out / "dataset.json").exists() and not (out / "cases.json").exists()


def test_generate_dataset_validates_before_writing(tmp_path):
    with pytest.raises(InputError):
        syn.generate_dataset(tmp_path / "bad", "multiclass", 1, shape=SHAPE, families=["nope"])
    with pytest.raises(InputError):
        syn.generate_dataset(tmp_path / "bad", "multiclass", 0, shape=SHAPE)
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------
def test_triplanar_overlay_writes_a_png(tmp_path):
    from irisseg import viz

    case = _case("findings", 0)
    out = viz.triplanar_overlay(case.image, case.label, tmp_path / "fig" / "a.png", title="t",
                                spacing=case.spacing, label_names=case.label_names)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    masks = {"reference": case.label > 0, "prediction": np.zeros_like(case.label)}
    assert viz.mask_centre(viz.as_mask_dict(masks, case.label.shape), case.label.shape) == tuple(
        int(round(v)) for v in np.argwhere(case.label > 0).mean(0))
    viz.triplanar_overlay(np.zeros((2,) + case.label.shape), masks, tmp_path / "b.png", fill=False, channel=1)
    with pytest.raises(InputError):
        viz.triplanar_overlay(case.image, {"bad": np.zeros((3, 3, 3))}, tmp_path / "c.png")
