"""In-context inference: losses, in-context tuning, the segmenter and its strategies, the CLI.

Everything runs a randomly initialised tiny IRIS model on a 16^3 grid: the assertions are about geometry,
bookkeeping, freezing and error handling, not about segmentation quality.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from irisseg.cli import main
from irisseg.errors import InputError
from irisseg.incontext import STRATEGIES, InContextSegmenter, load_model, resolve_model_dir
from irisseg.io import Volume, read_volume, same_geometry, write_volume
from irisseg.losses import dice_bce_loss, soft_dice_loss
from irisseg.models.iris import IrisModel, build_iris
from irisseg.models.task_encoding import TaskEmbedding
from irisseg.models.tuner import tune_task

TINY = dict(base_channels=4, embed_dim=16, num_heads=2, num_tokens=2, image_size=(16, 16, 16))


def oblique_direction(angles_deg) -> np.ndarray:
    """A proper rotation (det +1) as a 3x3 direction matrix."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()


def tiny_model(seed: int = 0) -> IrisModel:
    torch.manual_seed(seed)
    return build_iris("iris-small", **TINY).eval()


@pytest.fixture(scope="module")
def model() -> IrisModel:
    return tiny_model()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model):
    return model.save(tmp_path_factory.mktemp("model") / "tiny")


def blob_case(seed: int, shape=(20, 24, 18), spacing=(0.9, 1.2, 2.0), origin=(5.0, -7.0, 12.0), angles=(5, 10, -25),
              labels=(1,)):
    """A float32 image with bright boxes and their label map (one box per label), oblique and anisotropic."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 5, shape).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    D, H, W = shape
    for i, label in enumerate(labels):
        z0 = 2 + i * (D // (len(labels) + 1))
        box = (slice(z0, z0 + max(3, D // (len(labels) + 2))), slice(H // 4, 3 * H // 4), slice(W // 4, 3 * W // 4))
        mask[box] = label
        image[box] += 60.0 * (i + 1)
    geo = dict(spacing=spacing, origin=origin, direction=oblique_direction(angles))
    return Volume(image, **geo), Volume(mask, **geo)


def oblique_query(seed: int = 7) -> Volume:
    """A query of another shape, spacing, origin and direction than the supports."""
    image, _ = blob_case(seed, shape=(13, 27, 11), spacing=(0.7, 1.3, 3.1), origin=(-40.5, 12.25, 3.0),
                         angles=(20, -15, 30))
    return image


# ---------------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------------
def test_dice_bce_of_a_perfect_prediction_is_near_zero():
    g = torch.Generator().manual_seed(0)
    target = (torch.rand(2, 3, 8, 8, 8, generator=g) > 0.7).float()
    logits = (target * 2 - 1) * 50.0  # very confident and right
    assert float(dice_bce_loss(logits, target)) < 1e-6
    assert dice_bce_loss(logits, target, reduction="none").shape == (2, 3)
    wrong = -logits
    assert float(dice_bce_loss(wrong, target)) > 40.0  # BCE of confident mistakes is large


def test_soft_dice_matches_monai():
    from monai.losses import DiceLoss

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 6, 7, 5, generator=g) * 3
    target = (torch.rand(2, 3, 6, 7, 5, generator=g) > 0.6).float()
    target[1, 2] = 0  # an empty class too
    ref = DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5, reduction="none")(logits, target).reshape(2, 3)
    assert torch.allclose(soft_dice_loss(logits, target, reduction="none"), ref, atol=1e-5)
    ref_mean = DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)(logits, target)
    assert float(soft_dice_loss(logits, target)) == pytest.approx(float(ref_mean), abs=1e-5)


def test_dice_bce_is_dice_plus_voxel_mean_bce():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 2, 5, 5, 5, generator=g)
    target = (torch.rand(2, 2, 5, 5, 5, generator=g) > 0.5).float()
    per = dice_bce_loss(logits, target, reduction="none")
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(2, 3, 4))
    assert torch.allclose(per, soft_dice_loss(logits, target, reduction="none") + bce, atol=1e-6)
    assert float(dice_bce_loss(logits, target)) == pytest.approx(float(per.mean()), abs=1e-6)
    assert float(dice_bce_loss(logits, target, reduction="sum")) == pytest.approx(float(per.sum()), abs=1e-5)
    assert dice_bce_loss(logits.bfloat16(), target).dtype == torch.float32


# ---------------------------------------------------------------------------------------------------
# in-context tuning
# ---------------------------------------------------------------------------------------------------
def toy_support(K=2, N=1, S=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(1, K, N, S, S, S)
    masks[..., 4:11, 5:12, 3:10] = 1
    images = torch.randn(1, K, 1, S, S, S, generator=g) + 3 * masks[:, :, :1]
    return images, masks


def support_loss(model, task, images, masks) -> float:
    with torch.no_grad():
        logits = model.decode(images[0], task.expand_batch(images.shape[1]))
    return float(dice_bce_loss(logits, masks[0]))


def test_tune_task_keeps_the_model_frozen_and_lowers_the_support_loss():
    model = tiny_model(1)
    model.train()
    model.encoder.eval()  # a mixed train/eval state must come back as it was
    frozen_name, frozen_param = next(iter(model.named_parameters()))
    frozen_param.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}

    images, masks = toy_support()
    with torch.no_grad():
        task = model.encode_task(images, masks)
    start = task.clone()
    history: list[float] = []
    tuned = tune_task(model, task, images, masks, steps=6, lr=1e-2, history=history)

    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert flags[frozen_name] is False and model.training is True
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())
    # The input task is untouched, the tuned one differs and fits the supports better.
    assert all(torch.equal(a, b) for a, b in zip(task.tensors(), start.tensors(), strict=True))
    assert [t.shape for t in tuned.tensors()] == [t.shape for t in task.tensors()]
    assert not all(torch.equal(a, b) for a, b in zip(tuned.tensors(), task.tensors(), strict=True))
    assert len(history) == 7 and history[-1] < history[0]
    # The dense support memory (matching keys and values) is carried over, not tuned.
    assert task.has_matching and torch.equal(tuned.keys, task.keys) and torch.equal(tuned.values, task.values)
    model.eval()
    assert support_loss(model, tuned, images, masks) < support_loss(model, task, images, masks)


def test_tune_task_under_inference_mode_and_default_settings(model):
    images, masks = toy_support(K=1, N=2, seed=3)
    masks[:, :, 1] = 1 - masks[:, :, 0]
    with torch.inference_mode():  # inference tensors in, as InContextSegmenter produces them
        task = model.encode_task(images, masks)
        tuned = tune_task(model, task, images, masks)  # 10 steps, lr 1e-3
    assert not all(torch.equal(a, b) for a, b in zip(tuned.tensors(), task.tensors(), strict=True))
    assert all(not t.requires_grad for t in tuned.tensors())
    assert support_loss(model, tuned, images, masks) <= support_loss(model, task, images, masks)
    assert not any(p.requires_grad is False for p in model.parameters())
    with pytest.raises(ValueError):
        tune_task(model, task, images, masks[:, :, :1])  # masks of 1 class for a 2-class task


# ---------------------------------------------------------------------------------------------------
# the segmenter
# ---------------------------------------------------------------------------------------------------
def test_output_has_exactly_the_query_geometry(model):
    image, mask = blob_case(0)
    seg = InContextSegmenter(model, strategy="ensemble")
    task = seg.set_support([image], [mask])
    assert seg.task is task and task.tokens.shape == (1, 1, 3, 16) and seg.labels == [1]
    query = oblique_query()
    out = seg.segment(query)
    assert out.shape == query.shape == (13, 27, 11)
    assert out.spacing == query.spacing and out.origin == query.origin
    assert np.array_equal(out.direction, query.direction)
    assert out.array.dtype == np.uint8 and set(np.unique(out.array)) <= {0, 1}
    prob = seg.segment(query, return_probabilities=True)
    assert isinstance(prob, Volume) and prob.array.dtype == np.float32 and prob.shape == query.shape
    assert prob.spacing == query.spacing and prob.origin == query.origin
    assert np.array_equal(prob.direction, query.direction)
    assert 0.0 <= prob.array.min() and prob.array.max() <= 1.0 and prob.array.std() > 0
    # The label map is the thresholded probability map.
    assert np.array_equal(out.array, (prob.array > 0.5).astype(np.uint8))
    assert set(seg.timings) == {"support", "tune", "query"} and seg.timings["query"] > 0


def test_multi_label_output_uses_the_requested_labels(model):
    image, mask = blob_case(1, labels=(2, 5, 7))
    seg = InContextSegmenter(model, strategy="ensemble", threshold=1e-6)  # nearly everything is foreground
    seg.set_support([image], [mask], labels=[5, 2])
    assert seg.num_classes == 2 and seg.labels == [5, 2]
    out = seg.segment(oblique_query())
    values = set(np.unique(out.array).tolist())
    assert values <= {0, 2, 5} and values & {2, 5}
    probs = seg.segment(oblique_query(), return_probabilities=True)
    assert isinstance(probs, list) and len(probs) == 2 and all(p.shape == (13, 27, 11) for p in probs)
    # Argmax among the classes above the threshold, in the order of the labels.
    seg.threshold = 0.5
    p5 = np.array([[[0.9, 0.2, 0.6, 0.1]]], np.float32)
    p2 = np.array([[[0.3, 0.7, 0.8, 0.4]]], np.float32)
    labels = seg.labels_from_probabilities([Volume(p5), Volume(p2)])
    assert labels.array.tolist() == [[[5, 2, 2, 0]]] and labels.array.dtype == np.uint8


def test_strategies(model):
    (i1, m1), (i2, m2) = blob_case(2), blob_case(3, shape=(18, 20, 22), spacing=(1.0, 1.0, 1.5))
    tasks = {}
    for strategy in ("one-shot", "ensemble", "tune"):
        seg = InContextSegmenter(model, strategy=strategy, tune_steps=3)
        tasks[strategy] = seg.set_support([i1, i2], [m1, m2])
        assert seg.segment(oblique_query()).shape == (13, 27, 11)
        assert (seg.timings["tune"] > 0) == (strategy == "tune")
    second = InContextSegmenter(model, strategy="one-shot").set_support([i2], [m2])
    # one-shot: the first support only; ensemble: the average of the two one-shot embeddings.
    mean = TaskEmbedding.mean([tasks["one-shot"], second])
    for a, b in zip(tasks["ensemble"].tensors(), mean.tensors(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(tasks["one-shot"].tokens, second.tokens)
    # The ensemble's dense memory holds both supports' keys, one-shot's only the first one's.
    assert tasks["ensemble"].keys.shape[1] == 2 * tasks["one-shot"].keys.shape[1]
    torch.testing.assert_close(tasks["ensemble"].keys, mean.keys)
    unmatched = InContextSegmenter(model, strategy="ensemble", matching=False)
    plain = unmatched.set_support([i1, i2], [m1, m2])
    assert not plain.has_matching and plain.tokens.shape == tasks["ensemble"].tokens.shape
    assert unmatched.segment(oblique_query()).shape == (13, 27, 11)
    assert not all(torch.equal(a, b) for a, b in zip(tasks["tune"].tensors(), tasks["ensemble"].tensors(), strict=True))

    memory_model = tiny_model()
    memory_model.memory.update("blob", tasks["ensemble"])
    seg = InContextSegmenter(memory_model, strategy="memory")
    with pytest.raises(InputError, match="set_memory"):
        seg.segment(oblique_query())  # no class chosen yet
    with pytest.raises(InputError, match="not in the memory bank"):
        seg.set_memory(["spleen"])
    with pytest.raises(InputError, match="at least one class"):
        seg.set_memory([])
    with pytest.raises(InputError, match="takes no support"):
        seg.set_support([i1], [m1])
    task = seg.set_memory(["blob"], labels=[4])
    assert not task.has_matching  # a stored class has no support behind it
    assert all(torch.equal(a, b) for a, b in zip(task.tensors(), tasks["ensemble"].tensors(), strict=True))
    assert set(np.unique(seg.segment(oblique_query()).array).tolist()) <= {0, 4}
    assert STRATEGIES == ("one-shot", "ensemble", "tune", "memory")
    with pytest.raises(InputError, match="unknown strategy"):
        InContextSegmenter(model, strategy="few-shot")


def test_mirror_tta_makes_the_prediction_equivariant_to_mirroring_the_whole_task(model):
    # On volumes already on the model grid (16^3, unit spacing), mirroring the supports and the query together
    # must mirror the TTA prediction exactly: the 8 passes are the same passes in another order.
    def grid_case(seed):
        image, mask = blob_case(seed, shape=(16, 16, 16), spacing=(1.0, 1.0, 1.0), angles=(0, 0, 0))
        rng = np.random.default_rng(seed)
        return image.with_array(image.array + rng.normal(0, 20, image.shape).astype(np.float32)), mask

    (i1, m1), (i2, m2), (q, _) = grid_case(11), grid_case(12), grid_case(13)

    def mirror(v: Volume) -> Volume:
        return v.with_array(np.ascontiguousarray(v.array[:, ::-1]))

    for strategy in ("one-shot", "ensemble", "tune"):
        seg = InContextSegmenter(model, strategy=strategy, tune_steps=2, tta=True)
        seg.set_support([i1, i2], [m1, m2])
        p = seg.segment(q, return_probabilities=True).array
        seg.set_support([mirror(i1), mirror(i2)], [mirror(m1), mirror(m2)])
        p_m = seg.segment(mirror(q), return_probabilities=True).array
        # tune: the correction is tuned in each problem's own frame, so equivariance is only approximate.
        np.testing.assert_allclose(p_m[:, ::-1], p, atol=1e-4 if strategy != "tune" else 1e-2)
    plain = InContextSegmenter(model, strategy="ensemble")
    plain.set_support([i1, i2], [m1, m2])
    single = plain.segment(q, return_probabilities=True).array
    assert np.abs(single - p).max() > 1e-3  # the random model is not mirror-equivariant by itself
    memory_model = tiny_model()
    memory_model.memory.update("blob", plain.task)
    seg = InContextSegmenter(memory_model, strategy="memory", tta=True)
    seg.set_memory(["blob"])
    assert seg.segment(q).shape == q.shape  # nothing to mirror: one pass


def test_support_checks(model):
    image, mask = blob_case(4)
    multi_image, multi = blob_case(4, labels=(1, 3))
    seg = InContextSegmenter(model)
    shifted = Volume(mask.array, mask.spacing, (0.0, 0.0, 0.0), mask.direction)
    nan_image = image.with_array(np.where(mask.array > 0, np.nan, image.array).astype(np.float32))
    cases = [
        (([image], [shifted], None, ["sup_mask.nii.gz"]), "sup_mask.nii.gz: geometry does not match"),
        (([image], [mask.with_array(np.zeros_like(mask.array))], None, ["empty.nii.gz"]), "empty.nii.gz: mask is empty"),
        (([multi_image], [multi], None, None), "support mask 1: mask is not binary"),
        (([multi_image], [multi], [1, 2], None), "no voxel with label 2"),
        (([image, image], [mask], None, None), "2 support images but 1 support masks"),
        (([nan_image], [mask], None, [("img.nii.gz", "m.nii.gz")]), "img.nii.gz: image contains"),
        (([], [], None, None), "no support given"),
    ]
    for args, message in cases:
        with pytest.raises(InputError, match=message):
            seg.set_support(*args)
    assert seg.task is None
    with pytest.raises(InputError, match="no task yet"):
        seg.segment(image)
    # A single non-zero value counts as a binary mask (foreground = non-zero).
    seg.set_support([image], [mask.with_array(mask.array * 255)])
    assert seg.labels == [1]


def test_a_tiny_structure_does_not_vanish_on_the_model_grid(model):
    image, _ = blob_case(5, shape=(40, 40, 40), spacing=(1, 1, 1), angles=(0, 0, 0))
    dot = np.zeros(image.shape, np.uint8)
    dot[21, 21, 21] = 1  # a single voxel between the 16^3 grid's nearest-neighbour samples
    seg = InContextSegmenter(model)
    channels = seg._support_channels(image, image.with_array(dot), None, "img", "dot")
    _, grid_masks = seg._to_grid(image, channels, "dot")
    assert grid_masks.shape == (1, 16, 16, 16) and 1 <= grid_masks.sum() <= 8


def test_load_model(tmp_path, model, model_dir, monkeypatch):
    import irisseg
    import irisseg.incontext as ic

    loaded = load_model(model_dir)
    assert not loaded.training and loaded.config.image_size == (16, 16, 16)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    run = tmp_path / "run"
    model.save(run / "best")
    assert resolve_model_dir(run) == run / "best"
    monkeypatch.setattr(ic, "STARTER_DIR", tmp_path / "not_installed")
    with pytest.raises(InputError, match="starter weights are not installed"):
        load_model("starter")
    monkeypatch.setattr(ic, "STARTER_DIR", model_dir)
    assert isinstance(load_model("starter"), IrisModel)
    with pytest.raises(InputError, match="randomly initialised"):
        load_model("iris-small")
    assert isinstance(load_model("iris-small", allow_random=True), IrisModel)
    with pytest.raises(InputError, match="no such model folder"):
        load_model(tmp_path / "missing")
    with pytest.raises(InputError, match="config.json is missing"):
        load_model(tmp_path)
    assert irisseg.load_model is load_model and irisseg.InContextSegmenter is InContextSegmenter


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------
def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def files(tmp_path):
    """Two supports (one multi-label), two oblique queries, written as NIfTI."""
    data = tmp_path / "data"
    i1, m1 = blob_case(10)
    i2, m2 = blob_case(11, shape=(22, 18, 20), labels=(1, 2))
    paths = {
        "img1": write_volume(i1, data / "sup1.nii.gz"), "mask1": write_volume(m1, data / "sup1_mask.nii.gz"),
        "img2": write_volume(i2, data / "sup2.nii.gz"), "mask2": write_volume(m2, data / "sup2_mask.nii.gz"),
        "q1": write_volume(oblique_query(12), data / "case_a.nii.gz"),
        "q2": write_volume(blob_case(13, shape=(15, 19, 17), spacing=(1.1, 0.8, 2.6), angles=(-10, 25, 5))[0],
                           data / "case_b.nrrd"),
    }
    return paths


def outputs(folder):
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_cli_segment_writes_outputs_in_the_query_geometry(capsys, tmp_path, files, model_dir):
    out_file = tmp_path / "out" / "seg.nii.gz"
    code, out, err = run_cli(capsys, "segment", "--query", files["q1"], "--support", files["img1"], "--support-mask",
                             files["mask1"], "--out", out_file, "--model", model_dir, "--probabilities")
    assert code == 0, err
    query, seg, prob = read_volume(files["q1"]), read_volume(out_file), read_volume(tmp_path / "out" / "seg_prob.nii.gz")
    assert same_geometry(seg, query, tol=1e-4) and same_geometry(prob, query, tol=1e-4)
    assert seg.array.dtype == np.uint8 and set(np.unique(seg.array)) <= {0, 1}
    assert prob.array.dtype == np.float32 and 0 <= prob.array.min() and prob.array.max() <= 1
    assert "case_a.nii.gz" in out and "foreground ml" in out

    folder = tmp_path / "many"
    code, out, err = run_cli(capsys, "segment", "--query", files["q1"], "--query", files["q2"],
                             "--support", files["img1"], "--support-mask", files["mask1"],
                             "--support", files["img2"], "--support-mask", files["mask2"], "--label", "1",
                             "--out", folder, "--model", model_dir, "--strategy", "tune", "--tune-steps", "2")
    assert code == 0, err
    assert outputs(folder) == ["case_a_seg.nii.gz", "case_b_seg.nii.gz"]
    for q in ("q1", "q2"):
        name = files[q].name.split(".")[0] + "_seg.nii.gz"
        assert same_geometry(read_volume(folder / name), read_volume(files[q]), tol=1e-4)

    code, _, err = run_cli(capsys, "segment", "--query", files["q2"], "--support", files["img2"], "--support-mask",
                           files["mask2"], "--label", "2", "--label", "1", "--threshold", "0.001",
                           "--out", tmp_path / "ml", "--model", model_dir, "--strategy", "one-shot", "--probabilities",
                           "--tta")
    assert code == 0, err
    assert outputs(tmp_path / "ml") == ["case_b_seg.nii.gz", "case_b_seg_prob_1.nii.gz", "case_b_seg_prob_2.nii.gz"]
    labels = read_volume(tmp_path / "ml" / "case_b_seg.nii.gz")
    assert set(np.unique(labels.array).tolist()) <= {0, 1, 2} and labels.array.max() > 0
    assert same_geometry(labels, read_volume(files["q2"]), tol=1e-4)


def test_cli_segment_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, files, model_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    img1, mask1 = read_volume(files["img1"]), read_volume(files["mask1"])
    shifted = write_volume(Volume(mask1.array, mask1.spacing, (0.0, 0.0, 0.0), mask1.direction), bad / "shifted.nii.gz")
    empty = write_volume(mask1.with_array(np.zeros_like(mask1.array)), bad / "empty.nii.gz")
    nan_query = write_volume(img1.with_array(np.full(img1.shape, np.nan, np.float32)), bad / "nan.nrrd")
    flat = bad / "flat.nii.gz"
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.float32)), str(flat))
    corrupt = bad / "corrupt.nii.gz"
    corrupt.write_bytes(b"not a nifti file")
    sup = ["--support", files["img1"], "--support-mask", files["mask1"]]
    q = ["--query", files["q1"]]
    cases = {
        "missing mask": ([*q, "--support", files["img1"], "--support-mask", bad / "nope.nii.gz"], "nope.nii.gz: no such file"),
        "geometry": ([*q, "--support", files["img1"], "--support-mask", shifted], "geometry does not match"),
        "empty mask": ([*q, "--support", files["img1"], "--support-mask", empty], "empty.nii.gz: mask is empty"),
        "count": ([*q, *sup, "--support", files["img2"]], "2 --support image(s) but 1 --support-mask"),
        "non-binary": ([*q, "--support", files["img2"], "--support-mask", files["mask2"]], "mask is not binary"),
        "absent label": ([*q, *sup, "--label", "3"], "no voxel with label 3"),
        "unknown class": ([*q, "--strategy", "memory", "--class", "spleen"], "'spleen' is not in the memory bank"),
        "memory without class": ([*q, "--strategy", "memory"], "needs --class"),
        "memory with tta": ([*q, "--strategy", "memory", "--class", "blob", "--tta"], "no support to mirror"),
        "no support": ([*q], "--support-mask"),
        "unknown strategy": ([*q, *sup, "--strategy", "few-shot"], "unknown strategy"),
        "nan query": (["--query", nan_query, *sup], "NaN"),
        "2d query": (["--query", flat, *sup], "expected a 3D volume"),
        "bad second query": ([*q, "--query", corrupt, *sup], "corrupt.nii.gz: cannot read"),
        "missing query": ([*q, "--query", bad / "gone.nii.gz", *sup], "gone.nii.gz: no such file"),
        "untrained model": ([*q, *sup, "--model", "iris-small"], "randomly initialised"),
    }
    for name, (args, message) in cases.items():
        out = tmp_path / f"out_{name.replace(' ', '_')}"
        extra = [] if "--model" in args else ["--model", model_dir]
        code, _, err = run_cli(capsys, "segment", *args, "--out", out, *extra)
        assert code == 2, (name, err)
        assert err.count("\n") == 1 and err.startswith("irisseg: error: ") and message in err, (name, err)
        assert outputs(out) == [], name
    assert not list(tmp_path.glob(".irisseg-*")) and not list(tmp_path.glob("out_*"))


def test_cli_memory_round_trip(capsys, tmp_path, files, model_dir, monkeypatch):
    import shutil

    import irisseg.incontext as ic

    mdir = tmp_path / "model"
    shutil.copytree(model_dir, mdir)
    add = ["memory", "add", "--model", mdir, "--name", "blob"]
    code, _, err = run_cli(capsys, *add, "--support", files["img1"], "--support-mask", files["mask1"])
    assert code == 0, err
    code, _, err = run_cli(capsys, *add, "--support", files["img2"], "--support-mask", files["mask2"], "--label", "2")
    assert code == 0, err
    code, out, err = run_cli(capsys, "memory", "list", "--model", mdir)
    assert code == 0 and "blob" in out and "2" in out, err
    assert load_model(mdir).memory.counts == {"blob": 2}

    code, _, err = run_cli(capsys, "segment", "--query", files["q1"], "--out", tmp_path / "m.nii.gz", "--model", mdir,
                           "--strategy", "memory", "--class", "blob")
    assert code == 0, err
    assert same_geometry(read_volume(tmp_path / "m.nii.gz"), read_volume(files["q1"]), tol=1e-4)

    code, _, err = run_cli(capsys, *add, "--support", files["img2"], "--support-mask", files["mask2"])
    assert code == 2 and "mask is not binary" in err
    code, _, err = run_cli(capsys, "memory", "remove", "--model", mdir, "--name", "blob")
    assert code == 0, err
    code, out, _ = run_cli(capsys, "memory", "list", "--model", mdir)
    assert "blob" not in out and "no class stored" in out
    code, _, err = run_cli(capsys, "memory", "remove", "--model", mdir, "--name", "blob")
    assert code == 2 and "not in the memory bank" in err

    # The packaged starter folder is read-only.
    monkeypatch.setattr(ic, "STARTER_DIR", mdir.resolve())
    before = json.dumps(sorted(p.name for p in mdir.iterdir()))
    code, _, err = run_cli(capsys, "memory", "add", "--model", "starter", "--name", "x",
                           "--support", files["img1"], "--support-mask", files["mask1"])
    assert code == 2 and "read-only" in err and "copy" in err
    assert json.dumps(sorted(p.name for p in mdir.iterdir())) == before
    assert load_model(mdir).memory.names() == []
