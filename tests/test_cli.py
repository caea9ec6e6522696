"""End-to-end tests of the command line on tiny data: outputs, exit codes, one-line errors."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from irisseg.cli import main
from irisseg.io import Volume, write_volume


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def pair(tmp_path, blob_image_and_mask):
    image, mask = blob_image_and_mask
    img = write_volume(image, tmp_path / "img.nii.gz")
    ref = write_volume(mask, tmp_path / "ref.nii.gz")
    pred_arr = mask.array.copy()
    pred_arr[5:7] = 0  # remove two slices of the box
    pred = write_volume(mask.with_array(pred_arr), tmp_path / "pred.nii.gz")
    return img, ref, pred, mask


def test_help_and_version(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "info" in out and "synth" in out and "metrics" in out
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and "irisseg 0.1.0" in out


def test_info_reports_geometry_and_labels(capsys, pair, tmp_path):
    img, ref, _, mask = pair
    code, out, err = run_cli(capsys, "info", img, ref, "--json", tmp_path / "info.json")
    assert code == 0, err
    assert "20 x 30 x 25" in out and "0.8, 1.1, 2.5" in out
    report = json.loads((tmp_path / "info.json").read_text())["files"]
    assert report[0]["shape_dhw"] == [20, 30, 25] and not report[0]["is_label_map"]
    n = int(mask.array.sum())
    assert report[1]["labels"] == {"1": {"voxels": n, "volume_ml": pytest.approx(n * 0.8 * 1.1 * 2.5 / 1000)}}
    assert report[1]["orientation"] == report[0]["orientation"]


def test_metrics_table_and_json(capsys, pair, tmp_path):
    _, ref, pred, mask = pair
    out_json = tmp_path / "m.json"
    code, out, err = run_cli(capsys, "metrics", "--pred", pred, "--ref", ref, "--tolerance-mm", "2", "--json", out_json)
    assert code == 0, err
    result = json.loads(out_json.read_text())
    row = result["labels"]["1"]
    removed = 2 * 12 * 13
    total = int(mask.array.sum())
    assert row["dice"] == pytest.approx(2 * (total - removed) / (2 * total - removed), abs=1e-6)
    assert row["recall"] == pytest.approx((total - removed) / total, abs=1e-6)
    assert row["precision"] == pytest.approx(1.0)
    assert result["tolerance_mm"] == 2.0
    assert "Dice" in out and "HD95" in out


def test_metrics_empty_prediction_is_reported_not_an_error(capsys, pair, tmp_path):
    _, ref, _, mask = pair
    empty = write_volume(mask.with_array(np.zeros_like(mask.array)), tmp_path / "empty.nii.gz")
    code, _, err = run_cli(capsys, "metrics", "--pred", empty, "--ref", ref, "--json", tmp_path / "e.json")
    assert code == 0, err
    row = json.loads((tmp_path / "e.json").read_text())["labels"]["1"]
    assert row["dice"] == 0.0 and row["hd95"] == float("inf")


def test_metrics_warns_when_the_files_share_no_label_value(capsys, pair, tmp_path):
    _, ref, _, mask = pair
    scaled = write_volume(mask.with_array(mask.array.astype(np.uint8) * 255), tmp_path / "scaled.nii.gz")
    code, out, err = run_cli(capsys, "metrics", "--pred", scaled, "--ref", ref, "--json", tmp_path / "s.json")
    assert code == 0, err
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["labels"]["1"]["dice"] == 0.0 and report["labels"]["255"]["dice"] == 0.0
    assert "share no label value" in report["warning"] and "[255]" in report["warning"] and "[1]" in report["warning"]
    assert err.startswith("irisseg: warning: the files share no label value") and err.count("\n") == 1, err
    code, out, err = run_cli(capsys, "metrics", "--pred", ref, "--ref", ref, "--json", tmp_path / "same.json")
    assert code == 0 and "warning" not in out + err and "warning" not in json.loads((tmp_path / "same.json").read_text())


def _bad_inputs(tmp_path, pair):
    img, ref, _, mask = pair
    cases = {}
    cases["missing file"] = (["info", tmp_path / "nope.nii.gz"], "nope.nii.gz: no such file")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"\x1f\x8b garbage" * 20)
    cases["corrupt file"] = (["info", junk], "junk.nii.gz: cannot read image")
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.Image(6, 7, sitk.sitkFloat32), str(flat))
    cases["2D image"] = (["info", flat], "flat.nii.gz: expected a 3D volume, got a 2D")
    four = tmp_path / "four.nii.gz"
    sitk.WriteImage(sitk.Image([3, 4, 5, 2], sitk.sitkFloat32), str(four))
    cases["4D image"] = (["info", four], "four.nii.gz: expected a 3D volume, got a 4D")
    moved = write_volume(Volume(mask.array, (0.8, 1.1, 5.0), mask.origin, mask.direction), tmp_path / "moved.nii.gz")
    cases["mismatched geometry"] = (["metrics", "--pred", moved, "--ref", ref], "moved.nii.gz: geometry does not match")
    cropped = write_volume(Volume(mask.array[:-1], mask.spacing, mask.origin, mask.direction), tmp_path / "short.nii.gz")
    cases["mismatched shape"] = (["metrics", "--pred", cropped, "--ref", ref], "short.nii.gz: geometry does not match")
    soft = write_volume(mask.with_array(mask.array * 0.3), tmp_path / "soft.nii.gz")
    cases["non-integer mask"] = (["metrics", "--pred", soft, "--ref", ref], "soft.nii.gz: not a segmentation")
    nan_arr = mask.array.astype(np.float32)
    nan_arr[0, 0, 0] = np.nan
    nan = write_volume(mask.with_array(nan_arr), tmp_path / "nan.nii.gz")
    cases["NaN intensities"] = (["metrics", "--pred", nan, "--ref", ref], "nan.nii.gz: image contains 1 NaN")
    cases["unknown mode"] = (["synth", "--mode", "bogus", "--out", tmp_path / "s"], "--mode: unknown mode 'bogus'")
    cases["protocol outside lesion mode"] = (["synth", "--mode", "findings", "--protocol", "t1", "--out", tmp_path / "s"],
                                             "--protocol applies to --mode lesion only")
    cases["channels outside territories mode"] = (["synth", "--mode", "multiclass", "--channels", "3", "--out",
                                                   tmp_path / "s"], "--channels applies to --mode territories only")
    cases["unknown protocol"] = (["synth", "--mode", "lesion", "--protocol", "pd", "--out", tmp_path / "s"],
                                 "option protocol must be one of")
    cases["findings outside findings mode"] = (["synth", "--mode", "lesion", "--findings", "1-2", "--out", tmp_path / "s"],
                                               "--findings applies to --mode findings only")
    cases["bad findings range"] = (["synth", "--mode", "findings", "--findings", "one", "--out", tmp_path / "s"],
                                   "--findings 'one': give MIN-MAX")
    cases["findings out of range"] = (["synth", "--mode", "findings", "--findings", "1-9", "--out", tmp_path / "s"],
                                      "max_findings")
    cases["bad labels option"] = (["metrics", "--pred", ref, "--ref", ref, "--labels", "a,b"], "--labels")
    cases["missing option"] = (["metrics", "--pred", ref], "Missing option '--ref'")
    cases["image as mask"] = (["metrics", "--pred", img, "--ref", ref], "img.nii.gz")
    truncated = tmp_path / "cut.nii.gz"  # ITK alone would read it as a whole mask, zero-filled at the end
    truncated.write_bytes(gzip.compress(gzip.decompress(Path(ref).read_bytes())[:-50]))
    cases["truncated file"] = (["metrics", "--pred", truncated, "--ref", ref], "cut.nii.gz: truncated file")
    (tmp_path / "taken.json").mkdir(exist_ok=True)
    cases["output is a folder"] = (["info", ref, "--json", tmp_path / "taken.json"],
                                   "taken.json: is a folder; give a file name")
    (tmp_path / "a_file").write_text("keep")
    cases["output folder is a file"] = (["synth", "--mode", "lesion", "--cases", "1", "--shape", "16", "--out",
                                         tmp_path / "a_file"], "a_file: exists and is not a folder")
    cases["output is another kind of file"] = (["segment", "--query", img, "--support", img, "--support-mask", ref,
                                                "--out", tmp_path / "seg.png"], "seg.png: not a volume file name")
    return cases


def test_bad_input_gives_one_line_and_exit_2(capsys, tmp_path, pair):
    for name, (args, expected) in _bad_inputs(tmp_path, pair).items():
        code, out, err = run_cli(capsys, *args, "--json", tmp_path / "never.json") if args[0] == "metrics" else run_cli(capsys, *args)
        assert code == 2, (name, code, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, (name, err)
        assert lines[0].startswith("irisseg: error: "), (name, err)
        assert expected in lines[0], (name, lines[0])
        assert "Traceback" not in err + out
        assert not (tmp_path / "never.json").exists(), name


def test_metrics_json_into_a_folder_is_refused_before_any_work(capsys, tmp_path, pair):
    _, ref, _, _ = pair
    (tmp_path / "m.json").mkdir()
    code, out, err = run_cli(capsys, "metrics", "--pred", ref, "--ref", ref, "--json", tmp_path / "m.json")
    assert code == 2 and err.strip() == f"irisseg: error: {tmp_path / 'm.json'}: is a folder; give a file name to write to"
    assert "Dice" not in out  # refused before computing, and no temporary file left
    assert not any((tmp_path / "m.json").iterdir()) and not list(tmp_path.glob(".*.tmp"))


def test_a_folder_without_dicom_is_one_line_even_at_the_c_level(tmp_path):
    """GDCM prints C++ warnings straight to the process's stderr when a folder holds no DICOM series."""
    (tmp_path / "scan.nii.gz").mkdir()
    proc = subprocess.run([sys.executable, "-m", "irisseg", "info", str(tmp_path / "scan.nii.gz")],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "120"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"irisseg: error: {tmp_path / 'scan.nii.gz'}: folder holds no DICOM series (and no volume file)"


def test_console_script_exit_code(tmp_path):
    """The installed entry point exits 2 with one line, no traceback."""
    env = {**os.environ, "COLUMNS": "120"}
    proc = subprocess.run([sys.executable, "-m", "irisseg", "info", str(tmp_path / "missing.nii.gz")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"irisseg: error: {tmp_path / 'missing.nii.gz'}: no such file or folder"


def test_irisseg_warnings_print_as_one_line_and_others_pass_through(tmp_path):
    from irisseg.cli import _warning_printer

    seen = []
    show = _warning_printer(lambda *args: seen.append(args))
    out = io.StringIO()
    import irisseg.training.retrieval as own

    show(UserWarning("epoch 0: none of its\n  2 batches"), UserWarning, own.__file__, 12, out)
    assert out.getvalue() == "irisseg: warning: epoch 0: none of its 2 batches\n" and not seen
    show(UserWarning("from elsewhere"), UserWarning, str(tmp_path / "other.py"), 3, out)
    assert len(seen) == 1 and seen[0][2] == str(tmp_path / "other.py") and out.getvalue().count("\n") == 1
