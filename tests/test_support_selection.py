"""Support selection for in-context segmentation by retrieval: select_supports and 'irisseg segment --bank'."""

from __future__ import annotations

import numpy as np
import pytest

from irisseg.cli import main
from irisseg.data.findings import load_findings
from irisseg.data.synthetic import generate_dataset
from irisseg.errors import InputError
from irisseg.io import read_volume
from irisseg.models.embedding import EmbeddingConfig, EmbeddingNet, embed
from irisseg.retrieval import CaseIndex, build_index, model_grid, select_supports


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("bank")
    data = generate_dataset(root / "data", "findings", 8, shape=16, seed=11)
    torch.manual_seed(0)
    EmbeddingNet(EmbeddingConfig(channels=(4, 8), embedding_dim=16,
                                 extra={"retrieval": {"grid": [16, 16, 16]}})).save(root / "run" / "best")
    index = build_index(root / "run", data, root / "index")
    table = load_findings(data)
    # the finding carried by the most cases (at least 3, so that 2 supports exist besides the query)
    counts = table.labels.sum(0)
    label = table.names[int(np.argmax(counts))]
    assert counts.max() >= 3
    return {"data": data, "index": root / "index", "loaded": index, "table": table, "label": label}


def query_of(bank) -> tuple[str, object]:
    table, k = bank["table"], bank["table"].names.index(bank["label"])
    case = next(i for i in range(len(table)) if table.labels[i, k])
    return table.case_ids[case], table.image_paths[case][0]


def test_select_supports_picks_the_most_similar_cases_carrying_the_finding(bank):
    from irisseg.data.findings import retrieval_input
    from irisseg.retrieval import load_embedding_model

    index = CaseIndex.load(bank["index"])
    case_id, path = query_of(bank)
    query = read_volume(path)
    hits, value = select_supports(index, None, query, bank["label"], 2, query_paths=[path])
    assert value == bank["table"].label_values[bank["label"]] and value >= 1
    assert len(hits) == 2 and [h.rank for h in hits] == [1, 2]
    assert case_id not in [h.case_id for h in hits]  # a bank case never supports itself
    for h in hits:
        assert bank["label"] in h.findings and h.mask is not None
        assert (read_volume(h.mask).array == value).any()
    # brute force: cosine to every eligible case
    net, _, _ = load_embedding_model(index.model_info["model"])
    q = embed(net, [retrieval_input([query], model_grid(net))], batch_size=1)[0]
    k = index.names.index(bank["label"])
    eligible = [i for i in range(len(index)) if index.labels[i, k] and index.case_ids[i] != case_id]
    scores = index.vectors()[eligible] @ q
    expected = [index.case_ids[eligible[j]] for j in np.argsort(-scores, kind="stable")[:2]]
    assert [h.case_id for h in hits] == expected
    assert [h.score for h in hits] == pytest.approx(sorted(scores, reverse=True)[:2], abs=1e-4)


def test_select_supports_errors(bank):
    index = CaseIndex.load(bank["index"])
    _, path = query_of(bank)
    query = read_volume(path)
    with pytest.raises(InputError, match="not a finding of the index"):
        select_supports(index, None, query, "no_such_finding", 1)
    with pytest.raises(InputError, match="only .* case"):
        select_supports(index, None, query, bank["label"], 50)
    bare = CaseIndex(index.dim, index.names)
    bare.add(index.vectors(), index.case_ids, index.paths, index.labels)  # no masks, no label ids
    bare.model_info = dict(index.model_info)
    with pytest.raises(InputError, match="no label id"):
        select_supports(bare, None, query, bank["label"], 1)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_segment_with_retrieved_supports(capsys, bank, tmp_path):
    case_id, path = query_of(bank)
    out = tmp_path / "seg.nii.gz"
    code, stdout, err = run_cli(capsys, "segment", "--query", path, "--bank", bank["index"], "--label",
                                bank["label"], "--shots", "2", "--out", out)
    assert code == 0, err
    value = bank["table"].label_values[bank["label"]]
    query, seg = read_volume(path), read_volume(out)
    assert seg.array.shape == query.array.shape
    np.testing.assert_allclose(seg.spacing, query.spacing)
    np.testing.assert_allclose(seg.origin, query.origin)
    np.testing.assert_allclose(seg.direction, query.direction)
    assert set(np.unique(seg.array).tolist()) <= {0, value}
    chosen = stdout.split(" from ", 1)[1].split(";")[0]
    assert chosen.count("(") == 2 and case_id not in chosen


@pytest.mark.parametrize("extra, message", [
    (["--support", "x.nii.gz", "--support-mask", "y.nii.gz"], "--bank retrieves the supports"),
    ([], "needs one --label NAME"),
    (["--label", "a", "--label", "b"], "needs one --label NAME"),
])
def test_cli_bank_option_conflicts_are_one_line(capsys, bank, tmp_path, extra, message):
    _, path = query_of(bank)
    out = tmp_path / "seg.nii.gz"
    code, stdout, err = run_cli(capsys, "segment", "--query", path, "--bank", bank["index"], "--out", out, *extra)
    assert code == 2 and message in err and err.count("\n") == 1 and not out.exists()


def test_cli_label_names_need_a_bank(capsys, bank, tmp_path):
    _, path = query_of(bank)
    code, stdout, err = run_cli(capsys, "segment", "--query", path, "--support", path, "--support-mask", path,
                                "--label", bank["label"], "--out", tmp_path / "seg.nii.gz")
    assert code == 2 and "--bank" in err and err.count("\n") == 1
