"""In-context segmentation quality on held-out synthetic tasks, against what a user would otherwise do.

Usage::

    python benchmarks/incontext_quality.py --model runs/starter --tasks 20 --shape 64 --seed 1000 \\
        --exclude-train-families --json results/incontext_quality.json --markdown

For each task (``generate_task(shape, seed + i, n_views=1 + max(K), families=held_out, n_classes=1)``:
view 0 is the query, views 1..5 the supports, one labelled structure) and each K in ``--ks`` (1, 3, 5),
every method segments the query from the first K supports:

* ``one-shot`` (K = 1 only), ``ensemble``, ``tune``: :class:`irisseg.incontext.InContextSegmenter`;
  ``one-shot+tta``, ``ensemble+tta``, ``tune+tta``: the same with mirror test-time augmentation
  (``tta=True``: supports and query mirrored together along the 8 axis combinations, probabilities averaged);
* ``no-matching`` (ablation): ``ensemble`` with the model's dense matching switched off, i.e. from the
  task embedding (tokens and prototypes) alone;
* ``memory`` (no support; reported as K = 0): the model's class memory bank entry named after the
  structure's shape family, when the bank has one (held-out families usually do not);
* ``atlas``: :func:`irisseg.baselines.atlas_propagation_multi` (affine + B-spline registration of every
  support to the query, majority vote);
* ``unet``: :func:`irisseg.baselines.train_unet_on_supports`, trained for as many CPU seconds as the
  ``tune`` strategy took for the same K (support encoding + tuning + query), but at least
  ``--unet-seconds`` (30).

Every image is a :class:`~irisseg.io.Volume` with the task's spacing, origin and direction, so the real
geometry paths are used; Dice and HD95 (mm, with the task's spacing) are computed in the query's
geometry. HD95 is inf when exactly one of prediction and reference is empty (counted as ``inf``).

Held-out families: ``--families`` if given, else the model folder's ``config.json`` ``extra.holdout_families``;
``--exclude-train-families`` insists on one of the two (an error otherwise) instead of falling back to
all families.

Resumable: with ``--json OUT``, results are written after every task, and a rerun with the same settings
(weights digest included) skips the tasks already in OUT. The JSON holds the settings, every task's
per-method numbers (``dice``, ``hd95`` in mm, written as ``Infinity`` when infinite, ``seconds``,
``cpu_seconds``, method details) and the summary. CPU threads: ``--threads`` (default 1) is applied to torch and ITK for every
method alike (on a machine shared with other jobs, 2-thread OpenMP can slow down by 10x or more).
Expected runtime at 64^3 on 1 thread: ~3-5 min per task (most of it the U-Net's 3 x >= 30 s and the
atlas' 9 registrations), i.e. ~1-1.5 h for 20 tasks; see the timing printed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from irisseg.baselines import atlas_propagation_multi, train_unet_on_supports
from irisseg.data.synthetic import FAMILIES, generate_task
from irisseg.errors import InputError
from irisseg.incontext import InContextSegmenter, load_model, resolve_model_dir
from irisseg.io import Volume
from irisseg.metrics import dice, hd95

METHODS = ("one-shot", "ensemble", "tune", "memory", "atlas", "unet", "no-matching",
           "one-shot+tta", "ensemble+tta", "tune+tta")


# ---------------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------------
def _parse_list(values) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out.extend(x for x in str(v).replace(",", " ").split() if x)
    return out


def held_out_families(model_dir: Path | None, families: list[str], require: bool) -> tuple[list[str] | None, str]:
    """The families to draw tasks from, and where they came from."""
    if families:
        return families, "--families"
    if model_dir is not None and (model_dir / "config.json").is_file():
        extra = json.loads((model_dir / "config.json").read_text()).get("extra", {}) or {}
        held = extra.get("holdout_families") or (extra.get("train", {}) or {}).get("holdout_families")
        if held:
            return list(held), f"{model_dir / 'config.json'} extra.holdout_families"
    if require:
        raise InputError("--exclude-train-families: the model's config.json has no extra.holdout_families; "
                         "name the held-out families with --families")
    return None, "all families (the model may have been trained on them)"


# ---------------------------------------------------------------------------------------------------
# one task
# ---------------------------------------------------------------------------------------------------
def _volumes(task) -> tuple[list[Volume], list[Volume]]:
    images = [Volume(task.images[v], task.spacing, task.origin, np.asarray(task.direction).copy())
              for v in range(task.n_views)]
    masks = [img.with_array((task.labels[v] == 1).astype(np.uint8)) for v, img in enumerate(images)]
    return images, masks


def _score(pred: Volume, ref: Volume) -> dict:
    return {"dice": float(dice(pred.array, ref.array)),
            "hd95": float(hd95(pred.array, ref.array, ref.spacing_zyx)),
            "pred_voxels": int(np.count_nonzero(pred.array))}


class _Clock:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def run_task(index: int, args, model, families) -> dict:
    seed = args.seed + index
    ks = sorted(args.ks)
    task = generate_task(shape=args.shape, seed=seed, n_views=1 + max(ks), families=families, n_classes=1)
    images, masks = _volumes(task)
    query, ref = images[0], masks[0]
    sup_images, sup_masks = images[1:], masks[1:]
    family = task.families[1]
    record = {"task": index, "seed": seed, "family": family, "ref_voxels": int(ref.array.sum()),
              "spacing": list(task.spacing), "results": []}

    def add(method, k, pred, clock, **extra):
        record["results"].append({"method": method, "k": k, **_score(pred, ref), "seconds": clock.wall,
                                  "cpu_seconds": clock.cpu, **extra})

    tune_cpu: dict[int, float] = {}
    for method in ("one-shot", "ensemble", "tune", "one-shot+tta", "ensemble+tta", "tune+tta"):
        if method not in args.methods:
            continue
        strategy, tta = method.removesuffix("+tta"), method.endswith("+tta")
        seg = InContextSegmenter(model, strategy=strategy, tune_steps=args.tune_steps, tta=tta)
        for k in ks:
            if strategy == "one-shot" and k != 1:
                continue
            with _Clock() as c:
                seg.set_support(sup_images[:k], sup_masks[:k])
                pred = seg.segment(query)
            add(method, k, pred, c, timings=dict(seg.timings))
            if method == "tune":
                tune_cpu[k] = c.cpu
    if "no-matching" in args.methods and model.matcher is not None:
        seg = InContextSegmenter(model, strategy="ensemble", matching=False)
        for k in ks:
            with _Clock() as c:
                seg.set_support(sup_images[:k], sup_masks[:k])
                pred = seg.segment(query)
            add("no-matching", k, pred, c, timings=dict(seg.timings))
    if "memory" in args.methods:
        if family in model.memory:
            seg = InContextSegmenter(model, strategy="memory")
            with _Clock() as c:
                seg.set_memory([family])
                pred = seg.segment(query)
            add("memory", 0, pred, c)
        else:
            record["memory_missing"] = family
    for k in ks:
        if "atlas" in args.methods:
            with _Clock() as c:
                pred, infos = atlas_propagation_multi(sup_images[:k], sup_masks[:k], query, bspline=not args.no_bspline,
                                                      seed=seed, return_info=True, threads=args.threads)
            add("atlas", k, pred, c, inits=[i["init"] for i in infos],
                bspline_kept=[i["final_metric"] != i["affine_metric"] for i in infos])
        if "unet" in args.methods:
            budget = max(float(args.unet_seconds), tune_cpu.get(k, 0.0))
            with _Clock() as c:
                pred, info = train_unet_on_supports(sup_images[:k], sup_masks[:k], query, seconds=budget, seed=seed,
                                                    clock="process", threads=args.threads, return_info=True)
            add("unet", k, pred, c, budget_cpu_seconds=budget, steps=info["steps"], final_loss=info["final_loss"])
    return record


# ---------------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------------
def _stats(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return {"median": math.nan, "q25": math.nan, "q75": math.nan, "n": 0, "n_inf": 0}
    q25, med, q75 = np.percentile(arr, [25, 50, 75]) if np.all(np.isfinite(arr)) else _inf_percentiles(arr)
    return {"median": float(med), "q25": float(q25), "q75": float(q75), "n": int(arr.size),
            "n_inf": int(np.count_nonzero(np.isinf(arr)))}


def _inf_percentiles(arr: np.ndarray) -> tuple[float, float, float]:
    """Percentiles with +inf values kept as the largest (numpy's interpolation would give nan)."""
    s = np.sort(arr)
    out = []
    for q in (25, 50, 75):
        pos = (s.size - 1) * q / 100.0
        lo, hi = int(math.floor(pos)), int(math.ceil(pos))
        a, b = s[lo], s[hi]
        out.append(a if lo == hi or a == b else (math.inf if math.isinf(b) else a + (b - a) * (pos - lo)))
    return tuple(out)  # type: ignore[return-value]


def summarize(records: list[dict]) -> list[dict]:
    groups: dict[tuple[str, int], list[dict]] = {}
    for rec in records:
        for r in rec["results"]:
            groups.setdefault((r["method"], r["k"]), []).append(r)
    rows = []
    for method in METHODS:
        for k in sorted(k for m, k in groups if m == method):
            rs = groups[(method, k)]
            rows.append({"method": method, "k": k, "dice": _stats([r["dice"] for r in rs]),
                         "hd95": _stats([r["hd95"] for r in rs]),
                         "seconds": _stats([r["seconds"] for r in rs]),
                         "cpu_seconds": _stats([r["cpu_seconds"] for r in rs])})
    return rows


def _fmt(st: dict, digits: int) -> str:
    if st["n"] == 0:
        return "-"

    def f(v):
        return "inf" if math.isinf(v) else f"{v:.{digits}f}"

    return f"{f(st['median'])} [{f(st['q25'])}-{f(st['q75'])}]"


def print_table(rows: list[dict], markdown: bool) -> None:
    header = ["method", "K", "n", "Dice median [IQR]", "HD95 mm median [IQR]", "HD95 inf", "s/query", "CPU s/query"]
    lines = [[r["method"], "-" if r["k"] == 0 else str(r["k"]), str(r["dice"]["n"]), _fmt(r["dice"], 3),
              _fmt(r["hd95"], 1), str(r["hd95"]["n_inf"]), f"{r['seconds']['median']:.1f}",
              f"{r['cpu_seconds']['median']:.1f}"] for r in rows]
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|")
        for line in lines:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    for line in [header, *lines]:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------
def _weights_digest(model_dir: Path | None) -> str | None:
    """sha256 of the model's weights file, so a resumed run notices retrained weights."""
    if model_dir is None or not (model_dir / "model.safetensors").is_file():
        return None
    return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()[:16]


def _settings(args, model_dir, families) -> dict:
    return {"model": str(model_dir or args.model), "weights_sha256": _weights_digest(model_dir), "shape": args.shape, "seed": args.seed, "families": families,
            "ks": sorted(args.ks), "methods": sorted(args.methods), "tune_steps": args.tune_steps,
            "unet_seconds": args.unet_seconds, "bspline": not args.no_bspline, "threads": args.threads}


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=float))
    os.replace(tmp, path)


def combine_runs(paths: list[Path], out: Path | None, markdown: bool) -> int:
    """Pool the per-task results of several ``--json`` files by task seed and print one summary table.

    A (seed, method, K) result found in several files is taken from the first file that has it. Tasks
    with the same seed are the same task (same generator call), whatever file they come from.
    """
    by_seed: dict[int, dict] = {}
    sources = []
    for path in paths:
        data = json.loads(path.read_text())
        st = data["settings"]
        sources.append({"file": str(path), **st})
        print(f"{path}: model {st['model']} ({st.get('weights_sha256')}), methods {', '.join(st['methods'])}, "
              f"{len(data['tasks'])} tasks", flush=True)
        for rec in data["tasks"]:
            cur = by_seed.setdefault(rec["seed"], {**rec, "results": []})
            seen = {(r["method"], r["k"]) for r in cur["results"]}
            cur["results"] += [r for r in rec["results"] if (r["method"], r["k"]) not in seen]
    records = [by_seed[s] for s in sorted(by_seed)]
    rows = summarize(records)
    print(f"\n{len(records)} tasks (seeds {min(by_seed)}..{max(by_seed)})")
    print_table(rows, markdown=markdown)
    if out:
        _write_json(out, {"settings": {"combined": sources}, "tasks": records, "summary": rows})
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="starter", help="'starter', a model folder or a training run folder")
    ap.add_argument("--tasks", type=int, default=20)
    ap.add_argument("--shape", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1000, help="task i uses seed + i")
    ap.add_argument("--families", nargs="*", default=None, help="families to draw tasks from (overrides the config)")
    ap.add_argument("--exclude-train-families", action="store_true",
                    help="require held-out families (from --families or the model's config.json)")
    ap.add_argument("--ks", nargs="*", type=int, default=[1, 3, 5], help="support set sizes")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), help=f"subset of {', '.join(METHODS)}")
    ap.add_argument("--tune-steps", type=int, default=10)
    ap.add_argument("--unet-seconds", type=float, default=30.0, help="minimum CPU seconds of U-Net training")
    ap.add_argument("--no-bspline", action="store_true", help="affine-only atlas registration")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for torch and ITK (every method)")
    ap.add_argument("--json", type=Path, default=None, help="write per-task results here (and resume from it)")
    ap.add_argument("--markdown", action="store_true", help="also print the summary as a markdown table")
    ap.add_argument("--combine", nargs="+", type=Path, default=None, metavar="JSON",
                    help="only summarise earlier --json outputs together (results pooled per task seed, e.g. the "
                         "model's methods from one run and the baselines from another); --json writes the pool")
    args = ap.parse_args(argv)
    if args.combine:
        return combine_runs(args.combine, args.json, args.markdown)
    args.methods = _parse_list(args.methods)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown or not args.ks or min(args.ks) < 1:
        ap.error(f"unknown methods {unknown} or bad --ks {args.ks}")
    torch.set_num_threads(args.threads)

    try:
        model_dir = resolve_model_dir(args.model)
    except InputError:
        model_dir = None  # e.g. a registry name with --model iris-small (random weights)
    model = load_model(args.model, allow_random=True)
    fams = _parse_list(args.families)
    unknown_f = sorted(set(fams) - set(FAMILIES))
    if unknown_f:
        ap.error(f"unknown families {unknown_f} (choose from {', '.join(FAMILIES)})")
    families, source = held_out_families(model_dir, fams, args.exclude_train_families)
    settings = _settings(args, model_dir, families)
    print(f"model {settings['model']}; tasks from {families or 'all families'} ({source}); "
          f"{args.tasks} tasks at {args.shape}^3, seeds {args.seed}..{args.seed + args.tasks - 1}; K {sorted(args.ks)}; "
          f"{args.threads} thread(s)", flush=True)

    records: list[dict] = []
    if args.json and args.json.is_file():
        old = json.loads(args.json.read_text())
        if old.get("settings") == settings:
            records = [r for r in old.get("tasks", []) if r["task"] < args.tasks]
            print(f"resuming: {len(records)} task(s) already in {args.json}", flush=True)
        else:
            print(f"{args.json} holds results for other settings: starting afresh (it will be overwritten)", flush=True)
    done = {r["task"] for r in records}
    t_start = time.perf_counter()
    n_new = 0
    for i in range(args.tasks):
        if i in done:
            continue
        t0 = time.perf_counter()
        rec = run_task(i, args, model, families)
        rec["seconds"] = time.perf_counter() - t0
        records.append(rec)
        n_new += 1
        records.sort(key=lambda r: r["task"])
        if args.json:
            _write_json(args.json, {"settings": settings, "tasks": records, "summary": summarize(records)})
        per_task = (time.perf_counter() - t_start) / n_new
        left = args.tasks - len(records)
        brief = ", ".join(f"{r['method']}@{r['k']} {r['dice']:.2f}" for r in rec["results"])
        print(f"task {i} ({rec['family']}, seed {rec['seed']}) {rec['seconds']:.0f} s: {brief}; "
              f"ETA {left * per_task / 60:.1f} min", flush=True)

    rows = summarize(records)
    total = sum(r.get("seconds", 0.0) for r in records)
    print(f"\n{len(records)} tasks, {total / 60:.1f} min of compute in all ({total / max(len(records), 1):.0f} s per task)")
    missing = sorted({r['memory_missing'] for r in records if 'memory_missing' in r})
    if missing:
        print(f"memory: no bank entry for {', '.join(missing)} (skipped on those tasks)")
    print_table(rows, markdown=False)
    if args.markdown:
        print()
        print_table(rows, markdown=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
