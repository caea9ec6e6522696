"""Retrieval and multi-label classification metrics: hand-computed values, scikit-learn and torchmetrics
cross-checks, leave-one-out ranking, and input errors."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from irisseg.errors import InputError
from irisseg.metrics import classification_f1, rank_by_similarity, retrieval_metrics

# --------------------------------------------------------------------------------------------------------
# hand-computed example
#
# Labels over 3 classes. Gallery (G = 5):
#   g0 = [1,0,0]  g1 = [0,1,0]  g2 = [1,1,0]  g3 = [0,0,1]  g4 = [1,0,1]
# Queries (not part of the gallery, nothing excluded):
#   q0 = [1,0,0]: relevant g0 (J = 1/1), g2 (J = 1/2), g4 (J = 1/2); g1, g3 J = 0.          R = 3
#   q1 = [0,1,1]: relevant g1 (J = 1/2), g2 (J = 1/3), g3 (J = 1/2), g4 (J = 1/3); g0 J = 0. R = 4
#   q2 = [0,0,0]: nothing relevant, R = 0 -> left out of the means.
# Rankings:
#   q0: [1, 0, 3, 2, 4] -> rel [0, 1, 0, 1, 1], gains [0, 1, 0, 1/2, 1/2]
#   q1: [2, 0, 1, 4, 3] -> rel [1, 0, 1, 1, 1], gains [1/3, 0, 1/2, 1/3, 1/2]
#   q2: [0, 1, 2, 3, 4]
# Discounts 1 / log2(i + 1) for i = 1..5: d1 = 1, d2 = 1/log2(3), d3 = 1/2, d4 = 1/log2(5), d5 = 1/log2(6).

GALLERY = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1]])
QUERIES = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]])
RANKING = np.array([[1, 0, 3, 2, 4], [2, 0, 1, 4, 3], [0, 1, 2, 3, 4]])
D = [1 / math.log2(i + 1) for i in range(1, 6)]

EXPECTED_Q0 = {
    # hits in top 1 / 3 / 5: 0 / 1 / 3
    "precision@1": 0 / 1, "precision@3": 1 / 3, "precision@5": 3 / 5,
    "recall@1": 0 / 3, "recall@3": 1 / 3, "recall@5": 3 / 3,
    # P@i at the relevant ranks: P@2 = 1/2, P@4 = 2/4, P@5 = 3/5
    "map@1": 0 / min(1, 3),
    "map@3": (1 / 2) / min(3, 3),
    "map@5": (1 / 2 + 2 / 4 + 3 / 5) / min(5, 3),
    # DCG: 0; 1*d2; 1*d2 + 1/2*d4 + 1/2*d5.  Ideal gains [1, 1/2, 1/2, 0, 0]: IDCG@1 = 1,
    # IDCG@3 = IDCG@5 = 1 + 1/2*d2 + 1/2*d3
    "ndcg@1": 0 / 1,
    "ndcg@3": D[1] / (1 + D[1] / 2 + D[2] / 2),
    "ndcg@5": (D[1] + D[3] / 2 + D[4] / 2) / (1 + D[1] / 2 + D[2] / 2),
}
EXPECTED_Q1 = {
    # hits in top 1 / 3 / 5: 1 / 2 / 4
    "precision@1": 1 / 1, "precision@3": 2 / 3, "precision@5": 4 / 5,
    "recall@1": 1 / 4, "recall@3": 2 / 4, "recall@5": 4 / 4,
    # P@i at the relevant ranks: P@1 = 1, P@3 = 2/3, P@4 = 3/4, P@5 = 4/5
    "map@1": 1 / min(1, 4),
    "map@3": (1 + 2 / 3) / min(3, 4),
    "map@5": (1 + 2 / 3 + 3 / 4 + 4 / 5) / min(5, 4),
    # DCG: 1/3; 1/3 + 1/2*d3; 1/3 + 1/2*d3 + 1/3*d4 + 1/2*d5.  Ideal gains [1/2, 1/2, 1/3, 1/3, 0]:
    # IDCG@1 = 1/2, IDCG@3 = 1/2 + 1/2*d2 + 1/3*d3, IDCG@5 = IDCG@3 + 1/3*d4
    "ndcg@1": (1 / 3) / (1 / 2),
    "ndcg@3": (1 / 3 + D[2] / 2) / (1 / 2 + D[1] / 2 + D[2] / 3),
    "ndcg@5": (1 / 3 + D[2] / 2 + D[3] / 3 + D[4] / 2) / (1 / 2 + D[1] / 2 + D[2] / 3 + D[3] / 3),
}


def test_hand_computed_values_per_query_and_means():
    per = retrieval_metrics(QUERIES, GALLERY, RANKING, ks=(1, 3, 5), per_query=True)
    np.testing.assert_array_equal(per["n_relevant"], [3, 4, 0])
    for name, value in EXPECTED_Q0.items():
        assert per[name][0] == pytest.approx(value, abs=1e-12), name
        assert per[name][1] == pytest.approx(EXPECTED_Q1[name], abs=1e-12), name
        assert np.isnan(per[name][2]), name
    means = retrieval_metrics(QUERIES, GALLERY, RANKING, ks=(1, 3, 5))
    assert means["n_queries"] == 2 and means["n_queries_without_relevant"] == 1
    for name, value in EXPECTED_Q0.items():
        assert means[name] == pytest.approx((value + EXPECTED_Q1[name]) / 2, abs=1e-12), name
    assert set(means) == set(EXPECTED_Q0) | {"n_queries", "n_queries_without_relevant"}


def test_extra_ranking_columns_are_ignored_and_torch_inputs_work():
    torch = pytest.importorskip("torch")
    a = retrieval_metrics(QUERIES, GALLERY, RANKING, ks=(1, 3))
    b = retrieval_metrics(torch.as_tensor(QUERIES).bool(), torch.as_tensor(GALLERY).float(),
                          torch.as_tensor(RANKING), ks=[3, 1, 3])
    assert a == b


def test_no_query_with_a_relevant_item_gives_nan_means():
    out = retrieval_metrics(np.zeros((2, 3)), GALLERY, RANKING[:2], ks=(1,))
    assert out["n_queries"] == 0 and out["n_queries_without_relevant"] == 2
    assert math.isnan(out["precision@1"]) and math.isnan(out["ndcg@1"])


# --------------------------------------------------------------------------------------------------------
# leave-one-out on a random set, cross-checked against scikit-learn and torchmetrics


def _random_set(seed: int, n: int = 30, n_labels: int = 4, dim: int = 8):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, n_labels)) < 0.3).astype(np.int64)
    labels[0] = 0  # at least one case with no positive label (R = 0)
    emb = rng.normal(size=(n, dim))
    return labels, emb


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_leave_one_out_matches_sklearn_and_torchmetrics(seed):
    torch = pytest.importorskip("torch")
    tm = pytest.importorskip("torchmetrics.functional.retrieval")
    sk = pytest.importorskip("sklearn.metrics")
    labels, emb = _random_set(seed)
    n = len(labels)
    ks = (1, 3, 5, 10, 20, n - 1)
    ranking = rank_by_similarity(emb, emb, k=n - 1, exclude_self=True)
    per = retrieval_metrics(labels, labels, ranking, ks=ks, exclude_self=True, per_query=True)
    checked = 0
    for i in range(n):
        others = np.array([j for j in range(n) if j != i])
        gains = np.array([_jaccard(labels[i] > 0, labels[j] > 0) for j in others])
        relevant = gains > 0
        assert per["n_relevant"][i] == relevant.sum()
        if not relevant.any():
            assert all(np.isnan(per[f"{m}@{k}"][i]) for m in ("precision", "recall", "map", "ndcg")
                       for k in ks)
            continue
        checked += 1
        # scores that induce our ranking (all positive: torchmetrics ignores items scored <= 0)
        score = np.empty(n - 1)
        pos = {g: p for p, g in enumerate(ranking[i])}
        for col, g in enumerate(others):
            score[col] = float(n - pos[g])
        preds, target = torch.as_tensor(score), torch.as_tensor(relevant)
        graded = torch.as_tensor(gains)
        for k in ks:
            tm_precision = float(tm.retrieval_precision(preds, target, top_k=k))
            tm_recall = float(tm.retrieval_recall(preds, target, top_k=k))
            tm_ndcg = float(tm.retrieval_normalized_dcg(preds, graded, top_k=k))
            # scikit-learn: same log2(i + 1) discount (ranks from 1) and ideal DCG over every column of y_true
            sk_ndcg = sk.ndcg_score(gains[None], score[None], k=k)
            assert per[f"precision@{k}"][i] == pytest.approx(tm_precision, abs=1e-6)
            assert per[f"recall@{k}"][i] == pytest.approx(tm_recall, abs=1e-6)
            assert per[f"ndcg@{k}"][i] == pytest.approx(tm_ndcg, abs=1e-6)
            assert per[f"ndcg@{k}"][i] == pytest.approx(sk_ndcg, abs=1e-6)
        # torchmetrics' AP with top_k divides by the relevant items found in the top k, ours by min(k, R):
        # the two coincide only when the top k holds every candidate (k = G - 1 here), so compare there.
        k = n - 1
        tm_ap = float(tm.retrieval_average_precision(preds, target, top_k=k))
        assert per[f"map@{k}"][i] == pytest.approx(tm_ap, abs=1e-6)
    assert checked >= 10
    assert per["n_relevant"][0] == 0


def test_exclude_self_as_index_array_equals_leave_one_out_on_a_subset():
    labels, emb = _random_set(3)
    subset = np.array([4, 9, 17])
    full = retrieval_metrics(labels, labels, rank_by_similarity(emb, emb, 10, exclude_self=True),
                             ks=(1, 5, 10), exclude_self=True, per_query=True)
    ranking = rank_by_similarity(emb[subset], emb, 10, exclude_self=subset)
    part = retrieval_metrics(labels[subset], labels, ranking, ks=(1, 5, 10), exclude_self=subset,
                             per_query=True)
    for name, values in part.items():
        np.testing.assert_array_equal(values, full[name][subset])


# --------------------------------------------------------------------------------------------------------
# rank_by_similarity


def test_rank_by_similarity_excludes_self_and_returns_the_true_top_k():
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(25, 6)).astype(np.float32)
    k = 7
    ranking = rank_by_similarity(emb, emb, k, exclude_self=True)
    assert ranking.shape == (25, k) and ranking.dtype == np.int64
    scores = emb.astype(np.float64) @ emb.astype(np.float64).T
    for i in range(25):
        assert i not in ranking[i]
        assert len(set(ranking[i])) == k
        others = np.delete(scores[i], i)
        np.testing.assert_allclose(scores[i, ranking[i]], np.sort(others)[::-1][:k], rtol=0, atol=1e-12)
    # without exclusion every item finds itself first (its norm is the largest inner product it has here)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    np.testing.assert_array_equal(rank_by_similarity(unit, unit, 1)[:, 0], np.arange(25))


def test_rank_by_similarity_breaks_ties_by_index():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_array_equal(rank_by_similarity(np.array([[1.0, 0.0]]), gallery, 4), [[0, 2, 3, 1]])
    loo = rank_by_similarity(gallery, gallery, 2, exclude_self=True)
    np.testing.assert_array_equal(loo[[0, 2]], [[2, 3], [0, 3]])


def test_rank_by_similarity_errors():
    emb = np.zeros((4, 3))
    with pytest.raises(InputError, match="k must be"):
        rank_by_similarity(emb, emb, 4, exclude_self=True)
    with pytest.raises(InputError, match="k must be"):
        rank_by_similarity(emb, emb, 0)
    with pytest.raises(InputError, match="same E"):
        rank_by_similarity(emb, np.zeros((4, 2)), 1)
    with pytest.raises(InputError, match="exclude_self=True"):
        rank_by_similarity(emb[:2], emb, 1, exclude_self=True)
    with pytest.raises(InputError, match="exclude_self"):
        rank_by_similarity(emb[:2], emb, 1, exclude_self=np.array([0, 4]))
    bad = emb.copy()
    bad[1, 1] = np.nan
    with pytest.raises(InputError, match="finite"):
        rank_by_similarity(bad, emb, 1)


def test_retrieval_metrics_errors():
    with pytest.raises(InputError, match="binary"):
        retrieval_metrics(QUERIES * 2, GALLERY, RANKING)
    with pytest.raises(InputError, match="same number of classes"):
        retrieval_metrics(QUERIES[:, :2], GALLERY, RANKING, ks=(1,))
    with pytest.raises(InputError, match="fewer than the largest cutoff"):
        retrieval_metrics(QUERIES, GALLERY, RANKING, ks=(1, 10))
    with pytest.raises(InputError, match="gallery indices in"):
        retrieval_metrics(QUERIES, GALLERY, RANKING + 1, ks=(5,))
    with pytest.raises(InputError, match="repeat"):
        retrieval_metrics(QUERIES, GALLERY, np.array([[0, 0, 1]] * 3), ks=(2,))
    with pytest.raises(InputError, match="excluded item"):
        retrieval_metrics(GALLERY, GALLERY, np.tile(np.arange(5), (5, 1)), ks=(2,), exclude_self=True)
    with pytest.raises(InputError, match="positive integer"):
        retrieval_metrics(QUERIES, GALLERY, RANKING, ks=(0, 1))
    with pytest.raises(InputError, match="integer gallery"):
        retrieval_metrics(QUERIES, GALLERY, RANKING.astype(float), ks=(1,))


# --------------------------------------------------------------------------------------------------------
# classification F1


def test_f1_hand_computed():
    # class 0: TP 1, FP 1, FN 0 -> 2/3; class 1: TP 0, FP 0, FN 1 -> 0;
    # class 2: nothing predicted and nothing true -> 0 (zero_division)
    pred = np.array([[1, 0, 0], [1, 0, 0]])
    target = np.array([[1, 1, 0], [0, 0, 0]])
    out = classification_f1(pred, target)
    np.testing.assert_allclose(out["per_class_f1"], [2 / 3, 0.0, 0.0])
    np.testing.assert_array_equal(out["support"], [1, 1, 0])
    assert out["micro_f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))  # summed TP 1, FP 1, FN 1
    assert out["macro_f1"] == pytest.approx((2 / 3) / 3)
    assert out["weighted_f1"] == pytest.approx((2 / 3 * 1 + 0 * 1) / 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1_matches_sklearn(seed):
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    target = (rng.random((40, 6)) < 0.3).astype(int)
    pred = np.where(rng.random((40, 6)) < 0.8, target, 1 - target)
    target[:, 4] = 0
    pred[:, 4] = 0  # no predicted and no true positive: F1 = 0
    target[:, 5] = 0  # predictions without any truth: F1 = 0
    out = classification_f1(pred, target.astype(bool))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for average in ("micro", "macro", "weighted", None):
            expected = sk.f1_score(target, pred, average=average, zero_division=0)
            got = out["per_class_f1"] if average is None else out[f"{average}_f1"]
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    empty = classification_f1(np.zeros((3, 2)), np.zeros((3, 2)))
    assert empty["micro_f1"] == empty["macro_f1"] == empty["weighted_f1"] == 0.0


def test_f1_errors():
    with pytest.raises(InputError, match="same shape"):
        classification_f1(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(InputError, match="binary"):
        classification_f1(np.full((3, 2), 0.5), np.zeros((3, 2)))
    with pytest.raises(InputError, match="2-D"):
        classification_f1(np.zeros(3), np.zeros(3))
    with pytest.raises(InputError, match="at least one case"):
        classification_f1(np.zeros((0, 2)), np.zeros((0, 2)))
