"""Lesion-aware patch sampling: positive fraction, component balance, padding, seeding, the torch stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from irisseg.data.patches import (
    LesionPatchDataset,
    PatchAugmentConfig,
    PatchConfig,
    PatchSampler,
    body_mask,
    extract_patch,
    false_positive_centres,
    missed_components,
    window_start,
)
from irisseg.errors import InputError


def _ball(shape, centre, radius) -> np.ndarray:
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def _brain_case(seed: int = 0, shape=(32, 32, 32)):
    """A bright ball ("brain") on a zero background with three small lesions inside; image, label, body."""
    rng = np.random.default_rng(seed)
    body = _ball(shape, np.array(shape) / 2, min(shape) / 2 - 2)
    label = np.zeros(shape, np.uint8)
    label[10:12, 10:12, 10:13] = 1  # 12 voxels
    label[20:23, 18:21, 15:18] = 1  # 27 voxels
    label[16, 24, 16] = 1  # 1 voxel
    image = np.where(body, 1.0 + 0.1 * rng.standard_normal(shape), 0.0).astype(np.float32)
    image[label > 0] += 0.5
    return image, label, body


def _two_lesions():
    """One 20-voxel lesion and one 20,000-voxel lesion, far apart, in a (32, 40, 48) volume."""
    label = np.zeros((32, 40, 48), np.uint8)
    label[2:22, 2:27, 2:42] = 1  # 20 * 25 * 40 = 20,000 voxels
    label[26:28, 32:34, 40:45] = 1  # 2 * 2 * 5 = 20 voxels
    image = np.ones(label.shape, np.float32)
    return image, label


@pytest.mark.parametrize("fraction", [0.33, 0.7])
def test_positive_fraction_matches_config(fraction):
    image, label, body = _brain_case()
    sampler = PatchSampler(image, label, body, PatchConfig(patch_size=16, positive_fraction=fraction))
    rng = np.random.default_rng(7)
    draws = [sampler.draw_centre(rng) for _ in range(2000)]
    positives = np.array([p for _, p, _ in draws])
    assert abs(positives.mean() - fraction) < 0.05
    # positive centres are lesion voxels, their component is the one they lie in
    assert sampler.n_components == 3
    assert sorted(sampler.component_sizes.tolist()) == [1, 12, 27]
    for centre, positive, component in draws:
        if positive:
            assert label[tuple(centre)] == 1
            assert 0 <= component < 3
        else:
            assert component == -1


@pytest.mark.parametrize("border", ["shift", "pad"])
def test_centre_jitter_moves_the_drawn_voxel_around_the_patch_but_keeps_it_inside(border):
    image, label, body = _brain_case()
    size = np.array([16, 16, 12])

    def where_in_patch(jitter):
        cfg = PatchConfig(patch_size=tuple(size), positive_fraction=1.0, centre_jitter=jitter, border=border)
        sampler, rng = PatchSampler(image, label, body, cfg), np.random.default_rng(3)
        places = []
        for _ in range(400):
            s = sampler.sample(rng)
            inside = np.asarray(s.centre) - np.asarray(s.start)
            assert np.all(inside >= 0) and np.all(inside < size)  # the drawn lesion voxel is in the patch
            assert s.label[(0, *inside)] == 1
            places.append(inside)
        return np.array(places)

    if border == "pad":  # no shifting at the border: exactly centred without jitter
        assert np.all(where_in_patch(0.0) == size // 2)
    moved = where_in_patch(0.75) - size // 2
    reach = np.floor(0.75 * (size // 2))
    assert np.all(np.abs(moved) <= reach)
    if border == "pad":  # offsets cover the whole allowed range on every axis
        assert np.array_equal(moved.min(0), -reach) and np.array_equal(moved.max(0), reach)
    assert len({tuple(m) for m in moved}) > 100


def test_component_balanced_hits_the_small_lesion_half_the_time():
    image, label = _two_lesions()
    small = np.zeros(label.shape, bool)
    small[26:28, 32:34, 40:45] = True
    rng = np.random.default_rng(0)

    balanced = PatchSampler(image, label, config=PatchConfig(patch_size=16, positive_fraction=1.0))
    assert sorted(balanced.component_sizes.tolist()) == [20, 20000]
    centres = [balanced.draw_centre(rng)[0] for _ in range(1000)]
    hit = np.mean([small[tuple(c)] for c in centres])
    assert 0.35 <= hit <= 0.65

    unbalanced = PatchSampler(image, label, config=PatchConfig(patch_size=16, positive_fraction=1.0,
                                                               component_balanced=False))
    centres = [unbalanced.draw_centre(rng)[0] for _ in range(1000)]
    hit = np.mean([small[tuple(c)] for c in centres])
    assert hit < 0.02  # expected 20 / 20,020 = 0.1 %
    assert all(label[tuple(c)] == 1 for c in centres)


def test_subsampled_component_keeps_its_weight():
    image, label = _two_lesions()
    cfg = PatchConfig(patch_size=8, positive_fraction=1.0, component_balanced=False, max_component_voxels=50)
    sampler = PatchSampler(image, label, config=cfg)
    assert sampler.lesion_index.size == 70 and sampler.lesion_index.dtype == np.int32
    assert sorted(sampler.component_sizes.tolist()) == [20, 20000]
    rng = np.random.default_rng(3)
    components = [sampler.draw_centre(rng)[2] for _ in range(500)]
    big = int(np.argmax(sampler.component_sizes))
    assert np.mean(np.array(components) == big) > 0.98  # weighted by the true size, not the 50 kept


def test_volume_smaller_than_patch_is_padded_and_keeps_the_lesion():
    rng = np.random.default_rng(1)
    image = rng.uniform(1.0, 2.0, (2, 10, 12, 9)).astype(np.float32)
    label = np.zeros((10, 12, 9), np.uint8)
    label[7:9, 1:3, 6:8] = 1
    sampler = PatchSampler(image, label, config=PatchConfig(patch_size=16, positive_fraction=1.0))
    for _ in range(20):
        s = sampler.sample(rng)
        assert s.image.shape == (2, 16, 16, 16) and s.image.dtype == np.float32
        assert s.label.shape == s.valid.shape == (1, 16, 16, 16)
        assert s.label.dtype == s.valid.dtype == np.float32
        assert s.positive and label[s.centre] == 1
        # "shift": the whole small volume lies inside the patch, so does every lesion voxel
        assert s.valid.sum() == 10 * 12 * 9
        assert s.label.sum() == label.sum()
        assert set(np.unique(s.label)) == {0.0, 1.0}
        inside = s.valid[0] > 0
        assert np.all(s.label[0][~inside] == 0)
        for c in range(2):  # padding = the channel's minimum
            assert np.all(s.image[c][~inside] == image[c].min())
        local = tuple(np.array(s.centre) - np.array(s.start))
        assert s.label[(0, *local)] == 1
    # "pad": the centre is always the middle voxel of the patch
    pad = PatchSampler(image, label, config=PatchConfig(patch_size=16, positive_fraction=1.0, border="pad",
                                                        pad_value=0.0))
    for _ in range(20):
        s = pad.sample(rng)
        assert s.label[0, 8, 8, 8] == 1 and s.valid[0, 8, 8, 8] == 1
        assert np.all(s.image[:, s.valid[0] == 0] == 0.0)


def test_shift_keeps_patches_inside_large_volumes():
    image, label, body = _brain_case()
    sampler = PatchSampler(image, label, body, PatchConfig(patch_size=(16, 8, 12)))
    rng = np.random.default_rng(2)
    for _ in range(200):
        s = sampler.sample(rng)
        assert s.image.shape == (1, 16, 8, 12)
        assert s.valid.min() == 1.0
        start = np.array(s.start)
        assert np.all(start >= 0) and np.all(start + (16, 8, 12) <= 32)
        assert np.all(np.array(s.centre) >= start) and np.all(np.array(s.centre) < start + (16, 8, 12))


def test_extract_patch_matches_slicing_and_pads():
    array = np.arange(2 * 5 * 6 * 7, dtype=np.float32).reshape(2, 5, 6, 7)
    patch, valid = extract_patch(array, (1, 2, 3), (3, 3, 3))
    np.testing.assert_array_equal(patch, array[:, 1:4, 2:5, 3:6])
    assert valid.all()
    patch, valid = extract_patch(array, (-2, 4, 5), (4, 4, 4), pad_value=[-1.0, -2.0])
    np.testing.assert_array_equal(patch[:, 2:, :2, :2], array[:, :2, 4:, 5:])
    assert valid.sum() == 2 * 2 * 2 and valid[2:, :2, :2].all()
    assert np.all(patch[0][~valid] == -1.0) and np.all(patch[1][~valid] == -2.0)
    assert window_start((0, 9, 5), (10, 10, 10), (4, 4, 4), "shift").tolist() == [0, 6, 3]
    assert window_start((0, 9, 5), (10, 10, 10), (4, 4, 4), "pad").tolist() == [-2, 7, 3]


def test_multichannel_patches_keep_channels():
    image, label, body = _brain_case()
    channels = np.stack([image, 2 * image + 1, -image])
    sampler = PatchSampler(channels, label, body, PatchConfig(patch_size=12))
    assert sampler.channels == 3
    rng = np.random.default_rng(4)
    for _ in range(20):
        s = sampler.sample(rng)
        assert s.image.shape == (3, 12, 12, 12)
        box = tuple(slice(a, a + 12) for a in s.start)
        np.testing.assert_array_equal(s.image, channels[(slice(None), *box)])
        np.testing.assert_array_equal(s.label[0], label[box].astype(np.float32))


def test_same_seed_same_draws():
    image, label, body = _brain_case()
    sampler = PatchSampler(image, label, body, PatchConfig(patch_size=12, positive_fraction=0.5))

    def draws(seed):
        rng = np.random.default_rng(seed)
        return [sampler.sample(rng) for _ in range(30)]

    a, b, c = draws(11), draws(11), draws(12)
    assert [(s.centre, s.positive) for s in a] == [(s.centre, s.positive) for s in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert [s.centre for s in a] != [s.centre for s in c]


def test_negative_centres_lie_in_the_body_mask():
    image, label, body = _brain_case()
    sampler = PatchSampler(image, label, body, PatchConfig(patch_size=12, positive_fraction=0.0))
    assert sampler.n_body_voxels == body.sum()
    rng = np.random.default_rng(5)
    draws = [sampler.draw_centre(rng) for _ in range(500)]
    assert not any(p for _, p, _ in draws)
    assert all(body[tuple(c)] for c, _, _ in draws)
    # derived body (no mask given): the bright ball on a zero background, holes filled
    derived = PatchSampler(image, label, config=PatchConfig(patch_size=12, positive_fraction=0.0))
    np.testing.assert_array_equal(body_mask(image), body)
    assert all(body[tuple(derived.draw_centre(rng)[0])] for _ in range(500))
    # subsampled body: centres still inside
    small = PatchSampler(image, label, body, PatchConfig(patch_size=12, positive_fraction=0.0, max_body_voxels=100))
    assert small.body_index.size == 100 and small.n_body_voxels == body.sum()
    assert all(body[tuple(small.draw_centre(rng)[0])] for _ in range(200))


def test_empty_label_falls_back_to_negatives():
    image, _, body = _brain_case()
    sampler = PatchSampler(image, np.zeros(image.shape, np.uint8), body, PatchConfig(patch_size=12,
                                                                                     positive_fraction=1.0))
    assert not sampler.has_lesion and sampler.n_components == 0
    rng = np.random.default_rng(6)
    for _ in range(50):
        s = sampler.sample(rng)
        assert not s.positive and s.component == -1 and s.label.sum() == 0
        assert body[s.centre]
    # an empty body mask falls back to the whole volume
    anywhere = PatchSampler(np.zeros((8, 8, 8), np.float32), np.zeros((8, 8, 8)), config=PatchConfig(patch_size=4))
    assert anywhere.body_is_volume and anywhere.body_index.size == 512
    assert anywhere.sample(rng).image.shape == (1, 4, 4, 4)


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(InputError, match="positive_fraction"):
        PatchConfig(positive_fraction=1.5)
    with pytest.raises(InputError, match="border"):
        PatchConfig(border="wrap")
    with pytest.raises(InputError, match="centre_jitter"):
        PatchConfig(centre_jitter=1.0)
    with pytest.raises(InputError, match="patch_size"):
        PatchConfig(patch_size=(16, 16))
    assert PatchConfig(patch_size=[8, 16, 24]).patch_size == (8, 16, 24)  # as read from YAML
    with pytest.raises(InputError, match="label shape"):
        PatchSampler(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))


def _draws_match(sampler: PatchSampler, other: PatchSampler, n: int = 100) -> bool:
    """Whether two samplers draw the same centres from the same random stream."""
    a, b = np.random.default_rng(1), np.random.default_rng(1)
    return all(np.array_equal(sampler.draw_centre(a)[0], other.draw_centre(b)[0]) for _ in range(n))


def test_false_positive_centres_one_peak_per_component_away_from_lesions():
    label = np.zeros((20, 20, 20), np.uint8)
    label[4:8, 4:8, 4:8] = 1
    prob = np.zeros(label.shape, np.float32)
    prob[3:9, 4:8, 4:8] = 0.9  # the lesion found, one voxel too wide on each side: a boundary error, not counted
    prob[12:15, 12:15, 12:15] = 0.7  # a 27-voxel false positive with its peak at (13, 14, 12)
    prob[13, 14, 12] = 0.95
    prob[2, 16, 16] = 0.8  # a 1-voxel false positive
    prob[17, 2, 2] = 0.4  # below the threshold
    centres = false_positive_centres(prob, label, threshold=0.5)
    assert centres.dtype == np.int64
    np.testing.assert_array_equal(centres, [[13, 14, 12], [2, 16, 16]])  # largest component first
    np.testing.assert_array_equal(false_positive_centres(prob, label, max_centres=1), [[13, 14, 12]])
    # without the margin the boundary voxels next to the lesion are false positives too
    assert len(false_positive_centres(prob, label, margin=0)) == 4
    assert false_positive_centres(np.zeros(label.shape), label).shape == (0, 3)
    with pytest.raises(InputError, match="one shape"):
        false_positive_centres(prob, label[:-1])


def test_hard_negatives_take_their_share_of_negative_draws():
    image, label, body = _brain_case()
    cfg = PatchConfig(patch_size=12, positive_fraction=0.5, hard_negative_fraction=0.4)
    sampler = PatchSampler(image, label, body, cfg)
    hard = np.array([[16, 8, 16], [8, 16, 20]])
    rng = np.random.default_rng(0)
    # no hard negatives yet: the draws are those of a sampler without the option (no extra randomness)
    assert _draws_match(sampler, PatchSampler(image, label, body, PatchConfig(patch_size=12, positive_fraction=0.5)))
    sampler.set_hard_negatives(hard)
    draws = [sampler.draw_centre(rng) for _ in range(4000)]
    negatives = [c for c, positive, _ in draws if not positive]
    on_hard = np.mean([any(np.array_equal(c, h) for h in hard) for c in negatives])
    assert abs(on_hard - 0.4) < 0.05
    assert abs(np.mean([positive for _, positive, _ in draws]) - 0.5) < 0.05  # the positive share is unchanged
    sampler.set_hard_negatives([])  # cleared
    assert sampler.hard_negatives.shape == (0, 3)
    with pytest.raises(InputError, match="inside the volume"):
        sampler.set_hard_negatives([[0, 0, 32]])
    with pytest.raises(InputError, match=r"\(n, 3\)"):
        sampler.set_hard_negatives([[1, 2]])
    with pytest.raises(InputError, match="hard_negative_fraction"):
        PatchConfig(hard_negative_fraction=-0.1)


def test_missed_components_are_the_lesions_without_a_predicted_voxel_in_the_samplers_numbering():
    image, label, body = _brain_case()
    sampler = PatchSampler(image, label, body, PatchConfig(patch_size=12))
    # the sampler's components, in scipy's order: 0 = the 12-voxel lesion, 1 = the 1-voxel one, 2 = the 27-voxel one
    centres = [sampler.lesion_index[sampler.component_offsets[k]] for k in range(3)]
    assert [np.unravel_index(int(c), label.shape)[0] for c in centres] == [10, 16, 20]
    prob = np.zeros(label.shape, np.float32)
    prob[11, 11, 11] = 0.9  # one voxel of lesion 0 is enough
    prob[16, 24, 16] = 0.5  # lesion 1 at the threshold: not predicted
    prob[20:23, 18:21, 15:18] = 0.6
    prob[2, 2, 2] = 0.99  # a false positive finds nothing
    assert missed_components(prob, label).tolist() == [1]
    assert missed_components(prob, label, threshold=0.7).tolist() == [1, 2]
    assert missed_components(prob, label).dtype == np.int64
    assert missed_components(prob, np.zeros_like(label)).shape == (0,)
    with pytest.raises(InputError, match="one shape"):
        missed_components(prob, label[:-1])


def test_hard_positives_take_their_share_of_positive_draws():
    image, label, body = _brain_case()
    cfg = PatchConfig(patch_size=12, positive_fraction=0.5, hard_positive_fraction=0.6)
    sampler = PatchSampler(image, label, body, cfg)
    # no hard positives yet: the draws are those of a sampler without the option (no extra randomness)
    assert _draws_match(sampler, PatchSampler(image, label, body, PatchConfig(patch_size=12, positive_fraction=0.5)))
    sampler.set_hard_positives([1])  # the 1-voxel lesion, missed
    rng = np.random.default_rng(0)
    draws = [sampler.draw_centre(rng) for _ in range(4000)]
    components = np.array([k for _, positive, k in draws if positive])
    assert abs(np.mean(components == 1) - (0.6 + 0.4 / 3)) < 0.05  # the hard share, plus its uniform share
    assert abs(np.mean(components == 0) - 0.4 / 3) < 0.05
    assert abs(len(components) / len(draws) - 0.5) < 0.05  # the positive share is unchanged
    sampler.set_hard_positives([])
    assert sampler.hard_positives.shape == (0,)
    with pytest.raises(InputError, match=r"in \[0, 3\)"):
        sampler.set_hard_positives([3])
    with pytest.raises(InputError, match=r"\(n,\)"):
        sampler.set_hard_positives([[0, 1]])
    with pytest.raises(InputError, match="hard_positive_fraction"):
        PatchConfig(hard_positive_fraction=1.5)


def test_dataset_hard_negatives_reach_workers_started_after_the_change():
    cfg = PatchConfig(patch_size=8, positive_fraction=0.0, hard_negative_fraction=1.0)
    ds = LesionPatchDataset(_dataset_cases(), cfg, seed=2, samples_per_epoch=32)
    ds.set_hard_negatives(1, [[5, 6, 7]])
    centres = torch.cat([b["centre"][b["case"] == 1] for b in DataLoader(ds, batch_size=8, num_workers=1)])
    assert len(centres) > 5 and (centres == torch.tensor([5, 6, 7])).all()


def _dataset_cases():
    image, label, body = _brain_case(0)
    image2, _, body2 = _brain_case(1)
    return [(image, label, body), (image2, np.zeros_like(label), body2)]  # the second case has no lesion


def test_dataset_items_fraction_and_seeding():
    cfg = PatchConfig(patch_size=12, positive_fraction=0.7)
    ds = LesionPatchDataset(_dataset_cases(), cfg, seed=3, samples_per_epoch=1000)
    assert len(ds) == 1000
    items = list(ds)
    assert len(items) == 1000
    first = items[0]
    assert first["image"].shape == (1, 12, 12, 12) and first["image"].dtype == torch.float32
    assert first["label"].shape == first["valid"].shape == (1, 12, 12, 12)
    positives = np.array([it["positive"] for it in items])
    assert abs(positives.mean() - 0.7) < 0.05  # the empty case does not lower the fraction
    assert all(it["case"] == 0 for it in items if it["positive"])
    again = list(LesionPatchDataset(_dataset_cases(), cfg, seed=3, samples_per_epoch=1000))
    assert all(torch.equal(a["centre"], b["centre"]) for a, b in zip(items, again))
    ds.set_epoch(1)
    assert not all(torch.equal(a["centre"], b["centre"]) for a, b in zip(items, ds))


def test_dataset_instances_number_the_lesions_of_each_augmented_patch():
    from scipy import ndimage

    image, label, body = _brain_case()
    aug = PatchAugmentConfig(flip=0.5, spatial_prob=1.0)
    ds = LesionPatchDataset([(image, label, body)], PatchConfig(patch_size=16, positive_fraction=0.8), augment=aug,
                            seed=1, samples_per_epoch=40, instances=True)
    counts = []
    for it in ds:
        inst = it["instances"]
        assert inst.shape == it["label"].shape and inst.dtype == torch.int16
        assert torch.equal(inst > 0, it["label"] > 0.5)
        n = int(inst.max())
        assert n == ndimage.label(it["label"][0].numpy() > 0.5, structure=np.ones((3, 3, 3)))[1]
        assert set(torch.unique(inst).tolist()) == set(range(n + 1))
        counts.append(n)
    assert max(counts) >= 2  # patches with several lesions occur
    assert "instances" not in next(iter(LesionPatchDataset([(image, label, body)], PatchConfig(patch_size=16),
                                                           samples_per_epoch=1)))


def test_dataset_workers_draw_different_deterministic_streams():
    cfg = PatchConfig(patch_size=8, positive_fraction=0.5)

    def centres():
        ds = LesionPatchDataset(_dataset_cases(), cfg, seed=9, samples_per_epoch=40)
        loader = DataLoader(ds, batch_size=4, num_workers=2)
        batches = list(loader)
        assert sum(b["image"].shape[0] for b in batches) == 40
        assert batches[0]["image"].shape == (4, 1, 8, 8, 8)
        return [b["centre"] for b in batches]

    a, b = centres(), centres()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])  # batches 0 and 1 come from workers 0 and 1


def test_augmentation_keeps_image_and_label_aligned():
    image, label, body = _brain_case()
    image = label.astype(np.float32) * 3.0  # the image is the label, so flips must move both alike
    aug = PatchAugmentConfig(flip=0.5, intensity_prob=0.0, noise_prob=0.0)
    ds = LesionPatchDataset([(image, label, body)], PatchConfig(patch_size=12, positive_fraction=1.0),
                            augment=aug, seed=0, samples_per_epoch=50)
    for it in ds:
        torch.testing.assert_close(it["image"], it["label"] * 3.0)
    full = PatchAugmentConfig(flip=0.5, intensity_prob=1.0, noise_prob=1.0, noise_std=0.1)
    ds = LesionPatchDataset([(image, label, body)], PatchConfig(patch_size=12, positive_fraction=1.0),
                            augment=full, seed=0, samples_per_epoch=20)
    for it in ds:
        assert it["image"].shape == (1, 12, 12, 12) and it["image"].dtype == torch.float32
        assert set(torch.unique(it["label"]).tolist()) <= {0.0, 1.0}
        assert not torch.equal(it["image"], it["label"] * 3.0)


def test_spatial_and_acquisition_augmentations():
    from scipy import ndimage

    from irisseg.data.augment import gaussian_blur, random_gamma, simulate_low_resolution

    image, label, body = _brain_case()
    image = label.astype(np.float32) * 3.0
    # an identity "rotation" resamples exactly, so image and label stay aligned through the spatial branch
    ident = PatchAugmentConfig(flip=0.5, intensity_prob=0.0, noise_prob=0.0, spatial_prob=1.0, rotate_deg=0.0,
                               zoom=(1.0, 1.0))
    ds = LesionPatchDataset([(image, label, body)], PatchConfig(patch_size=12, positive_fraction=1.0),
                            augment=ident, seed=0, samples_per_epoch=10)
    for it in ds:
        torch.testing.assert_close(it["image"], it["label"] * 3.0, atol=1e-5, rtol=0)
    # every optional augmentation on: shapes kept, label and valid mask binary, lesions not wiped out
    full = PatchAugmentConfig(spatial_prob=1.0, gamma_prob=1.0, blur_prob=1.0, lowres_prob=1.0, rotate_deg=30.0)
    ds = LesionPatchDataset([(image, label, body)], PatchConfig(patch_size=12, positive_fraction=1.0),
                            augment=full, seed=0, samples_per_epoch=20)
    hits = 0
    for it in ds:
        assert it["image"].shape == (1, 12, 12, 12) and torch.isfinite(it["image"]).all()
        assert set(torch.unique(it["label"]).tolist()) <= {0.0, 1.0}
        assert set(torch.unique(it["valid"]).tolist()) <= {0.0, 1.0}
        hits += int(it["label"].sum() > 0)
    assert hits >= 15
    # the blur is scipy's Gaussian filter (nearest-edge mode, truncated at 3 sigma), per axis
    vol = np.random.default_rng(0).normal(size=(9, 11, 13)).astype(np.float32)
    ours = gaussian_blur(torch.from_numpy(vol)[None], (1.0, 0.0, 0.7))[0].numpy()
    ref = ndimage.gaussian_filter(vol, sigma=(1.0, 0.0, 0.7), mode="nearest", truncate=3.0)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    # gamma keeps each channel's range; a factor-1 low-resolution round trip is the identity
    x = torch.from_numpy(np.stack([vol, 2 * vol + 1]))
    y = random_gamma(x, (0.7, 1.5), torch.Generator().manual_seed(1))
    torch.testing.assert_close(y.amin(dim=(1, 2, 3)), x.amin(dim=(1, 2, 3)))
    torch.testing.assert_close(y.amax(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3)))
    assert torch.equal(simulate_low_resolution(x, 1.0), x)
    assert simulate_low_resolution(x, 0.5).shape == x.shape


def test_lesion_config_augmentation_overrides():
    from irisseg.errors import InputError
    from irisseg.training.lesion import LesionTrainConfig

    cfg = LesionTrainConfig(augmentation={"spatial_prob": 0.2, "gamma_prob": 0.3})
    aug = cfg.augment_config()
    assert aug.spatial_prob == 0.2 and aug.gamma_prob == 0.3 and aug.flip == 0.5
    assert LesionTrainConfig(augment=False, augmentation={"spatial_prob": 0.2}).augment_config() is None
    with pytest.raises(InputError, match="unknown augmentation setting"):
        LesionTrainConfig(augmentation={"rotation": 10})
    with pytest.raises(InputError, match="probability"):
        LesionTrainConfig(augmentation={"blur_prob": 2.0})
