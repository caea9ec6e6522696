"""Residual U-Net: shapes (any input size), deep supervision, save/load, widths, and it learns a blob."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from irisseg.errors import InputError
from irisseg.losses import deep_supervision_loss, get_loss
from irisseg.models.blocks import ResidualBlock
from irisseg.models.iris import count_parameters
from irisseg.models.unet import ResidualUNet, UNetConfig

TINY = dict(channels=(4, 8, 16))


def _net(seed: int = 0, **kw) -> ResidualUNet:
    torch.manual_seed(seed)
    return ResidualUNet(UNetConfig(**{**TINY, **kw}))


@pytest.mark.parametrize("size", [(16, 16, 16), (8, 12, 16), (13, 10, 7), (5, 9, 11)])
def test_output_shape_matches_input_for_any_size(size):
    net = _net(in_channels=2, out_channels=3).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 2, *size))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 3, *size)
    assert torch.isfinite(out).all()


def test_non_divisible_input_is_padded_at_the_end_and_cropped_back():
    net = _net().eval()
    x = torch.randn(1, 1, 13, 10, 7)
    padded = F.pad(x, (0, 1, 0, 2, 0, 3), mode="replicate")  # up to multiples of the total stride 4
    assert net.total_stride == (4, 4, 4)
    with torch.no_grad():
        assert torch.equal(net(x), net(padded)[..., :13, :10, :7])


def test_deep_supervision_list_in_training_single_tensor_in_eval():
    net = _net(channels=(4, 8, 16, 32), deep_supervision=True)
    assert net.output_strides == [(1, 1, 1), (2, 2, 2), (4, 4, 4)]
    net.train()
    outs = net(torch.randn(2, 1, 16, 16, 16))
    assert isinstance(outs, list) and [tuple(o.shape) for o in outs] == [(2, 1, 16, 16, 16), (2, 1, 8, 8, 8), (2, 1, 4, 4, 4)]
    odd = net(torch.randn(2, 1, 16, 13, 10))  # ceil(size / stride) at every scale
    assert [tuple(o.shape[2:]) for o in odd] == [(16, 13, 10), (8, 7, 5), (4, 4, 3)]
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, 16, 16, 16))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1, 16, 16, 16)
    # levels capped, and none without deep supervision
    assert len(_net(channels=(4, 8, 16, 32), deep_supervision=True, deep_supervision_levels=1).train()(
        torch.randn(2, 1, 16, 16, 16))) == 2
    assert isinstance(_net().train()(torch.randn(2, 1, 8, 8, 8)), torch.Tensor)


def test_anisotropic_strides_and_2d():
    net = _net(strides=((1, 2, 2), 2)).eval()
    assert net.total_stride == (2, 4, 4)
    with torch.no_grad():
        assert net(torch.randn(1, 1, 6, 10, 9)).shape == (1, 1, 6, 10, 9)
    net2d = _net(spatial_dims=2, deep_supervision=True).train()
    outs = net2d(torch.randn(2, 1, 13, 10))
    assert [tuple(o.shape) for o in outs] == [(2, 1, 13, 10), (2, 1, 7, 5)]


def test_save_load_round_trip_reproduces_outputs_exactly(tmp_path):
    net = _net(seed=3, in_channels=2, out_channels=2, strides=((1, 2, 2), 2), deep_supervision=True,
               blocks_per_level=[1, 2, 1])  # per level, from a JSON / YAML list
    assert [len(level) for level in net.encoder] == [1, 2, 1] and [len(level) for level in net.decoder] == [2, 1]
    # move the norms' affine parameters off their defaults so a failed load would show
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    net.eval()
    x = torch.randn(1, 2, 6, 11, 9)
    with torch.no_grad():
        ref = net(x)
    folder = net.save(tmp_path / "m", extra={"lesion": {"patch": [48, 48, 48]}})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["extra"] == {"lesion": {"patch": [48, 48, 48]}} and cfg["channels"] == [4, 8, 16]
    loaded = ResidualUNet.load(folder).eval()
    assert loaded.config.extra == {"lesion": {"patch": [48, 48, 48]}}
    assert replace(loaded.config, extra={}) == net.config  # lists from JSON come back as tuples
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)


def test_load_rejects_bad_folders(tmp_path):
    with pytest.raises(InputError, match="config.json is missing"):
        ResidualUNet.load(tmp_path)
    folder = _net().save(tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "channels": [4, 8, 32]}))
    with pytest.raises(InputError, match="cannot load weights"):
        ResidualUNet.load(folder)
    (folder / "config.json").write_text(json.dumps({"name": "iris-small", "base_channels": 16}))
    with pytest.raises(InputError, match="not a ResidualUNet config"):
        ResidualUNet.load(folder)


def test_config_validation():
    with pytest.raises(InputError, match="strides"):
        UNetConfig(channels=(4, 8, 16), strides=(2,))
    with pytest.raises(InputError, match="stride"):
        UNetConfig(channels=(4, 8), strides=((1, 2),))
    with pytest.raises(InputError, match="one count per level"):
        UNetConfig(channels=(4, 8, 16), blocks_per_level=(1, 2))
    with pytest.raises(InputError, match="at least 1"):
        UNetConfig(channels=(4, 8), blocks_per_level=(1, 0))
    with pytest.raises(InputError, match="unknown"):
        ResidualUNet(widths=(4, 8))
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        _net()(torch.randn(1, 2, 8, 8, 8))


def test_parameter_count_grows_with_width_and_depth():
    small = count_parameters(_net(channels=(4, 8, 16)))
    wide = count_parameters(_net(channels=(8, 16, 32)))
    deep = count_parameters(_net(channels=(4, 8, 16, 32)))
    assert set(small) == {"encoder", "upsample", "decoder", "head", "total"}
    assert small["total"] == sum(v for k, v in small.items() if k != "total")
    assert small["total"] < wide["total"] and small["total"] < deep["total"]
    assert count_parameters(_net(blocks_per_level=2))["total"] > small["total"]
    ds = count_parameters(_net(deep_supervision=True))
    assert ds["aux_heads"] == 8 + 1  # one 1x1 conv from 8 channels to 1 logit
    # the head: 4 channels -> 1 logit, weights + bias
    assert small["head"] == 5


def test_shares_the_iris_residual_block():
    net = _net()
    blocks = [m for m in net.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 3 + 2  # one per encoder level, one per decoder level
    # the block keeps its parameter names whatever spatial_dims is (starter weights still load)
    assert list(ResidualBlock(2, 4, stride=2).state_dict()) == list(ResidualBlock(2, 4, stride=2, spatial_dims=2).state_dict())


def test_same_seed_same_network():
    x = torch.randn(1, 1, 8, 8, 8)
    a, b = _net(seed=5).eval(), _net(seed=5).eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_a_few_sgd_steps_lower_the_loss_on_a_blob():
    g = torch.Generator().manual_seed(0)
    z, y, x = torch.meshgrid(*[torch.arange(12.0)] * 3, indexing="ij")
    target = (((z - 6) ** 2 + (y - 5) ** 2 + (x - 6) ** 2) < 9).float()[None, None].repeat(2, 1, 1, 1, 1)
    image = 2.0 * target + 0.3 * torch.randn(target.shape, generator=g)
    net = _net(seed=0, deep_supervision=True)
    loss_fn = get_loss("dice_bce")
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(12):
        loss = deep_supervision_loss(loss_fn, net(image), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("dims", [2, 3])
def test_instance_norm_equals_torch_instance_norm_and_keeps_channels_last(dims):
    from irisseg.models.blocks import InstanceNorm, channels_last

    torch.manual_seed(0)
    x = torch.randn(2, 5, *([6, 7, 8][:dims]))
    ours = InstanceNorm(5)
    ref = (torch.nn.InstanceNorm3d if dims == 3 else torch.nn.InstanceNorm2d)(5, affine=True)
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    ref.load_state_dict(ours.state_dict())  # same parameter names and shapes
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    y = ours(channels_last(x))
    if dims == 3:  # 3D goes channels-last (faster on the CPU); 2D stays as it is (measured slower)
        assert y.is_contiguous(memory_format=torch.channels_last_3d) and not y.is_contiguous()
    else:
        assert y.is_contiguous()
    torch.testing.assert_close(y, ref(x), atol=1e-5, rtol=1e-5)


def test_residual_unet_output_does_not_depend_on_memory_format():
    torch.manual_seed(0)
    net = ResidualUNet(UNetConfig(in_channels=2, out_channels=1, channels=(4, 8)))
    net.eval()
    x = torch.randn(1, 2, 12, 10, 8)
    with torch.no_grad():
        a = net(x)
        b = net(x.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_batch_norm_variant_keeps_running_statistics_through_save_and_load(tmp_path):
    net = _net(seed=5, norm="batch", deep_supervision=True)
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in net.modules())
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())
    net.train()
    with torch.no_grad():
        for _ in range(3):  # move the running statistics off their initial 0 / 1
            net(2.0 + 3.0 * torch.randn(2, 1, 16, 16, 16))
    net.eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        ref = net(x)
        # eval mode uses the running averages: an item's output does not depend on the rest of the batch
        assert torch.allclose(net(torch.cat([x, 5.0 * torch.randn(1, 1, 16, 16, 16)]))[:1], ref, atol=1e-5)
    loaded = ResidualUNet.load(net.save(tmp_path / "m")).eval()
    assert loaded.config.norm == "batch"
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    with pytest.raises(InputError, match="norm"):
        UNetConfig(channels=(4, 8), norm="layer")
