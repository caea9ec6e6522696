"""Dual-channel territory networks: shapes in 2D and 3D, decoder independence, save/load, config errors."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from irisseg.errors import InputError
from irisseg.models.iris import count_parameters
from irisseg.models.territories import TerritoryNet, TerritoryNetConfig
from irisseg.models.unet import ResidualUNet, UNetConfig

TINY = dict(channels=(8, 16, 32), attention_heads=8)
ARCHS = TerritoryNet.ARCHITECTURES


def _net(architecture: str, seed: int = 0, **kw) -> TerritoryNet:
    torch.manual_seed(seed)
    return TerritoryNet(TerritoryNetConfig(architecture=architecture, **{**TINY, **kw}))


@pytest.mark.parametrize("architecture", ARCHS)
@pytest.mark.parametrize(
    "spatial_dims, in_channels, size", [(2, 4, (37, 45)), (3, 3, (12, 20, 18)), (2, 4, (16, 16))]
)
def test_two_channel_logits_at_the_input_size(architecture, spatial_dims, in_channels, size):
    net = _net(architecture, spatial_dims=spatial_dims, in_channels=in_channels).eval()
    with torch.no_grad():
        out = net(torch.randn(2, in_channels, *size))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 2, *size)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[:, 0], out[:, 1])  # two distinct territories, not one copied map


def test_wrong_input_shape_is_rejected():
    net = _net("separate").eval()
    with pytest.raises(ValueError, match="expected a"):
        net(torch.randn(1, 3, 16, 16))  # 3 channels for a 4-channel network
    with pytest.raises(ValueError, match="expected a"):
        net(torch.randn(1, 4, 8, 16, 16))  # a volume for a 2D network


def _grads(net: TerritoryNet, output: torch.Tensor, prefix: str) -> list[torch.Tensor | None]:
    params = [p for name, p in net.named_parameters() if name.startswith(prefix)]
    assert params, prefix
    return list(torch.autograd.grad(output, params, retain_graph=True, allow_unused=True))


def _is_zero(grads) -> bool:
    return all(g is None or not g.any() for g in grads)


@pytest.mark.parametrize("architecture", ["separate", "cross_attention"])
def test_separate_decoders_are_independent_and_the_encoder_is_shared(architecture):
    net = _net(architecture).eval()
    out = net(torch.randn(2, 4, 16, 16))
    ch0, ch1 = out[:, 0].square().sum(), out[:, 1].square().sum()
    # path 2 keeps no encoder of its own: one encoder, read by both territories
    assert not hasattr(net.path2, "encoder")
    assert not any(name.startswith("path2.encoder") for name in net.state_dict())
    assert not _is_zero(_grads(net, ch0, "path1.encoder")) and not _is_zero(_grads(net, ch1, "path1.encoder"))
    # each decoder path (up-sampling, decoder levels, head) feeds its own channel only
    for prefix in ("upsample", "decoder", "head"):
        assert _is_zero(_grads(net, ch0, f"path2.{prefix}")), prefix
        assert _is_zero(_grads(net, ch1, f"path1.{prefix}")), prefix
        assert not _is_zero(_grads(net, ch0, f"path1.{prefix}")), prefix
        assert not _is_zero(_grads(net, ch1, f"path2.{prefix}")), prefix
    if architecture == "cross_attention":  # the bottleneck blocks talk to each other through attention
        for path in ("bottleneck1", "bottleneck2"):
            assert not _is_zero(_grads(net, ch0, path)) and not _is_zero(_grads(net, ch1, path)), path


def test_shared_decoder_feeds_both_channels():
    net = _net("shared").eval()
    out = net(torch.randn(2, 4, 16, 16))
    assert net.unet.head.out_channels == 2
    for ch in (out[:, 0].sum(), out[:, 1].sum()):
        assert not _is_zero(_grads(net, ch, "unet.decoder"))


@pytest.mark.parametrize("architecture", ARCHS)
def test_save_load_round_trip_gives_identical_outputs(tmp_path, architecture):
    net = _net(architecture, seed=3, spatial_dims=3, in_channels=2).eval()
    folder = net.save(tmp_path / "model", extra={"epoch": 7})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == architecture and cfg["channels"] == [8, 16, 32]
    assert cfg["extra"] == {"epoch": 7}
    loaded = TerritoryNet.load(folder).eval()
    assert loaded.config == replace(net.config, extra={"epoch": 7}) and loaded.config.channels == (8, 16, 32)
    x = torch.randn(1, 2, 9, 12, 10)
    with torch.no_grad():
        assert torch.equal(net(x), loaded(x))


def test_load_rejects_other_folders(tmp_path):
    # weights of another architecture
    folder = _net("separate").save(tmp_path / "sep")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architecture": "cross_attention"}))
    with pytest.raises(InputError, match="cannot load weights"):
        TerritoryNet.load(folder)
    # a plain U-Net folder, an invalid config, a missing folder
    unet = ResidualUNet(UNetConfig(channels=(4, 8))).save(tmp_path / "unet")
    with pytest.raises(InputError, match="not a TerritoryNet config"):
        TerritoryNet.load(unet)
    (folder / "config.json").write_text(json.dumps({**cfg, "architecture": "twin"}))
    with pytest.raises(InputError, match="invalid TerritoryNet config"):
        TerritoryNet.load(folder)
    with pytest.raises(InputError, match="not a model folder"):
        TerritoryNet.load(tmp_path / "nothing")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(architecture="twin"), "architecture must be one of"),
        (dict(architecture="cross_attention", channels=(8, 16, 36)), "divisible by attention_heads"),
        (dict(architecture="cross_attention", channels=(8, 16, 32), attention_heads=5), "divisible"),
        (dict(spatial_dims=4), "spatial_dims must be 2 or 3"),
        (dict(spatial_dims=1), "spatial_dims must be 2 or 3"),
        (dict(channels=(8,)), "at least two positive widths"),
        (dict(channels=(8, 0)), "at least two positive widths"),
        (dict(blocks_per_level=0), "blocks_per_level"),
        (dict(attention_heads=0), "attention_heads"),
    ],
)
def test_bad_config_raises_input_error(kwargs, match):
    with pytest.raises(InputError, match=match):
        TerritoryNetConfig(**kwargs)


def test_config_dict_round_trip_and_overrides():
    cfg = TerritoryNetConfig(architecture="separate", channels=[8, 16, 32], spatial_dims=3)
    assert cfg.channels == (8, 16, 32)
    assert TerritoryNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # attention_heads only constrains the cross_attention architecture
    assert TerritoryNetConfig(channels=(8, 16, 36)).architecture == "shared"
    net = TerritoryNet(cfg, architecture="shared")
    assert net.config.architecture == "shared" and net.config.spatial_dims == 3
    assert net.total_stride == (4, 4, 4)
    with pytest.raises(InputError, match="unknown TerritoryNetConfig field"):
        TerritoryNet(cfg, out_channels=3)


def test_parameter_counts_grow_with_the_architecture():
    counts = {a: count_parameters(_net(a))["total"] for a in ARCHS}
    unet1 = ResidualUNet(UNetConfig(in_channels=4, out_channels=1, spatial_dims=2, channels=(8, 16, 32)))
    encoder = sum(p.numel() for p in unet1.encoder.parameters())
    assert counts["shared"] == count_parameters(_net("shared").unet)["total"]
    # two full 1-channel U-Nets less one encoder
    assert counts["separate"] == 2 * count_parameters(unet1)["total"] - encoder
    # plus two 32-wide residual blocks and two pre-norm attention blocks (q/k/v/out projections + 2 LayerNorms)
    c = 32
    block = 2 * 9 * c * c + 4 * c
    attention = (4 * c * c + 4 * c) + 2 * (2 * c)
    assert counts["cross_attention"] == counts["separate"] + 2 * block + 2 * attention
    assert counts["cross_attention"] > counts["separate"] > counts["shared"]


def test_runs_under_bf16_autocast():
    net = _net("cross_attention").eval()
    x = torch.randn(1, 4, 20, 24)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert out.shape == (1, 2, 20, 24) and torch.isfinite(out.float()).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("architecture", ARCHS)
def test_cuda_bf16_autocast_matches_fp32(architecture):
    net = _net(architecture, spatial_dims=3).cuda().eval()
    x = torch.randn(2, 4, 12, 20, 18, device="cuda")
    with torch.no_grad():
        ref = net(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = net(x)
    assert out.shape == (2, 2, 12, 20, 18)
    assert torch.isfinite(out.float()).all()
    assert (torch.sigmoid(out.float()) > 0.5).eq(torch.sigmoid(ref) > 0.5).float().mean() > 0.9
