"""The built-in example behind ``irisseg demo`` (and ``make demo``).

A synthetic in-context task whose shape family was held out of the starter model's training: three
labelled support volumes and one query, all different "patients" of the same structure. The demo runs the
four inference strategies (one-shot, 3-shot ensemble, in-context tuning, memory retrieval), scores each
against the query's reference, and writes NIfTI files, tri-planar overlay PNGs and ``summary.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from irisseg.io import Volume, write_volume

#: Seed of the built-in example (fixed: the demo always shows the same task).
EXAMPLE_SEED = 2026


@dataclass
class Example:
    """The built-in example: supports (images, masks) and the query with its reference, as Volumes."""

    supports: list[Volume]
    support_masks: list[Volume]
    query: Volume
    reference: Volume
    family: str


def builtin_example(families: list[str], shape: tuple[int, int, int] | int = 64, seed: int = EXAMPLE_SEED,
                    n_support: int = 3) -> Example:
    """Generate the example task (deterministic): ``n_support`` supports and one query of one structure.

    Arguments:
      families (list[str]): shape families to draw the structure from (the model's held-out families).
      shape: grid (D, H, W) of the volumes, voxels. seed: task seed. n_support: number of supports.

    Returns:
      Example: Volumes with the task's anisotropic spacing (mm) and oblique direction.
    """
    from irisseg.data.synthetic import generate_task

    task = generate_task(shape=shape, seed=seed, n_views=n_support + 1, families=families, n_classes=1)
    geo = dict(spacing=task.spacing, origin=task.origin, direction=task.direction)
    vols = [Volume(task.images[v], **geo) for v in range(n_support + 1)]
    masks = [Volume((task.labels[v] == 1).astype(np.uint8), **geo) for v in range(n_support + 1)]
    return Example(vols[:n_support], masks[:n_support], vols[-1], masks[-1], task.families[1])


def run_demo(out: str | Path, model_name: str = "starter", device: str = "cpu", tune_steps: int = 10) -> dict:
    """Run the four strategies (and the ensemble with mirror TTA) on the built-in example; write everything to ``out``.

    Outputs in ``out``: ``query``, ``reference``, ``support_<i>`` / ``support_<i>_mask`` and one
    ``pred_<strategy>`` per run (``+`` written as ``_``) as NIfTI in the query's geometry, ``overlays.png``
    and ``summary.json``.

    Returns:
      dict: the summary written to ``out/summary.json`` (per strategy: dice, hd95_mm, seconds, supports).
    """
    from irisseg.incontext import InContextSegmenter, load_model
    from irisseg.metrics import dice, hd95
    from irisseg.viz import mask_centre, triplanar_overlays

    out = Path(out)
    model = load_model(model_name, device=device)
    holdout = list(model.config.extra.get("holdout_families") or [])
    if not holdout:
        from irisseg.data.synthetic import FAMILIES

        holdout = list(FAMILIES)
    ex = builtin_example(holdout, shape=tuple(model.config.image_size))
    files = {"query": write_volume(ex.query, out / "query.nii.gz"),
             "reference": write_volume(ex.reference, out / "reference.nii.gz")}
    for i, (img, msk) in enumerate(zip(ex.supports, ex.support_masks)):
        files[f"support_{i}"] = write_volume(img, out / f"support_{i}.nii.gz")
        files[f"support_{i}_mask"] = write_volume(msk, out / f"support_{i}_mask.nii.gz")

    class_name = f"demo/{ex.family}"
    runs = [("one-shot", 1), ("ensemble", 3), ("tune", 3), ("memory", 0), ("ensemble+tta", 3)]
    results, predictions = {}, {}
    for name, k in runs:
        strategy, tta = name.removesuffix("+tta"), name.endswith("+tta")
        seg = InContextSegmenter(model, device=device, strategy=strategy, tune_steps=tune_steps, tta=tta)
        t0 = time.perf_counter()
        if strategy == "memory":
            # A class stored earlier from the three supports (as `irisseg memory add` does); no support now.
            seg.set_memory([class_name])
        else:
            seg.set_support(ex.supports[:k], ex.support_masks[:k])
        pred = seg.segment(ex.query)
        seconds = time.perf_counter() - t0
        if name == "ensemble":
            model.memory.update(class_name, seg.task)
        predictions[name] = pred
        stem = f"pred_{name.replace('+', '_')}"
        files[stem] = write_volume(pred, out / f"{stem}.nii.gz")
        results[name] = {
            "supports": k,
            "dice": dice(pred.array, ex.reference.array),
            "hd95_mm": hd95(pred.array, ex.reference.array, ex.query.spacing_zyx),
            "seconds": seconds,
        }
    panels = [{"image": ex.supports[0].array, "masks": {"support mask": ex.support_masks[0].array},
               "spacing": ex.query.spacing_zyx, "row_title": "support 0"},
              {"image": ex.query.array, "masks": {"reference": ex.reference.array}, "spacing": ex.query.spacing_zyx,
               "row_title": "query: reference"}]
    centre = mask_centre({"reference": ex.reference.array}, ex.query.shape)  # same slices in every query row
    panels[1]["centre"] = centre
    for strategy, pred in predictions.items():
        panels.append({"image": ex.query.array, "masks": {"reference": ex.reference.array, strategy: pred.array},
                       "spacing": ex.query.spacing_zyx, "fill": False, "centre": centre,
                       "row_title": f"{strategy}: Dice {results[strategy]['dice']:.3f}"})
    overlay = triplanar_overlays(panels, out / "overlays.png",
                                 title=f"irisseg demo: held-out family '{ex.family}', model {model_name}")
    summary = {
        "model": model_name,
        "family": ex.family,
        "held_out_families": holdout,
        "example_seed": EXAMPLE_SEED,
        "query_geometry": ex.query.geometry(),
        "strategies": results,
        "files": {k: str(v) for k, v in {**files, "overlays": overlay}.items()},
    }
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=float))
    tmp.replace(out / "summary.json")
    return summary
