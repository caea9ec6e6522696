from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk

import irisseg
from irisseg.errors import InputError
from irisseg.io import (
    SUFFIXES,
    Volume,
    check_same_geometry,
    orientation_code,
    read_mask,
    read_volume,
    same_geometry,
    write_dicom_series,
    write_volume,
)


def assert_geometry_equal(a: Volume, b: Volume, atol: float) -> None:
    assert a.shape == b.shape
    np.testing.assert_allclose(a.spacing, b.spacing, atol=atol)
    np.testing.assert_allclose(a.origin, b.origin, atol=atol)
    np.testing.assert_allclose(a.direction, b.direction, atol=atol)


def test_top_level_exports():
    assert irisseg.read_volume is read_volume
    assert irisseg.write_volume is write_volume
    assert irisseg.Volume is Volume


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint8])
def test_round_trip_every_format(tmp_path, oblique_volume, suffix, dtype):
    vol = oblique_volume.with_array(oblique_volume.array.astype(dtype))
    path = write_volume(vol, tmp_path / f"img{suffix}")
    back = read_volume(path)
    assert back.array.dtype == dtype
    np.testing.assert_array_equal(back.array, vol.array)
    # NIfTI stores geometry in float32: positions around 100 mm keep ~1e-5 mm.
    assert_geometry_equal(back, vol, atol=1e-4)
    assert same_geometry(back, vol)
    # nothing else was left next to the file (temporary folders are cleaned up)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".irisseg")]
    assert leftovers == []


def test_sitk_round_trip_and_axis_order(oblique_volume):
    image = oblique_volume.to_sitk()
    # SimpleITK size is (x, y, z) = reversed array shape; spacing stays (x, y, z)
    assert image.GetSize() == tuple(reversed(oblique_volume.shape))
    assert image.GetSpacing() == oblique_volume.spacing
    back = Volume.from_sitk(image)
    np.testing.assert_array_equal(back.array, oblique_volume.array)
    assert_geometry_equal(back, oblique_volume, atol=1e-12)
    assert oblique_volume.spacing_zyx == (3.0, 1.3, 0.7)
    # physical point of index (i, j, k) in (x, y, z) order follows origin + D @ (spacing * index)
    idx = (2, 3, 4)
    expected = np.asarray(oblique_volume.origin) + oblique_volume.direction @ (np.asarray(oblique_volume.spacing) * idx)
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(idx), expected, atol=1e-9)


def test_dicom_series_round_trip(tmp_path, oblique_volume):
    import locale

    before = locale.setlocale(locale.LC_ALL)
    folder = write_dicom_series(oblique_volume, tmp_path / "series")
    assert locale.setlocale(locale.LC_ALL) == before  # GDCM's writer sets "C"; the process keeps its own
    assert len(list(folder.glob("*.dcm"))) == oblique_volume.shape[0]
    back = read_volume(folder)
    np.testing.assert_array_equal(back.array, oblique_volume.array)
    assert_geometry_equal(back, oblique_volume, atol=1e-4)


def test_dicom_slices_ordered_by_position(tmp_path, oblique_volume):
    folder = write_dicom_series(oblique_volume, tmp_path / "series")
    # rename files so that alphabetical order is reversed: reading must still order by position
    files = sorted(folder.glob("*.dcm"))
    for i, f in enumerate(files):
        f.rename(folder / f"z{len(files) - i:04d}.dcm")
    back = read_volume(folder)
    np.testing.assert_array_equal(back.array, oblique_volume.array)


def test_dicom_folder_with_two_series(tmp_path, oblique_volume):
    write_dicom_series(oblique_volume, tmp_path / "mixed", series_uid="1.2.3.4.1")
    second = oblique_volume.with_array(oblique_volume.array[::-1].copy())
    for f in write_dicom_series(second, tmp_path / "tmp2", series_uid="1.2.3.4.2").glob("*.dcm"):
        f.rename(tmp_path / "mixed" / f"b_{f.name}")
    with pytest.raises(InputError, match=r"2 DICOM series.*1\.2\.3\.4\.1, 1\.2\.3\.4\.2"):
        read_volume(tmp_path / "mixed")
    chosen = read_volume(tmp_path / "mixed", series_uid="1.2.3.4.2")
    np.testing.assert_array_equal(chosen.array, second.array)


def test_labels_listed(tmp_path):
    arr = np.zeros((4, 5, 6), np.uint8)
    arr[0, :2, :3] = 1
    arr[3, 4, 5] = 7
    vol = read_volume(write_volume(Volume(arr, spacing=(2.0, 1.0, 0.5)), tmp_path / "lab.nii.gz"))
    assert vol.is_label_map
    assert vol.labels() == {1: 6, 7: 1}
    assert vol.voxel_volume_ml == pytest.approx(1e-3)
    assert not Volume(np.full((2, 2, 2), 0.5, np.float32)).is_label_map
    assert Volume(np.full((2, 2, 2), 0.5, np.float32)).labels() == {}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.nii.gz", "no such file"),
        (lambda d: (d / "junk.nii.gz").write_bytes(b"not an image at all" * 10) and d / "junk.nii.gz", "cannot read image"),
        (lambda d: (d / "notes.txt").write_text("hello") and d / "notes.txt", "unsupported file type"),
        (lambda d: (d / "empty_dir").mkdir() or d / "empty_dir", "no DICOM series"),
    ],
)
def test_read_errors_name_the_file(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(InputError, match=message) as info:
        read_volume(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_read_rejects_2d_4d_and_vectors(tmp_path):
    sitk.WriteImage(sitk.Image(8, 9, sitk.sitkFloat32), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(InputError, match="expected a 3D volume, got a 2D"):
        read_volume(tmp_path / "flat.nii.gz")
    sitk.WriteImage(sitk.Image([4, 5, 6, 2], sitk.sitkFloat32), str(tmp_path / "four.nii.gz"))
    with pytest.raises(InputError, match="expected a 3D volume, got a 4D"):
        read_volume(tmp_path / "four.nii.gz")
    sitk.WriteImage(sitk.Image([4, 5, 6], sitk.sitkVectorFloat32, 3), str(tmp_path / "vec.mha"))
    with pytest.raises(InputError, match="3 components"):
        read_volume(tmp_path / "vec.mha")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_nan_intensities_rejected(tmp_path, suffix):
    arr = np.zeros((3, 4, 5), np.float32)
    arr[1, 2, 3] = np.nan
    arr[0, 0, 0] = np.inf
    path = write_volume(Volume(arr), tmp_path / f"nan{suffix}")
    with pytest.raises(InputError, match=f"nan{suffix}: image contains 2 NaN or infinite"):
        read_volume(path)
    kept = read_volume(path, allow_nan=True).array  # ITK's NIfTI reader zeroes them: irisseg puts them back
    assert np.isnan(kept[1, 2, 3]) and kept[0, 0, 0] == np.inf
    assert np.isfinite(kept).sum() == arr.size - 2


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
def test_truncated_nifti_is_refused(tmp_path, suffix, dtype):
    """ITK reads a cut NIfTI file as a whole volume with zeros at the end; irisseg refuses it."""
    import gzip

    arr = (np.arange(20 * 21 * 22) % 97).astype(dtype).reshape(20, 21, 22)
    path = write_volume(Volume(arr), tmp_path / f"whole{suffix}")
    assert np.array_equal(read_volume(path).array, arr)  # the complete file reads back
    stored = path.read_bytes()
    data = gzip.decompress(stored) if suffix == ".nii.gz" else stored
    cut = [(stored[: len(stored) // 2], "corrupt or truncated" if suffix == ".nii.gz" else "truncated file: ")]
    if suffix == ".nii.gz":  # a complete gzip stream around too few bytes
        cut.append((gzip.compress(data[:-7]), "truncated file: "))
    for raw, message in cut:
        bad = tmp_path / f"cut{suffix}"
        bad.write_bytes(raw)
        with pytest.raises(InputError, match=message) as info:
            read_volume(bad)
        assert str(bad) in str(info.value) and "\n" not in str(info.value)
    plain = tmp_path / f"plain{suffix}"  # a .nii.gz stored uncompressed (ITK reads it) is checked as it is
    plain.write_bytes(data)
    assert np.array_equal(read_volume(plain).array, arr)


def test_read_mask_checks(tmp_path, blob_image_and_mask):
    image, mask = blob_image_and_mask
    img_path = write_volume(image, tmp_path / "img.nii.gz")
    good = write_volume(mask, tmp_path / "mask.nii.gz")
    got = read_mask(good, reference=image, reference_name=img_path)
    assert got.array.dtype == np.uint8 and got.labels() == {1: int(mask.array.sum())}

    empty = write_volume(mask.with_array(np.zeros_like(mask.array)), tmp_path / "empty.nii.gz")
    with pytest.raises(InputError, match="empty.nii.gz: mask is empty"):
        read_mask(empty)
    multi = write_volume(mask.with_array(mask.array * 3), tmp_path / "three.nii.gz")
    with pytest.raises(InputError, match="not binary"):
        read_mask(multi, binary=True)
    assert read_mask(multi, label=3).labels() == {1: int(mask.array.sum())}
    with pytest.raises(InputError, match="no voxel with label 2"):
        read_mask(multi, label=2)
    frac = write_volume(mask.with_array(mask.array * 0.5), tmp_path / "soft.nii.gz")
    with pytest.raises(InputError, match="non-negative integers"):
        read_mask(frac)
    shifted = Volume(mask.array, mask.spacing, (11.0, -20.0, 30.0), mask.direction)
    moved = write_volume(shifted, tmp_path / "moved.nii.gz")
    with pytest.raises(InputError, match=r"moved.nii.gz: geometry does not match .*img.nii.gz: origin"):
        read_mask(moved, reference=image, reference_name=img_path)


def test_geometry_comparison(oblique_volume):
    same = oblique_volume.with_array(oblique_volume.array)
    assert same_geometry(oblique_volume, same)
    other = Volume(oblique_volume.array, (0.7, 1.3, 3.1), oblique_volume.origin, oblique_volume.direction)
    assert not same_geometry(oblique_volume, other)
    assert same_geometry(oblique_volume, other, tol=0.2)
    with pytest.raises(InputError, match=r"b.nii: geometry does not match a.nii: spacing"):
        check_same_geometry(oblique_volume, other, "a.nii", "b.nii")
    small = Volume(oblique_volume.array[:3], oblique_volume.spacing, oblique_volume.origin, oblique_volume.direction)
    assert not same_geometry(oblique_volume, small)


def test_orientation_codes():
    assert orientation_code(Volume(np.zeros((2, 2, 2)))) == "LPS"
    flipped = Volume(np.zeros((2, 2, 2)), direction=np.diag([-1.0, -1.0, 1.0]))
    assert orientation_code(flipped) == "RAS"


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    vol = Volume(np.zeros((3, 3, 3), np.float32))

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", boom)
    with pytest.raises(InputError, match="cannot write image"):
        write_volume(vol, tmp_path / "out.nii.gz")
    assert os.listdir(tmp_path) == []


def test_write_rejects_unknown_suffix(tmp_path):
    with pytest.raises(InputError, match="unsupported output type"):
        write_volume(Volume(np.zeros((2, 2, 2))), tmp_path / "x.png")


def test_volume_validation():
    with pytest.raises(InputError, match="3D array"):
        Volume(np.zeros((4, 4)))
    with pytest.raises(InputError, match="spacing must be positive"):
        Volume(np.zeros((2, 2, 2)), spacing=(1, 0, 1))
