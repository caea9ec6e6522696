"""Retrieval training: stratified split, balanced sampler, volume cache, triplet and soft micro-F1 losses, and
``irisseg retrieval train`` end to end (both modes, resume, bad input) on a tiny synthetic findings dataset.

The models are tiny and train for a few steps: the assertions are about values that can be computed by hand,
bookkeeping and error handling, not about retrieval quality (that is a benchmark's job).
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
import yaml

from irisseg.cli import main
from irisseg.data.findings import load_findings, retrieval_input
from irisseg.errors import InputError
from irisseg.io import read_volume
from irisseg.losses import soft_micro_f1_loss, triplet_loss, triplet_masks
from irisseg.models.embedding import EmbeddingConfig, EmbeddingNet
from irisseg.training.engine import read_metrics_csv
from irisseg.training.retrieval import (
    METRICS_COLUMNS,
    BalancedBatchSampler,
    RetrievalLightning,
    RetrievalTrainConfig,
    ShuffledBatchSampler,
    build_volume_cache,
    decode_volumes,
    encode_volumes,
    evaluate_embeddings,
    multilabel_stratified_split,
)

TINY = dict(grid=[16, 16, 16], channels=[4, 8], embedding_dim=16, epochs=2, steps_per_epoch=2, batch_size=4,
            n_classes_per_batch=2, n_samples_per_class=2, eval_batch_size=4, patience=5, lr=3e-3, seed=1,
            split=[0.5, 0.35, 0.15])


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from irisseg.data.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("findings") / "Dataset010_Findings", "findings", 12, shape=16,
                            seed=21)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


# ---------------------------------------------------------------------------------------------------
# split and samplers
# ---------------------------------------------------------------------------------------------------
def test_stratified_split_keeps_label_shares_exact_sizes_and_is_deterministic():
    rng = np.random.default_rng(0)
    prevalence = np.array([0.03, 0.1, 0.3, 0.5, 0.8])
    y = (rng.random((400, 5)) < prevalence).astype(np.uint8)
    fractions = (0.7, 0.15, 0.15)
    parts = multilabel_stratified_split(y, fractions, seed=3)
    assert [len(p) for p in parts] == [280, 60, 60]
    assert sorted(np.concatenate(parts).tolist()) == list(range(400))
    for part, f in zip(parts, fractions, strict=True):
        # every label's count in every part is within 2 cases of its share (a random split misses the rare
        # label's by ~sqrt(n) cases)
        np.testing.assert_array_less(np.abs(y[part].sum(0) - f * y.sum(0)), 2.0 + 1e-9)
    again = multilabel_stratified_split(y, fractions, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = multilabel_stratified_split(y, fractions, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    # small collections: every part gets a case as soon as there are enough
    for n in (3, 4, 7):
        small = multilabel_stratified_split(y[:n], fractions, seed=0)
        assert all(len(p) >= 1 for p in small) and sum(len(p) for p in small) == n
    with pytest.raises(InputError):
        multilabel_stratified_split(y, (0.5, 0.2), seed=0)


def test_balanced_sampler_batches_are_groups_sharing_their_finding():
    # one-hot findings: 5 cases of A, 3 of B, 1 of C, and 2 cases without any finding (rows 9, 10)
    y = np.zeros((11, 3), np.uint8)
    y[0:5, 0], y[5:8, 1], y[8, 2] = 1, 1, 1
    sampler = BalancedBatchSampler(y, n_classes=2, n_samples=3, steps=20, seed=7)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 20
    for batch in batches:
        assert len(batch) == 6
        assert not {9, 10} & set(batch)  # cases without a finding are never drawn
        groups = [batch[:3], batch[3:]]
        classes = [int(np.argmax(y[g[0]])) for g in groups]
        assert classes[0] != classes[1]
        for g, k in zip(groups, classes, strict=True):
            assert y[g, k].all()
            if y[:, k].sum() >= 3:  # without replacement when the finding has enough cases
                assert len(set(g)) == 3
    assert list(sampler) == batches  # same (seed, epoch): same batches
    sampler.set_epoch(1)
    assert list(sampler) != batches
    with pytest.raises(InputError, match="n_classes_per_batch"):
        BalancedBatchSampler(y, n_classes=4, n_samples=2, steps=1)
    shared = np.array([[1, 1, 0], [1, 0, 1], [1, 1, 1], [0, 0, 0]], np.uint8)  # all share A; row 3 never drawn
    with pytest.raises(InputError, match="every pair of the 3 training cases with a finding shares a finding"):
        BalancedBatchSampler(shared, n_classes=2, n_samples=2, steps=1)
    shuffled = ShuffledBatchSampler(5, batch_size=2, steps=5, seed=0)
    flat = [i for b in shuffled for i in b]
    assert all(len(b) == 2 for b in shuffled) and sorted(flat[:5]) == list(range(5))


# ---------------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------------
def test_uint8_encoding_round_trips_within_half_a_step_and_clips():
    x = np.linspace(-6, 6, 1001, dtype=np.float32)
    back = decode_volumes(encode_volumes(x, "uint8"))
    assert back.dtype == np.float32
    assert np.abs(back - np.clip(x, -4, 4)).max() <= 4 / 255 + 1e-6
    assert back.min() == -4.0 and abs(back.max() - 4.0) < 1e-6
    assert np.abs(decode_volumes(encode_volumes(x, "float16")) - x).max() <= 6 * 2.0 ** -11


def test_cache_is_built_once_reused_and_invalidated_by_a_changed_file(tmp_path, dataset):
    table = load_findings(dataset)
    table = table.subset(table.case_ids[:3])
    cache = build_volume_cache(table, (16, 16, 16), "float16", tmp_path / "cache")
    assert cache.path.name == "volumes.float16.npy" and cache.array.shape == (3, 1, 16, 16, 16)
    stamp = cache.path.stat().st_mtime_ns
    ref = [retrieval_input([read_volume(p) for p in paths], (16, 16, 16)) for paths in table.image_paths]
    for i in range(3):
        np.testing.assert_allclose(cache.load(i), ref[i], rtol=2.0 ** -10, atol=1e-4)
    again = build_volume_cache(table, (16, 16, 16), "float16", tmp_path / "cache")
    assert again.path.stat().st_mtime_ns == stamp  # reused, not rewritten
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["case_ids"] == table.case_ids and index["grid"] == [16, 16, 16] and index["dtype"] == "float16"
    # a touched image file invalidates the cache
    st = os.stat(table.image_paths[1][0])
    os.utime(table.image_paths[1][0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    rebuilt = build_volume_cache(table, (16, 16, 16), "float16", tmp_path / "cache")
    assert rebuilt.path.stat().st_mtime_ns != stamp
    assert json.loads((tmp_path / "cache" / "index.json").read_text()) != index
    # uint8: one byte a voxel, within half a quantisation step of the clipped values
    small = build_volume_cache(table, (16, 16, 16), "uint8", tmp_path / "cache")
    assert small.array.dtype == np.uint8 and not (tmp_path / "cache" / "volumes.float16.npy").exists()
    for i in range(3):
        assert np.abs(small.load(i) - np.clip(ref[i], -4, 4)).max() <= 4 / 255 + 1e-5


# ---------------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------------
def _toy_batch():
    """Unit vectors at 0, 53.13, 90 and 180 degrees; cases 0, 1 carry finding A, cases 2, 3 finding B.

    Squared distances 2 - 2 cos: d01 = 0.8, d02 = 2, d03 = 4, d12 = 0.4, d13 = 3.2, d23 = 2.
    """
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]], requires_grad=True)
    labels = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]])
    return emb, labels


def test_triplet_loss_batch_hard_matches_the_hand_computed_value():
    emb, labels = _toy_batch()
    # anchors: 0: relu(0.8 - 2 + 0.2) = 0; 1: 0.8 - 0.4 + 0.2 = 0.6; 2: 2 - 0.4 + 0.2 = 1.8; 3: relu(2 - 3.2 + 0.2) = 0
    loss = triplet_loss(emb, labels, margin=0.2, mining="batch_hard")
    assert loss.item() == pytest.approx(0.6, abs=1e-5)
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


def test_triplet_loss_semi_hard_matches_the_hand_computed_value():
    emb, labels = _toy_batch()
    # pairs: (0,1): negative 2 (d 2 > 0.8) -> 0; (1,0): negative 3 (3.2 > 0.8; 0.4 is not farther) -> 0;
    # (2,3): no negative farther than 2 -> hardest 0.4: 2 - 0.4 + 0.2 = 1.8; (3,2): negative 1 (3.2) -> 0
    loss = triplet_loss(emb, labels, margin=0.2, mining="semi_hard")
    assert loss.item() == pytest.approx(1.8 / 4, abs=1e-5)
    loss.backward()
    assert torch.isfinite(emb.grad).all()


def test_triplet_loss_is_zero_when_separated_or_without_a_valid_triplet():
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]], requires_grad=True)
    labels = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]])
    for mining in ("batch_hard", "semi_hard"):
        assert triplet_loss(emb, labels, margin=0.2, mining=mining).item() == 0.0
    # everybody shares finding A: no negative, no triplet; still a graph to backpropagate
    same = triplet_loss(emb, torch.ones(4, 2), mining="batch_hard")
    assert same.item() == 0.0 and same.requires_grad
    same.backward()
    # a case without any finding is nobody's positive and no anchor, but everybody's negative
    labels = torch.tensor([[1, 0], [1, 0], [0, 0]])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    # anchor 0: d01 = 2, d02 = 0.8 -> 2 - 0.8 + 0.2 = 1.4; anchor 1: d12 = 0.4 -> 2 - 0.4 + 0.2 = 1.8
    assert triplet_loss(x, labels, margin=0.2).item() == pytest.approx((1.4 + 1.8) / 2, abs=1e-5)
    with pytest.raises(ValueError):
        triplet_loss(x, labels, mining="hardest")
    pos, neg = triplet_masks(labels)
    assert pos.tolist() == [[False, True, False], [True, False, False], [False, False, False]]
    assert neg.tolist() == [[False, False, True], [False, False, True], [True, True, False]]


def test_triplet_training_warns_when_no_batch_of_an_epoch_held_a_triplet():
    cfg = RetrievalTrainConfig(mode="triplet", grid=(8, 8, 8), channels=(4, 8), embedding_dim=8)
    module = RetrievalLightning(EmbeddingNet(EmbeddingConfig(channels=(4, 8), embedding_dim=8)), cfg, ["A", "B"])
    image = torch.rand(3, 1, 8, 8, 8)

    def epoch(labels):
        module.training_step({"image": image, "labels": labels}, 0)
        module.training_step({"image": image, "labels": torch.tensor([[1, 0], [1, 0], [1, 1]])}, 1)  # all share A
        module._val = [(torch.arange(3), torch.nn.functional.normalize(torch.rand(3, 8), dim=1),
                        torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), None)]
        module.on_validation_epoch_end()

    with pytest.warns(UserWarning, match="none of its 2 triplet batches held a case with both a positive and a"):
        epoch(torch.tensor([[1, 1], [0, 1], [1, 1]]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning warns that self.log has no trainer here
        warnings.filterwarnings("error", message=".*triplet batches")
        epoch(torch.tensor([[1, 0], [1, 0], [0, 1]]))  # one batch of the epoch held triplets: no warning


def test_soft_micro_f1_loss_matches_the_hand_computed_value():
    ln3 = math.log(3.0)
    logits = torch.tensor([[ln3, 0.0], [-ln3, ln3]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # p = [[.75, .5], [.25, .75]]: TP = 1.5, FP = 0.75, FN = 0.5, F1 = 3 / 4.25
    loss = soft_micro_f1_loss(logits, targets)
    assert loss.item() == pytest.approx(1 - 3 / 4.25, abs=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[targets == 1] < 0).all()
    assert (logits.grad[targets == 0] > 0).all()
    perfect = soft_micro_f1_loss(torch.tensor([[30.0, -30.0], [-30.0, 30.0]]), targets)
    assert 0.0 <= perfect.item() < 1e-6
    assert soft_micro_f1_loss(torch.zeros(2, 2), torch.zeros(2, 2)).item() == pytest.approx(1.0)


def test_evaluate_embeddings_caps_cutoffs_and_selects_by_micro_f1_then_map():
    emb = np.eye(3, dtype=np.float32)[[0, 0, 1, 1]]  # cases 0, 1 identical; 2, 3 identical
    labels = np.array([[1, 0], [1, 0], [0, 1], [0, 1]])
    s = evaluate_embeddings(emb, labels)
    assert s["n"] == 4 and s["map@10"] == pytest.approx(1.0) and s["precision@1"] == pytest.approx(1.0)
    assert s["precision@20"] == pytest.approx(1 / 3)  # k capped at n - 1 = 3: one relevant among 3
    assert s["select"] == s["map@10"] and "micro_f1" not in s
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.1, 0.9]])
    s = evaluate_embeddings(emb, labels, probs)
    # TP 3, FP 1, FN 1: micro-F1 = 6 / 8
    assert s["micro_f1"] == pytest.approx(0.75) and s["select"] == pytest.approx(0.75 + 1e-3)


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------
def test_config_rejects_bad_settings(tmp_path):
    with pytest.raises(InputError, match="mode"):
        RetrievalTrainConfig(mode="contrastive")
    with pytest.raises(InputError, match="split"):
        RetrievalTrainConfig(split=(0.8, 0.0, 0.2))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"grid": [16, 16, 16], "gird": 3}))
    with pytest.raises(InputError, match="gird"):
        RetrievalTrainConfig.from_yaml(path)


def test_cli_triplet_train_writes_models_and_resumes(capsys, tmp_path, dataset, tiny_config):
    run = tmp_path / "triplet"
    code, out, err = run_cli(capsys, "retrieval", "train", "--mode", "triplet", "--data", dataset, "--out", run,
                             "--config", tiny_config, "--device", "cpu")
    assert code == 0, err
    assert "best epoch" in out and "mAP" in out
    rows = read_metrics_csv(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == [0, 1]
    with (run / "metrics.csv").open() as f:
        assert tuple(next(csv.reader(f))) == METRICS_COLUMNS
    for r in rows:
        assert np.isfinite(r["train_loss"]) and r["val_n"] == 4 and "val_micro_f1" not in r
        map10 = r["val_map@10"]  # NaN when no train_eval case shares a finding with another
        assert math.isnan(map10) or 0.0 <= map10 <= 1.0
        assert r["val_select"] == (map10 if math.isfinite(map10) else 0.0)
    splits = json.loads((run / "splits.json").read_text())
    ids = load_findings(dataset).case_ids
    assert sorted(splits["train"] + splits["train_eval"] + splits["test"]) == sorted(ids)
    assert [len(splits[k]) for k in ("train", "train_eval", "test")] == [6, 4, 2]
    for name in ("best", "last"):
        cfg = json.loads((run / name / "config.json").read_text())
        info = cfg["extra"]["retrieval"]
        assert info["mode"] == "triplet" and info["grid"] == [16, 16, 16] and len(info["finding_names"]) == 6
        assert info["split"] == splits and "val_map@10" in info["metrics"]
        assert (run / name / "model.safetensors").is_file()
    net = EmbeddingNet.load(run / "best")
    assert net.config.n_classes == 0 and net.config.embedding_dim == 16
    cache = run / "cache" / "volumes.float16.npy"
    stamp = cache.stat().st_mtime_ns
    code, _, err = run_cli(capsys, "retrieval", "train", "--mode", "triplet", "--data", dataset, "--out", run,
                           "--config", tiny_config, "--device", "cpu", "--epochs", "3", "--resume")
    assert code == 0, err
    assert [r["epoch"] for r in read_metrics_csv(run / "metrics.csv")] == [0, 1, 2]
    assert cache.stat().st_mtime_ns == stamp  # the cache was reused
    assert json.loads((run / "splits.json").read_text()) == splits
    # resuming with another mode (another architecture) is refused in one line
    code, _, err = run_cli(capsys, "retrieval", "train", "--mode", "microf1", "--data", dataset, "--out", run,
                           "--config", tiny_config, "--device", "cpu", "--epochs", "4", "--resume")
    assert code == 2 and "cannot resume" in err and len(err.strip().splitlines()) == 1


def test_cli_microf1_train_scores_the_head(capsys, tmp_path, dataset, tiny_config):
    run = tmp_path / "microf1"
    code, out, err = run_cli(capsys, "retrieval", "train", "--mode", "microf1", "--data", dataset, "--out", run,
                             "--config", tiny_config, "--device", "cpu")
    assert code == 0, err
    assert "micro-F1" in out
    rows = read_metrics_csv(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:
        assert 0.0 <= r["val_micro_f1"] <= 1.0 and 0.0 <= r["val_macro_f1"] <= 1.0
        map10 = r["val_map@10"] if math.isfinite(r["val_map@10"]) else 0.0
        assert r["val_select"] == pytest.approx(r["val_micro_f1"] + 1e-3 * map10)
    best = EmbeddingNet.load(run / "best")
    assert best.config.n_classes == 6
    assert json.loads((run / "best" / "config.json").read_text())["extra"]["retrieval"]["mode"] == "microf1"
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))


def test_cli_retrieval_train_bad_input_is_one_line(capsys, tmp_path, dataset, tiny_config):
    run = tmp_path / "run"
    cases = [("--data", tmp_path / "missing", "--config", tiny_config),
             ("--data", dataset, "--config", tiny_config, "--mode", "contrastive"),
             ("--data", dataset, "--config", tiny_config, "--resume")]
    for args in cases:
        code, _, err = run_cli(capsys, "retrieval", "train", "--out", run, "--device", "cpu", *args)
        assert code == 2
        assert err.startswith("irisseg: error:") and len(err.strip().splitlines()) == 1
        assert not run.exists()


# ---------------------------------------------------------------------------------------------------
# finding maps (dense auxiliary supervision)
# ---------------------------------------------------------------------------------------------------
def test_retrieval_map_codes_findings_on_the_image_grid():
    from irisseg.data.findings import retrieval_map
    from irisseg.io import Volume

    label = np.zeros((8, 12, 10), np.uint8)
    label[2:4, 3:9, 4:8] = 5   # finding 0 has label id 5
    label[5:7, 0:2, 0:2] = 2   # finding 1 has label id 2
    label[6, 10, 9] = 9        # an undeclared id stays background
    vol = Volume(label, spacing=(1.0, 1.5, 2.0), origin=(3.0, -2.0, 7.0), direction=np.eye(3))
    same = retrieval_map(vol, [5, 2], (8, 12, 10))  # the image's own grid: a pure recoding
    expected = np.zeros_like(label)
    expected[label == 5], expected[label == 2] = 1, 2
    np.testing.assert_array_equal(same, expected)
    half = retrieval_map(vol, [5, 2], (4, 6, 5))  # half the voxels per axis: nearest neighbour
    assert half.shape == (4, 6, 5) and half.dtype == np.uint8
    from irisseg.preprocess import resample

    np.testing.assert_array_equal(half, resample(vol.with_array(expected), shape=(4, 6, 5), kind="label").array)
    assert set(np.unique(half)) == {0, 1, 2}
    image = Volume(np.random.default_rng(0).normal(size=label.shape).astype(np.float32), spacing=vol.spacing,
                   origin=vol.origin, direction=vol.direction)
    assert retrieval_input(image, (4, 6, 5)).shape[1:] == half.shape  # the same grid as the image's
    # a file storing its axes in another order and flipped: map and input are reoriented alike, so the
    # map still marks where the bright finding voxels of the input are
    import SimpleITK as sitk

    def stored(v: Volume) -> Volume:
        return Volume.from_sitk(sitk.Flip(sitk.PermuteAxes(v.to_sitk(), [2, 0, 1]), [True, False, True]))

    bright = image.with_array(np.where(label == 5, 10.0, 0.0).astype(np.float32))
    fmap = retrieval_map(stored(vol), [5, 2], (8, 12, 10))
    x = retrieval_input(stored(bright), (8, 12, 10))[0]
    np.testing.assert_array_equal(fmap == 1, x > x.mean())
    np.testing.assert_array_equal(fmap, same)  # reoriented back to the canonical axes


def test_finding_map_loss_pools_targets_by_max_and_is_near_zero_when_perfect():
    from irisseg.losses import dice_bce_loss, finding_map_loss

    fmap = torch.zeros(2, 8, 8, 8, dtype=torch.long)
    fmap[0, 1, 1, 1] = 1           # a one-voxel finding 0 in case 0
    fmap[1, 4:8, 4:8, 4:8] = 2     # a larger finding 1 in case 1
    target = torch.zeros(2, 2, 4, 4, 4)
    target[0, 0, 0, 0, 0] = 1      # any covered voxel marks the coarse voxel
    target[1, 1, 2:, 2:, 2:] = 1
    perfect = (target * 2 - 1) * 30.0
    assert finding_map_loss(perfect, fmap).item() < 1e-4
    logits = torch.randn(2, 2, 4, 4, 4, requires_grad=True)
    loss = finding_map_loss(logits, fmap)
    folded = dice_bce_loss(logits.transpose(0, 1).reshape(1, 2, -1), target.transpose(0, 1).reshape(1, 2, -1))
    assert loss.item() == pytest.approx(folded.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        finding_map_loss(logits, fmap[0])


def test_map_head_reads_its_stage_and_leaves_the_embedding_unchanged():
    from irisseg.models.embedding import EmbeddingConfig

    torch.manual_seed(0)
    plain = EmbeddingNet(EmbeddingConfig(channels=(4, 8, 8), embedding_dim=8, n_classes=3))
    mapped = EmbeddingNet(EmbeddingConfig(channels=(4, 8, 8), embedding_dim=8, n_classes=3, map_classes=3,
                                          map_stage=1))
    mapped.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 1, 16, 12, 10)
    a, b = plain.eval()(x), mapped.eval()(x)
    assert b["maps"].shape == (2, 3, 8, 6, 5) and "maps" not in a
    torch.testing.assert_close(a["embedding"], b["embedding"])
    with pytest.raises(InputError, match="map_stage"):
        EmbeddingConfig(channels=(4, 8), map_classes=2, map_stage=2)


def test_cached_maps_follow_the_label_maps_and_the_augmentation(tmp_path, dataset):
    from irisseg.data.findings import retrieval_map
    from irisseg.training.retrieval import CachedVolumeDataset

    table = load_findings(dataset)
    table = table.subset(table.case_ids[:3])
    cache = build_volume_cache(table, (16, 16, 16), "float16", tmp_path / "cache", maps=True)
    values = [table.label_values[n] for n in table.names]
    for i in range(3):
        ref = retrieval_map(read_volume(table.label_paths[i]), values, (16, 16, 16))
        np.testing.assert_array_equal(cache.load_map(i), ref)
        present = {int(k) - 1 for k in np.unique(ref) if k}
        assert present <= set(np.flatnonzero(table.labels[i]))
    plain = CachedVolumeDataset(cache, [0, 1, 2], table.labels, maps=True)
    assert plain[1]["map"].dtype == torch.int64
    np.testing.assert_array_equal(plain[1]["map"].numpy(), cache.load_map(1))
    cfg = RetrievalTrainConfig(**{**TINY, "augment_prob": 1.0, "rotate_deg": 20.0, "noise_std": 0.0})
    warped = CachedVolumeDataset(cache, [0, 1, 2], table.labels, augment=cfg, seed=3, maps=True)
    item = warped[1]
    assert set(np.unique(item["map"].numpy())) <= set(np.unique(cache.load_map(1)))
    assert not np.array_equal(item["map"].numpy(), cache.load_map(1))  # moved with the image
    # a cache without maps refuses to give one
    bare = build_volume_cache(table, (16, 16, 16), "float16", tmp_path / "bare")
    with pytest.raises(InputError, match="no finding maps"):
        bare.load_map(0)


def test_cli_train_with_finding_maps(capsys, tmp_path, dataset, tiny_config):
    cfg = tmp_path / "maps.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "map_weight": 0.5, "map_stage": 1}))
    run = tmp_path / "maps"
    code, _, err = run_cli(capsys, "retrieval", "train", "--mode", "microf1", "--data", dataset, "--out", run,
                           "--config", cfg, "--device", "cpu")
    assert code == 0, err
    best = EmbeddingNet.load(run / "best")
    assert best.config.map_classes == 6 and best.config.map_stage == 1
    assert (run / "cache" / "maps.uint8.npy").is_file()
    assert len(read_metrics_csv(run / "metrics.csv")) == 2
