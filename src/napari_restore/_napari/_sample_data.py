"""npe2 sample data: the project's own CT head phantom (:func:`napari_restore.sample.make_ct_phantom`)."""
from __future__ import annotations

from ..sample import make_ct_phantom
from ._reader import LayerData, volume_to_layer_data


def ct_phantom_noisy() -> list[LayerData]:
    """"CT phantom (noisy)": 24 x 192 x 192 voxels of 2.5 x 0.8 x 0.8 mm, FBP-like noise SD 25 HU."""
    data, kwargs, kind = volume_to_layer_data(make_ct_phantom(noisy=True))
    kwargs["name"] = "CT phantom (noisy)"
    return [(data, kwargs, kind)]


def ct_phantom_clean() -> list[LayerData]:
    """"CT phantom (clean)": the same phantom without noise (the ground truth of the noisy one)."""
    data, kwargs, kind = volume_to_layer_data(make_ct_phantom(noisy=False))
    kwargs["name"] = "CT phantom (clean)"
    return [(data, kwargs, kind)]
