"""Self-ensemble distillation: training targets moved towards a model's own flip/rotation average.

``--distill-ensemble N`` fine-tunes a network so that one pass learns what its ``N``-pass
self-ensemble (:class:`napari_restore.networks.SelfEnsemble`) does.
"""
from __future__ import annotations

import torch
from torch import nn


class EnsembleTargets:
    """Targets ``lerp(y, teacher(x), weight)``, the teacher being ``network`` averaged over ``n``
    in-plane flips/rotations in eval mode (a frozen copy: the student's training does not move it).

    ``x``: ``(B, C, *spatial)`` network input; ``y``: ``(B, 1, *spatial)`` training target.
    """

    def __init__(self, network: nn.Module, n: int, weight: float, device: torch.device | str = "cpu"):
        from ..networks import SelfEnsemble, prepare_for_inference

        self.teacher = SelfEnsemble(prepare_for_inference(network), n).to(device)
        self.teacher.requires_grad_(False)
        self.weight = float(weight)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.lerp(y, self.teacher(x).to(y.dtype), self.weight)
