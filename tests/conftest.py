"""Shared fixtures: small volumes with anisotropic spacing and oblique geometry."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from irisseg.io import Volume


def oblique_direction(angles_deg=(20.0, -15.0, 30.0)) -> np.ndarray:
    """A proper rotation (det +1) as a 3x3 direction matrix."""
    return Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def oblique_volume(rng) -> Volume:
    """int16 volume (7, 9, 11), spacing (0.7, 1.3, 3.0) mm, oblique direction, non-zero origin."""
    array = rng.integers(-1000, 1000, size=(7, 9, 11)).astype(np.int16)
    return Volume(array, spacing=(0.7, 1.3, 3.0), origin=(-120.5, 33.25, 7.0), direction=oblique_direction())


@pytest.fixture
def blob_image_and_mask(rng) -> tuple[Volume, Volume]:
    """A float32 image (20, 30, 25) with a bright box, and its uint8 mask; anisotropic and oblique."""
    arr = rng.normal(0, 5, (20, 30, 25)).astype(np.float32)
    mask = np.zeros(arr.shape, np.uint8)
    mask[5:15, 8:20, 6:19] = 1
    arr[mask == 1] += 100
    geo = dict(spacing=(0.8, 1.1, 2.5), origin=(10.0, -20.0, 30.0), direction=oblique_direction((5, 10, -25)))
    return Volume(arr, **geo), Volume(mask, **geo)
