"""Supervised lesion pipeline: sliding-window prediction, training (metrics, exports, resume), the
``irisseg lesion`` commands end to end on tiny synthetic data, and bad input.

The models here are tiny and train for a few steps: the assertions are about shapes, geometry,
bookkeeping and error handling, not about segmentation quality (that is a benchmark's job).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from irisseg.cli import main
from irisseg.errors import InputError
from irisseg.io import Volume, read_volume, same_geometry, write_volume
from irisseg.lesion import (
    LesionPredictor,
    case_metrics,
    evaluate_dataset,
    normalize_channels,
    sliding_window_logits,
)
from irisseg.models.unet import ResidualUNet, UNetConfig
from irisseg.training.lesion import (
    ABLATION_TTA_COLUMNS,
    METRICS_COLUMNS,
    LesionLightning,
    LesionTrainConfig,
    make_loss,
    prepare_case,
    read_metrics_csv,
    train_lesion,
    tta_validation,
)

TINY = dict(channels=[4, 8], deep_supervision=True, patch=16, batch_size=2, steps_per_epoch=2, epochs=2,
            patience=5, num_workers=0, val_fraction=0.34, lr=3e-3)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("lesion") / "Dataset001_Lesion"
    assert main(["synth", "--mode", "lesion", "--cases", "3", "--shape", "24", "--seed", "77", "--out", str(root)]) == 0
    return root


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset, tiny_config):
    run = tmp_path_factory.mktemp("runs") / "lesion"
    assert main(["lesion", "train", "--data", str(dataset), "--out", str(run), "--config", str(tiny_config),
                 "--device", "cpu"]) == 0
    return run


def test_sliding_window_equals_whole_volume_prediction_when_the_volume_fits():
    torch.manual_seed(0)
    model = ResidualUNet(UNetConfig(in_channels=2, channels=(4, 8, 16))).eval()
    image = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        whole = model(image)
    window = sliding_window_logits(model, image, (16, 16, 16), overlap=0.5, precision="fp32")
    torch.testing.assert_close(window, whole, atol=1e-5, rtol=1e-5)
    # bf16 autocast (emulated where the CPU lacks it): float32 logits of the same shape, close to float32's
    half = sliding_window_logits(model, image, (16, 16, 16), overlap=0.5, precision="bf16")
    assert half.dtype == torch.float32 and half.shape == whole.shape and not torch.equal(half, whole)
    torch.testing.assert_close(half, whole, atol=0.05 * float(whole.abs().max()), rtol=0)
    # A volume smaller than the window is padded and cropped back: same shape as the input.
    small = sliding_window_logits(model, torch.randn(1, 2, 10, 13, 7), (16, 16, 16))
    assert small.shape == (1, 1, 10, 13, 7)
    # Larger than the window: many windows, the output covers the volume.
    big = sliding_window_logits(model, torch.randn(1, 2, 30, 20, 18), (16, 16, 16), overlap=0.25)
    assert big.shape == (1, 1, 30, 20, 18) and torch.isfinite(big).all()


def test_inference_precision_auto_uses_bf16_only_where_it_is_native(monkeypatch):
    import irisseg.models.blocks as blocks

    def dtype_under(device, precision):
        with blocks.inference_autocast(device, precision):
            return torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype

    assert dtype_under("cpu", "fp32") == torch.float32 and dtype_under("cpu", "bf16") == torch.bfloat16
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(blocks, "cpu_has_native_bf16", lambda native=native: native)
        assert dtype_under("cpu", "auto") == expected
    with pytest.raises(InputError, match="precision must be one of auto, fp32, bf16, got 'half'"):
        blocks.inference_autocast("cpu", "half")
    with pytest.raises(InputError, match="precision"):
        LesionTrainConfig(inference_precision="fp16")


def test_normalisation_is_per_channel_over_the_body():
    rng = np.random.default_rng(0)
    body = np.zeros((12, 12, 12), bool)
    body[2:10, 2:10, 2:10] = True
    a = np.where(body, rng.normal(100, 10, body.shape), 0).astype(np.float32)
    b = np.where(body, rng.normal(5, 0.1, body.shape), 0).astype(np.float32)
    out = normalize_channels([a, b])
    assert out.shape == (2, 12, 12, 12) and out.dtype == np.float32
    for c in out:
        assert abs(c[body].mean()) < 0.05 and abs(c[body].std() - 1) < 0.1
    # a small bright lesion (0.2% of the body): the default (z-score only, nnU-Net's MRI scheme) keeps it
    # apart from the rest of the body, clip_zscore flattens it to the body's 99.5th percentile
    a[5, 5, 5] = 400.0
    clipped, kept = normalize_channels([a], body, "clip_zscore")[0], normalize_channels([a], body)[0]
    assert clipped[5, 5, 5] == pytest.approx(clipped[body].max()) and np.sum(clipped[body] >= clipped[5, 5, 5]) > 1
    assert np.sum(kept[body] >= kept[5, 5, 5]) == 1 and kept[5, 5, 5] > 10
    assert abs(kept[body].mean()) < 1e-4 and abs(kept[body].std() - 1) < 1e-3
    with pytest.raises(InputError, match="normalization must be one of clip_zscore, zscore"):
        normalize_channels([a], body, "minmax")


def test_case_metrics_count_lesions():
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[1:3, 1:3, 1:3] = 1
    ref[6:9, 6:9, 6:9] = 1
    pred = np.zeros_like(ref)
    pred[6:9, 6:9, 6:9] = 1
    m = case_metrics(pred, ref, (1.0, 1.0, 1.0))
    assert m["lesion_recall"] == 0.5 and m["lesion_precision"] == 1.0 and m["n_lesions"] == 2
    assert m["dice"] == pytest.approx(2 * 27 / (27 + 35))


def test_learning_rate_anneals_over_steps_or_time_budget_whichever_ends_first():
    cfg = LesionTrainConfig(**{**TINY, "epochs": 10, "steps_per_epoch": 10, "max_minutes": 5.0})
    module = LesionLightning(ResidualUNet(UNetConfig(channels=(4, 8))), cfg, [])
    assert module.budget_used() == 0.0  # not attached to a trainer
    assert module.lr_factor(0) == pytest.approx(1 / 20)  # warm-up
    assert module.lr_factor(50) == pytest.approx(0.5)  # half the steps: cosine at its midpoint
    module.budget_used = lambda: 0.75  # three quarters of the time budget spent: time leads
    assert module.lr_factor(50) == pytest.approx(0.5 * (1 + np.cos(0.75 * np.pi)))
    module.budget_used = lambda: 1.2
    assert module.lr_factor(50) == 0.0 and module.lr_factor(100) == 0.0


def test_train_writes_metrics_models_and_splits(trained):
    rows = read_metrics_csv(trained / "metrics.csv")
    assert [r["epoch"] for r in rows] == [0, 1]
    with (trained / "metrics.csv").open() as f:
        assert tuple(next(csv.reader(f))) == METRICS_COLUMNS
    for r in rows:
        assert 0.0 <= r["val_dice"] <= 1.0 and 0.0 <= r["val_lesion_recall"] <= 1.0
        assert np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"])
    splits = json.loads((trained / "splits.json").read_text())
    assert len(splits["train"]) == 2 and len(splits["val"]) == 1 and not set(splits["train"]) & set(splits["val"])
    for name in ("best", "last"):
        cfg = json.loads((trained / name / "config.json").read_text())
        assert cfg["extra"]["lesion"]["patch"] == [16, 16, 16]
        assert (trained / name / "model.safetensors").is_file()
    assert list((trained / "logs").rglob("metrics.csv"))  # Lightning's own CSV log too
    assert list((trained / "tensorboard").rglob("events.out.tfevents.*"))  # and TensorBoard


class _CrashAt(L.Callback):
    """Simulate a killed run: raise when an epoch starts."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("killed")


class _FirstEpoch(L.Callback):
    def __init__(self):
        self.first = None

    def on_train_epoch_start(self, trainer, module):
        if self.first is None:
            self.first = trainer.current_epoch


def test_a_killed_run_resumes_from_the_last_epoch(tmp_path, dataset):
    cfg = LesionTrainConfig(**{**TINY, "epochs": 3, "ema_decay": 0.9})  # the weight average resumes too
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        train_lesion(cfg, dataset, run, device="cpu", progress=False, callbacks=[_CrashAt(2)])
    assert [r["epoch"] for r in read_metrics_csv(run / "metrics.csv")] == [0, 1]
    first = _FirstEpoch()
    train_lesion(cfg, dataset, run, resume=True, device="cpu", progress=False, callbacks=[first])
    assert first.first == 2  # continued, not restarted
    assert [r["epoch"] for r in read_metrics_csv(run / "metrics.csv")] == [0, 1, 2]


class _Batches(L.Callback):
    """Record (epoch, case, centre) of every training patch, and every case's hard-negative centres and
    hard-positive lesions as each epoch starts."""

    def __init__(self):
        self.items, self.pools, self.lesions = [], {}, {}

    def on_train_epoch_start(self, trainer, module):
        samplers = trainer.train_dataloader.dataset.samplers
        self.pools[trainer.current_epoch] = {k: {tuple(c) for c in s.hard_negatives.tolist()} for k, s in enumerate(samplers)}
        self.lesions[trainer.current_epoch] = {k: s.hard_positives.tolist() for k, s in enumerate(samplers)}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.items += [(trainer.current_epoch, int(k), tuple(c)) for k, c in zip(batch["case"], batch["centre"].tolist())]

    def hard_draws(self, epoch: int) -> int:
        """Patches of ``epoch`` centred on a hard negative, after checking that every patch on a case with
        hard negatives is centred on one of them and no other patch is."""
        pools = self.pools[epoch]
        items = [(k, c) for e, k, c in self.items if e == epoch]
        assert items and all((c in pools[k]) == bool(pools[k]) for k, c in items)
        return sum(bool(pools[k]) for k, _ in items)


def test_hard_negative_mining_centres_negatives_on_false_positives_and_resumes_with_them(tmp_path, dataset):
    # threshold 0.01: the barely trained net predicts lesion almost everywhere, so every mined case has
    # false positives; positive_fraction 0 and hard_negative_fraction 1: every patch on a mined case is one
    cfg = LesionTrainConfig(**{**TINY, "epochs": 3, "steps_per_epoch": 4, "positive_fraction": 0.0, "threshold": 0.01,
                               "hard_negative_fraction": 1.0, "hard_negative_cases": 1})
    run = tmp_path / "run"
    seen = _Batches()
    with pytest.raises(RuntimeError, match="killed"):
        train_lesion(cfg, dataset, run, device="cpu", progress=False, callbacks=[seen, _CrashAt(2)])
    assert [sum(map(bool, seen.pools[e].values())) for e in (0, 1, 2)] == [0, 1, 2]  # one case mined per epoch
    assert seen.hard_draws(0) == 0 and seen.hard_draws(1) > 0
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["_HardNegativeMiner"]
    assert state["visited"] == 2
    assert {int(k): {tuple(c) for c in v} for k, v in state["centres"].items()} == seen.pools[2]

    resumed = _Batches()
    train_lesion(cfg, dataset, run, resume=True, device="cpu", progress=False, callbacks=[resumed])
    assert resumed.pools[2] == seen.pools[2]  # the restored centres reach the resumed epoch's patches
    assert resumed.hard_draws(2) == 8  # both cases mined: every patch
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["_HardNegativeMiner"]
    assert state["visited"] == 2  # nothing is mined after the last epoch


def test_hard_positive_mining_marks_the_missed_lesions_and_resumes_with_them(tmp_path, dataset):
    # threshold 0.9999: the barely trained net finds no lesion, so every lesion of a mined case is missed
    cfg = LesionTrainConfig(**{**TINY, "epochs": 3, "steps_per_epoch": 2, "threshold": 0.9999,
                               "hard_positive_fraction": 0.5, "hard_negative_cases": 1})
    assert cfg.patch_config().hard_positive_fraction == 0.5
    run = tmp_path / "run"
    seen = _Batches()
    with pytest.raises(RuntimeError, match="killed"):
        train_lesion(cfg, dataset, run, device="cpu", progress=False, callbacks=[seen, _CrashAt(2)])
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["_HardNegativeMiner"]
    assert state["visited"] == 2 and state["centres"] == {}  # mined without hard negatives asked for
    mined = {int(k): v for k, v in state["lesions"].items()}
    assert len(mined) == 2  # one case an epoch, every lesion of it
    assert all(v == list(range(len(v))) and v for v in mined.values())
    assert {k: v for k, v in seen.lesions[2].items() if v} == mined
    assert not any(seen.lesions[0].values())

    resumed = _Batches()
    train_lesion(cfg, dataset, run, resume=True, device="cpu", progress=False, callbacks=[resumed])
    assert resumed.lesions[2] == seen.lesions[2]  # restored into the resumed epoch's samplers


class _Snapshot(L.Callback):
    """Record the live weights and their moving average after every training batch. Callbacks run before
    the module's own ``on_train_batch_end``, so ``ema[t]`` holds the average of the updates before step t."""

    def __init__(self):
        self.live, self.ema = [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.live.append({k: v.detach().clone() for k, v in module.model.state_dict().items()})
        self.ema.append({k: v.detach().clone() for k, v in module.eval_model.state_dict().items()})


def test_weight_average_follows_the_ema_formula_and_is_what_gets_exported(tmp_path, dataset):
    decay = 0.9
    cfg = LesionTrainConfig(**{**TINY, "epochs": 1, "steps_per_epoch": 4, "ema_decay": decay})
    snap = _Snapshot()
    run = train_lesion(cfg, dataset, tmp_path / "run", device="cpu", progress=False, callbacks=[snap])
    name = "encoder.0.0.conv1.weight"
    live = [w[name] for w in snap.live]
    ema = [w[name] for w in snap.ema][1:]  # the average after steps 0, 1, 2
    # the first update copies the weights, later ones blend: ema_t = decay * ema_{t-1} + (1 - decay) * w_t
    assert torch.equal(ema[0], live[0])
    for t in (1, 2):
        assert torch.allclose(ema[t], decay * ema[t - 1] + (1 - decay) * live[t], atol=1e-7)
    final = decay * ema[2] + (1 - decay) * live[3]
    assert not torch.allclose(final, live[3], atol=1e-5)
    exported = ResidualUNet.load(run / "last").state_dict()[name]
    assert torch.allclose(exported, final, atol=1e-7)  # RUN/last holds the average, not the live weights
    with pytest.raises(InputError, match="ema_decay"):
        LesionTrainConfig(ema_decay=1.0)


def test_blocks_per_level_reaches_the_trained_and_exported_network(tmp_path, dataset):
    cfg = LesionTrainConfig(**{**TINY, "epochs": 1, "steps_per_epoch": 1, "blocks_per_level": 2})
    run = train_lesion(cfg, dataset, tmp_path / "run", device="cpu", progress=False)
    net = ResidualUNet.load(run / "best")
    assert net.config.blocks_per_level == 2
    assert all(len(level) == 2 for level in net.encoder) and all(len(level) == 2 for level in net.decoder)
    with pytest.raises(InputError, match="blocks_per_level"):
        LesionTrainConfig(blocks_per_level=0)
    with pytest.raises(InputError, match="one count per level"):
        LesionTrainConfig(channels=[8, 16, 32], blocks_per_level=[1, 2])
    assert LesionTrainConfig(channels=[8, 16, 32], blocks_per_level=[1, 2, 3]).blocks_per_level == (1, 2, 3)


class _FakeCompiled:
    """Stands in for ``torch.compile(module)``: runs the module and counts calls, or fails like a missing
    C++ compiler would."""

    def __init__(self, module, fail: bool):
        self.module, self.fail, self.calls, self.bf16 = module, fail, 0, []

    def __call__(self, x):
        if self.fail:
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore detail")
        self.calls += 1
        self.bf16.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return self.module(x)


def test_compiled_training_steps_train_the_exported_network_and_fall_back_when_compiling_fails(
        tmp_path, dataset, monkeypatch):
    made = []

    def fake_compile(fail):
        def compile_(module, **kwargs):
            made.append(_FakeCompiled(module, fail))
            return made[-1]
        return compile_

    # float32 steps on both sides (``auto`` would pick bf16 for the compiled steps on a CPU with AMX)
    cfg = LesionTrainConfig(**{**TINY, "epochs": 1, "steps_per_epoch": 3, "compile": True, "train_precision": "fp32"})
    monkeypatch.setattr(torch, "compile", fake_compile(False))
    run = train_lesion(cfg, dataset, tmp_path / "compiled", device="cpu", progress=False)
    assert len(made) == 1 and made[0].calls == 3 and not any(made[0].bf16)  # every step, compiled once
    plain = train_lesion(LesionTrainConfig(**{**TINY, "epochs": 1, "steps_per_epoch": 3}), dataset,
                         tmp_path / "plain", device="cpu", progress=False)
    compiled_weights, plain_weights = ResidualUNet.load(run / "last").state_dict(), ResidualUNet.load(plain / "last").state_dict()
    assert compiled_weights.keys() == plain_weights.keys()  # no wrapper prefix in the export
    for k in plain_weights:  # same seed, same steps: the compiled wrapper trained the exported network
        assert torch.allclose(compiled_weights[k], plain_weights[k], atol=1e-6), k

    made.clear()
    monkeypatch.setattr(torch, "compile", fake_compile(True))
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*InvalidCxxCompiler.*training without it"):
        fallback = train_lesion(cfg, dataset, tmp_path / "fallback", device="cpu", progress=False)
    assert len(made) == 1  # not retried at every step
    assert [r["step"] for r in read_metrics_csv(fallback / "metrics.csv")] == [3]


def test_train_precision_runs_bf16_steps_only_where_asked_or_fast(tmp_path, dataset, monkeypatch):
    import irisseg.models.blocks as blocks
    from irisseg.training.engine import training_precision

    for native in (True, False):
        monkeypatch.setattr(blocks, "cpu_has_native_bf16", lambda native=native: native)
        # auto: bf16 on CUDA; on the CPU only for compiled steps on native bf16 (eager bf16 steps are slower)
        assert training_precision("cpu", "auto", compiled=True) == ("bf16-mixed" if native else "32-true")
        assert training_precision("cpu", "auto", compiled=False) == "32-true"
        assert training_precision("cuda", "auto") == "bf16-mixed"
        assert training_precision("cuda", "fp32") == "32-true"
        assert training_precision("cpu", "bf16") == "bf16-mixed"
    with pytest.raises(InputError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        LesionTrainConfig(train_precision="fp16")

    made = []

    def compile_(module, **kwargs):
        made.append(_FakeCompiled(module, False))
        return made[-1]

    monkeypatch.setattr(torch, "compile", compile_)
    monkeypatch.setattr(blocks, "cpu_has_native_bf16", lambda: True)
    cfg = LesionTrainConfig(**{**TINY, "epochs": 1, "steps_per_epoch": 3, "compile": True})
    run = train_lesion(cfg, dataset, tmp_path / "bf16", device="cpu", progress=False)
    assert made[0].calls == 3 and all(made[0].bf16)  # every step under bf16 autocast
    (row,) = read_metrics_csv(run / "metrics.csv")
    assert math.isfinite(row["train_loss"]) and 0.0 <= row["val_dice"] <= 1.0
    weights = ResidualUNet.load(run / "last").state_dict()
    assert all(w.dtype == torch.float32 for w in weights.values())  # mixed precision: float32 weights


def test_real_torch_compile_matches_the_plain_network():
    """The real ``torch.compile`` on a tiny lesion U-Net: the same outputs and gradients as without it (or,
    on a machine that cannot compile, the warned fallback, which is the plain network itself)."""
    torch.manual_seed(0)
    cfg = LesionTrainConfig(**{**TINY, "compile": True})
    net = ResidualUNet(UNetConfig(in_channels=1, out_channels=1, channels=cfg.channels, deep_supervision=True))
    module = LesionLightning(net, cfg, [])
    x = torch.randn(2, 1, 16, 16, 16)
    expected = [o.detach() for o in _as_list(net(x))]
    grads_plain = torch.autograd.grad(sum(o.sum() for o in _as_list(net(x))), list(net.parameters()))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = _as_list(module.train_forward(x))
    for o, e in zip(out, expected, strict=True):
        assert torch.allclose(o, e, atol=1e-4)
    grads = torch.autograd.grad(sum(o.sum() for o in out), list(net.parameters()))
    for g, gp in zip(grads, grads_plain, strict=True):  # fused kernels sum in another order
        assert float((g - gp).norm()) <= 1e-2 * float(gp.norm()) + 1e-6


def test_deep_supervision_targets_pool_the_mask_as_configured():
    """``deep_supervision_targets: max`` keeps a one-voxel lesion a full positive at the coarse levels;
    ``area`` makes it the covered fraction. The module's loss is deep_supervision_loss with that mode."""
    from irisseg.losses import deep_supervision_loss

    target = torch.zeros(2, 1, 8, 8, 8)
    target[0, 0, 3, 4, 5] = 1.0
    # outputs that predict the max-pooled mask confidently at every level
    outputs = [20.0 * (2 * torch.nn.functional.adaptive_max_pool3d(target, s) - 1) for s in (8, 4, 2)]
    losses = {}
    for mode in ("area", "max"):
        cfg = LesionTrainConfig(**{**TINY, "deep_supervision_targets": mode})
        module = LesionLightning(torch.nn.Identity(), cfg, [])
        losses[mode] = float(module._loss(outputs, target))
        assert losses[mode] == pytest.approx(float(deep_supervision_loss(make_loss(cfg), outputs, target, mode=mode)))
    assert losses["max"] < 1e-3 < losses["area"]  # right only for the max-pooled targets
    with pytest.raises(InputError, match="deep_supervision_targets must be 'area' or 'max'"):
        LesionTrainConfig(deep_supervision_targets="nearest")


def test_blob_weight_adds_the_instance_term_and_trains(tmp_path, dataset, monkeypatch):
    """``blob_weight`` adds ``w * blob_loss`` (per patch, not batch-folded) on the full-resolution output to
    the deep-supervised loss, and the training stream then carries the patches' lesion instances."""
    from irisseg.data import patches as patches_mod
    from irisseg.losses import blob_loss, deep_supervision_loss, get_loss

    g = torch.Generator().manual_seed(0)
    instances = torch.zeros(2, 1, 8, 8, 8, dtype=torch.int16)
    instances[0, 0, :3, :3, :3], instances[0, 0, 6, 6, 6], instances[1, 0, 4, 4, 2:4] = 1, 2, 1
    target = (instances > 0).float()
    outputs = [torch.randn(2, 1, 8, 8, 8, generator=g), torch.randn(2, 1, 4, 4, 4, generator=g)]
    cfg = LesionTrainConfig(**{**TINY, "blob_weight": 0.5})
    module = LesionLightning(torch.nn.Identity(), cfg, [])
    expected = (deep_supervision_loss(make_loss(cfg), outputs, target, mode=cfg.deep_supervision_targets)
                + 0.5 * blob_loss(get_loss("dice_bce"), outputs[0], instances))
    assert float(module._loss(outputs, target, instances)) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError, match="instances"):
        module._loss(outputs, target)
    plain = LesionLightning(torch.nn.Identity(), LesionTrainConfig(**TINY), [])
    assert float(plain._loss(outputs, target)) < float(module._loss(outputs, target, instances))

    seen = []
    draw = patches_mod.LesionPatchDataset.draw

    def spy(self, rng, gen):
        item = draw(self, rng, gen)
        seen.append(int(item["instances"].max()))
        return item

    monkeypatch.setattr(patches_mod.LesionPatchDataset, "draw", spy)
    run = train_lesion(LesionTrainConfig(**{**TINY, "epochs": 1, "blob_weight": 0.5, "positive_fraction": 1.0}),
                       dataset, tmp_path / "blob", device="cpu", progress=False)
    assert (run / "best" / "model.safetensors").is_file() and seen and max(seen) >= 1
    for bad in (-0.1, float("nan")):
        with pytest.raises(InputError, match="blob_weight"):
            LesionTrainConfig(blob_weight=bad)


def _as_list(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def test_lesion_config_rejects_bad_norm_and_jitter():
    with pytest.raises(InputError, match="norm"):
        LesionTrainConfig(norm="group")
    with pytest.raises(InputError, match="centre_jitter"):
        LesionTrainConfig(centre_jitter=-0.1)
    assert LesionTrainConfig(norm="batch", centre_jitter=0.5).centre_jitter == 0.5
    # positive draws are component-balanced unless the config asks for volume-proportional ones
    assert LesionTrainConfig().patch_config().component_balanced is True
    assert LesionTrainConfig(component_balanced=False).patch_config().component_balanced is False
    with pytest.raises(InputError, match="normalization"):
        LesionTrainConfig(normalization="minmax")


def oblique_case(seed: int) -> tuple[Volume, Volume]:
    """An image of another shape and an oblique, anisotropic geometry, with one bright blob as lesion."""
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    image = rng.normal(0.3, 0.02, (19, 23, 17)).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[8:11, 10:13, 7:10] = 1
    image[label > 0] = 0.9
    geo = dict(spacing=(0.8, 1.3, 2.4), origin=(-12.5, 30.0, 4.25),
               direction=Rotation.from_euler("xyz", (10, -20, 35), degrees=True).as_matrix())
    return Volume(image, **geo), Volume(label, **geo)


def test_cli_predict_and_evaluate_keep_the_input_geometry(capsys, tmp_path, trained, dataset):
    image, label = oblique_case(3)
    src = tmp_path / "in"
    img_path = write_volume(image, src / "odd_0000.nii.gz")
    code, out, err = run_cli(capsys, "lesion", "predict", "--model", trained, "--input", img_path,
                             "--out", tmp_path / "pred.nii.gz", "--probabilities")
    assert code == 0, err
    pred, prob = read_volume(tmp_path / "pred.nii.gz"), read_volume(tmp_path / "pred_prob.nii.gz")
    assert same_geometry(pred, image, tol=1e-4) and same_geometry(prob, image, tol=1e-4)
    assert pred.array.dtype == np.uint8 and set(np.unique(pred.array)) <= {0, 1}
    assert 0.0 <= prob.array.min() and prob.array.max() <= 1.0
    # The CLI output equals the Python API's.
    api = LesionPredictor(trained).predict([image])
    np.testing.assert_array_equal(api.array, pred.array)

    # A folder of images: one output per case, named by case id.
    code, _, err = run_cli(capsys, "lesion", "predict", "--model", trained, "--input", dataset / "imagesTr",
                           "--out", tmp_path / "folder")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["case_0000.nii.gz", "case_0001.nii.gz",
                                                                       "case_0002.nii.gz"]

    report = tmp_path / "report.csv"
    code, out, err = run_cli(capsys, "lesion", "evaluate", "--model", trained, "--data", dataset, "--out", report)
    assert code == 0, err
    with report.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["case_0000", "case_0001", "case_0002", "mean", "median"]
    dice = [float(r["dice"]) for r in rows[:3]]
    assert float(rows[3]["dice"]) == pytest.approx(np.mean(dice), abs=1e-5)
    assert "lesion_recall" in rows[0] and "hd95" in rows[0]

    # Only the run's validation cases, with mirror TTA.
    code, out, err = run_cli(capsys, "lesion", "evaluate", "--model", trained, "--data", dataset, "--out", report,
                             "--split", "val", "--tta")
    assert code == 0, err
    with report.open() as f:
        rows = list(csv.DictReader(f))
    val = json.loads((trained / "splits.json").read_text())["val"]
    assert [r["case"] for r in rows] == [*val, "mean", "median"]


def test_cli_lesion_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, trained, dataset):
    image, _ = oblique_case(4)
    bad = tmp_path / "bad"
    nan = write_volume(image.with_array(np.full(image.shape, np.nan, np.float32)), bad / "nan.nii.gz")
    corrupt = bad / "corrupt.nii.gz"
    corrupt.write_bytes(b"not a nifti")
    good = write_volume(image, bad / "good.nii.gz")
    twice = tmp_path / "twice"  # two files that would both be written to <out>/a.nii.gz
    write_volume(image, twice / "a.nii.gz")
    write_volume(image, twice / "a_0000.nii.gz")
    mixed = tmp_path / "mixed"  # one format is read, the other would be skipped without a word
    write_volume(image, mixed / "a.nii.gz")
    write_volume(image, mixed / "b.nii.gz")
    write_volume(image, mixed / "c.mha")
    (tmp_path / "taken.csv").mkdir()
    cases = {
        "missing input": (["predict", "--model", trained, "--input", bad / "nope.nii.gz"], "nope.nii.gz: no such file"),
        "nan": (["predict", "--model", trained, "--input", nan], "NaN"),
        "corrupt": (["predict", "--model", trained, "--input", corrupt], "corrupt.nii.gz"),
        "not a model": (["predict", "--model", bad, "--input", good], "no lesion model"),
        "missing data": (["evaluate", "--model", trained, "--data", bad / "none"], "no such dataset folder"),
        "one case twice": (["predict", "--model", trained, "--input", twice],
                           "a.nii.gz and a_0000.nii.gz are both case 'a'"),
        "mixed formats": (["predict", "--model", trained, "--input", mixed], "mixes .nii.gz images with other formats (c.mha)"),
        "unknown loss": (["train", "--data", bad, "--loss", "hinge"], "unknown loss"),
        "unknown ablation loss": (["ablate", "--data", bad, "--losses", "dice_bce,hinge"], "unknown loss"),
        "bad device": (["train", "--data", dataset, "--device", "tpu9"], "unknown device"),
        "ablate bad device": (["ablate", "--data", dataset, "--losses", "dice_bce", "--device", "tpu9"], "unknown device"),
    }
    for name, (args, message) in cases.items():
        out = tmp_path / f"out_{name.replace(' ', '_')}"
        code, _, err = run_cli(capsys, "lesion", *args, "--out", out / "report.csv" if args[0] == "evaluate" else out)
        assert code == 2, (name, err)
        assert err.count("\n") == 1 and err.startswith("irisseg: error: ") and message in err, (name, err)
        assert not out.exists() or not any(out.rglob("*.nii.gz")), name
        if "device" in name:
            assert not out.exists(), name
    assert not list(tmp_path.rglob(".irisseg-*"))
    code, _, err = run_cli(capsys, "lesion", "predict", "--model", trained, "--input", good, "--out", tmp_path / "p.png")
    assert code == 2 and "p.png: not a volume file name (give one ending in .nii.gz" in err, err
    assert not (tmp_path / "p.png").exists()
    code, _, err = run_cli(capsys, "lesion", "evaluate", "--model", trained, "--data", dataset, "--out", tmp_path / "taken.csv")
    assert code == 2 and err.strip().endswith("taken.csv: is a folder; give a file name to write to"), err
    assert not any((tmp_path / "taken.csv").iterdir()) and not list(tmp_path.glob(".*.tmp"))


def test_cli_ablate_writes_the_table_and_plots_and_skips_finished_runs(capsys, tmp_path, dataset, tiny_config):
    out = tmp_path / "ablation"
    args = ["lesion", "ablate", "--data", dataset, "--losses", "dice_bce,tversky", "--config", tiny_config,
            "--epochs", "1", "--out", out, "--device", "cpu"]
    code, text, err = run_cli(capsys, *args)
    assert code == 0, err
    with (out / "ablation_summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["loss"] for r in rows] == ["dice_bce", "tversky"]
    for r in rows:
        history = read_metrics_csv(out / r["loss"] / "metrics.csv")
        best = max(history, key=lambda h: h["val_dice"])
        assert float(r["val_dice"]) == pytest.approx(best["val_dice"], abs=1e-4)  # computed, not typed
    for png in ("dice_curve.png", "loss_curve.png", "ablation_val_dice.png", "ablation_val_recall.png"):
        assert (out / png).stat().st_size > 5_000, png
    assert list(out.glob("overlay_*.png"))
    assert "tta_val_dice" not in rows[0] and not (out / "dice_bce" / "val_tta.csv").exists()
    stamp = (out / "dice_bce" / "best" / "model.safetensors").stat().st_mtime_ns
    heldout = tmp_path / "Dataset002_Heldout"
    assert main(["synth", "--mode", "lesion", "--cases", "2", "--shape", "20", "--seed", "78", "--out", str(heldout)]) == 0
    code, text, err = run_cli(capsys, *args, "--tta", "--test", heldout)
    assert code == 0, err
    assert (out / "dice_bce" / "best" / "model.safetensors").stat().st_mtime_ns == stamp  # not retrained
    assert "dice_bce + TTA" in text and "tversky test" in text
    with (out / "ablation_summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    for r in rows:  # the summary's TTA columns are the means of the per-case mirrored report
        with (out / r["loss"] / "val_tta.csv").open() as f:
            report = list(csv.DictReader(f))
        cases = [c for c in report if c["case"] not in ("mean", "median")]
        assert [c["case"] for c in cases] == json.loads((out / r["loss"] / "splits.json").read_text())["val"]
        assert float(r["tta_val_dice"]) == pytest.approx(np.mean([float(c["dice"]) for c in cases]), abs=1e-4)
        assert float(r["tta_val_lesion_recall"]) == pytest.approx(
            np.mean([float(c["lesion_recall"]) for c in cases]), abs=1e-4)
        # The held-out columns: the best model (no TTA) on every labelled case of the other dataset.
        scored = evaluate_dataset(LesionPredictor(out / r["loss"]), heldout)
        assert [c["case"] for c in scored] == ["case_0000", "case_0001"]
        assert float(r["test_dice"]) == pytest.approx(np.mean([c["dice"] for c in scored]), abs=1e-4)
        assert float(r["test_lesion_recall"]) == pytest.approx(np.mean([c["lesion_recall"] for c in scored]), abs=1e-4)
        with (out / r["loss"] / "test_report.csv").open() as f:
            assert [c["case"] for c in csv.DictReader(f)] == ["case_0000", "case_0001", "mean", "median"]

    # A held-out set that is the training data, missing, unlabelled or of another channel count is refused
    # before anything trains.
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(heldout, unlabelled)
    shutil.rmtree(unlabelled / "labelsTr")
    two_channel = tmp_path / "two_channel"
    shutil.copytree(heldout, two_channel)
    for first in sorted((two_channel / "imagesTr").glob("*_0000.nii.gz")):
        shutil.copy(first, first.with_name(first.name.replace("_0000.", "_0001.")))
    meta = json.loads((two_channel / "dataset.json").read_text())
    meta["channel_names"] = {"0": "synthetic", "1": "copy"}
    (two_channel / "dataset.json").write_text(json.dumps(meta))
    for test, message in ((dataset, "is the training dataset itself"), (tmp_path / "nope", "no such dataset folder"),
                          (unlabelled, "without a label"), (two_channel, "2 image channel(s)")):
        fresh = tmp_path / "refused"
        code, _, err = run_cli(capsys, "lesion", "ablate", "--data", dataset, "--losses", "focal_dice", "--config",
                               tiny_config, "--epochs", "1", "--out", fresh, "--device", "cpu", "--test", test)
        assert code == 2 and err.count("\n") == 1 and message in err, err
        assert not fresh.exists()


def test_tta_validation_scores_the_best_model_with_mirroring_and_caches_the_report(trained, dataset):
    val_ids = json.loads((trained / "splits.json").read_text())["val"]
    mirrored = evaluate_dataset(LesionPredictor(trained, tta=True), dataset, val_ids)
    scores = tta_validation(trained, dataset)
    assert set(scores) == set(ABLATION_TTA_COLUMNS)
    assert scores["tta_val_dice"] == pytest.approx(np.mean([r["dice"] for r in mirrored]), abs=1e-5)
    assert scores["tta_val_lesion_precision"] == pytest.approx(
        np.mean([r["lesion_precision"] for r in mirrored]), abs=1e-5)
    # HD95 summarised like val_hd95 during training: the median over the cases (inf for an empty prediction)
    assert scores["tta_val_hd95"] == pytest.approx(np.median([r["hd95"] for r in mirrored]), abs=1e-4)
    stamp = (trained / "val_tta.csv").stat().st_mtime_ns
    assert tta_validation(trained, dataset) == scores
    assert (trained / "val_tta.csv").stat().st_mtime_ns == stamp  # read back, not predicted again
    assert not list(trained.glob("*.tmp"))
    weights = trained / "best" / "model.safetensors"  # a best model saved after the report: scored again
    os.utime(weights, ns=(stamp + 10**9, stamp + 10**9))
    assert tta_validation(trained, dataset) == scores
    assert (trained / "val_tta.csv").stat().st_mtime_ns > stamp


def test_two_channel_dataset_trains_predicts_and_refuses_a_missing_channel(capsys, tmp_path, dataset, tiny_config):
    """nnU-Net multi-channel layout (case_XXXX_0000 / _0001): the model takes both, prediction needs both."""
    root = tmp_path / "Dataset002_TwoChannel"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for label_path in sorted((dataset / "labelsTr").glob("*.nii.gz")):
        case = label_path.name[: -len(".nii.gz")]
        first = read_volume(dataset / "imagesTr" / f"{case}_0000.nii.gz")
        write_volume(first, root / "imagesTr" / f"{case}_0000.nii.gz")
        write_volume(first.with_array(1.0 - first.array), root / "imagesTr" / f"{case}_0001.nii.gz")
        write_volume(read_volume(label_path), root / "labelsTr" / label_path.name)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "lesion", "train", "--data", root, "--out", run, "--config", tiny_config,
                           "--epochs", 1, "--device", "cpu")
    assert code == 0, err
    assert LesionPredictor(run).in_channels == 2

    code, _, err = run_cli(capsys, "lesion", "predict", "--model", run, "--input", root / "imagesTr",
                           "--out", tmp_path / "pred")
    assert code == 0, err
    for case in ("case_0000", "case_0001", "case_0002"):
        pred = read_volume(tmp_path / "pred" / f"{case}.nii.gz")
        assert same_geometry(pred, read_volume(root / "imagesTr" / f"{case}_0000.nii.gz"), tol=1e-4)

    # One channel file given: its _0001 sibling is found next to it ...
    code, _, err = run_cli(capsys, "lesion", "predict", "--model", run,
                           "--input", root / "imagesTr" / "case_0000_0000.nii.gz", "--out", tmp_path / "one.nii.gz")
    assert code == 0, err
    # ... and refused with one line when it is missing.
    alone = write_volume(read_volume(root / "imagesTr" / "case_0000_0000.nii.gz"), tmp_path / "alone" / "x_0000.nii.gz")
    code, out, err = run_cli(capsys, "lesion", "predict", "--model", run, "--input", alone,
                             "--out", tmp_path / "two.nii.gz")
    assert code == 2 and "expects 2 channel(s)" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "two.nii.gz").exists()
    # ... and refused as well when a third channel file sits beside them (it would be ignored)
    for c in (1, 2):
        write_volume(read_volume(alone), alone.with_name(f"x_000{c}.nii.gz"))
    code, out, err = run_cli(capsys, "lesion", "predict", "--model", run, "--input", alone,
                             "--out", tmp_path / "three.nii.gz")
    assert code == 2 and "x_0002.nii.gz: extra channel file (the model expects 2 channel(s)" in err, err
    assert not (tmp_path / "three.nii.gz").exists()


def test_mirror_tta_prediction_is_equivariant_to_flipping_the_input(trained):
    image, _ = oblique_case(5)
    predictor = LesionPredictor(trained, tta=True)
    prob = predictor.predict_probabilities([image]).array
    flipped = predictor.predict_probabilities([image.with_array(image.array[::-1, :, ::-1].copy())]).array
    np.testing.assert_allclose(flipped[::-1, :, ::-1], prob, atol=1e-5)
    plain = LesionPredictor(trained).predict_probabilities([image]).array
    assert not np.allclose(plain, prob, atol=1e-6)  # the flipped passes do change the average


def test_in_context_commands_refuse_a_lesion_model(capsys, tmp_path, trained):
    from irisseg.incontext import load_model

    with pytest.raises(InputError, match="not an in-context \\(IRIS\\) model"):
        load_model(trained / "best")
    for args in (["memory", "list", "--model", trained / "best"], ["demo", "--model", trained / "best", "--out", tmp_path / "d"]):
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and err == f"irisseg: error: {trained / 'best'}: not an in-context (IRIS) model (its config.json is another kind's)\n"
    assert not (tmp_path / "d").exists()


def test_prediction_does_not_depend_on_how_the_file_stores_its_axes(trained):
    """The model was trained with ``reorient`` (the default): a scan stored with permuted and flipped axes
    gets the same segmentation, voxel for voxel in patient space."""
    import SimpleITK as sitk

    def stored(v: Volume) -> Volume:
        return Volume.from_sitk(sitk.Flip(sitk.PermuteAxes(v.to_sitk(), [2, 0, 1]), [True, False, True]))

    config = json.loads((trained / "best" / "config.json").read_text())
    assert config["extra"]["lesion"]["reorient"] is True
    predictor = LesionPredictor(trained)
    image, _ = oblique_case(6)
    plain = predictor.predict_probabilities([image])
    moved = predictor.predict_probabilities([stored(image)])
    assert same_geometry(moved, stored(image), tol=1e-9)
    np.testing.assert_allclose(moved.array, stored(plain).array, atol=1e-6)
    predictor.reorient = False  # as a model trained before the option existed: the grid as stored
    assert not np.allclose(predictor.predict_probabilities([stored(image)]).array, stored(plain).array, atol=1e-3)


def test_the_normalization_a_model_was_trained_with_is_the_one_it_predicts_with(tmp_path, trained):
    """The stored ``normalization`` reaches prediction; a model from before the option (a description of
    clip-and-z-score stored there) keeps clipping."""
    import shutil

    image, _ = oblique_case(7)
    image = image.with_array(np.where(image.array > 0.5, 3.0, image.array).astype(np.float32))  # far above p99.5
    config = json.loads((trained / "best" / "config.json").read_text())
    assert config["extra"]["lesion"]["normalization"] == "zscore"  # the default
    probs = {}
    for name, stored_value in (("old", "per-channel clip 0.5-99.5 pct + z-score over the body (non-zero voxels)"),
                               ("clip", "clip_zscore")):
        folder = shutil.copytree(trained / "best", tmp_path / name)
        config["extra"]["lesion"]["normalization"] = stored_value
        (folder / "config.json").write_text(json.dumps(config))
        predictor = LesionPredictor(folder)
        assert predictor.normalization == "clip_zscore"
        probs[name] = predictor.predict_probabilities([image]).array
    np.testing.assert_allclose(probs["old"], probs["clip"], atol=1e-6)
    assert not np.allclose(LesionPredictor(trained).predict_probabilities([image]).array, probs["clip"], atol=1e-3)


def test_lesion_config_target_spacing_values_and_yaml_round_trip():
    assert LesionTrainConfig().target_spacing is None  # the default: each case's own voxel grid
    assert LesionTrainConfig(target_spacing="median").target_spacing == "median"
    assert LesionTrainConfig(target_spacing=[1, 1, 2.5]).target_spacing == (1.0, 1.0, 2.5)
    for bad in ("mean", "123", [1, 2], [1, 0, 1], [1, float("nan"), 1], 3):
        with pytest.raises(InputError, match="target_spacing"):
            LesionTrainConfig(target_spacing=bad)
    cfg = LesionTrainConfig(channels=[4, 8], blocks_per_level=[1, 2], target_spacing=[0.9, 0.9, 3])
    assert LesionTrainConfig(**yaml.safe_load(yaml.safe_dump(cfg.to_yaml_dict()))) == cfg  # tuples dump as lists


def test_prepare_case_resamples_the_image_and_the_lesion_mask_to_the_target_spacing(dataset):
    from irisseg.data.datasets import load_dataset

    case = load_dataset(dataset).cases[0]
    native = prepare_case(case)
    fine = prepare_case(case, spacing=tuple(s / 2 for s in native.geometry.spacing))
    assert fine.image.shape[1:] == tuple(2 * n for n in native.image.shape[1:])
    assert fine.label.shape == fine.body.shape == fine.image.shape[1:] == fine.geometry.shape
    assert fine.label.dtype == np.uint8 and set(np.unique(fine.label)) <= {0, 1}
    volume_mm3 = [c.label.sum() * np.prod(c.geometry.spacing) for c in (native, fine)]
    assert volume_mm3[1] == pytest.approx(volume_mm3[0], rel=0.25)  # the lesions keep their size in mm^3
    assert abs(fine.image[0][fine.body].mean()) < 1e-3  # normalised on the model grid


def test_target_spacing_median_trains_on_one_voxel_size_and_predicts_on_the_input_grid(capsys, tmp_path, dataset):
    from irisseg.preprocess import canonical_axes, reorient

    config = tmp_path / "median.yaml"
    config.write_text(yaml.safe_dump({**TINY, "epochs": 1, "target_spacing": "median"}))
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "lesion", "train", "--data", dataset, "--out", run, "--config", config,
                           "--device", "cpu")
    assert code == 0, err
    # nnU-Net's target spacing: per axis, the median over the training cases, on the reoriented axes
    spacings = []
    for case in json.loads((run / "splits.json").read_text())["train"]:
        volume = read_volume(dataset / "imagesTr" / f"{case}_0000.nii.gz")
        spacings.append(reorient(volume, *canonical_axes(volume.direction)).spacing)
    assert len({tuple(s) for s in spacings}) > 1  # the synthetic cases differ in voxel size
    stored = json.loads((run / "best" / "config.json").read_text())["extra"]["lesion"]["target_spacing"]
    np.testing.assert_allclose(stored, np.median(spacings, axis=0), rtol=1e-6)
    assert yaml.safe_load((run / "train_config.yaml").read_text())["target_spacing"] == "median"
    assert np.isfinite(read_metrics_csv(run / "metrics.csv")[-1]["val_dice"])

    predictor = LesionPredictor(run)
    assert predictor.target_spacing == pytest.approx(tuple(stored))
    image, _ = oblique_case(5)
    probs = predictor.predict_probabilities([image])
    assert same_geometry(probs, image, tol=1e-9) and probs.array.dtype == np.float32
    assert 0.0 <= probs.array.min() and probs.array.max() <= 1.0
    predictor.target_spacing = None  # the same network on the input's own grid sees other voxels
    assert not np.allclose(predictor.predict_probabilities([image]).array, probs.array, atol=1e-3)
    img_path = write_volume(image, tmp_path / "in" / "odd_0000.nii.gz")
    code, _, err = run_cli(capsys, "lesion", "predict", "--model", run, "--input", img_path,
                           "--out", tmp_path / "pred.nii.gz")
    assert code == 0, err
    pred = read_volume(tmp_path / "pred.nii.gz")
    assert same_geometry(pred, image, tol=1e-4)
    np.testing.assert_array_equal(pred.array, LesionPredictor(run).predict([image]).array)
