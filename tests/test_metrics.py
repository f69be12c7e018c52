"""Image-quality metrics: known values, CT window convention, noise estimates on real data."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import erf

from napari_restore.errors import InputError
from napari_restore.metrics import (
    ct_psnr,
    ct_ssim,
    edge_rise_distance,
    edge_width_fwhm,
    noise_power_spectrum,
    noise_sd_estimate,
    psnr,
    radial_average,
    roi_stats,
    ssim,
    window,
)


@pytest.fixture(scope="module")
def ct_slice(shared_data):
    """Real body CT slice (HU) of the Siemens series, index 10 by InstanceNumber."""
    import pydicom

    files = sorted((shared_data / "ct" / "siemens-body-j2k").iterdir())
    heads = sorted((pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber, f) for f in files)
    ds = pydicom.dcmread(heads[10][1])
    return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


@pytest.fixture(scope="module")
def mr_slice(shared_data):
    import nibabel as nib

    return np.asarray(nib.load(shared_data / "mr" / "nifti" / "T1.nii.gz").dataobj)[:, :, 70].astype(np.float64)


def test_psnr_known_values(mr_slice):
    assert psnr(mr_slice, mr_slice, 255.0) == math.inf
    for offset in (1.0, 5.0):
        assert psnr(mr_slice, mr_slice + offset, 255.0) == pytest.approx(20 * math.log10(255.0 / offset))
    with pytest.raises(InputError):
        psnr(mr_slice, mr_slice[1:], 255.0)
    with pytest.raises(InputError):
        psnr(mr_slice, mr_slice, 0.0)


def test_ssim(mr_slice):
    assert ssim(mr_slice, mr_slice, 255.0) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    s5 = ssim(mr_slice, mr_slice + rng.normal(0, 5, mr_slice.shape), 255.0)
    s20 = ssim(mr_slice, mr_slice + rng.normal(0, 20, mr_slice.shape), 255.0)
    assert 1.0 > s5 > s20 > 0.0
    vol = np.stack([mr_slice, mr_slice + 10.0])
    test = np.stack([mr_slice + rng.normal(0, 5, mr_slice.shape), mr_slice + 10.0])
    assert ssim(vol, test, 255.0) == pytest.approx((ssim(vol[0], test[0], 255.0) + 1.0) / 2)


def test_window_convention(ct_slice):
    w = window(np.array([-1000.0, -150.0, 50.0, 250.0, 3000.0]))
    np.testing.assert_allclose(w, [0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(window(np.array([-160.0, 240.0]), width=400, level=40), [0.0, 1.0])
    noisy = ct_slice + np.random.default_rng(1).normal(0, 20, ct_slice.shape)
    assert ct_psnr(ct_slice, noisy) == pytest.approx(psnr(window(ct_slice), window(noisy), 1.0))
    assert ct_ssim(ct_slice, noisy) == pytest.approx(ssim(window(ct_slice), window(noisy), 1.0))
    # inside the window, a constant HU offset c gives 20 log10(W / c)
    body = ct_slice[230:270, 130:170]  # liver, far from the window limits
    assert ct_psnr(body, body + 4.0) == pytest.approx(20 * math.log10(400 / 4.0), abs=1e-6)


def test_roi_stats():
    a = np.arange(12, dtype=float).reshape(3, 4)
    mask = a >= 6
    mean, sd = roi_stats(a, mask)
    assert mean == pytest.approx(8.5) and sd == pytest.approx(np.std(np.arange(6, 12), ddof=1))
    with pytest.raises(InputError):
        roi_stats(a, np.zeros_like(mask))


def test_noise_sd_estimate_on_real_data(ct_slice, mr_slice):
    # CT: soft-tissue mask (0-100 HU) as in Christianson et al. 2015; the scan has ~10 HU noise
    soft = (ct_slice > 0) & (ct_slice < 100)
    liver = ct_slice[230:270, 130:170].astype(np.float64)
    yy, xx = np.mgrid[:40, :40]
    a = np.c_[np.ones(1600), yy.ravel(), xx.ravel(), yy.ravel() ** 2, xx.ravel() ** 2, (yy * xx).ravel()]
    resid = liver.ravel() - a @ np.linalg.lstsq(a, liver.ravel(), rcond=None)[0]
    est = noise_sd_estimate(ct_slice, soft)
    assert est == pytest.approx(resid.std(), rel=0.2)
    # the white-noise estimator underestimates correlated CT noise (documented)
    assert noise_sd_estimate(ct_slice, soft, method="highpass") < 0.6 * est
    # MR + known white noise: the local estimator finds it where the image is flat (the zero
    # background of this skull-stripped T1); the high-pass one within the image's own fine texture
    noisy = mr_slice + np.random.default_rng(2).normal(0, 12.0, mr_slice.shape)
    assert noise_sd_estimate(noisy) == pytest.approx(12.0, rel=0.1)
    assert noise_sd_estimate(noisy, method="highpass") == pytest.approx(12.0, rel=0.15)
    with pytest.raises(InputError):
        noise_sd_estimate(ct_slice, np.zeros(ct_slice.shape, bool))


def test_edge_rise_distance():
    x = np.arange(-30, 31) * 0.5  # mm
    sigma = 1.2
    edge = 100 + 900 * 0.5 * (1 + erf(x / (sigma * math.sqrt(2))))
    assert edge_rise_distance(edge, 0.5) == pytest.approx(2.5631 * sigma, rel=0.03)
    assert edge_rise_distance(edge[::-1], 0.5) == pytest.approx(2.5631 * sigma, rel=0.03)
    noisy = edge + np.where(np.abs(x) > 8, np.random.default_rng(3).normal(0, 40, x.size), 0)
    assert edge_rise_distance(noisy, 0.5) == pytest.approx(2.5631 * sigma, rel=0.1)
    with pytest.raises(InputError):
        edge_rise_distance(np.ones(20), 0.5)


def _disks(n: int = 256, supersample: int = 4) -> np.ndarray:
    """Three 1000-unit disks, pixel-integrated (ideal step edges), ``(n, n)``."""
    m = n * supersample
    yy, xx = np.mgrid[:m, :m] / supersample
    img = np.zeros((m, m))
    for cy, cx, r in ((75, 75, 38), (175, 160, 50), (75, 200, 25)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1000.0
    return img.reshape(n, supersample, n, supersample).mean(axis=(1, 3))


def test_edge_width_reads_the_blur_of_step_edges_through_noise():
    from scipy import ndimage as ndi

    img, rng = _disks(), np.random.default_rng(5)
    for fwhm in (1.5, 2.0, 3.0, 4.0):
        sigma = fwhm / 2.3548
        true = 2.3548 * math.sqrt(sigma ** 2 + 1 / 12)  # the pixel's own width adds 1/12 px^2
        blurred = ndi.gaussian_filter(img, sigma)
        for sd in (0.0, 10.0, 40.0):
            noisy = blurred + rng.normal(0, sd, img.shape) if sd else blurred
            assert edge_width_fwhm(noisy, max(sd, 1.0)) == pytest.approx(true, abs=0.25), (fwhm, sd)
    assert edge_width_fwhm(img, 1.0) < 1.0  # unblurred steps
    assert edge_width_fwhm(rng.normal(0, 20, (128, 128)), 20.0) is None  # no edge stands out of the noise
    with pytest.raises(InputError):
        edge_width_fwhm(np.zeros((4, 4)), 1.0)


def test_edge_width_grows_with_the_blur_added_to_a_real_slice(ct_slice):
    from scipy import ndimage as ndi

    rng = np.random.default_rng(6)
    reads = [edge_width_fwhm(ndi.gaussian_filter(ct_slice, f / 2.3548) + rng.normal(0, 10, ct_slice.shape), 10.0)
             if f else edge_width_fwhm(ct_slice, 10.0) for f in (0.0, 1.5, 2.5, 3.5)]
    assert reads[0] < 1.7  # the Siemens body kernel: sharp
    assert all(b > a + 0.3 for a, b in zip(reads, reads[1:])), reads


def test_nps_integrates_to_variance():
    rng = np.random.default_rng(4)
    sp = (0.8, 0.5)
    white = rng.normal(0, 7.0, (8, 64, 64))
    nps = noise_power_spectrum(white, sp)
    df = 1 / (64 * 0.8) * 1 / (64 * 0.5)
    assert nps.sum() * df == pytest.approx(white.var(axis=(-2, -1), ddof=0).mean(), rel=1e-6)
    f, r = radial_average(nps, sp)
    assert np.all(np.diff(f) > 0)
    assert r[1:].mean() == pytest.approx(49.0 * 0.8 * 0.5, rel=0.1)  # flat: sigma^2 dx dy
