"""The residual U-Net factory: identity at start, odd sizes, linear output, whitelisted norms."""
from __future__ import annotations

import pytest
import torch

from napari_restore.errors import ModelError
from napari_restore.networks import (DEFAULT_2D, DEFAULT_3D, ResidualUNet, SelfEnsemble, build_network,
                                     expand_context, mirror_indices, network_spec, prepare_for_inference)
from _engine_helpers import one_torch_thread


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_torch_thread()


@pytest.mark.parametrize("nru", [0, 1])
@pytest.mark.parametrize("dims,shape", [(2, (3, 1, 37, 45)), (2, (1, 1, 5, 130)), (3, (1, 1, 7, 21, 18))])
def test_untrained_network_is_exactly_the_identity_for_any_size(nru, dims, shape):
    args = {**(DEFAULT_2D if dims == 2 else DEFAULT_3D), "num_res_units": nru}
    net = build_network("ResidualUNet", args).eval()
    x = torch.randn(shape) * 3
    with torch.no_grad():
        y = net(x)
    assert y.shape == x.shape
    assert torch.equal(y, x)


def _randomise(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval()


def test_odd_sizes_match_an_even_crop_and_output_is_linear():
    net = _randomise(build_network())
    x = torch.randn(2, 1, 67, 83)
    with torch.no_grad():
        y = net(x)
    r = y - x
    assert y.shape == x.shape and torch.isfinite(y).all()
    # the residual is not clipped by an output activation: it takes both signs, unbounded
    assert (r < -0.05).any() and (r > 0.05).any()
    # scaling the last layer scales the residual exactly: the output layer is linear
    with torch.no_grad():
        net.branch.model[-1].conv.weight.mul_(2)
        net.branch.model[-1].conv.bias.mul_(2)
        r2 = net(x) - x
    torch.testing.assert_close(r2, 2 * r, rtol=1e-4, atol=1e-5)


def test_training_moves_away_from_identity():
    torch.manual_seed(0)
    net = build_network("ResidualUNet", {**DEFAULT_2D, "channels": [4, 8], "strides": [2]})
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(2, 1, 32, 32)
    loss = torch.nn.functional.mse_loss(net(x), 0.5 * x)
    loss.backward()
    assert net.branch.model[-1].conv.weight.grad.abs().sum() > 0  # zero init still learns
    opt.step()
    assert not torch.equal(net.eval()(x), x)


@pytest.mark.parametrize("norm", ["instance", "INSTANCE", "layer", "group"])
def test_per_sample_norms_are_refused(norm):
    with pytest.raises(ModelError, match="norm"):
        build_network("ResidualUNet", {**DEFAULT_2D, "norm": norm})


def test_unknown_architecture_and_arguments_are_refused():
    with pytest.raises(ModelError, match="unknown architecture"):
        build_network("os.system", {})
    with pytest.raises(ModelError, match="cannot build"):
        build_network("ResidualUNet", {**DEFAULT_2D, "evil": 1})


def test_spec_round_trip_and_fused_inference_copy_agree():
    torch.manual_seed(1)
    net = build_network("ResidualUNet", {**DEFAULT_2D, "num_res_units": 1})
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(3):  # non-trivial batch-norm statistics
        x = torch.randn(4, 1, 48, 48)
        loss = (net(x) - 0.3 * x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    spec = network_spec(net)
    assert spec["name"] == "ResidualUNet" and spec["args"]["num_res_units"] == 1
    rebuilt = build_network(spec["name"], spec["args"])
    rebuilt.load_state_dict(net.state_dict())
    fused = prepare_for_inference(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # original untouched
    x = torch.randn(1, 1, 61, 75)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), net(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(rebuilt.eval()(x), net(x))
    assert isinstance(rebuilt, ResidualUNet)


@pytest.mark.parametrize("nru", [0, 1])
def test_context_network_takes_neighbours_and_grows_from_a_single_slice_one(nru):
    single = _randomise(build_network("ResidualUNet", {**DEFAULT_2D, "num_res_units": nru}), seed=2)
    wide = build_network("ResidualUNet", {**DEFAULT_2D, "num_res_units": nru, "context": 2})
    assert network_spec(wide)["args"]["context"] == 2
    x = torch.randn(2, 5, 40, 36)
    with torch.no_grad():
        assert wide.eval()(x).shape == (2, 1, 40, 36)
        assert torch.equal(wide(x), x[:, 2:3])  # untrained: the centre slice unchanged
        wide.load_state_dict(expand_context(single.state_dict(), wide))
        # the warm start computes exactly what the single-slice network did
        torch.testing.assert_close(wide(x), single(x[:, 2:3]), rtol=0, atol=0)
        # and once the neighbours' weights move, the neighbours change the output
        first = next(p for p in wide.parameters() if p.ndim == 4 and p.shape[1] == 5)
        first[:, 0].add_(0.3)
        assert not torch.allclose(wide(x), single(x[:, 2:3]))
    with pytest.raises(ModelError, match="context"):
        build_network("ResidualUNet", {**DEFAULT_3D, "context": 1})


def test_noise_input_network_measures_the_level_and_grows_from_one_without_it():
    """FFDNet-style conditioning on a level the network measures itself (issue 18)."""
    g = torch.Generator().manual_seed(4)
    # the level: the low quantile of local SDs, blind to constant padding and to a few edges
    flat = torch.randn(1, 1, 200, 200, generator=g) * 0.3
    padded = torch.nn.functional.pad(flat, (60, 60, 60, 60), value=-8.0)  # outside the field of view
    steps = flat + (torch.arange(200)[None, None, None, :] // 25 % 2) * 2.0  # 7 strong edges across
    level = ResidualUNet.noise_level(torch.cat([flat, padded[..., :200, :200], steps]))
    assert level.shape == (3, 1, 1, 1)
    assert 0.8 * 0.3 < float(level[0]) < 1.0 * 0.3
    assert abs(float(level[1]) - float(level[0])) < 0.03 and abs(float(level[2]) - float(level[0])) < 0.03
    assert float(ResidualUNet.noise_level(torch.zeros(1, 1, 32, 32))) == 0.0
    # grown from a 2.5-D network without it: the same function until the level channel's weights move
    base = _randomise(build_network("ResidualUNet", {**DEFAULT_2D, "context": 1}), seed=5)
    cond = build_network("ResidualUNet", {**DEFAULT_2D, "context": 1, "noise_input": True})
    assert "noise_input" not in base.config and network_spec(cond)["args"]["noise_input"] is True
    cond.load_state_dict(expand_context(base.state_dict(), cond))
    x = torch.randn(2, 3, 48, 40, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(cond.eval()(x), base.eval()(x), rtol=0, atol=0)
        first = next(p for p in cond.parameters() if p.ndim == 4 and p.shape[1] == 4)
        first[:, 3].add_(0.5)
        quiet, loud = cond(x * 0.1), cond(x)
        assert not torch.allclose(cond(x), base(x))
        assert not torch.allclose(quiet * 10, loud, atol=1e-3)  # (a nonlinear network: not linear in x)
        # the channel carries the measured level: a noise-free (constant) input reads 0, and there
        # the moved channel weights change nothing
        still = torch.full((2, 3, 48, 40), 0.7)
        torch.testing.assert_close(cond(still), base(still), rtol=0, atol=1e-6)
        fused = prepare_for_inference(cond)  # batch norm folded, channels last: float rounding only
        torch.testing.assert_close(fused(x), cond(x), rtol=1e-3, atol=2e-3)
    with pytest.raises(ModelError, match="noise_input"):
        build_network("ResidualUNet", {**DEFAULT_3D, "noise_input": True})


def test_mirror_indices_fold_half_sample_symmetric():
    assert mirror_indices(-2, 7, 4).tolist() == [1, 0, 0, 1, 2, 3, 3]
    assert mirror_indices(-1, 3, 1).tolist() == [0, 0, 0]


@pytest.mark.parametrize("dims,shape", [(2, (2, 3, 40, 52)), (3, (1, 1, 6, 24, 20))])
def test_self_ensemble_is_the_mean_over_flips_and_rotations(dims, shape):
    args = {**(DEFAULT_2D if dims == 2 else DEFAULT_3D), "channels": [8, 16], "strides": [2]}
    net = _randomise(build_network("ResidualUNet", {**args, **({"context": 1} if dims == 2 else {})}), seed=4).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.equal(SelfEnsemble(net, 1)(x), net(x))
        flip = torch.flip(net(torch.flip(x, dims=(-1,))), dims=(-1,))
        torch.testing.assert_close(SelfEnsemble(net, 2)(x), (net(x) + flip) / 2)
        e8 = SelfEnsemble(net, 8)
        assert e8.context == net.context and e8.multiple == net.multiple
        # the dihedral mean commutes with a rotation and a flip of its input; one pass does not
        r = lambda t: torch.flip(torch.rot90(t, 1, dims=(-2, -1)), dims=(-1,))  # noqa: E731
        torch.testing.assert_close(e8(r(x)), r(e8(x)), rtol=0, atol=1e-5)
        assert not torch.allclose(net(r(x)), r(net(x)), atol=1e-3)
    with pytest.raises(ModelError, match="self-ensemble"):
        SelfEnsemble(net, 3)
