"""Territory training, prediction and the experiment matrix (``irisseg territories``) on tiny synthetic data.

The networks are tiny and train for a few steps: the assertions are about shapes, geometry, bookkeeping
(the ranking is recomputed from the runs' files; finished runs are skipped, interrupted ones resumed) and
error handling, not about segmentation quality.
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import yaml

from irisseg.cli import main
from irisseg.data.datasets import load_dataset
from irisseg.io import Volume, read_volume, same_geometry, write_volume
from irisseg.metrics import dice
from irisseg.territories import EXPERIMENTS
from irisseg.training.lesion import read_metrics_csv
from irisseg.training.territories import (
    METRICS_COLUMNS,
    TerritoryPredictor,
    TerritoryTrainConfig,
    label_targets,
    labels_from_probabilities,
    prepare_territory_case,
    read_validation_csv,
    territory_label_sets,
    train_territories,
)

TINY = dict(channels=[4, 8], attention_heads=4, patch=16, batch_size=4, steps_per_epoch=2, epochs=2, n_folds=2,
            num_workers=0, lr=3e-3)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("territories") / "Dataset003_Territories"
    assert main(["synth", "--mode", "territories", "--cases", "4", "--shape", "24", "--seed", "5",
                 "--out", str(root)]) == 0
    return root


@pytest.fixture(scope="module")
def tiny_settings(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset, tiny_settings):
    run = tmp_path_factory.mktemp("runs") / "cross"
    assert main(["territories", "train", "--config", "SeparateDecoders_CrossAttention_SpatialLoss", "--data",
                 str(dataset), "--fold", "1", "--out", str(run), "--settings", str(tiny_settings),
                 "--device", "cpu"]) == 0
    return run


# ---- labels -----------------------------------------------------------------------------------------------


def test_label_sets_and_targets_by_hand():
    assert territory_label_sets({"background": 0, "left": 1, "right": 2}) == ((1, 3), (2, 3))
    assert territory_label_sets({"background": 0, "a": 1, "b": 2, "both": 3}) == ((1, 3), (2, 3))
    assert territory_label_sets({"background": 0, "x": 7, "y": 4}) == ((4,), (7,))
    assert territory_label_sets({"background": 0, "l": (1, 3), "r": (2, 3)}) == ((1, 3), (2, 3))
    label = np.array([0, 1, 2, 3, 1], np.uint8).reshape(1, 1, 5)
    np.testing.assert_array_equal(label_targets(label, ((1, 3), (2, 3)))[:, 0, 0], [[0, 1, 0, 1, 1], [0, 0, 1, 1, 0]])
    with pytest.raises(Exception, match="two labels"):
        territory_label_sets({"background": 0, "a": 1, "b": 2, "c": 5})


def test_label_map_from_probabilities_larger_wins_where_both_exceed_the_threshold():
    p1 = np.array([0.1, 0.9, 0.6, 0.7, 0.8, 0.4])
    p2 = np.array([0.2, 0.1, 0.7, 0.6, 0.8, 0.45])
    labels = labels_from_probabilities(np.stack([p1, p2]).reshape(2, 1, 1, 6))
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels[0, 0], [0, 1, 2, 1, 1, 0])  # tie -> territory 1


# ---- CLI -------------------------------------------------------------------------------------------------


def test_list_prints_the_14_names(capsys):
    code, out, err = run_cli(capsys, "territories", "list")
    assert code == 0, err
    for name, exp in EXPERIMENTS.items():
        assert f" {name} " in out and exp.architecture in out
    assert len(EXPERIMENTS) == 14


def test_train_writes_metrics_models_and_validation(trained, dataset):
    rows = read_metrics_csv(trained / "metrics.csv")
    assert [r["epoch"] for r in rows] == [0, 1]
    assert set(METRICS_COLUMNS) <= set(rows[0])
    for r in rows:
        assert 0.0 <= r["val_dice_1"] <= 1.0 and r["val_mean_dice"] == pytest.approx(
            (r["val_dice_1"] + r["val_dice_2"]) / 2, abs=1e-6)
    for folder in ("best", "last"):
        assert (trained / folder / "model.safetensors").is_file() and (trained / folder / "config.json").is_file()
    splits = json.loads((trained / "splits.json").read_text())
    assert splits["fold"] == 1 and len(splits["val"]) == 2 and not set(splits["val"]) & set(splits["train"])
    done = json.loads((trained / "done.json").read_text())
    best = max(rows, key=lambda r: r["val_mean_dice"])
    assert done["best_epoch"] == best["epoch"] and done["val_mean_dice"] == pytest.approx(best["val_mean_dice"])

    # validation.csv: the best model's per-case Dice, which the predictor reproduces from the files
    cases = read_validation_csv(trained / "validation.csv")
    assert [c["case"] for c in cases] == splits["val"]
    assert {c["config"] for c in cases} == {"SeparateDecoders_CrossAttention_SpatialLoss"}
    assert np.mean([(c["dice_1"] + c["dice_2"]) / 2 for c in cases]) == pytest.approx(best["val_mean_dice"], abs=1e-6)
    data = load_dataset(dataset)
    predictor = TerritoryPredictor(trained)
    assert predictor.in_channels == 4 and predictor.spatial_dims == 2
    for row in cases:
        case = prepare_territory_case(data[row["case"]], ((1, 3), (2, 3)))
        channels, _ = data[row["case"]].load()
        prob = predictor.predict_probabilities(channels)
        assert prob.shape == (2, *channels[0].shape)
        assert dice(prob[0] > 0.5, case.target[0]) == pytest.approx(row["dice_1"], abs=1e-6)
        assert dice(prob[1] > 0.5, case.target[1]) == pytest.approx(row["dice_2"], abs=1e-6)


def _ranking_from_runs(out, names):
    """Mean Dice per config recomputed from the runs' validation.csv files."""
    expected = {}
    for name in names:
        rows = read_validation_csv(out / name / "fold_0" / "validation.csv")
        expected[name] = {"mean_dice": np.mean([(r["dice_1"] + r["dice_2"]) / 2 for r in rows]),
                          "dice_1": np.mean([r["dice_1"] for r in rows]), "dice_2": np.mean([r["dice_2"] for r in rows])}
    return expected


def _read_ranking(out):
    with (out / "ranking.csv").open() as f:
        return list(csv.DictReader(f))


def test_matrix_ranks_from_the_runs_resumes_and_skips_finished_runs(capsys, tmp_path, dataset, tiny_settings):
    out = tmp_path / "matrix"
    names = ["SharedDecoder", "SeparateDecoders_ComplementaryLoss"]
    # an interrupted run: one epoch done, no done.json
    cfg = TerritoryTrainConfig(**{**TINY, "epochs": 1})
    first = out / names[0] / "fold_0"
    train_territories(names[0], cfg, dataset, 0, first, device="cpu", progress=False)
    (first / "done.json").unlink()
    epoch0 = read_metrics_csv(first / "metrics.csv")[0]

    args = ["territories", "matrix", "--data", dataset, "--folds", "0", "--configs", ",".join(names),
            "--settings", tiny_settings, "--epochs", "2", "--out", out, "--device", "cpu"]
    code, text, err = run_cli(capsys, *args)
    assert code == 0, err
    resumed = read_metrics_csv(first / "metrics.csv")
    assert [r["epoch"] for r in resumed] == [0, 1] and resumed[0] == epoch0  # continued, not restarted
    for name in names:
        assert name in text
        assert json.loads((out / name / "fold_0" / "done.json").read_text())["epochs"] == 2

    ranking = _read_ranking(out)
    expected = _ranking_from_runs(out, names)
    assert sorted(r["config"] for r in ranking) == sorted(names)
    for r in ranking:
        for key in ("mean_dice", "dice_1", "dice_2"):
            assert float(r[key]) == pytest.approx(expected[r["config"]][key], abs=1e-5)
        assert float(r["fold0_mean_dice"]) == pytest.approx(expected[r["config"]]["mean_dice"], abs=1e-5)
        assert float(r["asymmetry"]) == pytest.approx(abs(float(r["dice_1"]) - float(r["dice_2"])), abs=1e-5)
    assert [r["config"] for r in ranking] == sorted(names, key=lambda n: (-expected[n]["mean_dice"], n))
    report = (out / "ranking.md").read_text()
    assert "Wilcoxon" in report
    for name in names:  # the training-runs table: 2 of 2 planned epochs each
        assert f"| {name} | 0 | 2 / 2 |" in report
    assert (out / "ranking.png").stat().st_size > 5_000

    # Second call: nothing is retrained; the ranking follows the (edited) validation files.
    stamps = {n: (out / n / "fold_0" / "best" / "model.safetensors").stat().st_mtime_ns for n in names}
    last = ranking[-1]["config"]
    path = out / last / "fold_0" / "validation.csv"
    rows = read_validation_csv(path)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["config", "fold", "case", "dice_1", "dice_2"])
        w.writeheader()
        w.writerows([{**r, "dice_1": 1.0, "dice_2": 0.98} for r in rows])
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    assert {n: (out / n / "fold_0" / "best" / "model.safetensors").stat().st_mtime_ns for n in names} == stamps
    top = _read_ranking(out)[0]
    assert top["config"] == last and float(top["mean_dice"]) == pytest.approx(0.99)


def oblique_channels(seed: int, n: int = 4) -> list[Volume]:
    """``n`` channels of another shape with an oblique, anisotropic geometry: two bright halves."""
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    geo = dict(spacing=(0.8, 1.3, 2.4), origin=(-12.5, 30.0, 4.25),
               direction=Rotation.from_euler("xyz", (10, -20, 35), degrees=True).as_matrix())
    out = []
    for c in range(n):
        image = rng.normal(0.1, 0.02, (19, 23, 17)).astype(np.float32)
        image[3:16, 4:19, 3:9] += 0.8 if c % 2 == 0 else 0.3
        image[3:16, 4:19, 9:14] += 0.3 if c % 2 == 0 else 0.8
        out.append(Volume(image, **geo))
    return out


def test_predict_writes_a_two_label_map_in_the_input_geometry(capsys, tmp_path, trained):
    channels = oblique_channels(3)
    paths = [write_volume(v, tmp_path / "in" / f"odd_{c:04d}.nii.gz") for c, v in enumerate(channels)]
    code, out, err = run_cli(capsys, "territories", "predict", "--model", trained, "--input", paths[0],
                             "--out", tmp_path / "pred.nii.gz", "--probabilities", "--device", "cpu")
    assert code == 0, err
    pred = read_volume(tmp_path / "pred.nii.gz")
    assert pred.array.dtype == np.uint8 and set(np.unique(pred.array)) <= {0, 1, 2}
    assert pred.shape == channels[0].shape and same_geometry(pred, channels[0], tol=1e-4)
    prob = np.stack([read_volume(tmp_path / f"pred_prob_{k}.nii.gz").array for k in (1, 2)])
    np.testing.assert_array_equal(labels_from_probabilities(prob), pred.array)
    api = TerritoryPredictor(trained).predict(channels)
    np.testing.assert_array_equal(api.array, pred.array)

    # a folder of cases: one output per case
    code, _, err = run_cli(capsys, "territories", "predict", "--model", trained, "--input", tmp_path / "in",
                           "--out", tmp_path / "folder")
    assert code == 0, err
    assert [p.name for p in (tmp_path / "folder").iterdir()] == ["odd.nii.gz"]


def test_3d_training_and_prediction(tmp_path, dataset):
    cfg = TerritoryTrainConfig(**{**TINY, "spatial_dims": 3, "patch": 16, "batch_size": 2, "epochs": 1})
    run = train_territories("SeparateDecoders", cfg, dataset, 0, tmp_path / "run3d", device="cpu", progress=False)
    assert [r["epoch"] for r in read_metrics_csv(run / "metrics.csv")] == [0]
    assert len(read_validation_csv(run / "validation.csv")) == 2
    predictor = TerritoryPredictor(run)
    assert predictor.spatial_dims == 3
    channels = oblique_channels(4)
    assert predictor.predict_probabilities(channels).shape == (2, 19, 23, 17)
    labels = predictor.predict(channels)
    assert same_geometry(labels, channels[0]) and set(np.unique(labels.array)) <= {0, 1, 2}


def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, dataset, trained):
    bad = tmp_path / "bad"
    one = write_volume(oblique_channels(5, n=1)[0], bad / "single.nii.gz")
    alone = write_volume(oblique_channels(5, n=1)[0], bad / "alone_0000.nii.gz")
    relabelled = {}
    for name, recode in (("empty", lambda a: np.zeros_like(a)), ("only1", lambda a: np.where(a > 0, 1, 0).astype(a.dtype))):
        copy = relabelled[name] = tmp_path / f"ds_{name}"
        shutil.copytree(dataset, copy)
        for i, path in enumerate(sorted((copy / "labelsTr").iterdir())):
            if name == "only1" or i == 0:  # one empty label map; or no territory 2 anywhere
                label = read_volume(path)
                write_volume(label.with_array(recode(label.array)), path)
    cases = {
        "unknown config": (["train", "--config", "SharedDecoder_Nope", "--data", dataset], "unknown territory configuration"),
        "missing data": (["train", "--config", "SharedDecoder", "--data", bad / "none"], "no such dataset folder"),
        "matrix unknown config": (["matrix", "--data", dataset, "--configs", "SharedDecoder,Nope"],
                                  "unknown territory configuration"),
        "matrix bad folds": (["matrix", "--data", dataset, "--folds", "zero"], "--folds"),
        "matrix fold out of range": (["matrix", "--data", dataset, "--folds", "0,7", "--settings", bad.parent / "t.yaml"],
                                     "fold 7 does not exist: folds are 0..1"),
        "one channel": (["predict", "--model", trained, "--input", one], "expects 4 channels"),
        "missing channel": (["predict", "--model", trained, "--input", alone], "missing channel file"),
        "not a model": (["predict", "--model", bad, "--input", one], "no territory model"),
        "bad device": (["train", "--config", "SharedDecoder", "--data", dataset, "--device", "tpu9"], "unknown device"),
        "empty label map": (["train", "--config", "SharedDecoder", "--data", relabelled["empty"],
                             "--settings", bad.parent / "t.yaml"],
                            "case_0000.nii.gz: empty label map: no voxel of either territory"),
        "no territory 2": (["train", "--config", "SharedDecoder", "--data", relabelled["only1"],
                            "--settings", bad.parent / "t.yaml"],
                           "no training case holds territory 2"),
        "matrix bad device": (["matrix", "--data", dataset, "--device", "tpu9"], "unknown device"),
    }
    (bad.parent / "t.yaml").write_text(yaml.safe_dump(TINY))
    for name, (args, message) in cases.items():
        out = tmp_path / f"out_{name.replace(' ', '_')}"
        code, _, err = run_cli(capsys, "territories", *args, "--out", out / "x.nii.gz" if args[0] == "predict" else out)
        assert code == 2, (name, err)
        assert err.count("\n") == 1 and err.startswith("irisseg: error: ") and message in err, (name, err)
        assert not out.exists(), name
    assert not list(tmp_path.rglob(".irisseg-*"))
    taken = tmp_path / "taken"  # a run folder path that is a file, and an output file under a file
    taken.write_text("x")
    code, _, err = run_cli(capsys, "territories", "train", "--config", "SharedDecoder", "--data", dataset,
                           "--out", taken, "--settings", bad.parent / "t.yaml")
    assert code == 2 and err == f"irisseg: error: {taken}: exists and is not a folder\n", err
    code, _, err = run_cli(capsys, "territories", "predict", "--model", trained, "--input", dataset / "imagesTr",
                           "--out", taken / "preds")
    assert code == 2 and err == f"irisseg: error: {taken}: is a file, not a folder\n", err
    assert taken.read_text() == "x" and not list(tmp_path.rglob(".irisseg-*"))


def test_predictor_refuses_a_non_territory_model(tmp_path):
    from irisseg.errors import InputError
    from irisseg.models.unet import ResidualUNet, UNetConfig

    ResidualUNet(UNetConfig(in_channels=4, channels=(4, 8))).save(tmp_path / "unet")
    with pytest.raises(InputError, match="not a territory model"):
        TerritoryPredictor(tmp_path / "unet")


def test_prediction_does_not_depend_on_how_the_file_stores_its_axes(trained):
    """Trained with ``reorient`` (the default), a 2D territory model slices the same patient axis whatever
    axis order the file stores: the probabilities agree voxel for voxel in patient space."""
    import SimpleITK as sitk

    from irisseg.training.territories import TerritoryPredictor

    def stored(v: Volume) -> Volume:
        return Volume.from_sitk(sitk.Flip(sitk.PermuteAxes(v.to_sitk(), [1, 2, 0]), [False, True, True]))

    predictor = TerritoryPredictor(trained)
    assert predictor.reorient and predictor.spatial_dims == 2
    channels = oblique_channels(8)
    plain = predictor.predict_probabilities(channels)
    moved = predictor.predict_probabilities([stored(c) for c in channels])
    for k in range(2):
        np.testing.assert_allclose(moved[k], stored(channels[0].with_array(plain[k])).array, atol=1e-6)
    labels = predictor.predict([stored(c) for c in channels])
    assert same_geometry(labels, stored(channels[0]), tol=1e-9)
