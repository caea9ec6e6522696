"""`irisseg demo` end to end with a tiny model (the real one uses the starter weights)."""

from __future__ import annotations

import json

import numpy as np
import torch

from irisseg.cli import main
from irisseg.demo import builtin_example
from irisseg.io import read_volume, same_geometry
from irisseg.models.iris import build_iris


def test_builtin_example_is_deterministic_and_held_out():
    a = builtin_example(["ellipsoids"], shape=16, seed=3)
    b = builtin_example(["ellipsoids"], shape=16, seed=3)
    assert a.family == "ellipsoids" and len(a.supports) == 3
    assert np.array_equal(a.query.array, b.query.array) and np.array_equal(a.reference.array, b.reference.array)
    assert all(m.array.any() for m in a.support_masks) and a.reference.array.any()
    assert not np.array_equal(a.supports[0].array, a.query.array)


def test_demo_writes_everything_in_the_query_geometry(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_iris("iris-small", base_channels=4, embed_dim=16, num_heads=2, num_tokens=2, image_size=(16, 16, 16))
    model.save(tmp_path / "model", extra={"holdout_families": ["blobs"]})
    out = tmp_path / "demo"
    code = main(["demo", "--model", str(tmp_path / "model"), "--out", str(out), "--tune-steps", "2"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["strategies"]) == ["one-shot", "ensemble", "tune", "memory", "ensemble+tta"]
    assert summary["family"] == "blobs"
    query = read_volume(out / "query.nii.gz")
    for strategy, row in summary["strategies"].items():
        assert 0.0 <= row["dice"] <= 1.0 and row["seconds"] > 0
        pred = read_volume(out / f"pred_{strategy.replace('+', '_')}.nii.gz")
        assert same_geometry(pred, query, tol=1e-4)
    assert (out / "overlays.png").stat().st_size > 10_000
    assert "one-shot" in capsys.readouterr().out
