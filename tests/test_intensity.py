"""Intensity normalisation: fixed HU mapping for CT, robust percentiles for MR, exact inverses."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import napari_restore
from napari_restore.errors import ModelError
from napari_restore.intensity import CT_DEFAULT, MR_DEFAULT, Normalizer, default_spec, validate_spec
from _engine_helpers import one_torch_thread


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_torch_thread()


def test_ct_mapping_is_fixed_and_exactly_invertible_with_padding(shared_data):
    hu = napari_restore.load(shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz")[0].array.copy()
    hu[:, :4, :] = -2048.0  # out-of-field padding of two vendors, and metal
    hu[:, -4:, :] = -3024.0
    hu[5, 50, 60] = 4000.0
    hu[6, 50, 60] = 12.25  # a non-integer value
    norm = Normalizer.fit(default_spec("CT"), hu)
    assert norm.spec == CT_DEFAULT
    y = norm.forward(hu)
    assert y.dtype == np.float32 and y.min() >= -2.0 and y.max() < 6.0
    # fixed: HU 0 is 0 and HU -1024 is -2 whatever the volume holds
    np.testing.assert_array_equal(norm.forward(np.array([0.0, -1024.0, 512.0], np.float32)), [0.0, -2.0, 1.0])
    back = norm.inverse(y, original=hu)
    assert np.array_equal(back, hu)  # bit-exact, padding and metal restored
    assert np.array_equal(back[:, :4], np.full_like(back[:, :4], -2048.0))


def test_ct_torch_and_numpy_paths_agree(shared_data):
    hu = napari_restore.load(shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz")[0].array[:3]
    norm = Normalizer.fit(CT_DEFAULT, hu)
    t = norm.forward(torch.from_numpy(hu))
    assert torch.equal(t, torch.from_numpy(norm.forward(hu)))
    assert torch.equal(norm.inverse_linear(t), torch.from_numpy(np.clip(hu, -1024, 3071)))


def test_mr_percentiles_and_inverse_in_source_units(shared_data):
    mr = napari_restore.load(shared_data / "mr" / "nifti" / "T1.nii.gz")[0].array
    norm = Normalizer.fit(MR_DEFAULT, mr)
    p1, p99 = np.percentile(mr, [1, 99])
    # percentiles from a subsample, close to the full-volume ones
    assert abs(norm.stats["p_lower"] - p1) <= 0.02 * (p99 - p1) + 1e-6
    assert abs(norm.stats["p_upper"] - p99) <= 0.02 * (p99 - p1)
    y = norm.forward(mr)
    assert np.mean((y >= -0.01) & (y <= 1.01)) > 0.97
    back = norm.inverse(y, original=mr)
    np.testing.assert_allclose(back, mr, rtol=1e-6, atol=1e-4 * float(p99))
    assert not norm.clips


def test_sampling_does_not_copy_a_big_volume():
    import tracemalloc

    vol = np.random.default_rng(0).standard_normal((96, 512, 512), dtype=np.float32)
    tracemalloc.start()
    Normalizer.fit(MR_DEFAULT, vol)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 0.25 * vol.nbytes


@pytest.mark.parametrize("spec", [{"kind": "zscore"}, {"kind": "ct", "scale": 0}, {"kind": "ct", "clip": [5, 1]},
                                  {"kind": "percentile", "lower": 99, "upper": 1}, "ct", None])
def test_invalid_specs_are_refused(spec):
    with pytest.raises(ModelError):
        validate_spec(spec)
