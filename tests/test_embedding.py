"""Embedding network: shapes for any input size, unit norm, logits, batched embed(), save/load, gradients."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from irisseg.errors import InputError
from irisseg.models.embedding import EmbeddingConfig, EmbeddingNet, embed

TINY = dict(channels=(4, 8, 16, 32), embedding_dim=24)


def _net(seed: int = 0, **kw) -> EmbeddingNet:
    torch.manual_seed(seed)
    return EmbeddingNet(EmbeddingConfig(**{**TINY, **kw}))


@pytest.mark.parametrize("size", [(16, 16, 16), (24, 20, 32), (8, 8, 8), (9, 12, 8)])
def test_shapes_and_unit_norm_for_several_sizes_with_one_model(size):
    net = _net(in_channels=2, n_classes=3).eval()
    with torch.no_grad():
        out = net(torch.randn(3, 2, *size))
    assert set(out) == {"embedding", "logits"}
    assert out["embedding"].shape == (3, 24) and out["embedding"].dtype == torch.float32
    assert out["logits"].shape == (3, 3) and out["logits"].dtype == torch.float32
    torch.testing.assert_close(out["embedding"].norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    assert torch.isfinite(out["logits"]).all()


@pytest.mark.parametrize("concat_max_pool", [True, False])
def test_logits_absent_without_classes(concat_max_pool):
    net = _net(concat_max_pool=concat_max_pool).eval()
    assert net.classifier is None
    expected = TINY["channels"][-1] * (2 if concat_max_pool else 1)
    assert net.projection.in_features == expected
    with torch.no_grad():
        out = net(torch.randn(2, 1, 16, 16, 16))
    assert set(out) == {"embedding"}
    assert out["embedding"].shape == (2, 24)


def test_logits_read_the_features_before_normalisation():
    net = _net(n_classes=4).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        feats = net.features(x)
        out = net(x)
    torch.testing.assert_close(out["logits"], net.classifier(feats))
    torch.testing.assert_close(out["embedding"], feats / feats.norm(dim=1, keepdim=True))


def test_forward_rejects_wrong_channels_or_dims():
    net = _net(in_channels=2).eval()
    with pytest.raises(InputError, match="expected a"):
        net(torch.randn(1, 1, 16, 16, 16))
    with pytest.raises(InputError, match="expected a"):
        net(torch.randn(2, 16, 16, 16))


def test_config_validation_and_round_trip():
    cfg = EmbeddingConfig(channels=[4, 8], embedding_dim=16, n_classes=2, dropout=0.1)
    assert cfg.channels == (4, 8) and cfg.strides == (1, 2) and cfg.total_stride == 2
    assert EmbeddingConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad in (dict(channels=()), dict(embedding_dim=0), dict(n_classes=-1), dict(dropout=1.0)):
        with pytest.raises(InputError):
            EmbeddingConfig(**bad)
    with pytest.raises(InputError, match="unknown EmbeddingConfig"):
        EmbeddingNet(nope=1)


def test_embed_matches_batched_forward_and_handles_mixed_shapes():
    net = _net(n_classes=2).eval()
    gen = torch.Generator().manual_seed(1)
    same = torch.randn(5, 1, 16, 16, 16, generator=gen)
    with torch.no_grad():
        expected = net(same)["embedding"].numpy()
    # batch_size 2 splits the five volumes into 2 + 2 + 1; 3D numpy volumes get their channel axis added
    got = embed(net, [v[0].numpy() for v in same], batch_size=2)
    assert got.shape == (5, 24) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)

    other = torch.randn(1, 20, 12, 16, generator=gen)
    mixed = [same[0], other, same[1], same[2].numpy().astype(">f8")]  # big-endian float64 too
    got = embed(net, mixed, batch_size=8)
    with torch.no_grad():
        other_emb = net(other[None])["embedding"].numpy()[0]
    np.testing.assert_allclose(got[[0, 2, 3]], expected[[0, 1, 2]], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got[1], other_emb, atol=1e-5, rtol=0)
    assert embed(net, []).shape == (0, 24)


def test_embed_restores_training_mode_and_validates_input():
    net = _net().train()
    embed(net, [np.zeros((16, 16, 16), np.float32) + np.arange(16)], batch_size=1)
    assert net.training
    with pytest.raises(InputError, match="volume 1"):
        embed(net, [np.zeros((16, 16, 16)), np.zeros((16, 16))])
    with pytest.raises(InputError, match="channel"):
        embed(net, [np.zeros((2, 16, 16, 16))])
    bad = np.zeros((16, 16, 16))
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        embed(net, [bad])
    with pytest.raises(InputError, match="batch_size"):
        embed(net, [np.zeros((16, 16, 16))], batch_size=0)


def test_save_load_round_trip_gives_identical_embeddings(tmp_path):
    net = _net(seed=3, n_classes=2, dropout=0.2)
    x = [np.random.default_rng(0).normal(size=(1, 16, 16, 16)).astype(np.float32) for _ in range(2)]
    before = embed(net, x)
    net.save(tmp_path / "model", extra={"epoch": 7})
    assert json.loads((tmp_path / "model" / "config.json").read_text())["extra"] == {"epoch": 7}
    loaded = EmbeddingNet.load(tmp_path / "model")
    assert loaded.config.to_dict() == {**net.config.to_dict(), "extra": {"epoch": 7}}
    np.testing.assert_array_equal(embed(loaded, x), before)


def test_load_rejects_other_model_folders(tmp_path):
    from irisseg.models.unet import ResidualUNet, UNetConfig

    ResidualUNet(UNetConfig(channels=(4, 8))).save(tmp_path / "unet")
    with pytest.raises(InputError, match="not an EmbeddingNet config"):
        EmbeddingNet.load(tmp_path / "unet")


def test_gradients_reach_the_first_convolution_in_training_mode():
    net = _net(n_classes=3, dropout=0.1).train()
    out = net(torch.randn(2, 1, 16, 16, 16))
    target = torch.randn(2, 24)
    loss = (out["embedding"] * target).sum() + out["logits"].square().mean()
    loss.backward()
    grad = net.stages[0].conv1.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
