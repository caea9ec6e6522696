"""Baselines: atlas propagation recovers a known transform; the from-scratch U-Net runs and learns a toy."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from irisseg.baselines import (
    SmallUNet,
    atlas_propagation,
    atlas_propagation_multi,
    majority_vote,
    register,
    train_unet_on_supports,
)
from irisseg.errors import InputError
from irisseg.io import Volume, same_geometry
from irisseg.metrics import dice


def _scene(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A body with a few bright balls (asymmetric, so rotations are observable) and an ellipsoid target."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(n, dtype=float)] * 3, indexing="ij")
    img = np.zeros((n, n, n), np.float32)
    body = ((z - n / 2) / (0.42 * n)) ** 2 + ((y - n / 2) / (0.38 * n)) ** 2 + ((x - n / 2) / (0.45 * n)) ** 2 < 1
    img[body] = 0.3
    for _ in range(5):
        c = rng.uniform(0.3 * n, 0.7 * n, 3)
        r = rng.uniform(0.06 * n, 0.12 * n)
        img[(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < r * r] = rng.uniform(0.5, 1.0)
    mask = ((z - 0.45 * n) / (0.15 * n)) ** 2 + ((y - 0.55 * n) / (0.1 * n)) ** 2 + ((x - 0.4 * n) / (0.2 * n)) ** 2 < 1
    img[mask] = 0.8
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    return img, mask.astype(np.uint8)


@pytest.fixture(scope="module")
def atlas() -> tuple[Volume, Volume, sitk.Transform]:
    """Support image and mask (40^3, anisotropic) and a known rigid transform (query point -> support point)."""
    img, mask = _scene()
    support = Volume(img, spacing=(1.2, 1.0, 1.5), origin=(-20.0, 10.0, 5.0))
    transform = sitk.Euler3DTransform()
    transform.SetCenter(support.to_sitk().TransformContinuousIndexToPhysicalPoint([19.5] * 3))
    transform.SetRotation(*np.deg2rad([6.0, -4.0, 8.0]))
    transform.SetTranslation((3.0, -2.5, 4.0))
    return support, support.with_array(mask), transform


def _query_of(support: Volume, mask: Volume, transform: sitk.Transform, grid: Volume) -> tuple[Volume, np.ndarray]:
    """The query image on ``grid`` (the support moved by ``transform``) and the truly transformed mask."""
    g = grid.to_sitk()
    q = sitk.Resample(support.to_sitk(), g, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    truth = sitk.Resample(mask.to_sitk(), g, transform, sitk.sitkNearestNeighbor, 0)
    query = Volume(sitk.GetArrayFromImage(q), grid.spacing, grid.origin, grid.direction.copy())
    return query, sitk.GetArrayFromImage(truth)


def _oblique_grid(centre, shape_zyx=(30, 44, 36), spacing=(1.0, 0.9, 2.0), angles=(15.0, -10.0, 20.0)) -> Volume:
    direction = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    extent = np.asarray(tuple(reversed(shape_zyx))) * np.asarray(spacing)
    origin = np.asarray(centre) - direction @ (extent / 2 - np.asarray(spacing) / 2)
    return Volume(np.zeros(shape_zyx, np.uint8), spacing=spacing, origin=tuple(origin), direction=direction)


def test_atlas_recovers_known_transform_same_grid(atlas):
    support, mask, transform = atlas
    query, truth = _query_of(support, mask, transform, support)
    assert dice(mask.array, truth) < 0.6  # the transform matters
    out, info = atlas_propagation(support, mask, query, bspline=False, return_info=True)
    assert dice(out.array, truth) > 0.8
    assert out.array.dtype == np.uint8 and set(np.unique(out.array)) <= {0, 1}
    assert out.shape == query.shape and out.spacing == query.spacing and out.origin == query.origin
    assert np.array_equal(out.direction, query.direction)
    assert info["init"] in ("geometry", "index")


def test_atlas_oblique_anisotropic_query_with_bspline(atlas):
    support, mask, transform = atlas
    centre = support.to_sitk().TransformContinuousIndexToPhysicalPoint([19.5] * 3)
    grid = _oblique_grid(centre)
    query, truth = _query_of(support, mask, transform, grid)
    out = atlas_propagation(support, mask, query, bspline=True, seed=3)
    assert dice(out.array, truth) > 0.8
    # exactly the query's geometry (no float round trip)
    assert out.shape == query.shape
    assert out.spacing == query.spacing and out.origin == query.origin
    assert np.array_equal(out.direction, query.direction)
    assert same_geometry(out, query, tol=0)


def test_atlas_is_deterministic_given_seed(atlas):
    support, mask, transform = atlas
    query, _ = _query_of(support, mask, transform, support)
    _, info_a = register(query, support, bspline=False, seed=7, init="geometry")
    _, info_b = register(query, support, bspline=False, seed=7, init="geometry")
    assert info_a["final_metric"] == info_b["final_metric"]


def test_atlas_multi_majority_vote(atlas):
    support, mask, transform = atlas
    query, truth = _query_of(support, mask, transform, support)
    out = atlas_propagation_multi([support, support, support], [mask, mask, mask], query, bspline=False)
    assert dice(out.array, truth) > 0.8 and same_geometry(out, query, tol=0)


def test_majority_vote_ties_go_to_background():
    a = Volume(np.array([[[1, 1, 0, 0]]], np.uint8))
    b = Volume(np.array([[[1, 0, 1, 0]]], np.uint8))
    c = Volume(np.array([[[1, 0, 0, 0]]], np.uint8))
    assert majority_vote([a, b, c]).array.tolist() == [[[1, 0, 0, 0]]]
    assert majority_vote([a, b]).array.tolist() == [[[1, 0, 0, 0]]]


def test_atlas_rejects_mask_in_other_geometry(atlas):
    support, mask, _ = atlas
    moved = Volume(mask.array, mask.spacing, (0.0, 0.0, 0.0), mask.direction)
    with pytest.raises(InputError, match="geometry"):
        atlas_propagation(support, moved, support, bspline=False)


# ---------------------------------------------------------------------------------------------------
# U-Net from scratch
# ---------------------------------------------------------------------------------------------------
def _cube_case(seed: int, n: int = 16, geometry: dict | None = None) -> tuple[Volume, Volume]:
    """A noisy image with a bright cube at a random place; the mask is the cube."""
    rng = np.random.default_rng(seed)
    img = rng.normal(0.0, 0.1, (n, n, n)).astype(np.float32)
    mask = np.zeros((n, n, n), np.uint8)
    lo = rng.integers(2, n // 2, 3)
    hi = lo + rng.integers(4, n // 2 - 1, 3)
    mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
    img[mask == 1] += 1.0
    geo = geometry or {}
    return Volume(img, **geo), Volume(mask, **geo)


def test_small_unet_shapes():
    import torch

    net = SmallUNet(1, base=4, depth=3)
    assert net(torch.zeros(1, 1, 16, 24, 32)).shape == (1, 1, 16, 24, 32)


def test_unet_runs_and_returns_query_geometry():
    supports = [_cube_case(s) for s in (0, 1)]
    geo = dict(spacing=(0.9, 1.3, 2.2), origin=(5.0, -7.0, 12.0),
               direction=Rotation.from_euler("xyz", (10, -5, 20), degrees=True).as_matrix())
    query, _ = _cube_case(5, n=20, geometry=geo)
    out, info = train_unet_on_supports([s[0] for s in supports], [s[1] for s in supports], query, seconds=3.0,
                                       seed=0, patch=None, base=4, threads=1, return_info=True)
    assert out.array.dtype == np.uint8 and set(np.unique(out.array)) <= {0, 1}
    assert same_geometry(out, query, tol=0)
    assert info["steps"] > 0 and info["train_seconds"] < 10.0
    assert info["grid"] == [16, 16, 16]


def test_unet_learns_bright_cube():
    supports = [_cube_case(s) for s in (0, 1, 2)]
    query, truth = _cube_case(7)
    # 60 steps (~5 s on one idle core); the time cap is only a safety net on a loaded machine.
    out, info = train_unet_on_supports([s[0] for s in supports], [s[1] for s in supports], query, seconds=40.0,
                                       max_steps=60, seed=0, base=8, threads=1, return_info=True)
    assert info["steps"] == 60, info
    assert dice(out.array, truth.array) > 0.5, info


def test_unet_is_reproducible_with_max_steps():
    supports = [_cube_case(0)]
    query, _ = _cube_case(3)
    kw = dict(seconds=30.0, max_steps=5, seed=4, patch=None, base=4, threads=1)
    a = train_unet_on_supports([supports[0][0]], [supports[0][1]], query, return_info=True, **kw)
    b = train_unet_on_supports([supports[0][0]], [supports[0][1]], query, return_info=True, **kw)
    assert a[1]["steps"] == b[1]["steps"] == 5
    assert a[1]["final_loss"] == b[1]["final_loss"]
    assert np.array_equal(a[0].array, b[0].array)
