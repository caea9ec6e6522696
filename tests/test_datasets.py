"""irisseg.data.datasets: nnU-Net v1/v2 and MSD raw datasets, validation, deterministic splits."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from irisseg.data.datasets import (
    Dataset,
    image_cases,
    kfold,
    load_dataset,
    load_splits,
    save_splits,
    split,
    stack_channels,
)
from irisseg.errors import InputError
from irisseg.io import Volume, write_volume

SHAPE = (6, 8, 10)
GEO = dict(spacing=(0.8, 1.2, 2.5), origin=(-10.0, 20.0, 5.0))


def _label_array(value: int = 1) -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[1:4, 2:6, 3:8] = value
    return label


def _write_json(path: Path, content) -> None:
    path.write_text(json.dumps(content, indent=1))


def make_v2(
    root: Path,
    ids=("liver_001", "liver_002", "liver_003"),
    channels=("CT", "PET"),
    labels=None,
    ending=".nii.gz",
    write_json=True,
) -> Path:
    """An nnU-Net v2 raw dataset: channel c of case i is filled with 100 * i + c."""
    labels = labels or {"background": 0, "liver": 1, "tumour": 2}
    for i, cid in enumerate(ids):
        for c in range(len(channels)):
            image = np.full(SHAPE, 100 * i + c, np.float32)
            write_volume(Volume(image, **GEO), root / "imagesTr" / f"{cid}_{c:04d}{ending}")
        write_volume(Volume(_label_array(1 + i % 2), **GEO), root / "labelsTr" / f"{cid}{ending}")
    if write_json:
        _write_json(
            root / "dataset.json",
            {
                "name": "Dataset042_Liver",
                "channel_names": {str(c): name for c, name in enumerate(channels)},
                "labels": labels,
                "numTraining": len(ids),
                "file_ending": ending,
            },
        )
    return root


# ---------------------------------------------------------------------------------------------------
# nnU-Net v2
# ---------------------------------------------------------------------------------------------------
def test_v2_two_channels(tmp_path):
    root = make_v2(tmp_path / "ds")
    # test images with a missing label, and junk that must be ignored
    for c in range(2):
        write_volume(
            Volume(np.zeros(SHAPE, np.float32), **GEO), root / "imagesTs" / f"liver_100_{c:04d}.nii.gz"
        )
    (root / "imagesTr" / "._liver_001_0000.nii.gz").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
    (root / "labelsTr" / "._liver_009.nii.gz").write_bytes(b"junk")
    (root / "imagesTr" / ".DS_Store").write_bytes(b"junk")
    (root / "imagesTr" / "notes.txt").write_text("not an image")

    ds = load_dataset(root)
    assert isinstance(ds, Dataset)
    assert ds.format == "nnunet_v2"
    assert ds.name == "Dataset042_Liver"
    assert ds.root == root
    assert ds.channel_names == ["CT", "PET"]
    assert ds.num_channels == 2
    assert ds.labels == {"background": 0, "liver": 1, "tumour": 2}
    assert ds.label_names == {0: "background", 1: "liver", 2: "tumour"}
    assert ds.file_ending == ".nii.gz"
    assert len(ds) == 3
    assert ds.case_ids == ["liver_001", "liver_002", "liver_003"]
    assert ds.metadata["numTraining"] == 3
    assert ds.extra == {}
    assert [c.case_id for c in ds.test_cases] == ["liver_100"]
    assert ds.test_cases[0].label_path is None

    case = ds["liver_002"]
    assert case is ds[1] and ds[-1].case_id == "liver_003"
    assert [p.name for p in case.image_paths] == ["liver_002_0000.nii.gz", "liver_002_0001.nii.gz"]
    assert case.label_path == root / "labelsTr" / "liver_002.nii.gz"
    assert [c.case_id for c in ds] == ds.case_ids

    images, label = case.load()
    assert len(images) == 2
    assert images[0].shape == SHAPE
    assert float(images[0].array[0, 0, 0]) == 100.0 and float(images[1].array[0, 0, 0]) == 101.0
    np.testing.assert_allclose(images[1].spacing, GEO["spacing"], atol=1e-5)
    assert label.array.dtype == np.uint8
    assert label.labels() == {2: int(_label_array().sum())}
    np.testing.assert_array_equal(case.load_label().array, label.array)  # via the image header
    stacked = stack_channels(images)
    assert stacked.shape == (2, *SHAPE) and stacked.dtype == np.float32

    with pytest.raises(InputError, match="no training case 'liver_999'"):
        ds["liver_999"]
    with pytest.raises(InputError, match="liver_100: no label file"):
        ds.test_cases[0].load_label()


def test_v2_other_file_ending_region_labels_and_numtraining_warning(tmp_path):
    root = make_v2(
        tmp_path / "ds",
        ids=("a", "b"),
        channels=("T1",),
        ending=".nrrd",
        labels={"background": 0, "whole": [1, 2], "core": 2},
    )
    meta = json.loads((root / "dataset.json").read_text())
    meta["numTraining"] = 5
    _write_json(root / "dataset.json", meta)
    with pytest.warns(UserWarning, match="numTraining is 5 but 2 training cases"):
        ds = load_dataset(root / "dataset.json")  # the json file itself works too
    assert ds.file_ending == ".nrrd"
    assert ds.is_region_based
    assert ds.labels == {"background": 0, "whole": (1, 2), "core": 2}
    assert ds.label_names == {0: "background", 1: "label_1", 2: "core"}
    assert ds.label_values == (0, 1, 2)
    assert [p.name for p in ds["b"].image_paths] == ["b_0000.nrrd"]
    assert ds["b"].load_label().labels() == {2: int(_label_array().sum())}


def test_v2_explicit_dataset_entry(tmp_path):
    root = make_v2(tmp_path / "ds", ids=("x1",), channels=("CT",))
    (root / "imagesTr" / "x1_0000.nii.gz").rename(root / "scan.nii.gz")
    meta = json.loads((root / "dataset.json").read_text())
    meta["dataset"] = {"x1": {"images": ["scan.nii.gz"], "label": "labelsTr/x1.nii.gz"}}
    _write_json(root / "dataset.json", meta)
    ds = load_dataset(root)
    assert ds.case_ids == ["x1"]
    assert ds["x1"].image_paths == [root / "scan.nii.gz"]
    images, label = ds["x1"].load()
    assert label.labels() == {1: int(_label_array().sum())}


# ---------------------------------------------------------------------------------------------------
# MSD / nnU-Net v1
# ---------------------------------------------------------------------------------------------------
def _msd_json(ids, modality, test=()):
    return {
        "name": "BrainTumour",
        "tensorImageSize": "4D",
        "modality": modality,
        "labels": {"0": "background", "1": "edema", "2": "enhancing tumour"},
        "numTraining": len(ids),
        "numTest": len(test),
        "training": [{"image": f"./imagesTr/{i}.nii.gz", "label": f"./labelsTr/{i}.nii.gz"} for i in ids],
        "test": [f"./imagesTs/{i}.nii.gz" for i in test],
    }


def test_msd_4d_listing_works_but_loading_explains(tmp_path):
    root = tmp_path / "Task01_BrainTumour"
    ids = ["BRATS_002", "BRATS_001"]
    for i in [*ids, "BRATS_500"]:
        image = sitk.JoinSeries([Volume(np.full(SHAPE, c, np.float32), **GEO).to_sitk() for c in range(2)])
        folder = "imagesTs" if i == "BRATS_500" else "imagesTr"
        (root / folder).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(root / folder / f"{i}.nii.gz"))
        if folder == "imagesTr":
            write_volume(Volume(_label_array(2), **GEO), root / "labelsTr" / f"{i}.nii.gz")
            (root / "imagesTr" / f"._{i}.nii.gz").write_bytes(b"junk")
            (root / "labelsTr" / f"._{i}.nii.gz").write_bytes(b"junk")
    _write_json(root / "dataset.json", _msd_json(ids, {"0": "FLAIR", "1": "T1w"}, test=["BRATS_500"]))

    ds = load_dataset(root)
    assert ds.format == "msd"
    assert ds.name == "BrainTumour"
    assert ds.channel_names == ["FLAIR", "T1w"]
    assert ds.labels == {"background": 0, "edema": 1, "enhancing tumour": 2}
    assert ds.label_names == {0: "background", 1: "edema", 2: "enhancing tumour"}
    assert ds.case_ids == ["BRATS_001", "BRATS_002"]
    assert [c.case_id for c in ds.test_cases] == ["BRATS_500"]
    case = ds["BRATS_001"]
    assert case.multichannel_file and case.num_channels == 2
    assert case.image_paths == [root / "imagesTr" / "BRATS_001.nii.gz"]
    with pytest.raises(
        InputError, match=r"BRATS_001\.nii\.gz: holds 2 channels in one 4D file.*convert"
    ) as err:
        case.load_image()
    assert "BRATS_001_0000.nii.gz" in str(err.value)
    # the label still loads, checked against the 4D image's spatial geometry
    assert case.load_label().labels() == {2: int(_label_array().sum())}


def test_v1_per_channel_layout_and_single_channel_msd(tmp_path):
    # nnU-Net v1 task: dataset.json lists x.nii.gz, disk has x_0000.nii.gz, x_0001.nii.gz
    root = make_v2(tmp_path / "v1", ids=("p1", "p2"), channels=("T1", "T2"), write_json=False)
    _write_json(root / "dataset.json", _msd_json(["p1", "p2"], {"0": "T1", "1": "T2"}))
    ds = load_dataset(root)
    assert ds.format == "msd" and ds.case_ids == ["p1", "p2"]
    assert [p.name for p in ds["p2"].image_paths] == ["p2_0000.nii.gz", "p2_0001.nii.gz"]
    assert not ds["p2"].multichannel_file
    images, label = ds["p2"].load()
    assert [float(v.array.max()) for v in images] == [100.0, 101.0]
    assert label.labels() == {2: int(_label_array().sum())}

    # single-channel MSD: one 3D file per case, read directly
    root = tmp_path / "Task03_Liver"
    write_volume(Volume(np.ones(SHAPE, np.int16), **GEO), root / "imagesTr" / "liver_0.nii.gz")
    write_volume(Volume(_label_array(1), **GEO), root / "labelsTr" / "liver_0.nii.gz")
    _write_json(root / "dataset.json", _msd_json(["liver_0"], {"0": "CT"}, test=["liver_gone"]))
    with pytest.warns(UserWarning, match="1 test image.*missing.*liver_gone"):
        ds = load_dataset(root)
    assert ds.test_cases == []
    images, label = ds["liver_0"].load()
    assert len(images) == 1 and images[0].array.dtype == np.int16


# ---------------------------------------------------------------------------------------------------
# synthetic datasets (cases.json)
# ---------------------------------------------------------------------------------------------------
def test_synthetic_findings_dataset(tmp_path):
    synthetic = pytest.importorskip("irisseg.data.synthetic", reason="irisseg.data.synthetic not written yet")
    root = synthetic.generate_dataset(tmp_path / "syn", "findings", 3, shape=16, seed=3)
    ds = load_dataset(root)
    assert ds.format == "nnunet_v2"
    assert ds.case_ids == ["case_0000", "case_0001", "case_0002"]
    assert ds.channel_names == ["synthetic"]
    assert ds.labels["background"] == 0 and len(ds.labels) == len(synthetic.FINDINGS) + 1
    assert sorted(ds.extra) == ds.case_ids
    for case in ds:
        images, label = case.load()
        findings = ds.extra[case.case_id]["findings"]
        assert len(findings) == len(synthetic.FINDINGS)
        # the multi-hot vector says which finding labels occur in the label map
        present = {ds.label_names[v] for v in label.labels()}
        assert present == {name for name, hot in zip(synthetic.FINDINGS, findings, strict=True) if hot}
        assert images[0].shape == label.shape == (16, 16, 16)


# ---------------------------------------------------------------------------------------------------
# no dataset.json
# ---------------------------------------------------------------------------------------------------
def test_inferred_without_dataset_json(tmp_path):
    root = make_v2(tmp_path / "loose", ids=("a", "b", "c"), channels=("x", "y"), write_json=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_dataset(root)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "no dataset.json" in messages[0]
    assert ds.format == "inferred"
    assert ds.case_ids == ["a", "b", "c"]
    assert ds.channel_names == ["channel_0", "channel_1"]
    assert ds.labels == {"background": 0, "label_1": 1, "label_2": 2}
    assert ds["c"].load_label().labels() == {1: int(_label_array().sum())}


def test_not_a_dataset(tmp_path):
    with pytest.raises(InputError, match="no such dataset folder"):
        load_dataset(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"dataset\.json: no such file, and no imagesTr/labelsTr"):
        load_dataset(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------------
# broken datasets
# ---------------------------------------------------------------------------------------------------
def test_image_without_label_and_label_without_image(tmp_path):
    root = make_v2(tmp_path / "ds", ids=("c1", "c2", "c3", "c4"))
    (root / "labelsTr" / "c2.nii.gz").unlink()
    for c in range(2):
        (root / "imagesTr" / f"c4_{c:04d}.nii.gz").unlink()
    with pytest.raises(InputError) as err:
        load_dataset(root)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(root))
    assert "1 training image(s) without a label labelsTr/<case>.nii.gz: c2" in msg
    assert "1 label(s) without an image imagesTr/<case>_0000.nii.gz: c4" in msg


def test_many_unpaired_cases_are_counted(tmp_path):
    ids = [f"c{i:02d}" for i in range(8)]
    root = make_v2(tmp_path / "ds", ids=ids, channels=("CT",))
    for cid in ids[1:]:
        (root / "labelsTr" / f"{cid}.nii.gz").unlink()
    with pytest.raises(
        InputError,
        match=r"7 training image\(s\) without a label .*: c01, c02, c03, c04, c05 \.\.\. \(2 more\)",
    ):
        load_dataset(root)


def test_missing_and_extra_channel_files(tmp_path):
    root = make_v2(tmp_path / "ds", ids=("m1", "m2"))
    (root / "imagesTr" / "m2_0001.nii.gz").unlink()
    with pytest.raises(
        InputError,
        match=r"1 image\(s\) in imagesTr lack a channel file \(2 declared\), e.g.: m2_0001\.nii\.gz",
    ):
        load_dataset(root)
    write_volume(Volume(np.zeros(SHAPE, np.float32), **GEO), root / "imagesTr" / "m2_0001.nii.gz")
    write_volume(Volume(np.zeros(SHAPE, np.float32), **GEO), root / "imagesTr" / "m1_0002.nii.gz")
    with pytest.raises(InputError, match=r"channel beyond the 2 declared: m1_0002\.nii\.gz"):
        load_dataset(root)


def test_image_without_channel_suffix(tmp_path):
    root = make_v2(tmp_path / "ds", ids=("s1",), channels=("CT",))
    (root / "imagesTr" / "s1_0000.nii.gz").rename(root / "imagesTr" / "s1.nii.gz")
    with pytest.raises(
        InputError, match=r"s1\.nii\.gz: image name lacks the channel suffix _XXXX .*s1_0000\.nii\.gz"
    ):
        load_dataset(root)


def test_wrong_file_ending_is_explained(tmp_path):
    root = make_v2(tmp_path / "ds", ids=("e1",), channels=("CT",), ending=".nii")
    meta = json.loads((root / "dataset.json").read_text())
    meta["file_ending"] = ".nii.gz"
    _write_json(root / "dataset.json", meta)
    with pytest.raises(
        InputError, match=r"no image named <case>_0000\.nii\.gz \(found \.nii files: check file_ending\)"
    ):
        load_dataset(root)


@pytest.mark.parametrize(
    "content, expected",
    [
        (
            '{"labels": {"background": 0}, "channel_names": {"0": "CT"',
            r"dataset\.json: not valid JSON \(line 1",
        ),
        ("[1, 2]", r"dataset\.json: expected a JSON object, got list"),
        ('{"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}', r"dataset\.json: no 'labels' entry"),
        ('{"labels": {"background": 0}}', r"dataset\.json: declares no channels"),
        ('{"labels": {"background": "zero"}, "channel_names": {"0": "CT"}}', r"label 'background' must map"),
        ('{"labels": {"background": 0}, "channel_names": {"1": "CT"}}', r"must number channels 0 to 0"),
    ],
)
def test_bad_dataset_json(tmp_path, content, expected):
    root = make_v2(tmp_path / "ds", ids=("j1",), channels=("CT",))
    (root / "dataset.json").write_text(content)
    with pytest.raises(InputError, match=expected) as err:
        load_dataset(root)
    assert str(root / "dataset.json") in str(err.value) and "\n" not in str(err.value)


def test_corrupt_cases_json(tmp_path):
    root = make_v2(tmp_path / "ds", ids=("j1",), channels=("CT",))
    (root / "cases.json").write_text("{oops")
    with pytest.raises(InputError, match=r"cases\.json: not valid JSON"):
        load_dataset(root)


def test_label_value_not_declared(tmp_path):
    root = make_v2(tmp_path / "ds", ids=("v1", "v2"), channels=("CT",), labels={"background": 0, "liver": 1})
    ds = load_dataset(root)
    ds["v1"].load()  # holds label 1: fine
    with pytest.raises(InputError) as err:
        ds["v2"].load()  # holds label 2
    assert str(err.value) == (
        f"{root / 'labelsTr' / 'v2.nii.gz'}: label value(s) 2 not declared in dataset.json (declared: 0, 1)"
    )


def test_label_geometry_differs_from_image(tmp_path):
    root = make_v2(tmp_path / "ds", ids=("g1",), channels=("CT", "PET"))
    shifted = dict(GEO, origin=(-10.0, 20.0, 9.0))
    write_volume(Volume(_label_array(1), **shifted), root / "labelsTr" / "g1.nii.gz")
    ds = load_dataset(root)  # file names only: still fine
    with pytest.raises(
        InputError, match=r"labelsTr/g1\.nii\.gz: geometry does not match .*g1_0000\.nii\.gz: origin"
    ):
        ds["g1"].load()
    with pytest.raises(InputError, match=r"g1\.nii\.gz: geometry does not match"):
        ds["g1"].load_label()
    # channels must agree with each other too
    write_volume(Volume(np.zeros((6, 8, 11), np.float32), **GEO), root / "imagesTr" / "g1_0001.nii.gz")
    with pytest.raises(
        InputError, match=r"g1_0001\.nii\.gz: geometry does not match .*g1_0000\.nii\.gz: shape"
    ):
        ds["g1"].load_image()


# ---------------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------------
IDS = [f"case_{i:03d}" for i in range(23)]


def test_split_deterministic_disjoint_covering_order_independent():
    result = split(IDS, seed=7)
    assert set(result) == {"train", "val", "test"}
    assert [len(result[k]) for k in ("train", "val", "test")] == [
        16,
        4,
        3,
    ]  # 16.1, 3.45, 3.45 -> largest remainder
    flat = result["train"] + result["val"] + result["test"]
    assert sorted(flat) == IDS and len(set(flat)) == len(IDS)
    assert all(result[k] == sorted(result[k]) for k in result)
    assert split(list(reversed(IDS)), seed=7) == result
    assert split(set(IDS), seed=7) == result
    assert split(IDS, seed=8) != result
    # pinned values: a split must not change between versions (saved splits stay valid)
    assert result["val"] == ["case_005", "case_016", "case_020", "case_022"]
    assert result["test"] == ["case_002", "case_009", "case_011"]


def test_split_small_and_invalid():
    small = split(["a", "b", "c"])
    assert sorted(len(v) for v in small.values()) == [1, 1, 1]
    assert split(["a", "b", "c", "d"], fractions=(0.5, 0.5, 0.0))["test"] == []
    with pytest.raises(InputError, match="summing to 1"):
        split(IDS, fractions=(0.5, 0.2, 0.2))
    with pytest.raises(InputError, match="duplicate case ids: case_001"):
        split([*IDS, "case_001"])


def test_split_of_dataset(tmp_path):
    ds = load_dataset(make_v2(tmp_path / "ds", ids=("a", "b", "c", "d"), channels=("CT",)))
    assert split(ds, seed=1) == split(["d", "c", "b", "a"], seed=1)


def test_kfold():
    folds = kfold(IDS, k=5, seed=0)
    assert len(folds) == 5
    vals = [v for _, v in folds]
    assert sorted(x for v in vals for x in v) == IDS  # every case validated exactly once
    assert sorted(len(v) for v in vals) == [4, 4, 5, 5, 5]
    for train, val in folds:
        assert not set(train) & set(val)
        assert sorted(train + val) == IDS
        assert train == sorted(train) and val == sorted(val)
    assert kfold(list(reversed(IDS)), k=5, seed=0) == folds
    assert kfold(IDS, k=5, seed=1) != folds
    with pytest.raises(InputError, match="2 <= k <= number of cases"):
        kfold(["a", "b"], k=3)


def test_splits_final_json_round_trip(tmp_path):
    folds = kfold(IDS, k=5, seed=3)
    path = save_splits(tmp_path / "pre" / "splits_final.json", folds)
    raw = json.loads(path.read_text())
    assert isinstance(raw, list) and len(raw) == 5 and set(raw[0]) == {"train", "val"}
    assert raw[2]["val"] == folds[2][1]
    assert load_splits(path) == folds
    assert load_splits(path, case_ids=IDS) == folds
    with pytest.raises(InputError, match=r"splits_final\.json: fold 0 names 1 unknown case\(s\): case_000"):
        load_splits(path, case_ids=IDS[1:])

    one = split(IDS)
    save_splits(tmp_path / "one.json", one)
    assert json.loads((tmp_path / "one.json").read_text()) == [one]
    assert load_splits(tmp_path / "one.json") == [(one["train"], one["val"])]

    (tmp_path / "bad.json").write_text('[{"train": ["a"], "val": ["a"]}]')
    with pytest.raises(InputError, match=r"bad\.json: fold 0: case\(s\) in both train and val: a"):
        load_splits(tmp_path / "bad.json")
    (tmp_path / "worse.json").write_text('{"train": []}')
    with pytest.raises(InputError, match=r"worse\.json: expected a non-empty list"):
        load_splits(tmp_path / "worse.json")


def test_msd_unpaired_and_missing_channel(tmp_path):
    root = make_v2(tmp_path / "v1", ids=("p1", "p2", "p3"), channels=("T1", "T2"), write_json=False)
    _write_json(root / "dataset.json", _msd_json(["p1", "p2", "p3"], {"0": "T1", "1": "T2"}))
    (root / "labelsTr" / "p1.nii.gz").unlink()  # listed image without label
    (root / "imagesTr" / "p3_0001.nii.gz").unlink()  # missing channel
    write_volume(Volume(_label_array(1), **GEO), root / "labelsTr" / "p9.nii.gz")  # unlisted label, no image
    with pytest.raises(InputError) as err:
        load_dataset(root)
    msg = str(err.value)
    assert "1 training image(s) without a label: p1" in msg
    assert "1 label(s) without an image: p9" in msg
    assert "1 image(s) lack a channel file (2 declared), e.g.: p3_0001.nii.gz" in msg


def test_image_cases_groups_channel_files_and_reports_what_is_missing(tmp_path):
    vol = Volume(np.zeros((4, 5, 6), np.float32))
    folder = tmp_path / "imagesTs"
    for case in ("b", "a"):
        for c in range(2):
            write_volume(vol, folder / f"{case}_{c:04d}.nii.gz")
    cases = image_cases(folder, n_channels=2)
    assert [c for c, _ in cases] == ["a", "b"]
    assert [p.name for p in cases[0][1]] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    # A channel file finds its siblings; a single-channel model takes any file as one case.
    assert image_cases(folder / "b_0000.nii.gz", n_channels=2) == [("b", [folder / "b_0000.nii.gz",
                                                                          folder / "b_0001.nii.gz"])]
    plain = write_volume(vol, tmp_path / "scan.nii.gz")
    assert image_cases(plain) == [("scan", [plain])]
    with pytest.raises(InputError, match="c_0001.nii.gz: missing channel file"):
        write_volume(vol, folder / "c_0000.nii.gz")
        image_cases(folder / "c_0000.nii.gz", n_channels=2)
    with pytest.raises(InputError, match="lack a channel file"):
        image_cases(folder, n_channels=2)
    with pytest.raises(InputError, match="expects 2 channels"):
        image_cases(plain, n_channels=2)
    with pytest.raises(InputError, match="no such file"):
        image_cases(tmp_path / "nope")
