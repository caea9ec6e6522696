"""The FAISS case index: exact and IVF-PQ search, incremental adds, persistence, evaluation, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from irisseg.cli import main
from irisseg.data.synthetic import generate_dataset
from irisseg.errors import InputError
from irisseg.metrics import rank_by_similarity, retrieval_metrics
from irisseg.models.embedding import EmbeddingConfig, EmbeddingNet
from irisseg.retrieval import CASES_FILE, INDEX_FILE, META_FILE, VECTORS_FILE, CaseIndex, evaluate_index

faiss = pytest.importorskip("faiss")
faiss.omp_set_num_threads(1)
NAMES = ["a", "b", "c"]


def unit_rows(rng, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_index(rng, n: int, dim: int = 16, approximate: bool = False, start: int = 0):
    x = unit_rows(rng, n, dim)
    ids = [f"c{i}" for i in range(start, start + n)]
    labels = rng.integers(0, 2, (n, len(NAMES)))
    index = CaseIndex(dim, NAMES, approximate=approximate)
    index.add(x, ids, [f"/data/{c}_0000.nii.gz" for c in ids], labels)
    return index, x, ids, labels


def positions(index: CaseIndex, hits) -> list[list[int]]:
    return [[index.case_ids.index(h.case_id) for h in row] for row in hits]


def test_exact_search_equals_brute_force(rng):
    index, x, ids, labels = make_index(rng, 300)
    queries = unit_rows(rng, 20, 16)
    hits = index.search(queries, 10)
    assert positions(index, hits) == rank_by_similarity(queries, x, 10).tolist()
    np.testing.assert_allclose([[h.score for h in row] for row in hits],
                               np.sort(queries @ x.T, axis=1)[:, ::-1][:, :10], atol=1e-5)
    first = hits[0][0]
    assert first.rank == 1 and first.paths == [f"/data/{first.case_id}_0000.nii.gz"]
    assert first.findings == [n for n, v in zip(NAMES, labels[ids.index(first.case_id)]) if v]
    # leave-one-out: each stored vector searched without itself
    loo = index.search(x[:5], 4, exclude=[[c] for c in ids[:5]])
    assert positions(index, loo) == rank_by_similarity(x[:5], x, 4, exclude_self=np.arange(5)).tolist()
    assert [h.case_id for h in index.search(x[0], 2, exclude=ids[0])[0]] == [ids[i] for i in
                                                                          rank_by_similarity(x[:1], x, 3)[0, 1:]]
    assert len(index.search(x[:1], 1000)[0]) == 300  # k larger than the index: every case once
    with pytest.raises(InputError, match="nprobe applies to an approximate"):
        index.nprobe = 4


def test_add_then_search_finds_added_items_and_refuses_duplicates(rng):
    index, x, ids, labels = make_index(rng, 40)
    new = unit_rows(rng, 5, 16)
    index.add(new * 3.0, ["n0", "n1", "n2", "n3", "n4"], ["/data/n.nii.gz"] * 5, np.ones((5, 3)), names=NAMES)
    assert len(index) == 45
    hits = index.search(new, 1)
    assert [row[0].case_id for row in hits] == ["n0", "n1", "n2", "n3", "n4"]
    assert all(abs(row[0].score - 1) < 1e-5 for row in hits)  # stored L2-normalised
    with pytest.raises(InputError, match="already in the index: c3"):
        index.add(new[:1], ["c3"], ["/x.nii.gz"], np.zeros((1, 3)))
    with pytest.raises(InputError, match="given twice: z"):
        index.add(new[:2], ["z", "z"], ["/x.nii.gz"] * 2, np.zeros((2, 3)))
    with pytest.raises(InputError, match="differ from the index"):
        index.add(new[:1], ["y"], ["/x.nii.gz"], np.zeros((1, 3)), names=["a", "b", "d"])
    with pytest.raises(InputError, match="binary"):
        index.add(new[:1], ["y"], ["/x.nii.gz"], np.full((1, 3), 2))
    with pytest.raises(InputError, match="all zero"):
        index.add(np.zeros((1, 16)), ["y"], ["/x.nii.gz"], np.zeros((1, 3)))
    assert len(index) == 45  # failed adds changed nothing


def test_save_load_round_trip_is_identical(rng, tmp_path):
    index, x, ids, labels = make_index(rng, 60)
    queries = unit_rows(rng, 7, 16)
    folder = index.save(tmp_path / "idx")
    assert sorted(p.name for p in folder.iterdir()) == [CASES_FILE, INDEX_FILE, META_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no staging folder left behind
    loaded = CaseIndex.load(folder)
    assert loaded.case_ids == ids and loaded.paths == index.paths and loaded.names == NAMES
    np.testing.assert_array_equal(loaded.labels, labels)
    np.testing.assert_array_equal(loaded.vectors(), index.vectors())
    assert [[h.to_dict() for h in row] for row in loaded.search(queries, 5)] == \
           [[h.to_dict() for h in row] for row in index.search(queries, 5)]
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["kind"] == "exact" and meta["dim"] == 16 and meta["n_cases"] == 60 and meta["recall_at_10"] is None
    loaded.add(queries, [f"q{i}" for i in range(7)], ["/q.nii.gz"] * 7, np.zeros((7, 3)))
    loaded.save(folder)  # replaces the index in place
    assert len(CaseIndex.load(folder)) == 67 and [p.name for p in tmp_path.iterdir()] == ["idx"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a case index: refusing"):
        index.save(tmp_path / "other")


def test_approximate_index_measures_and_stores_recall(rng, tmp_path):
    index, x, ids, labels = make_index(rng, 2000, dim=32, approximate=True)
    assert index.kind == "ivfpq" and index.nlist == 51 and index.m == 8  # 4 sqrt(2000) capped at 2000 // 39
    assert 0 < index.recall_at_10 <= 1 and index.recall_queries == 1000
    folder = index.save(tmp_path / "ivf")
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["kind"] == "ivfpq" and meta["recall_at_10"] == index.recall_at_10 and meta["nbits"] == 8
    assert (folder / VECTORS_FILE).is_file()
    loaded = CaseIndex.load(folder)
    queries = x[:10]
    assert [[h.case_id for h in row] for row in loaded.search(queries, 5)] == \
           [[h.case_id for h in row] for row in index.search(queries, 5)]
    hit = loaded.search(queries[:1], 3)[0]
    assert hit[0].case_id == ids[0] and abs(hit[0].score - 1) < 1e-5  # re-scored with the exact vector
    loaded.nprobe = loaded.nlist  # every list visited: only the quantization error is left
    assert loaded.measure_recall() >= index.recall_at_10
    result = evaluate_index(loaded, ks=(1, 10))
    assert result["n_queries_total"] == 2000 and 0 <= result["map@10"] <= 1
    with pytest.raises(InputError, match="at least 256 cases.*exact index"):
        make_index(rng, 100, approximate=True)


def test_leave_one_out_evaluation_matches_the_metrics(rng):
    index, x, ids, labels = make_index(rng, 30)
    ranking = rank_by_similarity(x, x, 20, exclude_self=True)
    expected = retrieval_metrics(labels, labels, ranking, ks=(1, 3, 5, 10, 20), exclude_self=True)
    result = evaluate_index(index, ks=(1, 3, 5, 10, 20, 50))
    assert result["ks"] == [1, 3, 5, 10, 20] and result["mode"] == "leave-one-out"
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key


def test_loading_a_missing_or_corrupt_index_is_one_clear_error(rng, tmp_path):
    with pytest.raises(InputError, match="no such index folder"):
        CaseIndex.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a case index .*index.faiss, cases.json, meta.json missing"):
        CaseIndex.load(tmp_path / "empty")
    index, *_ = make_index(rng, 20)
    folder = index.save(tmp_path / "idx")
    good = (folder / INDEX_FILE).read_bytes()
    for broken in (b"not a faiss index at all", good[: len(good) // 2]):
        (folder / INDEX_FILE).write_bytes(broken)
        with pytest.raises(InputError, match="unreadable FAISS index") as err:
            CaseIndex.load(folder)
        assert "\n" not in str(err.value)
    (folder / INDEX_FILE).write_bytes(good)
    cases = json.loads((folder / CASES_FILE).read_text())
    (folder / CASES_FILE).write_text(json.dumps({"cases": cases["cases"][:-1]}))
    with pytest.raises(InputError, match="holds 20 vectors but cases.json 19"):
        CaseIndex.load(folder)
    (folder / META_FILE).write_text("{")
    with pytest.raises(InputError, match="unreadable JSON"):
        CaseIndex.load(folder)


# ---------------------------------------------------------------------------------------------------------
# command line, end to end on a tiny findings collection
# ---------------------------------------------------------------------------------------------------------
def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    first = generate_dataset(root / "first", "findings", 8, shape=16, seed=5)
    second = generate_dataset(root / "second", "findings", 8, shape=16, seed=6)
    torch_seed = 0
    import torch

    torch.manual_seed(torch_seed)
    model = EmbeddingNet(EmbeddingConfig(channels=(4, 8), embedding_dim=16,
                                         extra={"retrieval": {"grid": [16, 16, 16]}})).save(root / "run" / "best")
    return {"first": first, "second": second, "run": root / "run", "model": model, "root": root}


def test_cli_index_search_evaluate_and_add(capsys, collection, tmp_path):
    out = tmp_path / "index"
    code, stdout, err = run_cli(capsys, "retrieval", "index", "--model", collection["run"], "--data",
                                collection["first"], "--out", out)
    assert code == 0, err
    assert "cases indexed" in stdout and "exact" in stdout
    meta = json.loads((out / META_FILE).read_text())
    assert meta["n_cases"] == 8 and meta["dim"] == 16 and meta["grid"] == [16, 16, 16]
    assert meta["model"] == str(collection["model"].absolute()) and len(meta["model_sha256"]) == 64

    query = collection["first"] / "imagesTr" / "case_0003_0000.nii.gz"
    code, stdout, err = run_cli(capsys, "retrieval", "search", "--index", out, "--query", query, "-k", "5")
    assert code == 0, err
    assert "case_0003" in stdout and "cosine" in stdout
    code, stdout, err = run_cli(capsys, "retrieval", "search", "--index", out, "--query", query, "-k", "5", "--json")
    assert code == 0, err
    doc = json.loads(stdout)  # nothing but the JSON document on stdout
    assert len(doc["hits"]) == 5 and [h["rank"] for h in doc["hits"]] == [1, 2, 3, 4, 5]
    assert doc["hits"][0]["case_id"] == "case_0003" and doc["hits"][0]["score"] == pytest.approx(1, abs=1e-4)
    assert doc["hits"][0]["paths"] == [str(query.absolute())]
    label = collection["first"] / "labelsTr" / "case_0003.nii.gz"
    assert doc["hits"][0]["mask"] == str(label.absolute())
    assert set(doc["hits"][0]) == {"rank", "case_id", "score", "findings", "paths", "mask"}  # as documented
    code, stdout, err = run_cli(capsys, "retrieval", "search", "--index", out, "--query", query, "-k", "3", "--json",
                                "--exclude", "case_0003")
    assert code == 0, err
    assert "case_0003" not in [h["case_id"] for h in json.loads(stdout)["hits"]]

    code, stdout, err = run_cli(capsys, "retrieval", "evaluate", "--index", out, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["ks"] == [1, 3, 5] and result["mode"] == "leave-one-out"  # 7 other cases: k <= 7
    for key in ("precision@1", "recall@5", "map@3", "ndcg@5", "n_queries", "n_queries_without_relevant"):
        assert key in result
    code, stdout, err = run_cli(capsys, "retrieval", "evaluate", "--index", out)
    assert code == 0, err
    assert "mAP@k" in stdout and "NDCG@k" in stdout

    # --add: the second collection reuses the ids case_0000..: refused without a prefix, added with one
    code, stdout, err = run_cli(capsys, "retrieval", "index", "--model", collection["run"], "--data",
                                collection["second"], "--out", out, "--add")
    assert code == 2 and err.count("\n") == 1 and "--id-prefix" in err and stdout == ""
    code, stdout, err = run_cli(capsys, "retrieval", "index", "--model", collection["run"], "--data",
                                collection["second"], "--out", out, "--add", "--id-prefix", "b/")
    assert code == 0, err
    index = CaseIndex.load(out)
    assert len(index) == 16 and index.case_ids[8] == "b/case_0000"
    code, stdout, err = run_cli(capsys, "retrieval", "index", "--model", collection["run"], "--data",
                                collection["first"], "--out", out, "--add")  # already indexed: skipped
    assert code == 0, err
    assert len(CaseIndex.load(out)) == 16
    code, stdout, err = run_cli(capsys, "retrieval", "evaluate", "--index", out, "--data", collection["first"],
                                "--json")
    assert code == 0, err
    assert json.loads(stdout)["n_queries_total"] == 8 and json.loads(stdout)["mode"] == "queries"


def test_cli_bad_input_is_one_line_and_exit_2(capsys, collection, tmp_path):
    out = tmp_path / "index"
    assert run_cli(capsys, "retrieval", "index", "--model", collection["model"], "--data", collection["first"],
                   "--out", out)[0] == 0
    images = collection["first"] / "imagesTr"
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b garbage")
    nan_image = tmp_path / "nan.mha"
    arr = np.ones((16, 16, 16), np.float32)
    arr[3, 4, 5] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(nan_image))
    cases = [
        (["retrieval", "search", "--index", tmp_path / "missing", "--query", images / "case_0000_0000.nii.gz"],
         "no such index folder"),
        (["retrieval", "search", "--index", out, "--query", tmp_path / "nope.nii.gz"], "no such file"),
        (["retrieval", "search", "--index", out, "--query", corrupt], "corrupt.nii.gz"),
        (["retrieval", "search", "--index", out, "--query", images / "case_0000_0000.nii.gz", "--query",
          images / "case_0001_0000.nii.gz"], "takes 1 channel(s), got 2"),
        (["retrieval", "search", "--index", out, "--query", nan_image], "NaN"),
        (["retrieval", "evaluate", "--index", collection["first"]], "not a case index"),
        (["retrieval", "index", "--model", tmp_path / "nomodel", "--data", collection["first"], "--out",
          tmp_path / "new"], "no such model folder"),
        (["retrieval", "index", "--model", collection["model"], "--data", collection["first"], "--out",
          tmp_path / "new", "--approximate"], "exact index"),
    ]
    for args, message in cases:
        code, stdout, err = run_cli(capsys, *args)
        assert code == 2, (args, err)
        assert err.startswith("irisseg: error: ") and err.count("\n") == 1 and message in err, err
        assert stdout == ""
    assert not (tmp_path / "new").exists()  # nothing half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.nii.gz", "index", "nan.mha"]
