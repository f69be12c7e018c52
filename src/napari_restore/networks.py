"""Residual U-Nets (2D and 3D) on MONAI building blocks.

The only architecture a model card may name is ``"ResidualUNet"`` (:data:`ARCHITECTURES`): a
MONAI :class:`monai.networks.nets.UNet` used as the *residual branch* ``f`` of

    output = input + f(input)

- linear output (MONAI's top layer is ``conv_only``), one channel in, one channel out;
- the last layer(s) of ``f`` start at zero, so an untrained network is exactly the identity;
- normalisation is batch norm or none: in eval mode batch norm is a fixed per-channel affine map,
  so tiled and whole-slice results agree (instance/layer/group norm are refused);
- any spatial size works: the input is padded (reflect, or replicate when too small) to a
  multiple of the total stride and the output cropped back.

The default 2-D network (:data:`DEFAULT_2D`, 0.16 M parameters) is small on purpose, for the
target of >= 20 slices/s end to end on 2 CPU cores. What :func:`napari_restore.inference.restore`
runs is :func:`prepare_for_inference`'s copy (batch norm folded into the convolutions, channels-last
weights: together ~1.6x on the CPU), on the CPU in one worker thread per torch thread, each with one
thread (:mod:`napari_restore.step_runner`: ~1.2-1.4x more on 2 cores). Measured figures of the
shipped models: ``docs/speed.md``.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelError
from .constants import ENSEMBLE_SIZES

#: Default arguments of the 2-D residual U-Net (channels 16-128, three stride-2 levels).
DEFAULT_2D: dict[str, Any] = {
    "spatial_dims": 2, "channels": [16, 32, 64, 128], "strides": [2, 2, 2],
    "num_res_units": 0, "norm": "batch", "act": "PRELU", "dropout": 0.0,
    "kernel_size": 3, "up_kernel_size": 3,
}
#: Default arguments of the 3-D residual U-Net.
DEFAULT_3D: dict[str, Any] = {**DEFAULT_2D, "spatial_dims": 3, "channels": [16, 32, 64], "strides": [2, 2]}

_ALLOWED_NORMS = {None, "batch"}


class ResidualUNet(nn.Module):
    """``y = x + f(x)`` with ``f`` a MONAI UNet whose last layer starts at zero.

    Args:
        spatial_dims: 2 (input ``(B, 1, H, W)``) or 3 (input ``(B, 1, D, H, W)``).
        context: 2-D only: neighbouring slices on each side given as extra input channels
            ("2.5-D"): input ``(B, 2 * context + 1, H, W)``, slice ``z - context .. z + context``;
            the output ``(B, 1, H, W)`` is the centre slice plus the learned correction.
        channels, strides, num_res_units, kernel_size, up_kernel_size, act, dropout: as for
            :class:`monai.networks.nets.UNet`.
        norm: ``"batch"`` or ``None``. Per-sample norms (instance, layer, group) are refused:
            they make tiled and whole-image results differ.
        noise_input: 2-D only: give ``f`` one more input channel, constant over the image: the
            noise level the network measures on the (centre) slice it is given
            (:meth:`noise_level`, FFDNet-style conditioning on a level it estimates itself, so
            callers pass the same input as to any other network).

    Input and output are float tensors in the model's normalised intensity units; any spatial
    size is accepted.
    """

    def __init__(self, spatial_dims: int = 2, channels=(16, 32, 64, 128), strides=(2, 2, 2),
                 num_res_units: int = 0, norm: str | None = "batch", act: str = "PRELU",
                 dropout: float = 0.0, kernel_size: int = 3, up_kernel_size: int = 3, context: int = 0,
                 noise_input: bool = False):
        super().__init__()
        from monai.networks.nets import UNet

        norm_name = norm.lower() if isinstance(norm, str) else norm
        if norm_name not in _ALLOWED_NORMS:
            raise ModelError(f"ResidualUNet: norm={norm!r} is not allowed; use 'batch' or None "
                             "(per-sample norms make tiled and whole results differ)")
        if spatial_dims not in (2, 3):
            raise ModelError(f"ResidualUNet: spatial_dims must be 2 or 3, got {spatial_dims!r}")
        channels, strides = [int(c) for c in channels], [int(s) for s in strides]
        if len(channels) < 2 or len(strides) != len(channels) - 1 or min(channels) < 1 or min(strides) < 1:
            raise ModelError(f"ResidualUNet: need len(strides) == len(channels) - 1 >= 1, got "
                             f"channels={channels}, strides={strides}")
        if int(context) < 0 or (int(context) and spatial_dims != 2):
            raise ModelError(f"ResidualUNet: context slices need spatial_dims=2 and context >= 0, got "
                             f"context={context!r}, spatial_dims={spatial_dims!r}")
        if noise_input and spatial_dims != 2:
            raise ModelError("ResidualUNet: noise_input needs spatial_dims=2")
        if not isinstance(act, str):
            raise ModelError(f"ResidualUNet: act must be a MONAI activation name, got {act!r}")
        self.config: dict[str, Any] = {
            "spatial_dims": int(spatial_dims), "channels": channels, "strides": strides,
            "num_res_units": int(num_res_units), "norm": norm_name, "act": act,
            "dropout": float(dropout), "kernel_size": int(kernel_size), "up_kernel_size": int(up_kernel_size),
            "context": int(context),
        }
        if noise_input:  # only when set: the configs (and cards) of every other network stay as they were
            self.config["noise_input"] = True
        self.spatial_dims, self.context, self.noise_input = int(spatial_dims), int(context), bool(noise_input)
        self.multiple = int(math.prod(strides))
        self.branch = UNet(
            spatial_dims=spatial_dims, in_channels=2 * int(context) + 1 + int(bool(noise_input)), out_channels=1,
            channels=channels,
            strides=strides, num_res_units=int(num_res_units), norm=norm_name or (), act=act,
            dropout=float(dropout), kernel_size=int(kernel_size), up_kernel_size=int(up_kernel_size),
        )
        zero_last_layer(self)

    @staticmethod
    def noise_level(plane: torch.Tensor, size: int = 5, quantile: float = 0.25) -> torch.Tensor:
        """``(B, 1, 1, 1)``: the noise SD of each ``(B, 1, H, W)`` plane, in its units.

        The ``quantile`` of the local SDs in ``size x size`` windows (every window up to 128 px
        a side, a regular subsample of them beyond), leaving out windows with no variation
        (padding, outside the field of view): flat tissue sets the low quantiles, edges only
        the upper ones. Not differentiated.
        """
        with torch.no_grad():
            p = plane.float()
            k = int(min(size, *p.shape[-2:]))
            out = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
            if k >= 2:
                step = max(1, min(p.shape[-2:]) // 128)
                m = F.avg_pool2d(p, k, stride=step)
                var = (F.avg_pool2d(p * p, k, stride=step) - m * m).clamp_min(0.0) * (k * k / (k * k - 1))
                sd = var.sqrt().flatten(1)
                for i, row in enumerate(sd):
                    row = row[row > 1e-4]
                    if row.numel():
                        out[i] = torch.kthvalue(row, max(1, int(round(quantile * row.numel())))).values
        return out.view(-1, 1, 1, 1).to(plane.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, 2 * context + 1, *spatial)``; returns ``(B, 1, *spatial)``, centre + ``f(x)``."""
        c = self.context
        centre = x[:, c:c + 1]
        if self.noise_input:  # the level channel is measured here, on what the network is given
            x = torch.cat([x, self.noise_level(centre).expand_as(centre)], dim=1)
        spatial = x.shape[2:]
        pads: list[int] = []
        for size in reversed(spatial):  # F.pad wants the last axis first
            extra = (-size) % self.multiple
            pads += [extra // 2, extra - extra // 2]
        if any(pads):
            small = any(max(pads[2 * i], pads[2 * i + 1]) >= s for i, s in enumerate(reversed(spatial)))
            xp = F.pad(x, pads, mode="replicate" if small else "reflect")
            r = self.branch(xp)
            crop = tuple(slice(pads[2 * i], pads[2 * i] + s) for i, s in enumerate(reversed(spatial)))
            r = r[(Ellipsis, *reversed(crop))]
        else:
            r = self.branch(x)
        return centre + r.to(centre.dtype)


def zero_last_layer(net: ResidualUNet) -> None:
    """Zero the output layer(s) of the residual branch, so that ``net`` is the identity."""
    top_up = net.branch.model[-1]
    if net.config["num_res_units"] == 0:
        layers = [top_up.conv]
    else:  # transposed conv (+ norm/act) then a residual unit ending in a plain conv
        layers = [top_up[0].conv, list(top_up[1].conv.modules())[-1]]
    with torch.no_grad():
        for layer in layers:
            layer.weight.zero_()
            if layer.bias is not None:
                layer.bias.zero_()


#: The whitelist of architectures a model card may name.
ARCHITECTURES: dict[str, type[nn.Module]] = {"ResidualUNet": ResidualUNet}


def build_network(name: str = "ResidualUNet", args: dict[str, Any] | None = None, **kwargs) -> nn.Module:
    """Build a whitelisted architecture by name.

    Args:
        name: a key of :data:`ARCHITECTURES`.
        args: constructor arguments (as stored in a model card); ``kwargs`` are merged in.
            With neither, the 2-D default :data:`DEFAULT_2D`.

    Raises:
        ModelError: unknown architecture or arguments it does not accept.
    """
    if name not in ARCHITECTURES:
        raise ModelError(f"unknown architecture {name!r}; only {sorted(ARCHITECTURES)} can be built")
    merged = dict(DEFAULT_2D if args is None and not kwargs else {})
    merged.update(args or {})
    merged.update(kwargs)
    try:
        return ARCHITECTURES[name](**merged)
    except ModelError:
        raise
    except Exception as exc:  # TypeError (unknown argument), ValueError from MONAI, ...
        raise ModelError(f"cannot build {name} with arguments {merged}: {exc}") from None


def network_spec(net: nn.Module) -> dict[str, Any]:
    """``{"name": ..., "args": {...}}`` of a whitelisted network, as stored in a model card."""
    for name, cls in ARCHITECTURES.items():
        if type(net) is cls:
            return {"name": name, "args": copy.deepcopy(net.config)}
    raise ModelError(f"{type(net).__name__} is not a whitelisted architecture ({sorted(ARCHITECTURES)})")


def mirror_indices(start: int, n: int, size: int) -> np.ndarray:
    """Indices ``start .. start+n-1`` folded into ``[0, size)`` by half-sample symmetric reflection.

    ``-1 -> 0``, ``size -> size - 1``: the neighbours of an end slice (context networks) and the
    border of reflect-extended training crops.
    """
    i = np.arange(start, start + n) % (2 * size)
    return np.where(i >= size, 2 * size - 1 - i, i)


def expand_context(state: dict[str, torch.Tensor], net: ResidualUNet) -> dict[str, torch.Tensor]:
    """Weights of a network with fewer input channels laid into ``net`` (a warm start).

    A single-slice network's input-layer kernels ``(out, 1, ...)`` go to the centre channel; a
    network without ``noise_input`` keeps its kernels on the slice channels. The new channels'
    kernels (neighbour slices, noise level) start at zero: the grown network computes exactly
    what the smaller one did.
    """
    own = net.state_dict()
    slices = 2 * net.context + 1
    out = {}
    for key, value in state.items():
        target = own.get(key)
        if target is not None and value.shape != target.shape and value.ndim >= 2 \
                and target.shape[1] == slices + int(net.noise_input) and value.shape[2:] == target.shape[2:] \
                and value.shape[0] == target.shape[0] and value.shape[1] in (1, slices):
            grown = torch.zeros_like(target)
            if value.shape[1] == 1:
                grown[:, net.context] = value[:, 0]
            else:
                grown[:, :slices] = value
            value = grown
        out[key] = value
    return out


def prepare_for_inference(net: nn.Module) -> nn.Module:
    """An eval-mode copy of ``net`` with batch norm folded into the preceding convolution.

    Numerically the same function as ``net.eval()`` (up to float rounding), ~25 % faster on CPU;
    2-D networks also get channels-last weights (another ~30 % on CPU: the transposed
    convolutions were half of the time).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net = copy.deepcopy(net).eval()
    for module in net.modules():
        conv, adn = getattr(module, "conv", None), getattr(module, "adn", None)
        norm = getattr(adn, "N", None) if adn is not None else None
        if isinstance(conv, nn.modules.conv._ConvNd) and isinstance(norm, nn.modules.batchnorm._BatchNorm):
            if norm.track_running_stats and norm.running_mean is not None:
                transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
                module.conv = fuse_conv_bn_eval(conv, norm, transpose=transposed)
                adn.N = nn.Identity()
    if getattr(net, "spatial_dims", None) == 2:  # NHWC weights: ~30 % faster on CPU (oneDNN), same result
        net = net.to(memory_format=torch.channels_last)
    return net



class SelfEnsemble(nn.Module):
    """Geometric self-ensemble: the mean of ``net`` over ``n`` in-plane flips and rotations.

    ``n``: 1 (``net`` alone), 2 (identity and a left-right flip), 4 (the four 90-degree
    rotations) or 8 (those and their flips: the dihedral group of the square). Each output is
    mapped back before averaging; the cost is ``n`` forward passes. Input and output as ``net``
    (``(B, C, *spatial)``, the last two axes in-plane); ``context``, ``multiple``, ``config`` and
    ``spatial_dims`` are the wrapped network's.
    """

    def __init__(self, net: nn.Module, n: int):
        super().__init__()
        if n not in ENSEMBLE_SIZES:
            raise ModelError(f"self-ensemble size must be one of {ENSEMBLE_SIZES}, got {n!r}")
        self.net, self.n = net, int(n)
        for name in ("context", "multiple", "config", "spatial_dims"):
            if hasattr(net, name):
                setattr(self, name, getattr(net, name))

    def _transforms(self) -> list[tuple[int, bool]]:
        if self.n == 2:
            return [(0, False), (0, True)]
        return [(k, flip) for flip in (False, True) for k in range(4)][: self.n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = None
        for k, flip in self._transforms():
            t = torch.rot90(x, k, dims=(-2, -1))
            t = torch.flip(t, dims=(-1,)) if flip else t
            y = self.net(t)
            y = torch.flip(y, dims=(-1,)) if flip else y
            y = torch.rot90(y, -k, dims=(-2, -1))
            acc = y if acc is None else acc + y
        return acc / self.n


__all__ = ["ResidualUNet", "ARCHITECTURES", "DEFAULT_2D", "DEFAULT_3D", "build_network",
           "network_spec", "prepare_for_inference", "zero_last_layer", "expand_context", "mirror_indices",
           "SelfEnsemble", "ENSEMBLE_SIZES"]
