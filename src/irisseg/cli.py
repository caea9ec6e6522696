"""The ``irisseg`` command line.

Every command reads and writes volumes through :mod:`irisseg.io`, so outputs keep the input geometry.
Bad input (a missing or corrupt file, wrong dimensions, mismatched geometry, an empty or non-binary mask,
NaN intensities) prints one line ``irisseg: error: <file>: <problem>`` on stderr and exits with code 2.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from irisseg.errors import InputError

app = typer.Typer(
    name="irisseg",
    help="3D medical image segmentation by example, and similar-case retrieval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console()


def _split_names(values: list[str] | None) -> list[str] | None:
    """``--families a,b --families c`` -> ``["a", "b", "c"]`` (None when not given)."""
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _fmt(value: float, digits: int = 4) -> str:
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if value is None or not np.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}"


def _write_json(path: Path, payload: dict) -> None:
    """Write JSON atomically (temporary file, then rename), so a failure leaves nothing half-written.
    Callers check ``path`` with :func:`irisseg.io.check_output_file` before their work."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default, allow_nan=True))
    tmp.replace(path)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ---------------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------------
def volume_info(path: Path) -> dict:
    """Everything ``irisseg info`` reports about one file, as a JSON-friendly dict."""
    from irisseg.io import orientation_code, read_volume

    vol = read_volume(path, allow_nan=True)
    arr = vol.array
    finite = np.isfinite(arr) if arr.dtype.kind == "f" else None
    values = arr[finite] if finite is not None else arr
    info = {
        "path": str(path),
        "shape_dhw": list(vol.shape),
        "size_xyz": list(vol.size_xyz),
        "dtype": str(arr.dtype),
        "spacing_xyz_mm": list(vol.spacing),
        "origin_xyz_mm": list(vol.origin),
        "direction": vol.direction.round(6).reshape(-1).tolist(),
        "orientation": orientation_code(vol),
        "field_of_view_mm": [float(s * n) for s, n in zip(vol.spacing, vol.size_xyz)],
        "intensity": {
            "min": float(values.min()) if values.size else float("nan"),
            "max": float(values.max()) if values.size else float("nan"),
            "mean": float(values.mean()) if values.size else float("nan"),
            "std": float(values.std()) if values.size else float("nan"),
            "non_finite_voxels": int((~finite).sum()) if finite is not None else 0,
        },
        "is_label_map": vol.is_label_map,
    }
    if vol.is_label_map:
        labels = vol.labels()
        if len(labels) <= 1000:
            info["labels"] = {
                str(k): {"voxels": n, "volume_ml": n * vol.voxel_volume_ml} for k, n in labels.items()
            }
    return info


@app.command()
def info(
    files: Annotated[list[Path], typer.Argument(help="Volume files (.nii, .nii.gz, .nrrd, .mha, .mhd) or DICOM folders.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON here.")] = None,
) -> None:
    """Shape, spacing (mm), orientation code, intensity range, and labels with voxel counts and ml.

    Shape is printed in array order (D, H, W); spacing and origin in (x, y, z) order, as SimpleITK.
    """
    from irisseg.io import check_output_file

    if json_out is not None:
        check_output_file(json_out)
    reports = []
    for path in files:
        rep = volume_info(path)
        reports.append(rep)
        table = Table(title=str(path), show_header=False, title_justify="left")
        table.add_column("field", style="bold")
        table.add_column("value")
        table.add_row("shape (D, H, W)", " x ".join(map(str, rep["shape_dhw"])))
        table.add_row("dtype", rep["dtype"])
        table.add_row("spacing (x, y, z) mm", ", ".join(f"{s:.4g}" for s in rep["spacing_xyz_mm"]))
        table.add_row("origin (x, y, z) mm", ", ".join(f"{s:.4g}" for s in rep["origin_xyz_mm"]))
        table.add_row("orientation", rep["orientation"])
        table.add_row("field of view mm", " x ".join(f"{s:.1f}" for s in rep["field_of_view_mm"]))
        it = rep["intensity"]
        table.add_row("intensity range", f"{_fmt(it['min'], 3)} .. {_fmt(it['max'], 3)} (mean {_fmt(it['mean'], 3)}, std {_fmt(it['std'], 3)})")
        if it["non_finite_voxels"]:
            table.add_row("non-finite voxels", f"[red]{it['non_finite_voxels']}[/red]")
        console.print(table)
        if "labels" in rep:
            lt = Table(title="labels", title_justify="left")
            lt.add_column("label", justify="right")
            lt.add_column("voxels", justify="right")
            lt.add_column("volume (ml)", justify="right")
            for k, v in rep["labels"].items():
                lt.add_row(k, str(v["voxels"]), f"{v['volume_ml']:.3f}")
            if not rep["labels"]:
                lt.add_row("-", "0", "0 (no foreground)")
            console.print(lt)
    if json_out is not None:
        _write_json(json_out, {"files": reports})


# ---------------------------------------------------------------------------------------------------
# synth
# ---------------------------------------------------------------------------------------------------
@app.command()
def synth(
    out: Annotated[Path, typer.Option("--out", help="Dataset folder to write (nnU-Net raw layout).")],
    mode: Annotated[str, typer.Option("--mode", help="multiclass | lesion | territories | findings")] = "multiclass",
    cases: Annotated[int, typer.Option("--cases", min=1, help="Number of cases.")] = 8,
    shape: Annotated[int, typer.Option("--shape", min=16, help="Cube side in voxels (D = H = W), at least 16.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives the same dataset.")] = 0,
    families: Annotated[list[str] | None, typer.Option("--families", help="Shape families to use (comma-separated or repeated).")] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="Shape families to hold out.")] = None,
    channels: Annotated[int | None, typer.Option("--channels", min=1, help="Image channels (territories mode).")] = None,
    protocol: Annotated[str | None, typer.Option(
        "--protocol", help="Lesion mode: flair (bright lesions, default) | t1 (dark lesions) | random (any contrast).")] = None,
    findings: Annotated[str | None, typer.Option(
        "--findings", help="Findings mode: how many finding types per case, MIN-MAX (default 1-6) or N.")] = None,
) -> None:
    """Write a synthetic, domain-randomised nnU-Net-style dataset (imagesTr/, labelsTr/, dataset.json).

    Images are float32 volumes of SHAPE^3 voxels with random anisotropic spacing (mm); labels are uint8
    label maps in the same geometry. ``cases.json`` records each case's shape families and findings.
    """
    from irisseg.data.synthetic import MODES, generate_dataset

    if mode not in MODES:
        raise InputError(f"--mode: unknown mode {mode!r} (choose from {', '.join(MODES)})")
    options = {}
    if channels is not None:
        if mode != "territories":
            raise InputError(f"--channels applies to --mode territories only, not {mode!r}")
        options["channels"] = channels
    if protocol is not None:
        if mode != "lesion":
            raise InputError(f"--protocol applies to --mode lesion only, not {mode!r}")
        options["protocol"] = protocol
    if findings is not None:
        if mode != "findings":
            raise InputError(f"--findings applies to --mode findings only, not {mode!r}")
        try:
            low, _, high = findings.partition("-")
            options["min_findings"], options["max_findings"] = int(low), int(high or low)
        except ValueError:
            raise InputError(f"--findings {findings!r}: give MIN-MAX (e.g. 1-2) or one number") from None
    with console.status(f"generating {cases} {mode} cases at {shape}^3 ..."):
        root = generate_dataset(
            out, mode=mode, cases=cases, shape=shape, seed=seed,
            families=_split_names(families), exclude=_split_names(exclude), **options,
        )
    console.print(f"wrote {cases} {mode} cases to {root}")


# ---------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------
#: (key in the metrics dict, column header) of the metrics table.
METRIC_COLUMNS = (
    ("dice", "Dice"), ("iou", "IoU"), ("precision", "Prec"), ("recall", "Rec"),
    ("hd95", "HD95 mm"), ("assd", "ASSD mm"), ("surface_dice", "NSD"),
)
LESION_COLUMNS = (("lesion_recall", "L-Rec"), ("lesion_precision", "L-Prec"), ("lesion_f1", "L-F1"))


def compare_files(pred: Path, ref: Path, tolerance_mm: float = 1.0, labels: list[int] | None = None,
                  lesion_wise: bool = False) -> dict:
    """Per-label metrics of a predicted label map against a reference in the same geometry.

    Arguments:
      pred, ref: label-map files (D, H, W) with equal shape, spacing, origin and direction.
      tolerance_mm (float): surface-Dice tolerance in mm.
      labels (list[int] | None): labels to evaluate (default: every non-zero label in either file).
      lesion_wise (bool): also report lesion-wise detection (26-connected components).

    Returns:
      dict: ``{"pred", "ref", "spacing_zyx_mm", "tolerance_mm", "labels": {label: {metric: value}}}``, plus
      ``"warning"`` (str) when both files have foreground but share no label value (for example 0/255
      against 0/1): labels are compared value by value, so every Dice is then 0.
    """
    from irisseg.io import read_mask
    from irisseg.metrics import evaluate

    ref_vol = read_mask(ref, allow_empty=True)
    pred_vol = read_mask(pred, reference=ref_vol, reference_name=ref, allow_empty=True)
    pred_values = {int(v) for v in np.unique(pred_vol.array)} - {0}  # read_mask: integer label maps
    ref_values = {int(v) for v in np.unique(ref_vol.array)} - {0}
    per_label = evaluate(pred_vol.array, ref_vol.array, spacing=ref_vol.spacing_zyx,
                         labels=sorted(pred_values | ref_values) if labels is None else labels,
                         tolerance_mm=tolerance_mm, lesion_wise=lesion_wise)
    report = {
        "pred": str(pred),
        "ref": str(ref),
        "spacing_zyx_mm": list(ref_vol.spacing_zyx),
        "tolerance_mm": tolerance_mm,
        "labels": {str(k): v for k, v in per_label.items()},
    }
    if pred_values and ref_values and not pred_values & ref_values:
        report["warning"] = (f"the files share no label value ({pred} has {sorted(pred_values)}, {ref} has "
                             f"{sorted(ref_values)}); labels are compared value by value")
    return report


def print_metrics_table(report: dict, title: str | None = None) -> None:
    """Print the per-label table of :func:`compare_files`'s report (NSD: surface Dice at the tolerance)."""
    rows = report["labels"]
    columns = METRIC_COLUMNS + tuple(c for c in LESION_COLUMNS if any(c[0] in r for r in rows.values()))
    table = Table(title=title or f"{report['pred']} vs {report['ref']}", title_justify="left")
    table.add_column("label", justify="right")
    for _, header in columns:
        table.add_column(header, justify="right")
    table.add_column("ref ml", justify="right")
    table.add_column("pred ml", justify="right")
    for label, row in rows.items():
        table.add_row(label, *(_fmt(row[key], 2 if "mm" in header else 3) for key, header in columns),
                      _fmt(row["ref_volume_ml"], 2), _fmt(row["pred_volume_ml"], 2))
    if not rows:
        table.add_row("-", "no foreground in either file", *[""] * (len(columns) + 1))
    console.print(table)


@app.command()
def metrics(
    pred: Annotated[Path, typer.Option("--pred", help="Predicted label map.")],
    ref: Annotated[Path, typer.Option("--ref", help="Reference label map, same geometry as --pred.")],
    tolerance_mm: Annotated[float, typer.Option("--tolerance-mm", min=0.0, help="Surface Dice tolerance in mm.")] = 1.0,
    labels: Annotated[str | None, typer.Option("--labels", help="Comma-separated labels (default: all).")] = None,
    lesion: Annotated[bool, typer.Option("--lesion", help="Add lesion-wise recall, precision and F1.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metrics as JSON here.")] = None,
) -> None:
    """Dice, IoU, precision, recall, HD95 and ASSD (mm), surface Dice, per label.

    Both files are label maps (D, H, W) with the same shape, spacing, origin and direction. Empty cases
    follow the documented conventions of :mod:`irisseg.metrics` (both empty: Dice 1; one empty: Dice 0,
    HD95 inf).
    """
    from irisseg.io import check_output_file

    try:
        label_list = [int(x) for x in labels.split(",")] if labels else None
    except ValueError:
        raise InputError(f"--labels: expected comma-separated integers, got {labels!r}") from None
    if json_out is not None:
        check_output_file(json_out)
    report = compare_files(pred, ref, tolerance_mm=tolerance_mm, labels=label_list, lesion_wise=lesion)
    print_metrics_table(report)
    if "warning" in report:
        _warning_line(report["warning"])
    if json_out is not None:
        _write_json(json_out, report)
        console.print(f"wrote {json_out}")


# ---------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------
@app.command()
def train(
    out: Annotated[Path, typer.Option("--out", help="Run folder: best/, last/, logs/, checkpoints/.")],
    config: Annotated[Path | None, typer.Option("--config", help="YAML training settings (see IncontextTrainConfig).")] = None,
    data: Annotated[list[Path] | None, typer.Option("--data", help="nnU-Net-style dataset folder (repeatable).")] = None,
    synthetic: Annotated[bool, typer.Option("--synthetic", help="Stream synthetic tasks (default when no --data).")] = False,
    max_steps: Annotated[int | None, typer.Option("--max-steps", min=1, help="Override the config's max_steps.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoints/last.ckpt.")] = False,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | auto (bf16 autocast on cuda).")] = "auto",
) -> None:
    """Train the IRIS in-context model episodically on datasets and/or synthetic tasks.

    Each step: one task, K supports and Q queries on a SHAPE^3 grid, Dice + BCE, AdamW with a cosine
    schedule, gradient clipping 1.0. Exports RUN/best and RUN/last (config.json + model.safetensors +
    memory.safetensors) after every validation; logs to RUN/logs/version_N/metrics.csv (a new version per start or resume; and TensorBoard).
    """
    from irisseg.training.incontext import IncontextTrainConfig, train_incontext

    cfg = IncontextTrainConfig.from_yaml(config) if config else IncontextTrainConfig()
    if max_steps is not None:
        cfg.max_steps = max_steps
    for d in data or []:
        if not d.exists():
            raise InputError(f"{d}: no such dataset folder")
    run = train_incontext(cfg, out, data=[str(d) for d in data or []], synthetic=synthetic or not data,
                          resume=resume, device=device)
    console.print(f"run folder: {run} (models in {run / 'best'} and {run / 'last'})")


# ---------------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------------
@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the example, predictions, overlays, summary.json.")] = Path("demo_out"),
    model: Annotated[str, typer.Option("--model", help="starter, or a model/run folder.")] = "starter",
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | auto")] = "cpu",
    tune_steps: Annotated[int, typer.Option("--tune-steps", min=1, help="Steps of in-context tuning.")] = 10,
) -> None:
    """Segment the built-in example by example, with the four strategies, and print how well each did.

    The example is a synthetic task from shape families held out of the model's training: three support
    volumes with masks and one query (anisotropic, oblique geometry). Runs one-shot, ensemble (3 supports),
    tune, memory (a class stored from the ensemble) and ensemble+tta (mirror test-time augmentation).
    Writes OUT/query.nii.gz, reference.nii.gz, support_*.nii.gz, pred_<strategy>.nii.gz (in the query's
    geometry; ensemble+tta as pred_ensemble_tta.nii.gz), overlays.png
    and summary.json (per strategy: Dice, HD95 in mm, seconds).
    """
    from irisseg.demo import run_demo

    with console.status("running the in-context demo ..."):
        summary = run_demo(out, model_name=model, device=device, tune_steps=tune_steps)
    table = Table(title=f"irisseg demo: held-out structure family '{summary['family']}'", title_justify="left")
    for col in ("strategy", "supports", "Dice", "HD95 mm", "seconds"):
        table.add_column(col, justify="right" if col != "strategy" else "left")
    for name, r in summary["strategies"].items():
        table.add_row(name, str(r["supports"]) if r["supports"] else "stored class", _fmt(r["dice"], 3),
                      _fmt(r["hd95_mm"], 2), f"{r['seconds']:.2f}")
    console.print(table)
    console.print(f"wrote {out}/ (NIfTI files, overlays.png, summary.json)")


# ---------------------------------------------------------------------------------------------------
# segment (in-context) and the class memory bank
# ---------------------------------------------------------------------------------------------------
def _volume_stem(path: Path) -> str:
    """A file's name without its volume ending (``case_0000.nii.gz`` -> ``case_0000``); a folder's name."""
    from irisseg.io import volume_suffix

    suffix = volume_suffix(path)
    if suffix:
        return path.name[: len(path.name) - len(suffix)]
    return path.name if path.is_dir() else path.stem


def _read_supports(supports: list[Path] | None, masks: list[Path] | None):
    """Read support images and masks (paired in order); check counts, files and mask geometry.

    Returns ``(images, masks, names)``: Volumes and ``(image path, mask path)`` pairs for messages. Empty or
    non-binary masks are left to :meth:`InContextSegmenter.set_support`, which knows the labels asked for.
    """
    from irisseg.io import read_mask, read_volume

    supports, masks = list(supports or []), list(masks or [])
    if len(supports) != len(masks):
        raise InputError(
            f"{len(supports)} --support image(s) but {len(masks)} --support-mask file(s): "
            "give one mask per support image, in the same order"
        )
    images, maps, names = [], [], []
    for image_path, mask_path in zip(supports, masks, strict=True):
        image = read_volume(image_path)
        maps.append(read_mask(mask_path, reference=image, reference_name=image_path, allow_empty=True))
        images.append(image)
        names.append((str(image_path), str(mask_path)))
    return images, maps, names


def _label_values(labels: list[str] | None) -> list[int] | None:
    """``--label`` values without ``--bank``: integers (label ids of the support masks)."""
    if not labels:
        return None
    values = []
    for text in labels:
        try:
            values.append(int(text))
        except ValueError:
            raise InputError(f"--label {text!r}: give the label's integer value in the support masks (a finding "
                             f"name such as {text!r} goes with --bank INDEX)") from None
    return values


def _open_bank(bank: Path):
    """``(index, embedding network)`` of ``--bank`` (the network named in the index, weights checked)."""
    from irisseg.retrieval import CaseIndex, query_model

    index = CaseIndex.load(bank)
    return index, query_model(index, None)


def _retrieved_supports(seg, retrieval, volume, query_path: Path, label: str, shots: int) -> None:
    """Choose the query's supports in the bank (:func:`irisseg.retrieval.select_supports`), encode them."""
    from irisseg.io import read_mask, read_volume
    from irisseg.retrieval import select_supports

    index, net = retrieval
    hits, value = select_supports(index, net, volume, label, shots, query_paths=[query_path], device=seg.device)
    images, masks, names = [], [], []
    for hit in hits:
        image = read_volume(hit.paths[0])
        masks.append(read_mask(hit.mask, reference=image, reference_name=hit.paths[0], allow_empty=True))
        images.append(image)
        names.append((hit.paths[0], hit.mask))
    seg.set_support(images, masks, labels=[value], names=names)
    console.print(f"{query_path.name}: {label} (label {value}) from "
                  + ", ".join(f"{h.case_id} ({h.score:.3f})" for h in hits)
                  + f"; encoding {seg.timings['support']:.2f} s")


#: File endings that name a file irisseg cannot write a volume to; ``--out`` with one of them is refused
#: rather than made into a folder of that name.
#: --precision of the lesion commands that predict (irisseg.models.blocks.inference_autocast).
_PRECISION_HELP = ("auto | fp32 | bf16: auto predicts under bf16 autocast on CUDA and on CPUs with native bf16 (AMX; "
                   "about 2x faster, Dice unchanged on synthetic lesions), float32 elsewhere.")
_OTHER_FILE_ENDINGS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".csv", ".json", ".txt", ".yaml",
                       ".yml", ".npy", ".npz", ".pt", ".pth", ".pkl", ".h5", ".hdf5", ".safetensors", ".dcm", ".gz",
                       ".zip")


def _is_volume_out(out: Path) -> bool:
    """Whether ``--out`` names one volume file (True) or a folder (False).

    Raises:
      InputError: ``out`` ends like another kind of file (``x.png``, ``x.csv``, ...) and is not an existing
        folder: neither a volume nor a folder name.
    """
    from irisseg.io import SUFFIXES, volume_suffix

    if volume_suffix(out):
        return True
    if out.suffix.lower() in _OTHER_FILE_ENDINGS and not out.is_dir():
        raise InputError(f"--out {out}: not a volume file name (give one ending in {', '.join(SUFFIXES)}) "
                         "or a folder")
    return False


def _segment_targets(queries: list[Path], out: Path) -> list[Path]:
    """Output path of each query: OUT itself (one query, OUT with a volume ending) or OUT/<stem>_seg.nii.gz."""
    if _is_volume_out(out):
        if len(queries) > 1:
            raise InputError(
                f"--out {out}: with {len(queries)} queries --out must be a folder (each output is named <query>_seg.nii.gz)"
            )
        if out.is_dir():
            raise InputError(f"--out {out}: is a folder; give a file name or a folder without a volume ending")
        targets = [out]
    else:
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out}: exists and is not a folder")
        targets = [out / f"{_volume_stem(q)}_seg.nii.gz" for q in queries]
        seen: dict[Path, Path] = {}
        for q, t in zip(queries, targets, strict=True):
            if t in seen:
                raise InputError(f"queries {seen[t]} and {q} would both be written to {t}: put them in separate runs")
            seen[t] = q
    return targets


def _probability_paths(target: Path, labels: list[int]) -> list[Path]:
    """``seg.nii.gz`` -> ``seg_prob.nii.gz`` (one class) or ``seg_prob_<label>.nii.gz`` per class."""
    from irisseg.io import volume_suffix

    suffix = volume_suffix(target)
    base = target.name[: len(target.name) - len(suffix)]
    if len(labels) == 1:
        return [target.with_name(f"{base}_prob{suffix}")]
    return [target.with_name(f"{base}_prob_{label}{suffix}") for label in labels]


def _commit_staged(files: list[tuple[Path, Path]]) -> None:
    """Move staged outputs (each alone in its staging subfolder) to their final paths; data files of a
    header + data pair (e.g. .mhd + .raw) go before their header."""
    import os

    for staged, final in files:
        final.parent.mkdir(parents=True, exist_ok=True)
        for written in sorted(staged.parent.iterdir(), key=lambda p: p.name == staged.name):
            os.replace(written, final.parent / written.name)


def _staging_dir(dest: Path) -> Path:
    """A temporary folder on the same file system as ``dest`` (in its nearest existing ancestor)."""
    import tempfile

    anchor = dest.absolute()
    while not anchor.exists():
        anchor = anchor.parent
    return Path(tempfile.mkdtemp(prefix=".irisseg-segment-", dir=anchor))


@app.command()
def segment(
    query: Annotated[list[Path], typer.Option("--query", help="Image to segment (repeatable).")],
    out: Annotated[Path, typer.Option("--out", help="Output file (one query) or folder (<query>_seg.nii.gz per query).")],
    support: Annotated[list[Path] | None, typer.Option("--support", help="Support image (repeatable), paired in order with --support-mask.")] = None,
    support_mask: Annotated[list[Path] | None, typer.Option("--support-mask", help="Mask of the support image (repeatable), same geometry as it.")] = None,
    model: Annotated[str, typer.Option("--model", help="'starter' (packaged weights) or a trained model / run folder.")] = "starter",
    strategy: Annotated[str, typer.Option("--strategy", help="one-shot | ensemble | tune | memory")] = "ensemble",
    class_names: Annotated[list[str] | None, typer.Option("--class", help="Stored class to segment, --strategy memory only (repeatable).")] = None,
    label: Annotated[list[str] | None, typer.Option("--label", help="Label value of the support masks to segment (repeatable: one output label each); with --bank, the finding name to segment (once).")] = None,
    bank: Annotated[Path | None, typer.Option("--bank", help="Case index of a labelled collection ('irisseg retrieval index'): the supports are, per query, its --shots cases most similar to the query that carry --label NAME.")] = None,
    shots: Annotated[int, typer.Option("--shots", min=1, help="Supports retrieved from --bank per query.")] = 1,
    tune_steps: Annotated[int, typer.Option("--tune-steps", min=0, help="Adam steps of --strategy tune.")] = 10,
    threshold: Annotated[float, typer.Option("--threshold", help="Foreground probability threshold, in (0, 1).")] = 0.5,
    tta: Annotated[bool, typer.Option("--tta", help="Mirror test-time augmentation: supports and query mirrored together along the 8 axis combinations, probabilities averaged (about 8x slower; not with --strategy memory).")] = False,
    probabilities: Annotated[bool, typer.Option("--probabilities", help="Also write float32 probability maps (<out>_prob[_<label>]).")] = False,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | auto (bf16 autocast on cuda).")] = "cpu",
) -> None:
    """Segment queries by example: from labelled supports, from retrieved supports, or from a stored class.

    Supports and queries may have any shape, spacing, origin and direction; each output is a label map in
    its query's exact geometry (uint8: 0 background, 1 for a binary support mask, or the --label values).
    A multi-label support mask needs --label. --strategy memory takes --class instead of supports.
    --bank INDEX --label NAME --shots K takes no supports: for each query the K cases of the index most
    similar to it (cosine of the retrieval embeddings) that carry finding NAME are its supports (their
    images and label maps, mask = NAME's id, which labels the output); a query that is itself in the index
    never supports itself. Outputs are written only once every query has been segmented; bad input writes
    nothing.
    """
    import shutil
    import time

    from irisseg.incontext import STRATEGIES, InContextSegmenter, load_model
    from irisseg.io import read_volume, write_volume

    if strategy not in STRATEGIES:
        raise InputError(f"--strategy: unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    if bank is not None:
        if support or support_mask or class_names or strategy == "memory":
            raise InputError("--bank retrieves the supports: give no --support/--support-mask/--class and no "
                             "--strategy memory")
        if not label or len(label) != 1:
            raise InputError("--bank needs one --label NAME: the finding to segment (a finding name of the index)")
    else:
        label = _label_values(label)
    if strategy == "memory":
        if tta:
            raise InputError("--tta mirrors the supports with the query: --strategy memory has no support to mirror")
        if not class_names:
            raise InputError("--strategy memory needs --class NAME (a class stored with 'irisseg memory add')")
        if support or support_mask:
            raise InputError("--strategy memory takes no --support/--support-mask (the classes come from the model's memory)")
        if label and len(label) != len(class_names):
            raise InputError(f"{len(label)} --label value(s) for {len(class_names)} --class name(s): give one label per class")
    elif bank is None:
        if class_names:
            raise InputError("--class is only used with --strategy memory (store a class with 'irisseg memory add')")
        if not support and not support_mask:
            raise InputError("give --support IMAGE --support-mask MASK (repeatable), --bank INDEX --label NAME, "
                             "or --strategy memory --class NAME")
    targets = _segment_targets(query, out)
    inputs = {Path(p).absolute() for p in [*query, *(support or []), *(support_mask or [])]}
    for q in query:
        if not q.exists():
            raise InputError(f"{q}: no such file or folder")
    for t in targets:
        if t.absolute() in inputs:
            raise InputError(f"--out {t}: would overwrite an input file")
    retrieval = _open_bank(bank) if bank is not None else None
    images, masks, names = _read_supports(support, support_mask)

    net = load_model(model, device=device)
    seg = InContextSegmenter(net, device=device, strategy=strategy, tune_steps=tune_steps, threshold=threshold,
                              tta=tta)
    if strategy == "memory":
        seg.set_memory(class_names, labels=label)
    elif retrieval is None:
        seg.set_support(images, masks, labels=label, names=names)
    if retrieval is None:
        console.print(
            f"task: {strategy}, {len(images) if images else 'no'} support(s), classes "
            f"{', '.join(seg.class_names or [str(v) for v in seg.labels])}; encoding {seg.timings['support']:.2f} s"
            + (f", tuning {seg.timings['tune']:.2f} s" if strategy == "tune" else "")
        )

    staging = _staging_dir(targets[0].parent)
    rows, files = [], []  # files: (staged path, final path)
    try:
        for q, target in zip(query, targets, strict=True):
            t0 = time.perf_counter()
            volume = read_volume(q)
            if retrieval is not None:
                _retrieved_supports(seg, retrieval, volume, q, label[0], shots)
            probs = seg.predict_probabilities(volume, name=str(q))
            labels_vol = seg.labels_from_probabilities(probs)
            staged = write_volume(labels_vol, staging / f"{len(files)}" / target.name)
            files.append((staged, target))
            if probabilities:
                for p, path in zip(probs, _probability_paths(target, seg.labels), strict=True):
                    files.append((write_volume(p, staging / f"{len(files)}" / path.name), path))
            ml = {v: float((labels_vol.array == v).sum()) * volume.voxel_volume_ml for v in seg.labels}
            rows.append((q.name, str(target), time.perf_counter() - t0, ml))
        _commit_staged(files)  # every query succeeded: move the outputs into place
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    table = Table(title=f"irisseg segment ({strategy})", title_justify="left")
    for column, justify in (("query", "left"), ("output", "left"), ("seconds", "right"), ("foreground ml", "right")):
        table.add_column(column, justify=justify, overflow="fold")
    for q, target, seconds, ml in rows:
        fg = f"{next(iter(ml.values())):.3f}" if len(ml) == 1 else ", ".join(f"{k}: {v:.3f}" for k, v in ml.items())
        table.add_row(q, target, f"{seconds:.2f}", fg)
    console.print(table)


def _command_group(name: str, help: str) -> typer.Typer:
    """A ``irisseg <name> ...`` group of sub-commands, registered on the main app."""
    group = typer.Typer(name=name, help=help, no_args_is_help=True, add_completion=False,
                        pretty_exceptions_enable=False)
    app.add_typer(group, name=name)
    return group


memory_app = _command_group(
    "memory", "The class memory bank of a model folder: named task embeddings for --strategy memory.")


def _memory_folder(model: str, modify: bool) -> Path:
    """The model folder whose ``memory.safetensors`` to use; the packaged starter folder is read-only."""
    from irisseg.incontext import is_starter_dir, resolve_model_dir
    from irisseg.models.iris import check_iris_config

    folder = resolve_model_dir(model)
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: not a model folder (config.json is missing)")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, TypeError, ValueError):
        raise InputError(f"{folder / 'config.json'}: unreadable model config") from None
    check_iris_config(config if isinstance(config, dict) else {}, folder)  # only in-context models have a memory
    if modify and is_starter_dir(folder):
        raise InputError(
            f"{folder}: the packaged starter weights are read-only; copy the folder first "
            "(e.g. cp -r <starter> my_model) and pass the copy with --model"
        )
    return folder


def _load_bank(folder: Path):
    """The folder's memory bank (an empty one, with the model's momentum, when there is no file yet)."""
    from irisseg.models.iris import IrisConfig
    from irisseg.models.memory import ClassMemoryBank

    path = folder / "memory.safetensors"
    if not path.is_file():
        try:
            momentum = IrisConfig.from_dict(json.loads((folder / "config.json").read_text())).memory_momentum
        except (json.JSONDecodeError, TypeError, ValueError):
            raise InputError(f"{folder / 'config.json'}: unreadable model config") from None
        return ClassMemoryBank(momentum)
    try:
        return ClassMemoryBank.load(path)
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise InputError(f"{path}: cannot read the memory bank ({' '.join(str(exc).split())[:200]})") from None


@memory_app.command("add")
def memory_add(
    model: Annotated[str, typer.Option("--model", help="Trained model (or run) folder; its memory.safetensors is updated.")],
    name: Annotated[str, typer.Option("--name", help="Class name, e.g. liver.")],
    support: Annotated[list[Path] | None, typer.Option("--support", help="Support image (repeatable).")] = None,
    support_mask: Annotated[list[Path] | None, typer.Option("--support-mask", help="Its mask, same geometry (repeatable).")] = None,
    label: Annotated[int | None, typer.Option("--label", help="Label of the support masks to store (needed for multi-label masks).")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | auto.")] = "cpu",
) -> None:
    """Encode the supports (ensemble over them) and store the task embedding under NAME.

    A new class stores the embedding as is; an existing one is updated as an exponential moving average
    (momentum from the bank, 0.999 by default). Writes MODEL/memory.safetensors atomically; the packaged
    starter weights are never modified (copy the folder first).
    """
    from irisseg.incontext import InContextSegmenter, load_model

    name = name.strip()
    if not name:
        raise InputError("--name: give a non-empty class name")
    folder = _memory_folder(model, modify=True)
    if not support and not support_mask:
        raise InputError("memory add needs --support IMAGE --support-mask MASK (repeatable)")
    images, masks, names = _read_supports(support, support_mask)
    net = load_model(folder, device=device)
    net.memory = _load_bank(folder)
    seg = InContextSegmenter(net, device=device, strategy="ensemble")
    task = seg.set_support(images, masks, labels=None if label is None else [label], names=names)
    net.memory.update(name, task)
    net.memory.save(folder / "memory.safetensors")
    console.print(f"stored class {name!r} in {folder / 'memory.safetensors'} (update {net.memory.counts[name]}, "
                  f"{len(images)} support(s))")


@memory_app.command("list")
def memory_list(
    model: Annotated[str, typer.Option("--model", help="Model folder, run folder or 'starter'.")] = "starter",
) -> None:
    """The classes stored in a model's memory bank and how many updates each has had."""
    folder = _memory_folder(model, modify=False)
    bank = _load_bank(folder)
    table = Table(title=f"memory of {folder}", title_justify="left")
    table.add_column("class")
    table.add_column("updates", justify="right")
    for name in bank.names():
        table.add_row(name, str(bank.counts[name]))
    if not len(bank):
        table.add_row("-", "no class stored")
    console.print(table)


@memory_app.command("remove")
def memory_remove(
    model: Annotated[str, typer.Option("--model", help="Model folder or run folder.")],
    name: Annotated[str, typer.Option("--name", help="Class to remove.")],
) -> None:
    """Remove a class from a model's memory bank (MODEL/memory.safetensors is rewritten atomically)."""
    folder = _memory_folder(model, modify=True)
    bank = _load_bank(folder)
    bank.remove(name)
    bank.save(folder / "memory.safetensors")
    console.print(f"removed class {name!r} from {folder / 'memory.safetensors'}")


# ---------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------
@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    """irisseg: segment 3D medical images by example; find similar cases."""
    if version:
        from irisseg import __version__

        console.print(f"irisseg {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        console.print(ctx.get_help())


# ---------------------------------------------------------------------------------------------------
# lesion: supervised lesion segmentation
# ---------------------------------------------------------------------------------------------------
lesion_app = _command_group(
    "lesion", "Supervised lesion segmentation: residual 3D U-Net, lesion-aware patches, whole-volume prediction.")


def _check_dataset_dir(data: Path) -> None:
    if not data.exists():
        raise InputError(f"{data}: no such dataset folder")
    if not data.is_dir():
        raise InputError(f"{data}: not a folder (expected an nnU-Net-style dataset: dataset.json, imagesTr, labelsTr)")


@lesion_app.command("train")
def lesion_train(
    data: Annotated[Path, typer.Option("--data", help="nnU-Net-style dataset folder (imagesTr/<case>_0000.nii.gz ..., labelsTr/).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: best/, last/, metrics.csv, splits.json, logs/, checkpoints/.")],
    config: Annotated[Path | None, typer.Option("--config", help="YAML settings (see LesionTrainConfig).")] = None,
    loss: Annotated[str | None, typer.Option("--loss", help="dice_bce | tversky | focal_dice (overrides the config).")] = None,
    patch: Annotated[int | None, typer.Option("--patch", min=8, help="Patch side in voxels (default 48).")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Most epochs (early stopping may end sooner).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoints/last.ckpt.")] = False,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | auto (bf16 autocast on cuda).")] = "auto",
) -> None:
    """Train a residual 3D U-Net for lesion segmentation on lesion-aware patches.

    Images may have several channels (_0000, _0001, ...); lesion = every non-zero label. Volumes stay on
    their own voxel grid. Each epoch: steps_per_epoch patch batches, then whole-volume sliding-window
    validation (Dice, IoU, lesion recall / precision / F1, HD95 in mm) written to OUT/metrics.csv and
    TensorBoard; early stopping on validation Dice; OUT/best and OUT/last are model folders.
    """
    from irisseg.training.lesion import LesionTrainConfig, train_lesion

    _check_dataset_dir(data)
    cfg = LesionTrainConfig.with_overrides(config, loss=loss, patch=patch, epochs=epochs)
    run = train_lesion(cfg, data, out, resume=resume, device=device)
    _print_lesion_history(run)


def _print_lesion_history(run: Path) -> None:
    from irisseg.training.lesion import read_metrics_csv

    rows = read_metrics_csv(run / "metrics.csv")
    if rows:
        best = max(rows, key=lambda r: r.get("val_dice", -1.0))
        console.print(f"best epoch {best['epoch']}: val Dice {best['val_dice']:.3f}, IoU {best['val_iou']:.3f}, "
                      f"lesion recall {best['val_lesion_recall']:.3f}, precision {best['val_lesion_precision']:.3f}")
    console.print(f"run folder: {run} (models in {run / 'best'} and {run / 'last'}, metrics in {run / 'metrics.csv'})")


def _case_targets(input: Path, n_channels: int, out: Path) -> tuple[list[tuple[str, list[Path]]], list[Path]]:
    """The cases of ``--input`` (a channel file or a folder, nnU-Net naming) and the output file of each.

    ``out`` is a file name (``.nii.gz``, ...) for one case, else a folder receiving ``<case>.nii.gz``.

    Raises:
      InputError: several cases for one output file, ``out`` is a file where a folder is needed, or an
        output would overwrite an input.
    """
    from irisseg.data.datasets import image_cases

    cases = image_cases(input, n_channels)
    if _is_volume_out(out):
        if len(cases) > 1:
            raise InputError(f"--out {out}: {len(cases)} cases need an output folder, not a file name")
        targets = [out]
    else:
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out}: exists and is not a folder")
        targets = [out / f"{case_id}.nii.gz" for case_id, _ in cases]
    inputs = {p.absolute() for _, paths in cases for p in paths}
    for t in targets:
        if t.absolute() in inputs:
            raise InputError(f"--out {t}: would overwrite an input file")
    return cases, targets


@lesion_app.command("predict")
def lesion_predict(
    model: Annotated[Path, typer.Option("--model", help="Lesion run folder (uses best/) or model folder.")],
    input: Annotated[Path, typer.Option("--input", help="Image file, or folder of images (<case>_0000.nii.gz ...).")],
    out: Annotated[Path, typer.Option("--out", help="Output file (one case) or folder (<case>.nii.gz per case).")],
    probabilities: Annotated[bool, typer.Option("--probabilities", help="Also write float32 probability maps (<case>_prob).")] = False,
    threshold: Annotated[float | None, typer.Option("--threshold", help="Probability threshold (default: the model's, 0.5).")] = None,
    tta: Annotated[bool, typer.Option("--tta", help="Mirror test-time augmentation (8 flipped passes averaged, 8x slower).")] = False,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | auto.")] = "cpu",
    precision: Annotated[str, typer.Option("--precision", help=_PRECISION_HELP)] = "auto",
) -> None:
    """Segment lesions in whole volumes by sliding-window inference.

    Multi-channel cases are found by nnU-Net naming (<case>_0000, <case>_0001, ... in the same folder).
    Each output is a uint8 mask (1 = lesion) in exactly its input's geometry (shape, spacing, origin,
    direction). Outputs are written only once every case has been predicted; bad input writes nothing.
    """
    import shutil

    from irisseg.io import read_volume, volume_suffix, write_volume
    from irisseg.lesion import LesionPredictor

    predictor = LesionPredictor(model, device=device, threshold=threshold, tta=tta, precision=precision)
    cases, targets = _case_targets(input, predictor.in_channels, out)
    staging = _staging_dir(targets[0].parent)
    files, rows = [], []
    try:
        for (case_id, paths), target in zip(cases, targets, strict=True):
            channels = [read_volume(p) for p in paths]
            prob = predictor.predict_probabilities(channels, names=[str(p) for p in paths])
            mask = predictor.to_mask(prob)
            files.append((write_volume(mask, staging / str(len(files)) / target.name), target))
            if probabilities:
                suffix = volume_suffix(target)
                prob_name = f"{target.name[: len(target.name) - len(suffix)]}_prob{suffix}"
                files.append((write_volume(prob, staging / str(len(files)) / prob_name), target.with_name(prob_name)))
            rows.append((case_id, str(target), predictor.seconds, float(mask.array.sum()) * mask.voxel_volume_ml))
        _commit_staged(files)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    table = Table(title="irisseg lesion predict", title_justify="left")
    for column, justify in (("case", "left"), ("output", "left"), ("seconds", "right"), ("lesion ml", "right")):
        table.add_column(column, justify=justify, overflow="fold")
    for case_id, target, seconds, ml in rows:
        table.add_row(case_id, target, f"{seconds:.2f}", f"{ml:.3f}")
    console.print(table)


@lesion_app.command("evaluate")
def lesion_evaluate(
    model: Annotated[Path, typer.Option("--model", help="Lesion run folder (uses best/) or model folder.")],
    data: Annotated[Path, typer.Option("--data", help="Dataset folder: every labelled case (labelsTr, labelsTs) is scored.")],
    out: Annotated[Path, typer.Option("--out", help="CSV report: one row per case, then mean and median rows.")],
    split: Annotated[str, typer.Option("--split", help="all | train | val: with val or train, only that part of the run's splits.json.")] = "all",
    tta: Annotated[bool, typer.Option("--tta", help="Mirror test-time augmentation (8 flipped passes averaged).")] = False,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | auto.")] = "cpu",
    precision: Annotated[str, typer.Option("--precision", help=_PRECISION_HELP)] = "auto",
) -> None:
    """Predict every labelled case of a dataset and write Dice, IoU, lesion recall / precision / F1 and HD95 (mm).

    HD95 is inf for a case with lesions and an empty prediction; the mean and median rows use finite values.
    ``--split val`` scores only the validation cases of the run given as --model (its splits.json).
    """
    import json

    from irisseg.io import check_output_file, write_csv
    from irisseg.lesion import LesionPredictor, evaluate_dataset, summary_rows

    _check_dataset_dir(data)
    check_output_file(out)
    case_ids = None
    if split != "all":
        splits_path = model / "splits.json"
        if split not in ("train", "val"):
            raise InputError(f"--split: choose all, train or val, not {split!r}")
        if not splits_path.is_file():
            raise InputError(f"--split {split}: {splits_path} not found (give a run folder as --model)")
        case_ids = json.loads(splits_path.read_text())[split]
    predictor = LesionPredictor(model, device=device, tta=tta, precision=precision)
    rows = evaluate_dataset(predictor, data, case_ids)
    summary = summary_rows(rows)
    write_csv(out, [*rows, *summary], float_digits=6)
    table = Table(title=f"irisseg lesion evaluate: {len(rows)} case(s)", title_justify="left")
    keys = ("dice", "iou", "lesion_recall", "lesion_precision", "lesion_f1", "hd95")
    for column in ("case", *keys):
        table.add_column(column, justify="left" if column == "case" else "right")
    for r in [*rows, *summary] if len(rows) <= 20 else summary:
        table.add_row(r["case"], *(_fmt(r[k], 3) for k in keys))
    console.print(table)
    console.print(f"wrote {out}")


@lesion_app.command("ablate")
def lesion_ablate(
    data: Annotated[Path, typer.Option("--data", help="nnU-Net-style dataset folder.")],
    out: Annotated[Path, typer.Option("--out", help="Folder: one run per loss, ablation_summary.csv, curves, bar charts, overlays.")],
    losses: Annotated[str, typer.Option("--losses", help="Comma-separated losses to compare.")] = "dice_bce,tversky,focal_dice",
    config: Annotated[Path | None, typer.Option("--config", help="YAML settings shared by every run.")] = None,
    patch: Annotated[int | None, typer.Option("--patch", min=8, help="Patch side in voxels.")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Most epochs per run.")] = None,
    tta: Annotated[bool, typer.Option("--tta", help="Also score each best model on the validation cases with mirror test-time augmentation (8 passes per case).")] = False,
    test: Annotated[Path | None, typer.Option("--test", help="Held-out labelled dataset folder (cases never trained or validated on): each best model is also scored on all of its labelled cases.")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | auto.")] = "auto",
) -> None:
    """Train one run per loss on the same split and seed, then compare them in one table and plots.

    Writes OUT/<loss>/ (run folders; finished runs are not retrained, interrupted ones resume),
    OUT/ablation_summary.csv (best epoch of each: Dice, IoU, lesion recall / precision / F1, HD95),
    dice_curve.png, loss_curve.png, ablation_val_dice.png, ablation_val_recall.png and
    overlay_<case>.png (image / reference / each loss's prediction) for a few validation cases.
    With --tta each best model is also scored on the validation cases with mirroring (as nnU-Net
    validates): OUT/<loss>/val_tta.csv per case, tta_val_* columns in the summary and the table.
    With --test DIR each best model is also scored on every labelled case of DIR (imagesTr/labelsTr and
    imagesTs/labelsTs), e.g. another `irisseg synth` seed: OUT/<loss>/test_report.csv per case, test_*
    columns in the summary, a "<loss> test" row and bars. The validation numbers pick the best epoch
    and come from a few dozen cases; a held-out set of a hundred or more measures the model.
    """
    from irisseg.training.lesion import LesionTrainConfig, ablate_losses

    _check_dataset_dir(data)
    if test is not None:
        _check_dataset_dir(test)
    names = _split_names([losses]) or []
    cfg = LesionTrainConfig.with_overrides(config, patch=patch, epochs=epochs)
    rows = ablate_losses(cfg, data, names, out, device=device, tta=tta, test_data=test)
    table = Table(title="irisseg lesion ablate: validation at each loss's best epoch (lesion-wise recall, "
                        "precision, F1; HD95 mm)", title_justify="left")
    keys = ("val_dice", "val_iou", "val_lesion_recall", "val_lesion_precision", "val_lesion_f1", "val_hd95")
    for column in ("loss", "epoch", "min", "Dice", "IoU", "recall", "precision", "F1", "HD95"):
        table.add_column(column, justify="left" if column == "loss" else "right")
    for r in rows:
        table.add_row(r["loss"], str(r["best_epoch"]), f"{r['minutes']:.1f}", *(_fmt(r[k], 3) for k in keys))
        if tta:
            table.add_row(f"{r['loss']} + TTA", "", "", *(_fmt(r[f"tta_{k}"], 3) for k in keys))
        if test is not None:
            table.add_row(f"{r['loss']} test", "", "", *(_fmt(r[k.replace("val_", "test_", 1)], 3) for k in keys))
    Console(width=max(console.width, 110)).print(table)  # nine columns stay legible on an 80-column terminal
    console.print(f"wrote {out}/ablation_summary.csv and plots")


# ---------------------------------------------------------------------------------------------------
# territories: dual-channel territory segmentation and its 14-configuration experiment matrix
# ---------------------------------------------------------------------------------------------------
territories_app = _command_group(
    "territories", "Dual-channel territory segmentation (two sigmoid channels): 14 architecture x loss "
                   "configurations, training, the ranked experiment matrix, prediction.")


def _parse_folds(folds: str) -> list[int]:
    """``"0,1, 2"`` -> ``[0, 1, 2]``; InputError for anything that is not a list of non-negative integers."""
    parts = [p.strip() for p in folds.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise InputError(f"--folds: expected comma-separated fold numbers such as 0 or 0,1,2, got {folds!r}")
    return list(dict.fromkeys(int(p) for p in parts))


@territories_app.command("list")
def territories_list() -> None:
    """List the 14 configurations of the territory experiment matrix: name, architecture, losses.

    Every configuration trains the same U-Net backbone with a base loss (per-channel BCE + Dice); the
    add-on losses are weighted 0.1 (the adaptive spatial weight grows 0.05 -> 0.15 over training).
    """
    from irisseg.territories import EXPERIMENTS

    table = Table(title="irisseg territories: the 14 configurations", title_justify="left")
    table.add_column("name", no_wrap=True, min_width=max(map(len, EXPERIMENTS)))  # names stay whole, copyable
    table.add_column("architecture", no_wrap=True)
    table.add_column("losses", overflow="fold")
    for name, exp in EXPERIMENTS.items():
        table.add_row(name, exp.architecture, exp.description.split("; ", 1)[1])
    Console(width=max(console.width, 125)).print(table)  # wide enough for the longest name


@territories_app.command("train")
def territories_train(
    config: Annotated[str, typer.Option("--config", help="Configuration NAME (see 'irisseg territories list'), e.g. SharedDecoder_SpatialLoss.")],
    data: Annotated[Path, typer.Option("--data", help="nnU-Net-style dataset: imagesTr/<case>_0000 ... _0003.nii.gz, labelsTr/<case>.nii.gz, dataset.json.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: best/, last/, metrics.csv, validation.csv, splits.json, done.json, logs/, checkpoints/.")],
    fold: Annotated[int, typer.Option("--fold", min=0, help="Fold to train (0 .. n_folds-1 of a k-fold split over case ids).")] = 0,
    settings: Annotated[Path | None, typer.Option("--settings", help="YAML training settings (see TerritoryTrainConfig; e.g. configs/territories_matrix_cpu.yaml).")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Most epochs (overrides the settings; early stopping may end sooner).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoints/last.ckpt.")] = False,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | auto (bf16 autocast on cuda).")] = "auto",
) -> None:
    """Train one territory configuration on one fold and validate it on that fold's cases.

    Images: C channels per case (_0000, _0001, ... e.g. 4 perfusion maps), 3D volumes (D, H, W) of any
    size and spacing, each channel normalised on its own (clip 0.5-99.5 pct, z-score over the body).
    Labels: a label map in the image's geometry with labels 1 and 2 (3 = both, if present), two other
    label ids (smaller = territory 1), or two regions in dataset.json. The model predicts two sigmoid
    channels; spatial_dims 2 (default) trains on slices along array axis 0, 3 on cubic patches. Each
    epoch ends with whole-volume validation: Dice of each channel at probability 0.5.
    """
    from irisseg.territories import get_experiment
    from irisseg.training.territories import TerritoryTrainConfig, train_territories

    get_experiment(config)
    _check_dataset_dir(data)
    cfg = TerritoryTrainConfig.with_overrides(settings, epochs=epochs)
    run = train_territories(config, cfg, data, fold, out, resume=resume, device=device)
    done = json.loads((run / "done.json").read_text()) if (run / "done.json").is_file() else None
    if done:
        console.print(f"{done['config']} fold {done['fold']}: best epoch {done['best_epoch']}, mean Dice "
                      f"{done['val_mean_dice']:.4f} (territory 1 {done['val_dice_1']:.4f}, territory 2 "
                      f"{done['val_dice_2']:.4f}), {done['minutes']:.1f} min")
    console.print(f"run folder: {run} (model in {run / 'best'}, per-case Dice in {run / 'validation.csv'})")


@territories_app.command("matrix")
def territories_matrix(
    data: Annotated[Path, typer.Option("--data", help="nnU-Net-style dataset with multi-channel images and two territory labels.")],
    out: Annotated[Path, typer.Option("--out", help="Matrix folder: <config>/fold_<f>/ runs, ranking.csv, ranking.md, ranking.png, validation_cases.csv.")],
    folds: Annotated[str, typer.Option("--folds", help="Comma-separated folds, e.g. 0 or 0,1,2,3,4.")] = "0",
    configs: Annotated[str | None, typer.Option("--configs", help="Comma-separated configuration names (default: all 14).")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Most epochs per run (overrides the settings).")] = None,
    settings: Annotated[Path | None, typer.Option("--settings", help="YAML settings shared by every run (see TerritoryTrainConfig).")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | auto.")] = "auto",
) -> None:
    """Train and evaluate every configuration on every fold, then rank them in one report.

    Inputs as for 'irisseg territories train'. Finished runs (OUT/<config>/fold_<f>/done.json) are skipped,
    interrupted ones resume. The ranking is computed from the per-case validation Dice of each run's best
    model: OUT/ranking.csv and ranking.md (mean Dice, Dice per territory, asymmetry |dice_1 - dice_2|,
    rank; per fold and mean over folds; paired Wilcoxon tests over cases between the top configurations)
    and ranking.png (bar chart).
    """
    import csv

    from irisseg.territories import resolve_experiments
    from irisseg.training.territories import TerritoryTrainConfig, run_matrix

    chosen = resolve_experiments(configs)
    fold_list = _parse_folds(folds)
    _check_dataset_dir(data)
    cfg = TerritoryTrainConfig.with_overrides(settings)
    paths = run_matrix(data, fold_list, chosen, cfg, out, epochs=epochs, device=device)
    with paths["csv"].open(newline="") as f:
        ranking = list(csv.DictReader(f))
    table = Table(title=f"irisseg territories matrix: {len(ranking)} configuration(s), fold(s) "
                        f"{', '.join(map(str, fold_list))}", title_justify="left")
    for column in ("rank", "config", "mean Dice", "Dice 1", "Dice 2", "asymmetry", "cases"):
        table.add_column(column, justify="left" if column == "config" else "right", no_wrap=column == "config")
    for r in ranking:
        table.add_row(r["rank"], r["config"], *(_fmt(float(r[k])) for k in ("mean_dice", "dice_1", "dice_2", "asymmetry")),
                      r["n_cases"])
    Console(width=max(console.width, 125)).print(table)  # wide enough for the longest name
    console.print(f"wrote {paths['csv']}, {paths['markdown']}, {paths['png']}")


@territories_app.command("predict")
def territories_predict(
    model: Annotated[Path, typer.Option("--model", help="Territory run folder (uses best/) or model folder.")],
    input: Annotated[Path, typer.Option("--input", help="Image channel file (<case>_0000.nii.gz; siblings found) or folder of cases.")],
    out: Annotated[Path, typer.Option("--out", help="Output file (one case) or folder (<case>.nii.gz per case).")],
    probabilities: Annotated[bool, typer.Option("--probabilities", help="Also write float32 probability maps <case>_prob_1 / _prob_2.")] = False,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | auto (bf16 autocast on cuda).")] = "cpu",
) -> None:
    """Segment two territories in whole volumes.

    Multi-channel cases are found by nnU-Net naming (<case>_0000, <case>_0001, ... in the same folder;
    as many channels as the model was trained with, same geometry). Each output is a uint8 label map
    (0 background, 1 territory 1, 2 territory 2; where both probabilities exceed 0.5 the larger wins) in
    exactly its input's geometry (shape, spacing, origin, direction). Outputs are written only once every
    case has been predicted; bad input writes nothing.
    """
    import shutil

    from irisseg.io import read_volume, write_volume
    from irisseg.training.territories import TerritoryPredictor

    predictor = TerritoryPredictor(model, device=device)
    cases, targets = _case_targets(input, predictor.in_channels, out)
    staging = _staging_dir(targets[0].parent)
    files, rows = [], []
    try:
        for (case_id, paths), target in zip(cases, targets, strict=True):
            channels = [read_volume(p) for p in paths]
            prob = predictor.predict_probabilities(channels, names=[str(p) for p in paths])
            labels = predictor.to_labels(prob, channels[0])
            files.append((write_volume(labels, staging / str(len(files)) / target.name), target))
            if probabilities:
                for k, path in enumerate(_probability_paths(target, [1, 2])):
                    files.append((write_volume(channels[0].with_array(prob[k]), staging / str(len(files)) / path.name),
                                  path))
            ml = [float((labels.array == v).sum()) * labels.voxel_volume_ml for v in (1, 2)]
            rows.append((case_id, str(target), predictor.seconds, ml))
        _commit_staged(files)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    table = Table(title="irisseg territories predict", title_justify="left")
    for column, justify in (("case", "left"), ("output", "left"), ("seconds", "right"), ("territory 1 ml", "right"),
                            ("territory 2 ml", "right")):
        table.add_column(column, justify=justify, overflow="fold")
    for case_id, target, seconds, ml in rows:
        table.add_row(case_id, target, f"{seconds:.2f}", f"{ml[0]:.3f}", f"{ml[1]:.3f}")
    console.print(table)


# ---------------------------------------------------------------------------------------------------
# retrieval: similar-case retrieval
# ---------------------------------------------------------------------------------------------------
retrieval_app = _command_group(
    "retrieval", "Similar-case retrieval: train an embedding network, index a labelled collection, search it.")

# --- retrieval train ---
@retrieval_app.command("train")
def retrieval_train(
    data: Annotated[Path, typer.Option("--data", help="nnU-Net-style dataset folder (imagesTr/, labelsTr/, dataset.json; findings from findings.csv or the label maps).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: best/, last/, metrics.csv, splits.json, cache/, logs/, checkpoints/.")],
    mode: Annotated[str | None, typer.Option("--mode", help="triplet | microf1 (overrides the config; default microf1).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML settings (see RetrievalTrainConfig).")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Most epochs (early stopping may end sooner).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoints/last.ckpt (same split and cache).")] = False,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | auto (bf16 autocast on cuda).")] = "auto",
) -> None:
    """Train the retrieval embedding network: triplet learning or a micro-F1 classification head.

    Cases are split stratified on their findings into train / train_eval / test (OUT/splits.json) and
    preprocessed once into OUT/cache. After every epoch the train_eval cases are retrieved leave-one-out
    (precision / recall / mAP / NDCG at k) and, with a head, classified (micro / macro F1); the best model
    (micro-F1 then mAP@10, or mAP@10 in triplet mode) is exported to OUT/best, the latest to OUT/last.
    """
    from irisseg.training.retrieval import RetrievalTrainConfig, train_retrieval

    _check_dataset_dir(data)
    cfg = RetrievalTrainConfig.with_overrides(config, mode=mode, epochs=epochs)
    run = train_retrieval(cfg, data, out, resume=resume, device=device)
    _print_retrieval_history(run)


def _print_retrieval_history(run: Path) -> None:
    """The best epoch's scores (by val_select) as a table: one row per cutoff k, F1 and losses below."""
    from irisseg.training.engine import read_metrics_csv
    from irisseg.training.retrieval import KS

    rows = read_metrics_csv(run / "metrics.csv")
    if rows:
        best = max(rows, key=lambda r: r.get("val_select", -1.0))
        n = int(best.get("val_n", 0))
        table = Table(title=f"best epoch {best['epoch']} (train_eval, {n} cases, leave-one-out)")
        for column in ("k", "precision", "recall", "mAP", "NDCG"):
            table.add_column(column, justify="right")
        for k in KS:
            table.add_row(f"{k}" if k <= n - 1 else f"{k} (-> {n - 1})",
                          *(_fmt(best.get(f"val_{m}@{k}", float("nan")), 3) for m in ("precision", "recall", "map", "ndcg")))
        console.print(table)
        f1 = (f"micro-F1 {best['val_micro_f1']:.3f}, macro-F1 {best['val_macro_f1']:.3f}, "
              if "val_micro_f1" in best else "")
        console.print(f"{f1}train loss {_fmt(best.get('train_loss', float('nan')), 4)}, "
                      f"val loss {_fmt(best.get('val_loss', float('nan')), 4)}")
    console.print(f"run folder: {run} (models in {run / 'best'} and {run / 'last'}, metrics in {run / 'metrics.csv'})")


# --- retrieval index / search / evaluate ---
def _retrieval_finite(obj):
    """``obj`` with NaN / inf floats replaced by None (strict JSON)."""
    if isinstance(obj, dict):
        return {k: _retrieval_finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_retrieval_finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    return obj


def _retrieval_print_json(payload: dict) -> None:
    """One JSON document on stdout (nothing else is printed in --json mode)."""
    print(json.dumps(_retrieval_finite(payload), indent=2, default=_json_default))


@retrieval_app.command("index")
def retrieval_index(
    model: Annotated[Path, typer.Option("--model", help="Embedding model folder, or a 'retrieval train' run folder (uses best/).")],
    data: Annotated[Path, typer.Option("--data", help="nnU-Net-style dataset: every labelled case is indexed, findings from findings.csv or the label maps.")],
    out: Annotated[Path, typer.Option("--out", help="Index folder: index.faiss, cases.json, meta.json (+ vectors.npy for IVF-PQ).")],
    approximate: Annotated[bool | None, typer.Option("--approximate/--exact", help="IVF-PQ approximate index (needs >= 256 cases; recall@10 is measured and reported) or exact inner-product index. Default: exact; with --add, the existing index's kind.")] = None,
    add: Annotated[bool, typer.Option("--add", help="Add the cases to the index at OUT (built if missing). Cases already indexed from the same files are skipped; an id indexed with other files is refused (use --id-prefix).")] = False,
    id_prefix: Annotated[str, typer.Option("--id-prefix", help="Prepended to every case id of this collection (e.g. 'siteB/').")] = "",
    nprobe: Annotated[int | None, typer.Option("--nprobe", min=1, help="IVF-PQ: inverted lists visited per query (default round(sqrt(nlist))).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Cases embedded together.")] = 8,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | auto.")] = "cpu",
) -> None:
    """Embed every labelled case of a collection and build (or extend, --add) a similar-case index.

    Each case's channels are resampled to the model's retrieval grid, normalised and embedded; the index
    stores the unit-norm embeddings (cosine = inner product) with each case's id, image files and findings.
    The index folder is written atomically: a failure leaves the previous one (or nothing) in place.
    """
    from irisseg.retrieval import build_index

    _check_dataset_dir(data)
    index = build_index(model, data, out, approximate=approximate, add=add, batch_size=batch_size, device=device,
                        nprobe=nprobe, id_prefix=id_prefix)
    info = index.build_info
    table = Table(title=f"irisseg retrieval index: {out}", title_justify="left")
    table.add_column("setting")
    table.add_column("value", justify="right", overflow="fold")
    rows = [("cases indexed", str(len(index))), ("added now", str(info["added"]))]
    if add:
        rows.append(("skipped (already indexed)", str(len(info["skipped"]))))
    rows += [("embedding dim", str(index.dim)), ("kind", index.kind)]
    if index.kind == "ivfpq":
        rows += [("nlist / m / nprobe", f"{index.nlist} / {index.m} / {index.nprobe}"),
                 (f"recall@10 vs exact ({index.recall_queries} queries)", _fmt(index.recall_at_10, 3))]
    rows += [("grid", " x ".join(map(str, index.model_info["grid"]))), ("findings", ", ".join(index.names)),
             ("seconds", f"{info['seconds']:.1f} (embedding {info['embed_seconds']:.1f})")]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


@retrieval_app.command("search")
def retrieval_search(
    index: Annotated[Path, typer.Option("--index", help="Index folder written by 'irisseg retrieval index'.")],
    query: Annotated[list[Path], typer.Option("--query", help="Query image; repeat for each channel, in channel order (_0000, _0001, ...).")],
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Number of nearest cases.")] = 10,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of the table.")] = False,
    model: Annotated[Path | None, typer.Option("--model", help="Embedding model (default: the one named in the index; must have the same weights).")] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="Case id never returned (repeatable), e.g. the query's own case.")] = None,
    nprobe: Annotated[int | None, typer.Option("--nprobe", min=1, help="IVF-PQ index: inverted lists visited (this search only).")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | auto.")] = "cpu",
) -> None:
    """The k indexed cases most similar to a query image: rank, case id, cosine similarity, findings.

    The query may have any shape, spacing and orientation: it is resampled to the index's grid like the
    indexed cases. With --json: {"index", "query", "k", "kind", "n_cases", "hits": [{"rank", "case_id",
    "score", "findings", "paths", "mask"}]} (paths: the case's image files, absolute, in channel order;
    mask: its label map, absolute, or null when the index holds none).
    """
    from irisseg.io import read_volume
    from irisseg.retrieval import CaseIndex, query_model, search_cases

    idx = CaseIndex.load(index)
    if nprobe is not None:
        idx.nprobe = nprobe
    net = query_model(idx, model)
    if len(query) != net.config.in_channels:
        raise InputError(f"--query: the model takes {net.config.in_channels} channel(s), got {len(query)} file(s) "
                         f"(repeat --query once per channel, in channel order)")
    channels = [read_volume(q) for q in query]
    hits = search_cases(idx, net, channels, k=k, exclude=exclude, device=device)[0]
    if json_out:
        _retrieval_print_json({"index": str(index), "query": [str(q) for q in query], "k": k, "kind": idx.kind,
                               "n_cases": len(idx), "hits": [h.to_dict() for h in hits]})
        return
    table = Table(title=f"irisseg retrieval search: {len(hits)} nearest of {len(idx)} cases ({idx.kind} index)",
                  title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("case", no_wrap=True)
    table.add_column("cosine", justify="right")
    table.add_column("findings", overflow="fold")
    for h in hits:
        table.add_row(str(h.rank), h.case_id, f"{h.score:.4f}", ", ".join(h.findings) or "-")
    console.print(table)


@retrieval_app.command("evaluate")
def retrieval_evaluate(
    index: Annotated[Path, typer.Option("--index", help="Index folder written by 'irisseg retrieval index'.")],
    data: Annotated[Path | None, typer.Option("--data", help="Query collection (labelled dataset); default: leave-one-out over the indexed cases.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of the table.")] = False,
    ks: Annotated[str, typer.Option("--ks", help="Comma-separated cutoffs k (those above the gallery size are dropped).")] = "1,3,5,10,20",
    model: Annotated[Path | None, typer.Option("--model", help="Embedding model for --data (default: the one named in the index).")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | auto.")] = "cpu",
) -> None:
    """Retrieval quality of an index: precision, recall, mAP and NDCG at k.

    A gallery case is relevant to a query when they share a finding; NDCG's gain is the Jaccard index of
    their findings. Without --data each indexed case queries all the others (leave-one-out); with --data
    that collection's cases are embedded and query the index (the same case is left out of its ranking).
    Queries without any relevant case are left out of the means (counted in the output).
    """
    from irisseg.retrieval import CaseIndex, evaluate_index

    parts = [p.strip() for p in ks.split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise InputError(f"--ks: expected comma-separated positive integers such as 1,5,10, got {ks!r}")
    if data is not None:
        _check_dataset_dir(data)
    idx = CaseIndex.load(index)
    result = evaluate_index(idx, data, ks=[int(p) for p in parts], model=model, device=device)
    if json_out:
        _retrieval_print_json({"index": str(index), "data": None if data is None else str(data), **result})
        return
    table = Table(title=f"irisseg retrieval evaluate: {result['mode']}, {result['n_queries']} queries with a "
                        f"relevant case, gallery of {result['n_gallery']} ({idx.kind} index)", title_justify="left")
    for column in ("k", "P@k", "R@k", "mAP@k", "NDCG@k"):
        table.add_column(column, justify="right")
    for kk in result["ks"]:
        table.add_row(str(kk), *(_fmt(result[f"{m}@{kk}"], 4) for m in ("precision", "recall", "map", "ndcg")))
    console.print(table)
    if result["n_queries_without_relevant"]:
        console.print(f"{result['n_queries_without_relevant']} query case(s) share no finding with any gallery "
                      f"case and are left out of the means")


# --- app command (issue 7) ---
@app.command("app")
def app_command(
    host: Annotated[str, typer.Option("--host", help="Interface to bind: 127.0.0.1 (this machine only) or 0.0.0.0 (the network).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = 7860,
    model: Annotated[str, typer.Option("--model", help="'starter' (packaged weights) or a trained model / run folder.")] = "starter",
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | auto.")] = "cpu",
    index: Annotated[Path | None, typer.Option("--index", help="Case index ('irisseg retrieval index'): adds a similar-case search tab.")] = None,
    max_upload_mb: Annotated[int, typer.Option("--max-upload-mb", min=1, help="Largest accepted upload, MB.")] = 512,
) -> None:
    """Serve the web app: segment by example in the browser, view slices with overlays, download the result.

    Needs the optional 'app' extra of irisseg (Gradio). Open the printed URL; stop with Ctrl+C. Each browser
    connection's files live in their own temporary folder, removed when its tab closes.
    """
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise InputError("the web app needs the 'app' extra: pip install 'irisseg[app]'") from None
    from irisseg.app import launch

    launch(host=host, port=port, model=model, device=device, index=index, max_upload_mb=max_upload_mb)
# --- end app command ---


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code: 0 on success, 2 for bad input or bad usage, 130 if interrupted.

    Arguments:
      argv (list[str] | None): the arguments after ``irisseg`` (default: ``sys.argv[1:]``).
    """
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer(warnings.showwarning)
            result = app(args=argv, prog_name="irisseg", standalone_mode=False)
    except InputError as exc:
        _error_line(str(exc))
        return 2
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        if exc.filename is None:
            raise
        _error_line(_path_problem(exc))
        return 2
    except typer.Abort:
        print("irisseg: aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("irisseg: interrupted", file=sys.stderr)
        return 130
    except typer.TyperException as exc:  # usage errors: unknown option, missing option, bad value
        if type(exc).__name__ == "NoArgsIsHelpError":
            print(exc.format_message())
            return 0
        _error_line(f"{exc.format_message()} (see 'irisseg --help')")
        return int(getattr(exc, "exit_code", 2))
    return result if isinstance(result, int) else 0


def _path_problem(exc: OSError) -> str:
    """One line for an output path that could not be made: a file where a folder is needed, no permission."""
    path = Path(exc.filename)
    if isinstance(exc, FileExistsError) and path.is_file():
        return f"{path}: exists and is not a folder"
    if isinstance(exc, NotADirectoryError):
        for part in [path, *path.parents]:
            if part.is_file():
                return f"{part}: is a file, not a folder"
    return f"{path}: {(exc.strerror or type(exc).__name__).lower()}"


_PACKAGE_DIR = Path(__file__).resolve().parent


def _warning_printer(previous):
    """A ``warnings.showwarning`` that prints irisseg's own warnings as ``irisseg: warning: <message>`` (one
    line, no source line) and hands every other warning to ``previous``."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if Path(filename).resolve().is_relative_to(_PACKAGE_DIR):
            _warning_line(str(message), file)
        else:
            previous(message, category, filename, lineno, file, line)
    return show


def _warning_line(message: str, file=None) -> None:
    """Print ``irisseg: warning: <message>`` on one line of stderr (or ``file``)."""
    print(f"irisseg: warning: {' '.join(message.split())}", file=sys.stderr if file is None else file)


def _error_line(message: str) -> None:
    """Print ``irisseg: error: <message>`` on one line of stderr."""
    print(f"irisseg: error: {' '.join(message.split())}", file=sys.stderr)


def _console_script() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _console_script()
