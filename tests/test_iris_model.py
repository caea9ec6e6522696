"""The IRIS model: shapes, pixel shuffle, cached task decoding, memory bank, persistence."""

from __future__ import annotations

import json

import pytest
import torch

from irisseg.errors import InputError
from irisseg.models.blocks import pixel_shuffle_3d, pixel_unshuffle_3d
from irisseg.models.iris import CONFIGS, IrisModel, build_iris, count_parameters
from irisseg.models.memory import ClassMemoryBank
from irisseg.models.task_encoding import TaskEmbedding, upsample_adjoint

TINY = dict(base_channels=4, embed_dim=16, num_heads=2, num_tokens=3, image_size=(16, 16, 16))


@pytest.fixture
def tiny() -> IrisModel:
    torch.manual_seed(0)
    return build_iris("iris-small", **TINY).eval()


def support(B=2, K=2, N=3, S=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, K, 1, S, S, S, generator=g)
    masks = (torch.rand(B, K, N, S, S, S, generator=g) > 0.8).float()
    return images, masks


def test_shapes_at_a_tiny_size(tiny):
    images, masks = support()
    task = tiny.encode_task(images, masks)
    assert task.tokens.shape == (2, 3, 3 + 1, 16)
    assert [tuple(p.shape) for p in task.prototypes] == [(2, 3, 2, 4), (2, 3, 2, 8), (2, 3, 2, 16), (2, 3, 2, 16)]
    logits = tiny.decode(torch.randn(2, 1, 16, 16, 16), task)
    assert logits.shape == (2, 3, 16, 16, 16)


def test_seed_default_shapes_on_meta_device():
    """iris-base at 128^3 (the seed's shapes) without running a real 128^3 forward."""
    with torch.device("meta"):
        model = build_iris("iris-base")
        x = torch.empty(1, 1, 128, 128, 128)
        feats = model.encoder(x)
        assert [tuple(f.shape[1:]) for f in feats] == [(32, 128, 128, 128), (64, 64, 64, 64), (128, 32, 32, 32), (256, 16, 16, 16)]
        task = model.encode_task(torch.empty(1, 2, 1, 128, 128, 128), torch.empty(1, 2, 2, 128, 128, 128))
        assert task.tokens.shape == (1, 2, 9, 256)
        logits = model.decode(x, task)
        assert logits.shape == (1, 2, 128, 128, 128)
    assert CONFIGS["iris-base"].embed_dim == 256 and CONFIGS["iris-base"].num_tokens == 8


def test_pixel_shuffle_inverts():
    x = torch.randn(2, 3 * 8, 4, 5, 6)
    y = pixel_shuffle_3d(x, 2)
    assert y.shape == (2, 3, 8, 10, 12)
    assert torch.equal(pixel_unshuffle_3d(y, 2), x)
    z = torch.randn(1, 2, 16, 8, 24)
    assert torch.equal(pixel_shuffle_3d(pixel_unshuffle_3d(z, 8), 8), z)
    # a channel of the shuffled map holds the r^3 sub-positions of one coarse voxel
    x = torch.arange(8.0).reshape(1, 8, 1, 1, 1)
    assert pixel_shuffle_3d(x, 2).flatten().tolist() == list(range(8))


def test_foreground_pooling_equals_upsampled_pooling():
    """The adjoint trick gives exactly the seed's pooling of trilinearly upsampled features."""
    torch.manual_seed(1)
    feats = torch.randn(2, 5, 3, 4, 2, dtype=torch.float64)
    mask = (torch.rand(2, 1, 24, 32, 16, dtype=torch.float64) > 0.6).double()
    up = torch.nn.functional.interpolate(feats, size=(24, 32, 16), mode="trilinear", align_corners=False)
    expected = (up * mask).sum((-3, -2, -1))
    w = upsample_adjoint(mask, (3, 4, 2))
    got = torch.einsum("bcdhw,bndhw->bnc", feats, w)[:, 0]
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(w.sum((-3, -2, -1)), mask.sum((-3, -2, -1)))


def test_decode_with_cached_task_equals_forward(tiny):
    images, masks = support(B=1, K=3, N=2)
    queries = torch.randn(3, 1, 16, 16, 16)
    with torch.no_grad():
        task = tiny.encode_task(images, masks)
        cached = tiny.decode(queries, task)  # one task, three queries
        for i in range(3):
            full = tiny(images, masks, queries[i : i + 1])
            torch.testing.assert_close(cached[i : i + 1], full, rtol=1e-5, atol=1e-5)


def test_multiclass_is_per_class(tiny):
    """Segmenting classes together equals segmenting each alone (one embedding per class)."""
    images, masks = support(B=1, K=2, N=3)
    q = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        together = tiny(images, masks, q)
        for n in range(3):
            alone = tiny(images, masks[:, :, n : n + 1], q)
            torch.testing.assert_close(together[:, n : n + 1], alone, rtol=1e-5, atol=1e-5)


def test_ensemble_is_mean_over_supports_and_ignores_empty(tiny):
    images, masks = support(B=1, K=2, N=1)
    with torch.no_grad():
        both = tiny.encode_task(images, masks)
        one = [tiny.encode_task(images[:, k : k + 1], masks[:, k : k + 1]) for k in range(2)]
        for a, b in zip(both.tensors(), TaskEmbedding.mean(one).tensors()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        empty = masks.clone()
        empty[:, 1] = 0
        only_first = tiny.encode_task(images, empty)
        for a, b in zip(only_first.tensors(), one[0].tensors()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_similarity_flag_changes_the_decoder():
    off = build_iris("iris-small", **TINY, use_similarity=False)
    on = build_iris("iris-small", **TINY)
    assert count_parameters(on)["decoder"] > count_parameters(off)["decoder"]
    images, masks = support(B=1, K=1, N=1)
    assert off(images, masks, torch.randn(1, 1, 16, 16, 16)).shape == (1, 1, 16, 16, 16)


def test_gradients_reach_every_parameter(tiny):
    tiny.train()
    images, masks = support(B=1, K=2, N=2)
    tiny(images, masks, torch.randn(1, 1, 16, 16, 16)).sum().backward()
    missing = [n for n, p in tiny.named_parameters() if p.grad is None]
    assert missing == []


def test_memory_bank_ema_arithmetic(tmp_path):
    bank = ClassMemoryBank(momentum=0.9)
    e1 = TaskEmbedding(torch.full((1, 1, 3, 4), 1.0), (torch.full((1, 1, 2, 2), 2.0),))
    e2 = TaskEmbedding(torch.full((1, 1, 3, 4), 3.0), (torch.full((1, 1, 2, 2), -2.0),))
    bank.update("liver", e1)
    assert torch.equal(bank.get("liver").tokens, e1.tokens)  # first observation as is
    bank.update("liver", e2)
    torch.testing.assert_close(bank.get("liver").tokens, torch.full((1, 1, 3, 4), 0.9 * 1 + 0.1 * 3))
    torch.testing.assert_close(bank.get("liver").prototypes[0], torch.full((1, 1, 2, 2), 0.9 * 2 - 0.1 * 2))
    bank.update("spleen", e2)
    assert bank.names() == ["liver", "spleen"] and bank.counts == {"liver": 2, "spleen": 1}
    assert bank.get(["spleen", "liver"]).tokens.shape == (1, 2, 3, 4)
    bank.save(tmp_path / "memory.safetensors")
    back = ClassMemoryBank.load(tmp_path / "memory.safetensors")
    assert back.momentum == 0.9 and back.counts == bank.counts
    torch.testing.assert_close(back.get("liver").tokens, bank.get("liver").tokens)
    with pytest.raises(InputError, match="'kidney' is not in the memory bank"):
        bank.get("kidney")
    assert ClassMemoryBank().momentum == 0.999


def test_save_load_round_trip(tiny, tmp_path):
    images, masks = support(B=1, K=1, N=1)
    with torch.no_grad():
        tiny.memory.update("blob", tiny.encode_task(images, masks))
        before = tiny(images, masks, images[:, 0])
    tiny.save(tmp_path / "run", extra={"note": "test"})
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "memory.safetensors", "model.safetensors"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["extra"]["note"] == "test"
    loaded = IrisModel.load(tmp_path / "run").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, masks, images[:, 0]), before)
    assert loaded.memory.names() == ["blob"]
    with pytest.raises(InputError, match="not a model folder"):
        IrisModel.load(tmp_path)


def test_input_size_must_be_multiple_of_8(tiny):
    with pytest.raises(ValueError, match="multiple of 8"):
        tiny.encoder(torch.randn(1, 1, 12, 16, 16))


# -- dense matching (propagated support masks) --------------------------------------------------------------
def test_matching_memory_shapes_and_values(tiny):
    images, masks = support(B=2, K=3, N=2)
    with torch.no_grad():
        task = tiny.encode_task(images, masks)
    L = 3 * 4**3  # K x (16 / 4)^3 at the matching scale (stride 4)
    assert task.keys.shape == (2, L, tiny.config.match_dim)
    assert task.values.shape == (2, 2, L)
    torch.testing.assert_close(task.keys.norm(dim=-1), torch.ones(2, L))
    # Values are the supports' foreground fractions on the 4^3 grid, support after support.
    frac = masks[0, 1, 1].reshape(4, 4, 4, 4, 4, 4).mean(dim=(1, 3, 5)).flatten()
    torch.testing.assert_close(task.values[0, 1, 64:128], frac)


def test_matching_readout_propagates_the_mask_to_an_identical_query(tiny):
    """A query identical to the support, with a sharp temperature, reads back the support's mask."""
    images, masks = support(B=1, K=1, N=1)
    with torch.no_grad():
        tiny.matcher.log_temperature.fill_(8.0)  # exp(8) ~ 3000: attention ~ nearest key
        task = tiny.encode_task(images, masks)
        r = tiny.matcher.readout(tiny.encoder(images[:, 0]), task.keys, task.values)
    assert r.shape == (1, 1, 4, 4, 4)
    torch.testing.assert_close(r.flatten(), task.values.flatten(), rtol=0, atol=1e-3)


def test_matching_is_used_and_can_be_dropped(tiny):
    images, masks = support(B=1, K=2, N=1)
    q = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        task = tiny.encode_task(images, masks)
        with_match = tiny.decode(q, task)
        without = tiny.decode(q, task.without_matching())
    assert with_match.shape == without.shape == (1, 1, 16, 16, 16)
    assert not torch.allclose(with_match, without)


def test_embedding_operations_keep_the_dense_memory(tiny):
    images, masks = support(B=1, K=2, N=3)
    with torch.no_grad():
        task = tiny.encode_task(images, masks)
        one = [tiny.encode_task(images[:, k : k + 1], masks[:, k : k + 1]) for k in range(2)]
    sel = task.select([2, 0])
    assert sel.keys is task.keys and torch.equal(sel.values, task.values[:, [2, 0]])
    joined = TaskEmbedding.cat([task.select([0]), task.select([1, 2])], dim=1)
    assert torch.equal(joined.values, task.values)
    pooled = TaskEmbedding.mean(one)  # supports pooled: keys joined along L, like encoding both at once
    torch.testing.assert_close(pooled.keys, task.keys)
    torch.testing.assert_close(pooled.values, task.values)
    assert task.expand_batch(3).keys.shape[0] == 3
    # Memory-bank entries never carry a support memory.
    bank = ClassMemoryBank()
    bank.update("a", task.select([0]))
    assert not bank.get("a").has_matching


def test_transfer_weights_grows_a_model_without_changing_it():
    from irisseg.models.iris import transfer_weights

    torch.manual_seed(0)
    old = build_iris("iris-small", **TINY, use_matching=False).eval()
    new = build_iris("iris-small", **TINY, use_matching=True).eval()
    report = transfer_weights(new, old.state_dict())
    assert report["grown"] and any(n.startswith("matcher.") for n in report["new"])
    images, masks = support(B=1, K=1, N=2)
    q = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = old(images, masks, q)
        got = new.decode(q, new.encode_task(images, masks).without_matching())
    torch.testing.assert_close(got, expected)
