from __future__ import annotations

import numpy as np
import pytest

from irisseg.errors import InputError
from irisseg.io import Volume, same_geometry
from irisseg.preprocess import (
    CT_WINDOWS,
    GridRecord,
    PreprocessConfig,
    Preprocessor,
    canonical_axes,
    clip_percentiles,
    crop_or_pad,
    crop_to_bbox,
    ct_window,
    foreground_bbox,
    model_grid_record,
    reorient,
    resample,
    zscore,
)

CONFIGS = {
    "intensity_only": PreprocessConfig(),
    "to_shape": PreprocessConfig(target_shape=(16, 16, 16)),
    "to_spacing": PreprocessConfig(target_spacing=(1.0, 1.0, 1.0)),
    "crop_resample_pad": PreprocessConfig(
        crop_foreground=True, foreground_margin=2, target_spacing=(1.5, 1.5, 1.5), pad_shape=(24, 24, 24)
    ),
    "crop_only": PreprocessConfig(pad_shape=(12, 40, 20)),
    "no_reorient": PreprocessConfig(reorient=False, target_shape=(16, 16, 16)),
}


def physical_center_of_mass(vol: Volume) -> np.ndarray:
    idx = np.argwhere(vol.array > 0).mean(axis=0)[::-1]  # (x, y, z) index
    return np.asarray(vol.origin) + vol.direction @ (np.asarray(vol.spacing) * idx)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_invert_restores_geometry_exactly(blob_image_and_mask, name):
    image, mask = blob_image_and_mask
    out = Preprocessor(CONFIGS[name])(image, masks=[mask])
    back = out.record.invert(out.masks[0], kind="label")
    assert back.shape == image.shape
    assert back.spacing == image.spacing and back.origin == image.origin
    np.testing.assert_array_equal(back.direction, image.direction)
    assert back.array.dtype == mask.array.dtype
    # the array comes back within interpolation tolerance: most voxels equal, errors only at the border
    agreement = (back.array == mask.array).mean()
    assert agreement > 0.95, agreement
    dice = 2 * np.logical_and(back.array, mask.array).sum() / (back.array.sum() + mask.array.sum())
    assert dice > 0.9


@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_grid_stays_in_place(blob_image_and_mask, name):
    """The mask on the model grid sits at the same physical position as the original mask."""
    image, mask = blob_image_and_mask
    out = Preprocessor(CONFIGS[name])(image, masks=[mask])
    moved = np.linalg.norm(physical_center_of_mass(out.masks[0]) - physical_center_of_mass(mask))
    assert moved < 1.5 * max(out.masks[0].spacing)


def test_invert_of_probabilities_is_linear_and_float(blob_image_and_mask):
    image, _ = blob_image_and_mask
    out = Preprocessor(target_shape=(10, 10, 10))(image)
    prob = np.full((10, 10, 10), 0.25, np.float32)
    back = out.record.invert(prob, kind="linear")
    assert back.array.dtype == np.float32
    np.testing.assert_allclose(back.array, 0.25, atol=1e-6)


def test_identity_when_nothing_geometric(blob_image_and_mask):
    image, mask = blob_image_and_mask
    out = Preprocessor()(image, masks=[mask])
    assert out.record.steps == []
    np.testing.assert_array_equal(out.record.invert(out.masks[0]).array, mask.array)
    assert out.image.shape == (1, *image.shape)


def test_record_apply_matches_preprocessing_and_serialises(blob_image_and_mask):
    image, mask = blob_image_and_mask
    out = Preprocessor(CONFIGS["crop_resample_pad"])(image, masks=[mask])
    record = GridRecord.from_dict(out.record.to_dict())
    again = record.apply(mask, kind="label")
    np.testing.assert_array_equal(again.array, out.masks[0].array)
    assert same_geometry(again, out.masks[0], tol=1e-9)
    assert out.image.shape == (1, 24, 24, 24)


def test_multichannel_images_share_one_record(blob_image_and_mask):
    image, _ = blob_image_and_mask
    second = image.with_array(image.array * -2.0)
    out = Preprocessor(target_shape=(8, 12, 10))([image, second])
    assert out.image.shape == (2, 8, 12, 10)
    # z-scored channels: the second is the negative of the first
    np.testing.assert_allclose(out.image[1], -out.image[0], atol=1e-4)


def test_intensity_steps():
    rng = np.random.default_rng(0)
    arr = rng.normal(10.0, 3.0, size=(10, 10, 10)).astype(np.float32)
    arr[0, 0, 0] = 1e6
    clipped = clip_percentiles(arr, 0.5, 99.5)
    assert clipped.max() < 100 and clipped.max() == pytest.approx(np.percentile(arr, 99.5))
    z = zscore(arr)
    assert z.mean() == pytest.approx(0.0, abs=1e-5) and z.std() == pytest.approx(1.0, abs=1e-4)
    mask = np.zeros_like(arr)
    mask[:5] = 1
    zm = zscore(arr, mask=mask)
    assert zm[:5].mean() == pytest.approx(0.0, abs=1e-4)
    assert np.all(zscore(np.ones((3, 3, 3))) == 0)
    hu = np.array([-1100.0, -160.0, 40.0, 240.0, 3000.0])
    np.testing.assert_allclose(ct_window(hu, *CT_WINDOWS["abdomen"]), [0, 0, 0.5, 1, 1])
    with pytest.raises(InputError):
        clip_percentiles(arr, 60, 50)


def test_ct_window_config_replaces_zscore():
    vol = Volume(np.linspace(-1000, 1000, 27, dtype=np.float32).reshape(3, 3, 3))
    out = Preprocessor(ct_window="lung")(vol)
    # lung window (-600, 1500): [-1350, 150] HU -> [0, 1]
    assert out.image.min() == pytest.approx(350 / 1500) and out.image.max() == 1.0


def test_resample_keeps_extent_and_kind():
    vol = Volume(np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8), spacing=(1.0, 2.0, 3.0), origin=(5, 6, 7))
    out = resample(vol, spacing=(2.0, 2.0, 2.0))
    assert out.shape == (6, 6, 4)  # z: 4*3/2, y: 6*2/2, x: 8*1/2
    np.testing.assert_allclose(np.asarray(out.spacing) * out.size_xyz, np.asarray(vol.spacing) * vol.size_xyz)
    lab = Volume(np.arange(8, dtype=np.uint8).reshape(2, 2, 2))
    up = resample(lab, shape=(4, 4, 4), kind="label")
    assert up.array.dtype == np.uint8 and set(np.unique(up.array)) == set(range(8))


def test_crop_pad_and_bbox():
    vol = Volume(np.arange(27, dtype=np.int16).reshape(3, 3, 3), spacing=(2.0, 2.0, 2.0))
    padded = crop_or_pad(vol, (5, 5, 5))
    assert padded.shape == (5, 5, 5) and padded.array[1:4, 1:4, 1:4].tolist() == vol.array.tolist()
    assert padded.origin == (-2.0, -2.0, -2.0)
    cropped = crop_to_bbox(vol, (1, 1, 1), (3, 3, 3))
    assert cropped.array.tolist() == vol.array[1:, 1:, 1:].tolist() and cropped.origin == (2.0, 2.0, 2.0)
    arr = np.zeros((10, 10, 10))
    arr[2:4, 5, 6:9] = 1
    assert foreground_bbox(arr) == ((2, 5, 6), (4, 6, 9))
    assert foreground_bbox(arr, margin=3) == ((0, 2, 3), (7, 9, 10))
    assert foreground_bbox(np.zeros((2, 3, 4))) == ((0, 0, 0), (2, 3, 4))


def test_invert_rejects_wrong_shape(blob_image_and_mask):
    image, _ = blob_image_and_mask
    out = Preprocessor(target_shape=(8, 8, 8))(image)
    with pytest.raises(InputError, match="model grid"):
        out.record.invert(np.zeros((9, 8, 8)))


def _restored(image: Volume, order, flips) -> Volume:
    """``image`` stored with other axes: the same voxels in patient space, relabelled (SimpleITK's own
    PermuteAxes and Flip, as a file written that way would be read)."""
    import SimpleITK as sitk

    img = sitk.PermuteAxes(image.to_sitk(), [int(o) for o in order])
    return Volume.from_sitk(sitk.Flip(img, [bool(f) for f in flips]))


@pytest.mark.parametrize("order, flips", [((0, 1, 2), (True, False, False)), ((2, 0, 1), (False, False, False)),
                                          ((1, 2, 0), (False, True, True)), ((2, 1, 0), (True, True, True))])
def test_reorient_matches_simpleitk_and_undoes_any_stored_axis_order(blob_image_and_mask, order, flips):
    image, mask = blob_image_and_mask
    stored = _restored(image, order, flips)
    # reorient() relabels exactly as SimpleITK does (geometry and voxels)
    expected = _restored(stored, (1, 2, 0), (False, True, False))
    mine = reorient(stored, (1, 2, 0), (False, True, False))
    np.testing.assert_array_equal(mine.array, expected.array)
    assert same_geometry(mine, expected, tol=1e-9)
    # the canonical axes of any stored order give back the original array and geometry (near identity)
    back = reorient(stored, *canonical_axes(stored.direction))
    np.testing.assert_array_equal(back.array, image.array)
    assert same_geometry(back, image, tol=1e-6)


@pytest.mark.parametrize("order, flips", [((2, 0, 1), (False, False, False)), ((1, 2, 0), (True, False, True))])
def test_the_model_grid_does_not_depend_on_how_the_file_stores_its_axes(blob_image_and_mask, order, flips):
    image, mask = blob_image_and_mask
    pre = Preprocessor(target_shape=(16, 16, 16))
    plain, stored = pre(image, masks=[mask]), pre(_restored(image, order, flips), masks=[_restored(mask, order, flips)])
    np.testing.assert_allclose(stored.image, plain.image, atol=1e-5)  # the model sees the same thing
    np.testing.assert_array_equal(stored.masks[0].array, plain.masks[0].array)
    assert stored.record.steps[0]["op"] == "reorient"
    # a prediction on the model grid goes back to the stored file's own axes, exactly inverted
    back = stored.record.invert(stored.masks[0])
    expected = _restored(plain.record.invert(plain.masks[0]), order, flips)
    np.testing.assert_array_equal(back.array, expected.array)
    assert same_geometry(back, _restored(mask, order, flips), tol=1e-9)
    record = GridRecord.from_dict(stored.record.to_dict())  # JSON-friendly
    np.testing.assert_array_equal(record.apply(_restored(mask, order, flips)).array, plain.masks[0].array)


@pytest.mark.parametrize("order, flips", [((0, 1, 2), (False, False, False)), ((2, 0, 1), (True, False, False))])
def test_model_grid_record_reorients_then_resamples_to_the_spacing_and_inverts_exactly(blob_image_and_mask, order,
                                                                                        flips):
    from scipy import ndimage as ndi

    _, mask = blob_image_and_mask
    smooth = mask.with_array(ndi.gaussian_filter(mask.array.astype(np.float32) * 100, 2.0))
    stored = _restored(smooth, order, flips)
    canonical = model_grid_record(stored).model_geometry()
    # the grid's own spacing (within 0.1%): no resampling step, only the axis relabelling
    same = model_grid_record(stored, spacing=np.asarray(canonical["spacing"]) * 1.0005)
    assert [s["op"] for s in same.steps] == ([] if order == (0, 1, 2) and not any(flips) else ["reorient"])
    target = (1.5, 0.75, 2.0)
    record = model_grid_record(stored, spacing=target)
    assert record.steps[-1]["op"] == "resample"
    grid = record.model_geometry()
    extent = np.asarray(canonical["spacing"]) * np.asarray(canonical["shape"][::-1])
    np.testing.assert_array_equal(grid["shape"][::-1], np.round(extent / target).astype(int))
    np.testing.assert_allclose(np.asarray(grid["spacing"]) * np.asarray(grid["shape"][::-1]), extent)  # same extent
    # there and back: a smooth image comes back close, and exactly in the stored geometry
    back = record.invert(record.apply(stored, kind="image"), kind="linear")
    assert same_geometry(back, stored, tol=1e-9)
    inner = (slice(2, -2),) * 3
    error = np.abs(back.array[inner] - stored.array[inner]).mean() / stored.array[inner].mean()
    assert error < 0.05, error
