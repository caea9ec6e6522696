"""Dual-channel territory segmentation: the 14-configuration experiment matrix and its ranked report.

Two territories are predicted as two sigmoid channels (channel 0 = territory 1, channel 1 = territory 2).
A configuration is an output-head architecture and a set of auxiliary losses, and its name says both:
the name is split at ``_`` and read token by token:

* ``SharedDecoder``: architecture ``"shared"`` (one decoder, a two-channel head);
* ``SeparateDecoders``: architecture ``"separate"`` (one decoder per territory);
* ``SeparateDecoders_CrossAttention``: architecture ``"cross_attention"`` (separate decoders exchanging
  features through cross-attention);
* ``SpatialLoss``: + :func:`~irisseg.losses.spatial_consistency_loss`;
* ``ComplementaryLoss``: + :func:`~irisseg.losses.complementary_loss`;
* ``MultiScale``: the spatial term at several scales (implies ``SpatialLoss``);
* ``AdaptiveWeighting``: the spatial weight grows 0.05 -> 0.15 over training (implies ``SpatialLoss``).

:data:`EXPERIMENTS` holds the 14 configurations; :func:`get_experiment` / :func:`resolve_experiments`
look them up. :func:`rank_experiments`, :func:`paired_wilcoxon` and :func:`write_report` turn per-case
validation Dice rows into a ranked table, paired significance tests and a bar chart. No training here.

Evaluation rows (the ``results`` argument) are dicts, one per (configuration, fold, validation case)::

    {"config": "SharedDecoder", "fold": 0, "case": "case_007", "dice_1": 0.91, "dice_2": 0.89}

with ``dice_1`` / ``dice_2`` the Dice of channel 0 / 1 on that case.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np

from irisseg.errors import InputError
from irisseg.losses import TerritoryLoss

__all__ = [
    "TerritoryExperiment",
    "EXPERIMENTS",
    "ARCHITECTURES",
    "get_experiment",
    "resolve_experiments",
    "rank_experiments",
    "paired_wilcoxon",
    "write_report",
]

#: The output-head architectures a configuration can name.
ARCHITECTURES = ("shared", "separate", "cross_attention")

_ARCH_WORDS = {"shared": "shared decoder", "separate": "separate decoders",
               "cross_attention": "separate decoders with cross-attention"}


@dataclass(frozen=True)
class TerritoryExperiment:
    """One configuration of the territory experiment matrix.

    Fields:
      name (str): the configuration name, e.g. ``"SeparateDecoders_CrossAttention_SpatialLoss"``.
      architecture (str): ``"shared"`` | ``"separate"`` | ``"cross_attention"``.
      spatial, complementary, multiscale, adaptive (bool): the auxiliary loss terms (see
        :class:`~irisseg.losses.TerritoryLoss`); ``multiscale`` and ``adaptive`` imply ``spatial``.
    """

    name: str
    architecture: str
    spatial: bool = False
    complementary: bool = False
    multiscale: bool = False
    adaptive: bool = False

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        if (self.multiscale or self.adaptive) and not self.spatial:
            raise ValueError(f"{self.name}: multiscale / adaptive weighting need the spatial loss")

    def loss(self, weight: float = 0.1) -> TerritoryLoss:
        """The training loss of this configuration.

        Arguments:
          weight (float): weight of the auxiliary terms (the spatial term's is adaptive with ``adaptive``).

        Returns:
          TerritoryLoss: callable ``(logits (B, 2, *spatial), target (B, 2, *spatial), progress) -> scalar``.
        """
        return TerritoryLoss(spatial=self.spatial, complementary=self.complementary,
                             multiscale=self.multiscale, adaptive=self.adaptive, weight=weight)

    @property
    def description(self) -> str:
        """One line: the architecture and the loss terms, e.g. ``"shared decoder; BCE + Dice + spatial"``."""
        terms = ["BCE", "Dice"]
        if self.spatial:
            spatial = "spatial"
            if self.multiscale:
                spatial = "multi-scale spatial"
            if self.adaptive:
                spatial += " (adaptive weight 0.05->0.15)"
            terms.append(spatial)
        if self.complementary:
            terms.append("complementary")
        return f"{_ARCH_WORDS[self.architecture]}; {' + '.join(terms)}"


def _parse_name(name: str) -> TerritoryExperiment:
    """Read a configuration name token by token (see the module docstring)."""
    tokens = name.split("_")
    head = tokens[0]
    rest = tokens[1:]
    if head == "SharedDecoder":
        arch = "shared"
    elif head == "SeparateDecoders":
        arch = "separate"
        if rest and rest[0] == "CrossAttention":
            arch = "cross_attention"
            rest = rest[1:]
    else:
        raise ValueError(f"configuration name {name!r} must start with SharedDecoder or SeparateDecoders")
    flags = {"SpatialLoss": "spatial", "ComplementaryLoss": "complementary", "MultiScale": "multiscale",
             "AdaptiveWeighting": "adaptive"}
    on = set()
    for tok in rest:
        if tok not in flags or flags[tok] in on:
            raise ValueError(f"configuration name {name!r}: unexpected part {tok!r}")
        on.add(flags[tok])
    if on & {"multiscale", "adaptive"}:
        on.add("spatial")
    return TerritoryExperiment(name=name, architecture=arch, **{f: True for f in on})


_NAMES = (
    "SharedDecoder",
    "SharedDecoder_SpatialLoss",
    "SharedDecoder_ComplementaryLoss",
    "SharedDecoder_SpatialLoss_ComplementaryLoss",
    "SharedDecoder_SpatialLoss_MultiScale",
    "SharedDecoder_SpatialLoss_AdaptiveWeighting",
    "SeparateDecoders",
    "SeparateDecoders_SpatialLoss",
    "SeparateDecoders_ComplementaryLoss",
    "SeparateDecoders_SpatialLoss_ComplementaryLoss",
    "SeparateDecoders_CrossAttention",
    "SeparateDecoders_CrossAttention_SpatialLoss",
    "SeparateDecoders_CrossAttention_ComplementaryLoss",
    "SeparateDecoders_CrossAttention_SpatialLoss_ComplementaryLoss",
)

#: The 14 configurations of the experiment matrix, by name, in matrix order.
EXPERIMENTS: dict[str, TerritoryExperiment] = {n: _parse_name(n) for n in _NAMES}


def get_experiment(name: str) -> TerritoryExperiment:
    """The configuration called ``name`` (exact, or differing only in case and surrounding spaces).

    Arguments:
      name (str): a key of :data:`EXPERIMENTS`.

    Returns:
      TerritoryExperiment.

    Raises:
      InputError: an unknown name; the message lists the valid names.
    """
    key = str(name).strip()
    if key in EXPERIMENTS:
        return EXPERIMENTS[key]
    folded = {n.lower(): n for n in EXPERIMENTS}
    if key.lower() in folded:
        return EXPERIMENTS[folded[key.lower()]]
    raise InputError(f"unknown territory configuration {name!r} (choose from {', '.join(EXPERIMENTS)})")


def resolve_experiments(names: str | Sequence[str] | None) -> list[TerritoryExperiment]:
    """Configurations from a user's selection, in the order given, duplicates dropped.

    Arguments:
      names: None (all 14, in :data:`EXPERIMENTS` order), a comma-separated string
        (``"SharedDecoder, SeparateDecoders"``) or a list of names (items may be comma-separated too).

    Returns:
      list[TerritoryExperiment].

    Raises:
      InputError: an unknown name, or a selection with no name in it.
    """
    if names is None:
        return list(EXPERIMENTS.values())
    items = [names] if isinstance(names, str) else list(names)
    out: list[TerritoryExperiment] = []
    for item in items:
        for part in str(item).split(","):
            if part.strip():
                exp = get_experiment(part)
                if exp not in out:
                    out.append(exp)
    if not out:
        raise InputError(f"no territory configuration named in {names!r} (choose from {', '.join(EXPERIMENTS)})")
    return out


# ---------------------------------------------------------------------------------------------------------
# ranking and report
# ---------------------------------------------------------------------------------------------------------

_REQUIRED = ("config", "fold", "case", "dice_1", "dice_2")


def _clean_rows(results: Iterable[dict]) -> list[dict]:
    """Validated copies of the evaluation rows: fold int, Dice a float in [0, 1], no duplicate case."""
    rows, seen = [], set()
    for i, r in enumerate(results):
        missing = [k for k in _REQUIRED if k not in r]
        if missing:
            raise InputError(f"evaluation row {i} lacks {', '.join(missing)} (needs {', '.join(_REQUIRED)})")
        try:
            fold = int(r["fold"])
            d1, d2 = float(r["dice_1"]), float(r["dice_2"])
        except (TypeError, ValueError) as exc:
            raise InputError(f"evaluation row {i}: fold must be an integer and dice_1 / dice_2 numbers ({exc})") from None
        if not (0.0 <= d1 <= 1.0 and 0.0 <= d2 <= 1.0):  # also rejects NaN
            raise InputError(f"evaluation row {i} ({r['config']}, fold {fold}, case {r['case']}): "
                             f"dice_1 / dice_2 must be numbers in [0, 1], got {d1}, {d2}")
        key = (str(r["config"]), fold, r["case"])
        if key in seen:
            raise InputError(f"evaluation row {i}: case {r['case']!r} of {key[0]} fold {fold} appears twice")
        seen.add(key)
        rows.append({"config": key[0], "fold": fold, "case": r["case"], "dice_1": d1, "dice_2": d2})
    if not rows:
        raise InputError("no evaluation results to rank")
    return rows


def rank_experiments(results: Sequence[dict]) -> list[dict]:
    """One summary row per configuration, ranked by mean Dice over folds.

    Arguments:
      results (Sequence[dict]): per-case evaluation rows ``{"config": str, "fold": int, "case": id,
        "dice_1": float, "dice_2": float}`` (Dice of channel 0 / 1 on one validation case).

    Returns:
      list[dict]: sorted by ``rank``; each row has, in this order:

      * ``rank`` (int): 1 = highest ``mean_dice``; equal values are ordered by config name;
      * ``config`` (str), ``architecture`` (str; ``""`` for a name outside :data:`EXPERIMENTS`);
      * ``mean_dice``, ``dice_1``, ``dice_2`` (float): the mean over the config's folds of the per-fold
        values below (so ``mean_dice = (dice_1 + dice_2) / 2``);
      * ``asymmetry`` (float): ``|dice_1 - dice_2|`` of those means;
      * ``n_cases`` (int): cases over all folds; ``n_folds`` (int): folds with at least one case;
      * for every fold ``f`` found in ``results`` (ascending): ``fold{f}_mean_dice`` (mean over the fold's
        cases of ``(dice_1 + dice_2) / 2``), ``fold{f}_dice_1``, ``fold{f}_dice_2`` (case means),
        ``fold{f}_asymmetry`` (``|fold{f}_dice_1 - fold{f}_dice_2|``) and ``fold{f}_n_cases``; a fold the
        config lacks gets NaN values and ``n_cases`` 0 (and does not enter the mean over folds).

    Raises:
      InputError: no rows, a row missing a key, a Dice that is not a number in [0, 1], or a (config, fold, case) twice.
    """
    rows = _clean_rows(results)
    folds = sorted({r["fold"] for r in rows})
    configs = sorted({r["config"] for r in rows})
    table = []
    for cfg in configs:
        out: dict = {"rank": 0, "config": cfg, "architecture": EXPERIMENTS[cfg].architecture if cfg in EXPERIMENTS else ""}
        per_fold: dict = {}
        fold_means = []
        n_cases = 0
        for f in folds:
            sel = [r for r in rows if r["config"] == cfg and r["fold"] == f]
            if sel:
                d1 = float(np.mean([r["dice_1"] for r in sel]))
                d2 = float(np.mean([r["dice_2"] for r in sel]))
                md = float(np.mean([(r["dice_1"] + r["dice_2"]) / 2 for r in sel]))
                fold_means.append((md, d1, d2))
            else:
                d1 = d2 = md = float("nan")
            n_cases += len(sel)
            per_fold.update({f"fold{f}_mean_dice": md, f"fold{f}_dice_1": d1, f"fold{f}_dice_2": d2,
                             f"fold{f}_asymmetry": abs(d1 - d2), f"fold{f}_n_cases": len(sel)})
        md, d1, d2 = (float(np.mean([m[k] for m in fold_means])) for k in range(3))
        out.update({"mean_dice": md, "dice_1": d1, "dice_2": d2, "asymmetry": abs(d1 - d2),
                    "n_cases": n_cases, "n_folds": len(fold_means)})
        out.update(per_fold)
        table.append(out)
    table.sort(key=lambda r: (-r["mean_dice"], r["config"]))
    for i, r in enumerate(table, start=1):
        r["rank"] = i
    return table


def _case_means(rows: list[dict], config: str) -> dict[tuple, float]:
    return {(r["fold"], r["case"]): (r["dice_1"] + r["dice_2"]) / 2 for r in rows if r["config"] == config}


def paired_wilcoxon(results: Sequence[dict], configs: Sequence[str] | None = None, top: int = 3) -> list[dict]:
    """Two-sided Wilcoxon signed-rank tests of per-case mean Dice between pairs of configurations.

    Cases are paired by (fold, case); a case's value is ``(dice_1 + dice_2) / 2``; the test is
    ``scipy.stats.wilcoxon(a - b)`` with its defaults (two-sided, zero differences dropped, exact or normal
    p-value chosen by scipy). Degenerate pairs do not raise: fewer than 2 paired cases give
    ``statistic = p_value = nan``; all differences 0 give ``statistic = 0.0`` and ``p_value = 1.0``.

    Arguments:
      results (Sequence[dict]): evaluation rows as for :func:`rank_experiments`.
      configs (Sequence[str] | None): the configurations to compare (each must appear in ``results``);
        None: the ``top`` best by :func:`rank_experiments`.
      top (int): how many of the best-ranked configurations to compare when ``configs`` is None.

    Returns:
      list[dict]: one row per pair, ``a`` ranked above ``b``, pairs in rank order:
      ``{"a": str, "b": str, "n": int (paired cases), "median_diff": float (median of a - b; nan if
      n = 0), "statistic": float, "p_value": float}``.

    Raises:
      InputError: bad rows (see :func:`rank_experiments`) or a config without results.
    """
    from scipy.stats import wilcoxon

    rows = _clean_rows(results)
    ranking = rank_experiments(rows)
    order = [r["config"] for r in ranking]
    if configs is None:
        chosen = order[: max(0, int(top))]
    else:
        wanted = list(dict.fromkeys(str(c).strip() for c in configs))
        unknown = [c for c in wanted if c not in order]
        if unknown:
            raise InputError(f"no results for configuration(s) {', '.join(unknown)} "
                             f"(results have {', '.join(order)})")
        chosen = [c for c in order if c in wanted]
    out = []
    for a, b in combinations(chosen, 2):
        va, vb = _case_means(rows, a), _case_means(rows, b)
        keys = sorted(set(va) & set(vb), key=lambda k: (k[0], str(k[1])))
        diff = np.array([va[k] - vb[k] for k in keys], dtype=np.float64)
        n = len(keys)
        median = float(np.median(diff)) if n else float("nan")
        if n < 2:
            stat, p = float("nan"), float("nan")
        elif not np.any(diff != 0):
            stat, p = 0.0, 1.0
        else:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # small-sample / ties notices
                    res = wilcoxon(diff, alternative="two-sided")
                stat, p = float(res.statistic), float(res.pvalue)
            except ValueError:  # scipy refusing a degenerate sample
                stat, p = float("nan"), float("nan")
        out.append({"a": a, "b": b, "n": n, "median_diff": median, "statistic": stat, "p_value": p})
    return out


def _fmt(value, digits: int = 4) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _fmt_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.4f}"


def _markdown(ranking: list[dict], tests: list[dict], folds: list[int], top: int) -> str:
    head = ["Rank", "Config", "Mean Dice", "Dice territory 1", "Dice territory 2", "Asymmetry"]
    head += [f"Fold {f} mean Dice" for f in folds]
    lines = ["# Territory configurations ranked by mean Dice", "",
             "Mean Dice = (Dice territory 1 + Dice territory 2) / 2 per case, averaged over the cases of a "
             "fold, then over folds. Asymmetry = |Dice territory 1 - Dice territory 2|.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in ranking:
        cells = [str(r["rank"]), r["config"], _fmt(r["mean_dice"]), _fmt(r["dice_1"]), _fmt(r["dice_2"]),
                 _fmt(r["asymmetry"])] + [_fmt(r[f"fold{f}_mean_dice"]) for f in folds]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"## Paired Wilcoxon signed-rank tests (top {top}, per-case mean Dice, two-sided)", ""]
    if not tests:
        lines.append("Fewer than two configurations: no tests.")
    else:
        lines += ["| A | B | n | median diff (A - B) | statistic | p-value |", "|---|---|---|---|---|---|"]
        for t in tests:
            lines.append(f"| {t['a']} | {t['b']} | {t['n']} | {_fmt(t['median_diff'], 5)} | "
                         f"{_fmt(t['statistic'], 1)} | {_fmt_p(t['p_value'])} |")
        lines += ["", "n/a: fewer than 2 paired cases; p-value 1 when every paired difference is 0."]
    return "\n".join(lines) + "\n"


def _runs_markdown(runs: Sequence[dict] | None) -> str:
    if not runs:
        return ""
    lines = ["", "## Training runs", "",
             "| Config | Fold | Epochs run / planned | Best epoch | Minutes | Stopped by |", "|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (str(r.get("config", "")), int(r.get("fold", 0)))):
        planned = r.get("planned_epochs", "")
        lines.append(f"| {r.get('config', '')} | {r.get('fold', '')} | {r.get('epochs', '')} / {planned} | "
                     f"{r.get('best_epoch', '')} | {_fmt(float(r.get('minutes', float('nan'))), 2)} | "
                     f"{r.get('stopped_by', '')} |")
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _bar_chart(ranking: list[dict], path: Path) -> Path:
    from matplotlib.figure import Figure

    from irisseg.viz import COLOURS, save_figure

    names = [f"{r['rank']}. {r['config']}" for r in ranking]
    values = np.array([r["mean_dice"] for r in ranking], dtype=np.float64)
    fig = Figure(figsize=(8.0, 1.0 + 0.35 * len(ranking)), dpi=110)
    ax = fig.subplots()
    y = np.arange(len(ranking))
    ax.barh(y, values, color=COLOURS[0], height=0.7)
    for yi, v in zip(y, values):
        ax.annotate(f"{v:.4f}", (v, yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()  # rank 1 on top
    lo, hi = float(values.min()), float(values.max())
    pad = max(0.01, 0.25 * (hi - lo))  # zoom on the spread: Dice values of rival configs are close
    ax.set_xlim(max(0.0, lo - pad), min(1.0, hi + pad))
    ax.set_xlabel("mean Dice over folds ((territory 1 + territory 2) / 2)")
    ax.set_title("Territory configurations ranked by mean Dice", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(results: Sequence[dict], out_dir: str | os.PathLike, top: int = 3,
                 runs: Sequence[dict] | None = None) -> dict[str, Path]:
    """Write the ranking as CSV, markdown and a bar chart into ``out_dir`` (each file written atomically).

    * ``ranking.csv``: the rows of :func:`rank_experiments` (all columns, 6 significant digits);
    * ``ranking.md``: a table (rank, config, mean Dice, Dice territory 1 / 2, asymmetry, the mean Dice of
      each fold), then the table of :func:`paired_wilcoxon` between the ``top`` best configurations;
    * ``ranking.png``: horizontal bars of mean Dice per configuration, rank 1 on top (the x axis is zoomed
      on the spread of the values, so it does not start at 0).

    Arguments:
      results (Sequence[dict]): per-case evaluation rows (see :func:`rank_experiments`).
      out_dir (str | os.PathLike): output folder (created if missing).
      top (int): how many of the best configurations the Wilcoxon tests compare.
      runs (Sequence[dict] | None): the runs' ``done.json`` summaries (config, fold, epochs, planned_epochs,
        best_epoch, minutes, stopped_by); when given, ``ranking.md`` ends with a table of them, so a run cut
        short by its time budget is visible next to its score.

    Returns:
      dict[str, Path]: ``{"csv": ..., "markdown": ..., "png": ...}``.

    Raises:
      InputError: bad rows (see :func:`rank_experiments`).
    """
    from irisseg.io import write_csv

    rows = _clean_rows(results)
    ranking = rank_experiments(rows)
    tests = paired_wilcoxon(rows, top=top)
    folds = sorted({r["fold"] for r in rows})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "csv": write_csv(out / "ranking.csv", ranking, columns=list(ranking[0]), float_digits=6),
        "markdown": _write_text(out / "ranking.md", _markdown(ranking, tests, folds, top) + _runs_markdown(runs)),
        "png": _bar_chart(ranking, out / "ranking.png"),
    }
