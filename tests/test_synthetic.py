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


def test_lesion_contrast_attribute_marks_the_low_contrast_quarter():
    contrast = {"low": [], "normal": []}
    for seed in range(40):
        case = _case("lesion", seed, shape=32, thick_slice=0.0)
        lesion = case.label == 1
        ring = ndi.binary_dilation(lesion, iterations=2) & ~lesion
        contrast[case.attributes["lesion_contrast"]].append(case.image[lesion].mean() - case.image[ring].mean())
    assert 4 <= len(contrast["low"]) <= 18  # a quarter of 40 cases, binomial SD 2.7
    assert np.median(contrast["low"]) < np.median(contrast["normal"])


def test_acquisition_attributes_record_the_draws_without_changing_the_arrays():
    for mode in syn.MODES:
        case = _case(mode, 4, thick_slice=1.0)
        records = case.attributes["acquisition"]
        records = records if isinstance(records, list) else [records]
        assert len(records) == case.channels and all(set(r) == set(syn.ACQUISITION_KEYS) for r in records)
        assert all(r["slice_thickness"] > 1.0 and len(r["blur_sigma"]) == 3 for r in records)
    assert _case("multiclass", 4, thick_slice=0.0).attributes["acquisition"]["slice_thickness"] == 1.0
    # recording draws no random number: the image is the one rendered without a record
    tissue = np.random.default_rng(0).integers(0, 3, (SHAPE,) * 3)
    means, stds = np.array([0.1, 0.5, 0.9], np.float32), np.full(3, 0.02, np.float32)
    record: dict = {}
    with_record = syn._render(np.random.default_rng(7), tissue, means, stds, (0, 2.5, 1.0), record=record)
    without = syn._render(np.random.default_rng(7), tissue, means, stds, (0, 2.5, 1.0))
    np.testing.assert_array_equal(with_record, without)
    assert record["slice_axis"] == "z" and record["slice_thickness"] > 1.0


@pytest.mark.parametrize(("protocol", "sign"), [("flair", 1), ("t1", -1)])
def test_lesion_protocol_fixes_lesion_polarity_across_cases(protocol, sign):
    for seed in range(6):
        case = _case("lesion", seed, shape=32, protocol=protocol, thick_slice=0.0)
        lesion = case.label == 1
        ring = ndi.binary_dilation(lesion, iterations=2) & ~lesion
        assert sign * (case.image[lesion].mean() - case.image[ring].mean()) > 0, (protocol, seed)


def test_lesion_protocol_is_validated_and_random_keeps_the_old_stream():
    with pytest.raises(InputError, match="protocol"):
        _case("lesion", 0, protocol="pd")
    assert syn.mode_options("lesion")["protocol"] == "flair"
    flair, rand = _case("lesion", 1), _case("lesion", 1, protocol="random")
    np.testing.assert_array_equal(flair.label, rand.label)  # same lesions, other intensities
    assert not np.array_equal(flair.image, rand.image)


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
        case = syn.generate_case(mode, SHAPE, record["seed"], **options)  # the record says how it was made
        assert record["attributes"] == json.loads(json.dumps(case.attributes))
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


# --------------------------------------------------------------------------------------------------
# tasks (several "patients" of one structure, for in-context episodes)
# --------------------------------------------------------------------------------------------------
def _voxels(task):
    """(V, N) voxel counts of labels 1..N in every view."""
    n = len(task.families)
    return np.stack([np.bincount(lab.ravel(), minlength=n + 1)[1:n + 1] for lab in task.labels])


def test_task_same_seed_same_arrays_and_different_seed_differs():
    a, b, c = (syn.generate_task(SHAPE, s, n_views=3) for s in (4, 4, 5))
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.families == b.families and a.spacing == b.spacing
    np.testing.assert_array_equal(a.direction, b.direction)
    assert not np.array_equal(a.images, c.images)


def test_task_views_differ_but_show_the_same_labels_with_comparable_sizes():
    inconsistent, labels_seen = 0, 0
    for seed in range(4):
        task = syn.generate_task(32, seed, n_views=4)
        n = len(task.families)
        assert task.images.shape == task.labels.shape == (4, 32, 32, 32) and task.n_views == 4
        assert task.images.dtype == np.float32 and task.labels.dtype == np.uint8
        assert np.isfinite(task.images).all() and 0.0 <= task.images.min() and task.images.max() <= 1.0
        assert sorted(task.families) == sorted(task.label_names) == list(range(1, n + 1)) and 1 <= n <= 3
        assert set(task.families.values()) <= set(syn.FAMILIES)
        for v in range(4):
            assert set(np.unique(task.labels[v])) == set(range(n + 1))  # every label in every view
            for w in range(v):
                assert not np.array_equal(task.images[v], task.images[w])
                assert not np.array_equal(task.labels[v], task.labels[w])
        counts = _voxels(task)
        ratio = counts.max(0) / counts.min(0)
        assert (ratio <= 3.0).all(), (seed, counts)
        # same task: each target keeps its contrast sign against its surroundings in every view
        for lab in task.families:
            diffs = []
            for image, label in zip(task.images, task.labels, strict=True):
                inside = label == lab
                ring = ndi.binary_dilation(inside, iterations=2) & (label == 0)
                diffs.append(image[inside].mean() - image[ring].mean())
            labels_seen += 1
            inconsistent += not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs))
    assert inconsistent <= 1, f"{inconsistent} of {labels_seen} targets flip contrast between views"


def test_task_views_are_deformed_not_copies():
    task = syn.generate_task(32, 1, n_views=2, n_classes=1, families=["ellipsoids"])
    a, b = task.labels[0] == 1, task.labels[1] == 1
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice < 0.9  # each view moved / reshaped the structure
    body_a, body_b = task.images[0] > 0.15, task.images[1] > 0.15
    assert (body_a != body_b).mean() > 0.02  # the whole "patient" moved, not only the target


def test_task_family_hold_out_and_n_classes():
    for n in (1, 2, 3, 5):
        task = syn.generate_task(SHAPE, n, n_views=2, exclude=["vessels", "shells"], n_classes=n)
        assert sorted(task.families) == list(range(1, n + 1))
        assert not {"vessels", "shells"} & set(task.families.values())
        assert (_voxels(task) > 0).all()
    only = syn.generate_task(SHAPE, 0, n_views=2, families=["tubes"], n_classes=2)
    assert only.families == {1: "tubes", 2: "tubes"}
    nested = syn.generate_task(SHAPE, 0, n_views=2, families=["nested"], n_classes=1)
    assert nested.families == {1: "nested"}  # a nested structure on the last label keeps one label
    drawn = {len(syn.generate_task(16, s, n_views=1).families) for s in range(8)}
    assert drawn <= {1, 2, 3} and len(drawn) >= 2


def test_task_crop_keeps_every_target_in_every_view():
    task = syn.generate_task(32, 2, n_views=3, crop=(24, 20, 16))
    assert task.images.shape == task.labels.shape == (3, 24, 20, 16)
    assert (_voxels(task) > 0).all()
    full = syn.generate_task(32, 2, n_views=3)
    assert (_voxels(task) >= 0.6 * _voxels(full).min(0)).all()


def test_task_input_errors():
    with pytest.raises(InputError, match="n_views"):
        syn.generate_task(SHAPE, 0, n_views=0)
    with pytest.raises(InputError, match="n_classes"):
        syn.generate_task(SHAPE, 0, n_classes=6)
    with pytest.raises(InputError, match="crop"):
        syn.generate_task(SHAPE, 0, crop=(SHAPE + 1, 8, 8))
    with pytest.raises(InputError, match="valid options"):
        syn.generate_task(SHAPE, 0, channels=2)
    with pytest.raises(InputError, match="rotate"):
        syn.generate_task(SHAPE, 0, rotate=90)
    with pytest.raises(InputError, match="valid families"):
        syn.generate_task(SHAPE, 0, families=["spirals"])
    with pytest.raises(InputError):
        syn.generate_task(SHAPE, -1)
