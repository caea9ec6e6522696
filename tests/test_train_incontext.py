"""End to end: `irisseg train` a few steps, resume, then `irisseg segment` an oblique anisotropic query."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from irisseg.cli import main
from irisseg.data.episodes import AugmentConfig, SyntheticEpisodes, augment_episode
from irisseg.errors import InputError
from irisseg.io import Volume, read_volume, same_geometry, write_volume
from irisseg.training.incontext import IncontextTrainConfig

TINY_TRAIN = {
    "model": "iris-small",
    "model_overrides": {"base_channels": 4, "embed_dim": 16, "num_heads": 2, "num_tokens": 2, "image_size": [16, 16, 16]},
    "shape": 16, "max_support": 2, "n_query": 1, "max_classes": 2, "max_steps": 3, "val_every": 2,
    "val_tasks": 2, "checkpoint_every": 1, "num_workers": 0, "holdout_families": ["ellipsoids"],
}


def test_episodes_shapes_and_determinism():
    stream = SyntheticEpisodes(shape=16, max_support=3, n_query=2, max_classes=3, exclude=["vessels"], seed=5)
    a, b = next(iter(stream)), next(iter(stream))
    k = a["support_images"].shape[0]
    n = a["support_masks"].shape[1]
    assert 1 <= k <= 3 and 1 <= n <= 3 and len(a["names"]) == n
    assert a["query_images"].shape == (2, 1, 16, 16, 16) and a["query_masks"].shape == (2, n, 16, 16, 16)
    assert "vessels" not in a["names"]
    for key in ("support_images", "support_masks", "query_images", "query_masks"):
        assert (a[key] == b[key]).all()
    masks = a["support_masks"]
    assert set(masks.unique().tolist()) <= {0.0, 1.0}


def test_augmentation_keeps_masks_binary_and_flips_jointly():
    import torch

    ep = next(iter(SyntheticEpisodes(shape=16, max_support=1, n_query=1, max_classes=1, seed=1, augment=None)))
    # flips only: applied identically to support and query
    same = {k: (v.clone() if hasattr(v, "clone") else v) for k, v in ep.items()}
    same["query_images"], same["query_masks"] = same["support_images"].clone(), same["support_masks"].clone()
    out = augment_episode(same, AugmentConfig(flip=1.0, rotate_deg=0.0, scale=(1.0, 1.0), intensity=0.0),
                          torch.Generator().manual_seed(0))
    assert torch.equal(out["support_masks"], out["query_masks"])
    assert torch.equal(out["support_masks"], same["support_masks"].flip([-3, -2, -1]))
    rot = augment_episode(ep, AugmentConfig(), torch.Generator().manual_seed(0))
    assert set(rot["query_masks"].unique().tolist()) <= {0.0, 1.0}


def test_config_rejects_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.1\nbogus: 3\n")
    with pytest.raises(InputError, match="unknown setting"):
        IncontextTrainConfig.from_yaml(path)


def test_train_resume_and_segment_end_to_end(tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump(TINY_TRAIN))
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--synthetic", "--out", str(run), "--device", "cpu"]) == 0
    for sub in ("best", "last"):
        assert sorted(p.name for p in (run / sub).iterdir()) == ["config.json", "memory.safetensors", "model.safetensors"]
    meta = json.loads((run / "last" / "config.json").read_text())
    assert meta["extra"]["step"] == 3 and meta["extra"]["holdout_families"] == ["ellipsoids"]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    # resume continues from the last step
    assert main(["train", "--config", str(cfg), "--synthetic", "--out", str(run), "--max-steps", "4", "--resume",
                 "--device", "cpu"]) == 0
    assert json.loads((run / "last" / "config.json").read_text())["extra"]["step"] == 4
    capsys.readouterr()

    # segment an oblique, anisotropic query of another shape with the trained run
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(0)
    img = rng.normal(0, 1, (14, 22, 19)).astype(np.float32)
    mask = np.zeros(img.shape, np.uint8)
    mask[4:9, 6:15, 5:12] = 1
    img[mask == 1] += 4
    sup_geo = dict(spacing=(1.0, 1.0, 1.5), origin=(0.0, 0.0, 0.0))
    q_geo = dict(spacing=(0.7, 1.3, 2.9), origin=(-40.0, 12.5, 3.0),
                 direction=Rotation.from_euler("xyz", (12, -20, 35), degrees=True).as_matrix())
    write_volume(Volume(img, **sup_geo), tmp_path / "sup.nii.gz")
    write_volume(Volume(mask, **sup_geo), tmp_path / "sup_mask.nii.gz")
    query = Volume(np.ascontiguousarray(img[:, ::-1]), **q_geo)
    write_volume(query, tmp_path / "query.nrrd")
    code = main(["segment", "--query", str(tmp_path / "query.nrrd"), "--support", str(tmp_path / "sup.nii.gz"),
                 "--support-mask", str(tmp_path / "sup_mask.nii.gz"), "--model", str(run), "--out",
                 str(tmp_path / "seg.nii.gz"), "--strategy", "ensemble"])
    assert code == 0, capsys.readouterr().err
    seg = read_volume(tmp_path / "seg.nii.gz")
    assert seg.shape == query.shape
    assert same_geometry(seg, query, tol=1e-4)
    assert set(np.unique(seg.array)) <= {0, 1}


def test_train_bad_input(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "--data", str(tmp_path / "missing")]) == 2
    assert "missing: no such dataset folder" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r2"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r3"), "--device", "tpu9"]) == 2
    assert "unknown device 'tpu9'" in capsys.readouterr().err and not (tmp_path / "r3").exists()
    (tmp_path / "steps.yaml").write_text("max_steps: 0\n")
    assert main(["train", "--out", str(tmp_path / "r4"), "--config", str(tmp_path / "steps.yaml")]) == 2
    assert "max_steps must be at least 1, got 0" in capsys.readouterr().err and not (tmp_path / "r4").exists()
