"""Retrieved against random supports for in-context segmentation (issue: similar-case retrieval, part 5).

Usage::

    irisseg synth --mode findings --cases 160 --shape 64 --seed 6161 --out data/findings_6161
    irisseg retrieval train --mode microf1 --data data/findings_6161 --out runs/retrieval_6161
    irisseg synth --mode findings --cases 30 --shape 64 --seed 6162 --out data/findings_6162   # held-out queries
    irisseg retrieval index --model runs/retrieval_6161 --data data/findings_6161 --out runs/bank_6161
    python benchmarks/support_selection.py --index runs/bank_6161 --queries data/findings_6162 \\
        --shots 1,3 --draws 3 --json results/support_selection.json

A *task* is one held-out query case and one finding it carries (its mask = the finding's id in the query's
label map). For each task and each K in ``--shots``, the in-context model (``--model``, default the
packaged starter weights; ``one-shot`` for K = 1, ``ensemble`` above) segments the query from K supports
of the bank (the index's cases carrying that finding, with their label maps):

* ``retrieved``: :func:`irisseg.retrieval.select_supports`, the K most similar cases by the retrieval
  embedding (what ``irisseg segment --bank INDEX --label NAME --shots K`` does);
* ``random``: K cases drawn uniformly from the same eligible cases, ``--draws`` times (seeded); the task's
  random Dice is the mean over the draws.

Dice is computed in the query's own geometry. The table gives, per K and selection, the number of tasks,
median and mean Dice; then, per K, how many tasks retrieval won, and the paired Wilcoxon signed-rank
p-value (two-sided) of retrieved against random. ``--json`` writes every task's numbers and the summary.
Single CPU thread by default (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, type=Path, help="case index of the bank (irisseg retrieval index)")
    p.add_argument("--queries", required=True, type=Path, help="labelled held-out dataset (nnU-Net layout)")
    p.add_argument("--model", default="starter", help="in-context model: 'starter' or a model folder")
    p.add_argument("--shots", default="1,3", help="comma-separated K values (default 1,3)")
    p.add_argument("--draws", type=int, default=3, help="random support sets per task and K (default 3)")
    p.add_argument("--max-queries", type=int, default=None, help="use at most this many query cases")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--json", type=Path, default=None, help="write every task's numbers and the summary here")
    return p.parse_args(argv)


def segment_dice(seg, supports, value: int, query, reference: np.ndarray) -> float:
    """Dice of the in-context prediction of ``query`` from ``supports`` ((image path, mask path) pairs)."""
    from irisseg.io import read_mask, read_volume
    from irisseg.metrics import dice

    images, masks = [], []
    for image_path, mask_path in supports:
        image = read_volume(image_path)
        images.append(image)
        masks.append(read_mask(mask_path, reference=image, reference_name=image_path, allow_empty=True))
    seg.set_support(images, masks, labels=[value])
    labels = seg.labels_from_probabilities(seg.predict_probabilities(query))
    return float(dice(labels.array == value, reference))


def wilcoxon_p(a: list[float], b: list[float]) -> float:
    """Two-sided paired Wilcoxon signed-rank p-value (nan when every difference is zero or n < 2)."""
    from scipy.stats import wilcoxon

    diff = np.asarray(a) - np.asarray(b)
    if len(diff) < 2 or not np.any(diff):
        return float("nan")
    return float(wilcoxon(a, b).pvalue)


def main(argv=None) -> int:
    import torch

    from irisseg.data.findings import load_findings
    from irisseg.incontext import InContextSegmenter, load_model
    from irisseg.io import read_volume
    from irisseg.retrieval import CaseIndex, query_model, select_supports

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shots = sorted({int(k) for k in args.shots.split(",")})
    index = CaseIndex.load(args.index)
    net = query_model(index, None)
    iris = load_model(args.model, device=args.device)
    table = load_findings(args.queries)
    rng = np.random.default_rng(args.seed)
    cases = range(len(table)) if args.max_queries is None else range(min(len(table), args.max_queries))
    tasks, t0 = [], time.perf_counter()
    for i in cases:
        query_path = table.image_paths[i][0]
        query = read_volume(query_path)
        label_map = read_volume(table.label_paths[i]).array
        for name in table.findings_of(i):
            if name not in index.label_values or name not in table.label_values:
                continue
            ref = label_map == table.label_values[name]
            value = index.label_values[name]
            k = index.names.index(name)
            eligible = [j for j in range(len(index)) if index.labels[j, k] and index.masks[j]]
            if not ref.any() or len(eligible) < max(shots):
                continue
            task = {"case": table.case_ids[i], "finding": name, "eligible": len(eligible)}
            for K in shots:
                seg = InContextSegmenter(iris, device=args.device, strategy="one-shot" if K == 1 else "ensemble")
                hits, _ = select_supports(index, net, query, name, K, query_paths=[query_path], device=args.device)
                retrieved = segment_dice(seg, [(h.paths[0], h.mask) for h in hits], value, query, ref)
                draws = []
                for _ in range(args.draws):
                    pick = rng.choice(eligible, size=K, replace=False)
                    draws.append(segment_dice(seg, [(index.paths[j][0], index.masks[j]) for j in pick], value,
                                              query, ref))
                task[f"k{K}"] = {"retrieved": retrieved, "random": float(np.mean(draws)), "random_draws": draws,
                                 "supports": [h.case_id for h in hits]}
            tasks.append(task)
            print(f"{task['case']} {name:>14s} " + "  ".join(
                f"K={K}: retrieved {task[f'k{K}']['retrieved']:.3f} random {task[f'k{K}']['random']:.3f}"
                for K in shots), flush=True)
    if not tasks:
        print("no task: the queries carry no finding with enough bank cases", file=sys.stderr)
        return 2
    summary = []
    print(f"\n{len(tasks)} tasks, {time.perf_counter() - t0:.0f} s\n")
    print("| K | supports | tasks | median Dice | mean Dice | retrieved wins | Wilcoxon p |")
    print("|---|---|---|---|---|---|---|")
    for K in shots:
        r = [t[f"k{K}"]["retrieved"] for t in tasks]
        q = [t[f"k{K}"]["random"] for t in tasks]
        wins = sum(a > b for a, b in zip(r, q))
        p = wilcoxon_p(r, q)
        for sel, values in (("retrieved", r), (f"random (mean of {args.draws})", q)):
            row = {"k": K, "supports": sel, "tasks": len(values), "median_dice": statistics.median(values),
                   "mean_dice": statistics.fmean(values)}
            extra = f"{wins}/{len(tasks)} | {p:.3g}" if sel == "retrieved" else " | "
            print(f"| {K} | {sel} | {len(values)} | {row['median_dice']:.3f} | {row['mean_dice']:.3f} | {extra} |")
            summary.append({**row, **({"wins": wins, "wilcoxon_p": p} if sel == "retrieved" else {})})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                         "tasks": tasks, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
