"""Territory experiment registry, ranking, paired Wilcoxon tests and the written report."""

from __future__ import annotations

import csv
import math
import random

import numpy as np
import pytest
from scipy.stats import wilcoxon

from irisseg.errors import InputError
from irisseg.losses import TerritoryLoss
from irisseg.territories import (
    EXPERIMENTS,
    TerritoryExperiment,
    get_experiment,
    paired_wilcoxon,
    rank_experiments,
    resolve_experiments,
    write_report,
)

NAMES = [
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
]

# ---- registry ----------------------------------------------------------------------------------------------


def test_exactly_the_14_names_in_order():
    assert list(EXPERIMENTS) == NAMES
    assert all(isinstance(e, TerritoryExperiment) and e.name == n for n, e in EXPERIMENTS.items())


@pytest.mark.parametrize("name", NAMES)
def test_parse_consistent_with_name(name):
    e = EXPERIMENTS[name]
    parts = name.split("_")
    expected_arch = ("shared" if parts[0] == "SharedDecoder"
                     else "cross_attention" if "CrossAttention" in parts else "separate")
    assert e.architecture == expected_arch
    assert e.complementary == ("ComplementaryLoss" in parts)
    assert e.multiscale == ("MultiScale" in parts)
    assert e.adaptive == ("AdaptiveWeighting" in parts)
    assert e.spatial == ("SpatialLoss" in parts or e.multiscale or e.adaptive)
    loss = e.loss()
    assert isinstance(loss, TerritoryLoss)
    assert (loss.spatial, loss.complementary, loss.multiscale, loss.adaptive) == (
        e.spatial, e.complementary, e.multiscale, e.adaptive)
    assert loss.weight == pytest.approx(0.1)
    assert "\n" not in e.description and "BCE + Dice" in e.description


def test_specific_configurations():
    e = get_experiment("SeparateDecoders_CrossAttention_SpatialLoss")
    assert (e.architecture, e.spatial, e.complementary, e.multiscale, e.adaptive) == (
        "cross_attention", True, False, False, False)
    e = get_experiment("SharedDecoder_SpatialLoss_AdaptiveWeighting")
    assert (e.architecture, e.spatial, e.adaptive, e.multiscale) == ("shared", True, True, False)
    assert "adaptive" in e.description
    e = get_experiment("SeparateDecoders_SpatialLoss_ComplementaryLoss")
    assert (e.architecture, e.spatial, e.complementary) == ("separate", True, True)
    assert sum(x.architecture == "shared" for x in EXPERIMENTS.values()) == 6
    assert sum(x.architecture == "separate" for x in EXPERIMENTS.values()) == 4
    assert sum(x.architecture == "cross_attention" for x in EXPERIMENTS.values()) == 4


def test_unknown_name_lists_valid_names():
    with pytest.raises(InputError) as info:
        get_experiment("SharedDecoder_FancyLoss")
    message = str(info.value)
    assert "SharedDecoder_FancyLoss" in message
    assert all(n in message for n in NAMES)
    assert "\n" not in message
    assert get_experiment(" shareddecoder ").name == "SharedDecoder"


def test_resolve_experiments():
    assert [e.name for e in resolve_experiments(None)] == NAMES
    got = resolve_experiments("SeparateDecoders, SharedDecoder_SpatialLoss,SeparateDecoders")
    assert [e.name for e in got] == ["SeparateDecoders", "SharedDecoder_SpatialLoss"]
    got = resolve_experiments(["SharedDecoder", "SeparateDecoders_CrossAttention,SharedDecoder_ComplementaryLoss"])
    assert [e.name for e in got] == ["SharedDecoder", "SeparateDecoders_CrossAttention",
                                     "SharedDecoder_ComplementaryLoss"]
    with pytest.raises(InputError, match="SharedDecoder"):
        resolve_experiments("SharedDecoder,Nope")
    with pytest.raises(InputError):
        resolve_experiments(" , ")


# ---- ranking -----------------------------------------------------------------------------------------------

# (dice_1, dice_2) per (config, fold, case)
DICE = {
    "SharedDecoder": {
        0: {"c1": (0.90, 0.80), "c2": (0.80, 0.70), "c3": (0.70, 0.90)},
        1: {"c4": (0.95, 0.85), "c5": (0.85, 0.75), "c6": (0.90, 0.80)},
    },
    "SeparateDecoders": {
        0: {"c1": (0.92, 0.86), "c2": (0.84, 0.78), "c3": (0.88, 0.82)},
        1: {"c4": (0.92, 0.90), "c5": (0.80, 0.70), "c6": (0.85, 0.80)},
    },
}


def _rows(dice=DICE, shuffle_seed: int | None = 0) -> list[dict]:
    rows = [{"config": cfg, "fold": fold, "case": case, "dice_1": d1, "dice_2": d2}
            for cfg, folds in dice.items() for fold, cases in folds.items() for case, (d1, d2) in cases.items()]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    return rows


def test_rank_experiments_hand_values():
    table = rank_experiments(_rows())
    assert [r["config"] for r in table] == ["SeparateDecoders", "SharedDecoder"]
    assert [r["rank"] for r in table] == [1, 2]
    sep, shared = table
    # SharedDecoder, fold 0: dice_1 (.9+.8+.7)/3 = .8, dice_2 (.8+.7+.9)/3 = .8
    #                fold 1: dice_1 (.95+.85+.9)/3 = .9, dice_2 (.85+.75+.8)/3 = .8
    assert shared["fold0_dice_1"] == pytest.approx(0.8)
    assert shared["fold0_dice_2"] == pytest.approx(0.8)
    assert shared["fold0_mean_dice"] == pytest.approx(0.8)
    assert shared["fold0_asymmetry"] == pytest.approx(0.0, abs=1e-12)
    assert shared["fold1_mean_dice"] == pytest.approx(0.85)
    assert shared["fold1_asymmetry"] == pytest.approx(0.1)
    assert shared["dice_1"] == pytest.approx(0.85)
    assert shared["dice_2"] == pytest.approx(0.8)
    assert shared["mean_dice"] == pytest.approx(0.825)
    assert shared["asymmetry"] == pytest.approx(0.05)
    # SeparateDecoders, fold 0: dice_1 2.64/3 = .88, dice_2 2.46/3 = .82 -> .85
    #                   fold 1: dice_1 2.57/3, dice_2 2.4/3 = .8
    assert sep["fold0_mean_dice"] == pytest.approx(0.85)
    assert sep["fold1_dice_1"] == pytest.approx(2.57 / 3)
    assert sep["fold1_mean_dice"] == pytest.approx((2.57 / 3 + 0.8) / 2)
    assert sep["dice_1"] == pytest.approx((0.88 + 2.57 / 3) / 2)
    assert sep["dice_2"] == pytest.approx(0.81)
    assert sep["mean_dice"] == pytest.approx(((0.88 + 2.57 / 3) / 2 + 0.81) / 2)
    assert sep["asymmetry"] == pytest.approx((0.88 + 2.57 / 3) / 2 - 0.81)
    for r in table:
        assert r["n_cases"] == 6 and r["n_folds"] == 2
        assert r["fold0_n_cases"] == 3 and r["fold1_n_cases"] == 3
        assert r["architecture"] == EXPERIMENTS[r["config"]].architecture
        assert r["mean_dice"] == pytest.approx((r["dice_1"] + r["dice_2"]) / 2)


def test_rank_follows_the_results_and_breaks_ties_by_name():
    # lower SeparateDecoders' fold-1 scores: the order flips
    worse = {k: {f: dict(c) for f, c in v.items()} for k, v in DICE.items()}
    worse["SeparateDecoders"][1] = {"c4": (0.5, 0.5), "c5": (0.5, 0.5), "c6": (0.5, 0.5)}
    assert [r["config"] for r in rank_experiments(_rows(worse))] == ["SharedDecoder", "SeparateDecoders"]
    # identical scores: alphabetical
    same = {"b_config": DICE["SharedDecoder"], "a_config": DICE["SharedDecoder"]}
    table = rank_experiments(_rows(same))
    assert [(r["rank"], r["config"]) for r in table] == [(1, "a_config"), (2, "b_config")]
    assert table[0]["architecture"] == ""


def test_missing_fold_and_bad_rows():
    rows = _rows(shuffle_seed=None)
    rows = [r for r in rows if not (r["config"] == "SharedDecoder" and r["fold"] == 1)]
    shared = next(r for r in rank_experiments(rows) if r["config"] == "SharedDecoder")
    assert shared["n_folds"] == 1 and shared["n_cases"] == 3
    assert math.isnan(shared["fold1_mean_dice"]) and shared["fold1_n_cases"] == 0
    assert shared["mean_dice"] == pytest.approx(0.8)
    with pytest.raises(InputError, match="no evaluation results"):
        rank_experiments([])
    with pytest.raises(InputError, match="dice_2"):
        rank_experiments([{"config": "x", "fold": 0, "case": 1, "dice_1": 0.5}])
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        rank_experiments([{"config": "x", "fold": 0, "case": 1, "dice_1": float("nan"), "dice_2": 0.5}])
    with pytest.raises(InputError, match="twice"):
        rank_experiments(_rows() + _rows()[:1])


# ---- Wilcoxon ----------------------------------------------------------------------------------------------


def _case_means(rows, config):
    return {(r["fold"], r["case"]): (r["dice_1"] + r["dice_2"]) / 2 for r in rows if r["config"] == config}


def test_wilcoxon_matches_scipy():
    rows = _rows()
    tests = paired_wilcoxon(rows)
    assert len(tests) == 1
    t = tests[0]
    assert (t["a"], t["b"], t["n"]) == ("SeparateDecoders", "SharedDecoder", 6)
    a, b = _case_means(rows, "SeparateDecoders"), _case_means(rows, "SharedDecoder")
    keys = sorted(a)
    x, y = np.array([a[k] for k in keys]), np.array([b[k] for k in keys])
    ref = wilcoxon(x, y, alternative="two-sided")
    assert t["p_value"] == pytest.approx(float(ref.pvalue), rel=1e-9)
    assert t["statistic"] == pytest.approx(float(ref.statistic))
    # differences .04 .06 .05 .01 -.05 -.025: median (.01 + .04) / 2
    assert t["median_diff"] == pytest.approx(0.025)


def test_wilcoxon_top_and_degenerate_pairs():
    dice = {"A": DICE["SeparateDecoders"], "B": DICE["SharedDecoder"], "C": DICE["SharedDecoder"],
            "D": {9: {"z": (0.1, 0.1)}}}
    rows = _rows(dice)
    tests = paired_wilcoxon(rows, top=3)
    assert [(t["a"], t["b"]) for t in tests] == [("A", "B"), ("A", "C"), ("B", "C")]
    same = tests[2]  # B and C are identical: every difference 0
    assert same["n"] == 6 and same["p_value"] == 1.0 and same["statistic"] == 0.0
    assert same["median_diff"] == 0.0
    # D shares no case with A: n = 0, NaN
    alone = paired_wilcoxon(rows, configs=["D", "A"])
    assert [(t["a"], t["b"], t["n"]) for t in alone] == [("A", "D", 0)]
    assert math.isnan(alone[0]["p_value"]) and math.isnan(alone[0]["median_diff"])
    assert paired_wilcoxon(rows, top=1) == []
    with pytest.raises(InputError, match="no results"):
        paired_wilcoxon(rows, configs=["A", "SharedDecoder"])


# ---- report ------------------------------------------------------------------------------------------------


def test_write_report(tmp_path):
    dice = dict(DICE)
    dice["SeparateDecoders_CrossAttention"] = {0: {"c1": (0.5, 0.6), "c2": (0.6, 0.6), "c3": (0.7, 0.5)},
                                               1: {"c4": (0.6, 0.6), "c5": (0.5, 0.5), "c6": (0.6, 0.7)}}
    rows = _rows(dice)
    out = write_report(rows, tmp_path / "report")
    assert set(out) == {"csv", "markdown", "png"}
    names = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert names == ["ranking.csv", "ranking.md", "ranking.png"]  # no temporary files left
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    order = ["SeparateDecoders", "SharedDecoder", "SeparateDecoders_CrossAttention"]
    with out["csv"].open() as f:
        table = list(csv.DictReader(f))
    assert [r["config"] for r in table] == order
    assert [int(r["rank"]) for r in table] == [1, 2, 3]
    assert float(table[1]["mean_dice"]) == pytest.approx(0.825)
    assert "fold1_mean_dice" in table[0]

    md = out["markdown"].read_text()
    ranking_lines = [line for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [line.split("|")[2].strip() for line in ranking_lines] == order
    assert "Dice territory 1" in md and "Fold 1 mean Dice" in md
    assert "0.8250" in ranking_lines[1]
    assert "Wilcoxon" in md
    assert "| SeparateDecoders | SharedDecoder | 6 |" in md
