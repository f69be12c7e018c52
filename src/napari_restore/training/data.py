"""Training data, one import path for all of it (the code lives in three modules).

- :mod:`.series`: discovery, caching, patient-wise split, position-matched pairs
  (:class:`SeriesData`, :func:`load_series`, :func:`split_series`, :func:`match_pairs`,
  :func:`resliced_views`, :func:`prewarm_ct_maps`);
- :mod:`.ct_noise`: the CT noise model (:func:`ct_noise_variance_maps`, :func:`ct_shaped_noise`);
- :mod:`.patches`: degradations and patch datasets (:class:`Degradation`, :class:`PatchDataset`,
  :func:`augment`, :func:`validation_set`).
"""
from __future__ import annotations

from .ct_noise import ct_noise_variance_maps, ct_shaped_noise
from .patches import Degradation, PatchDataset, augment, validation_set
from .series import SeriesData, load_series, match_pairs, prewarm_ct_maps, resliced_views, split_series

__all__ = ["SeriesData", "load_series", "split_series", "match_pairs", "PatchDataset", "Degradation", "prewarm_ct_maps",
           "validation_set", "augment", "ct_noise_variance_maps", "ct_shaped_noise", "resliced_views"]
