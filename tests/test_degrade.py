"""Degradations have the stated physics, measured on real CT and MR from ../shared/data."""
from __future__ import annotations

import math

import numpy as np
import pytest

from napari_restore.degrade import (
    blur,
    blur_and_noise,
    ct_lowdose_added_noise,
    ct_lowdose_noise,
    degrade,
    gaussian_psf,
    motion_psf,
    mr_rician_noise,
)
from napari_restore.errors import InputError
from napari_restore.metrics import edge_rise_distance, noise_power_spectrum, radial_average
from napari_restore.volume import Volume

# Liver ROI of the Siemens body CT, slice InstanceNumber 277 (index 10 of 20): rows 230-270,
# columns 130-170 at 0.98 mm (a homogeneous part of the right liver lobe, ~99 HU).
LIVER = (slice(230, 270), slice(130, 170))
LIVER_HALF = (slice(115, 135), slice(65, 85))


def _detrend(p: np.ndarray) -> np.ndarray:
    """Remove a quadratic surface (slow anatomy) from an ROI, leaving the noise."""
    yy, xx = np.mgrid[: p.shape[0], : p.shape[1]]
    a = np.c_[np.ones(p.size), yy.ravel(), xx.ravel(), yy.ravel() ** 2, xx.ravel() ** 2, (yy * xx).ravel()]
    c, *_ = np.linalg.lstsq(a, p.ravel().astype(np.float64), rcond=None)
    return p - (a @ c).reshape(p.shape)


def _corr(a: np.ndarray, axis: int) -> float:
    a = a - a.mean()
    if axis == 1:
        return float(np.corrcoef(a[:, 1:].ravel(), a[:, :-1].ravel())[0, 1])
    return float(np.corrcoef(a[1:].ravel(), a[:-1].ravel())[0, 1])


@pytest.fixture(scope="module")
def siemens(shared_data):
    """(HU slice 512x512, spacing (dy, dx) mm) of the real Siemens body CT, slice index 10."""
    import pydicom

    files = sorted((shared_data / "ct" / "siemens-body-j2k").iterdir())
    heads = sorted((pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber, f) for f in files)
    ds = pydicom.dcmread(heads[10][1])
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return hu, tuple(float(v) for v in ds.PixelSpacing)


@pytest.fixture(scope="module")
def siemens_half(siemens):
    """The same slice at half resolution (256x256, 1.95 mm): small enough for fast FBP."""
    from skimage.transform import downscale_local_mean

    hu, (dy, dx) = siemens
    return downscale_local_mean(hu, (2, 2)).astype(np.float32), (2 * dy, 2 * dx)


@pytest.fixture(scope="module")
def mr_slice(shared_data):
    import nibabel as nib

    img = nib.load(shared_data / "mr" / "nifti" / "T1.nii.gz")
    return np.asarray(img.dataobj)[:, :, 70].astype(np.float32)


def _soft_tissue(hu: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    return ndi.binary_erosion((hu > 0) & (hu < 200), np.ones((5, 5)))


# ---------------------------------------------------------------------------------------- CT
def test_ct_lowdose_full_resolution_noise_doubles_at_quarter_dose(siemens):
    """Calibration: at 25% dose the liver noise SD is ~2x the source's (variance x 1/d)."""
    hu, sp = siemens
    src_sd = _detrend(hu[LIVER]).std()
    assert 8.0 < src_sd < 13.0  # the real scan's own noise (~10 HU)
    out = ct_lowdose_noise(hu, sp, 0.25, n_views=256, seed=0)
    assert out.dtype == np.float32 and out.shape == hu.shape
    ratio = _detrend(out[LIVER]).std() / src_sd
    assert 1.7 < ratio < 2.3, ratio
    fast = ct_lowdose_noise(hu, sp, 0.25, method="image", seed=0)
    ratio_img = _detrend(fast[LIVER]).std() / src_sd
    assert 1.7 < ratio_img < 2.3, ratio_img


def test_ct_noise_variance_scales_with_inverse_dose(siemens_half):
    hu, sp = siemens_half
    mask = _soft_tissue(hu)
    v25 = ct_lowdose_added_noise(hu, sp, 0.25, n_views=128, seed=1)[mask].var()
    v10 = ct_lowdose_added_noise(hu, sp, 0.10, n_views=128, seed=2)[mask].var()
    expected = (1 / 0.10 - 1) / (1 / 0.25 - 1)  # = 3
    assert abs(v10 / v25 / expected - 1) < 0.2, v10 / v25


def test_ct_noise_is_correlated_unbiased_and_physical(siemens_half):
    hu, sp = siemens_half
    mask = _soft_tissue(hu)
    noise = ct_lowdose_added_noise(hu, sp, 0.1, n_views=128, seed=3)
    # mean HU preserved (log-domain nonlinearity and clipping stay below 1.5 HU)
    assert abs(noise[mask].mean()) < 1.5
    # FBP noise is spatially correlated, unlike white noise
    roi = noise[LIVER_HALF]
    assert _corr(roi, 1) > 0.25 and _corr(roi, 0) > 0.1
    white = np.random.default_rng(0).standard_normal(roi.shape)
    assert abs(_corr(white, 1)) < 0.15
    # photon physics: noise is stronger inside the body than in the air around it
    air = noise[:20, :20]
    assert roi.std() > 2 * air.std()
    # Poisson statistics: with no electronic noise, variance ~ 1/photons
    kw = dict(n_views=128, electronic_noise=0.0)
    more = ct_lowdose_added_noise(hu, sp, 0.25, photons=4e6, seed=4, **kw)[mask].var()
    less = ct_lowdose_added_noise(hu, sp, 0.25, photons=1e6, seed=5, **kw)[mask].var()
    assert less / more == pytest.approx(4.0, rel=0.2)


def test_ct_image_method_matches_projection_nps(siemens_half):
    """The image-domain approximation has the projection-domain NPS and level."""
    hu, sp = siemens_half
    region = (slice(96, 160), slice(64, 192))  # 64 x 128 px of the abdomen, centre of the body

    def rois(noise):
        r = noise[region]
        return [r[:, :64], r[:, 64:]]

    proj, img = [], []
    for seed in range(3):
        proj += rois(ct_lowdose_added_noise(hu, sp, 0.25, n_views=128, seed=seed))
        img += rois(ct_lowdose_added_noise(hu, sp, 0.25, method="image", seed=seed))
    f, nps_p = radial_average(noise_power_spectrum(np.stack(proj), sp), sp)
    _, nps_i = radial_average(noise_power_spectrum(np.stack(img), sp), sp)
    assert np.corrcoef(nps_p, nps_i)[0, 1] > 0.9
    assert np.std(img) / np.std(proj) == pytest.approx(1.0, abs=0.15)


def test_ct_deterministic_volume_and_errors(siemens_half):
    hu, sp = siemens_half
    small = hu[64:192, 64:192]
    a = ct_lowdose_noise(small, sp, 0.3, n_views=64, seed=7)
    b = ct_lowdose_noise(small, sp, 0.3, n_views=64, seed=7)
    c = ct_lowdose_noise(small, sp, 0.3, n_views=64, seed=8)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 1.0
    np.testing.assert_array_equal(ct_lowdose_noise(small, sp, 1.0, seed=1), small)
    vol = np.stack([small, small])
    out = ct_lowdose_noise(vol, (3.0, *sp), 0.3, method="image", seed=1)
    assert out.shape == vol.shape and out.dtype == np.float32
    assert np.abs(out[0] - out[1]).mean() > 1.0  # independent noise per slice
    for bad in (dict(dose=0.0), dict(dose=1.5), dict(dose=0.5, method="fbp"), dict(dose=0.5, filter_name="x")):
        with pytest.raises(InputError):
            ct_lowdose_noise(small, sp, **bad)
    with pytest.raises(InputError, match="square pixels"):
        ct_lowdose_noise(small, (0.5, 1.0), 0.5)


# ---------------------------------------------------------------------------------------- MR
def test_rician_bias_of_pure_noise():
    sigma = 0.05 * 200.0
    zeros = np.zeros((256, 256), np.float32)
    for domain in ("image", "kspace"):
        mag = mr_rician_noise(zeros, 0.05, reference=200.0, domain=domain, seed=4)
        assert mag.mean() == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=0.03)
        assert mag.min() >= 0


def test_rician_on_real_mr(mr_slice):
    from skimage.filters import threshold_otsu

    ref = mr_slice[mr_slice > threshold_otsu(mr_slice)].mean()  # documented default reference
    out = mr_rician_noise(mr_slice, 0.05, seed=5)
    sigma = 0.05 * ref
    bright = mr_slice > 0.5 * mr_slice.max()  # high SNR: Rician ~ Gaussian, unbiased
    diff = (out - mr_slice)[bright]
    assert diff.std() == pytest.approx(sigma, rel=0.1)
    assert abs(diff.mean()) < 0.1 * sigma
    background = mr_slice == 0  # skull-stripped: pure noise there
    assert out[background].mean() == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=0.05)
    np.testing.assert_array_equal(out, mr_rician_noise(mr_slice, 0.05, seed=5))
    assert not np.array_equal(out, mr_rician_noise(mr_slice, 0.05, seed=6))


# ---------------------------------------------------------------------------------------- blur
def _fwhm_px(profile: np.ndarray) -> float:
    p = profile / profile.max()
    c = int(np.argmax(p))
    left = c - np.argmax(p[c::-1] < 0.5)
    right = c + np.argmax(p[c:] < 0.5)
    xl = left + (0.5 - p[left]) / (p[left + 1] - p[left])
    xr = right - 1 + (p[right - 1] - 0.5) / (p[right - 1] - p[right])
    return xr - xl


def test_gaussian_psf_fwhm_in_mm_for_anisotropic_spacing():
    sp = (0.5, 1.2)
    k = gaussian_psf(4.0, sp)
    assert k.sum() == pytest.approx(1.0)
    cy, cx = np.array(k.shape) // 2
    assert _fwhm_px(k[:, cx]) * sp[0] == pytest.approx(4.0, rel=0.05)
    assert _fwhm_px(k[cy, :]) * sp[1] == pytest.approx(4.0, rel=0.05)
    k3 = gaussian_psf((6.0, 3.0, 3.0), (2.0, 0.7, 0.7))
    cz, cy, cx = np.array(k3.shape) // 2
    assert _fwhm_px(k3[:, cy, cx]) * 2.0 == pytest.approx(6.0, rel=0.05)
    assert _fwhm_px(k3[cz, :, cx]) * 0.7 == pytest.approx(3.0, rel=0.05)


def test_motion_psf_length_and_angle():
    sp = (0.6, 0.9)
    length, angle = 12.0, 30.0
    k = motion_psf(length, angle, sp)
    assert k.sum() == pytest.approx(1.0) and (k >= 0).all()
    yy, xx = np.mgrid[: k.shape[0], : k.shape[1]]
    c = k.shape[0] // 2
    ymm, xmm = (yy - c) * sp[0], (xx - c) * sp[1]
    a = math.radians(angle)
    along = xmm * math.cos(a) + ymm * math.sin(a)
    across = -xmm * math.sin(a) + ymm * math.cos(a)
    measured = math.sqrt(12 * (k * along**2).sum())  # uniform segment: var = L^2 / 12
    assert measured == pytest.approx(length, rel=0.05)
    assert math.sqrt((k * across**2).sum()) < 0.6  # a line, not a blob (mm)
    assert abs((k * along).sum()) < 1e-6  # centred


def test_blur_edge_and_noise(mr_slice):
    sp = (1.0, 1.0)
    fwhm = 3.0
    psf = gaussian_psf(fwhm, sp)
    out = blur(mr_slice, psf)
    assert out.shape == mr_slice.shape and out.dtype == np.float32
    assert out.mean() == pytest.approx(mr_slice.mean(), rel=1e-3)  # sum-1 PSF, reflecting borders
    step = np.zeros((64, 64), np.float32)
    step[:, 32:] = 100.0
    prof = blur(step, gaussian_psf(fwhm, (0.5, 0.5)))[32]
    sigma = fwhm / 2.3548
    assert edge_rise_distance(prof, 0.5) == pytest.approx(2.5631 * sigma, rel=0.05)
    noisy = blur_and_noise(mr_slice, psf, noise_sd=5.0, seed=1)
    assert (noisy - out).std() == pytest.approx(5.0, rel=0.03)
    np.testing.assert_array_equal(noisy, blur_and_noise(mr_slice, psf, noise_sd=5.0, seed=1))
    with pytest.raises(InputError):
        blur(mr_slice, np.ones((4, 4)))


# ---------------------------------------------------------------------------------------- entry
def test_degrade_entry_point_slicewise(mr_slice, siemens_half):
    vol = np.stack([mr_slice, mr_slice[::-1]])
    for kind, params in [
        ("mr_rician", dict(sigma_fraction=0.05)),
        ("gaussian_blur", dict(fwhm_mm=2.0, noise_sd=1.0)),
        ("motion_blur", dict(length_mm=5.0, angle_deg=45.0)),
    ]:
        a = degrade(vol, kind, seed=3, spacing_mm=(2.0, 1.0, 1.0), **params)
        b = degrade(vol, kind, seed=3, spacing_mm=(2.0, 1.0, 1.0), **params)
        assert a.shape == vol.shape and a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
        two_d = degrade(vol[0], kind, seed=3, spacing_mm=(1.0, 1.0), **params)
        assert two_d.shape == vol[0].shape
    # a 3-D blur mixes slices, the in-plane one does not
    in_plane = degrade(vol, "gaussian_blur", seed=0, spacing_mm=(1.0, 1.0, 1.0), fwhm_mm=2.0)
    np.testing.assert_allclose(in_plane[0], blur(vol[0], gaussian_psf(2.0, (1.0, 1.0))), atol=1e-3)
    full = degrade(vol, "gaussian_blur", seed=0, spacing_mm=(1.0, 1.0, 1.0), fwhm_mm=2.0, three_d=True)
    assert np.abs(full[0] - in_plane[0]).mean() > 0.1
    hu, sp = siemens_half
    ct = degrade(hu, "ct_lowdose", seed=1, spacing_mm=sp, dose=0.25, method="image")
    assert ct.shape == hu.shape and np.abs(ct - hu).mean() > 1.0
    # a Volume keeps its geometry and records the step
    v = Volume(hu[None], np.diag([3.0, sp[0], sp[1], 1.0]), "CT", {})
    out = degrade(v, "ct_lowdose", seed=1, dose=0.25, method="image")
    assert isinstance(out, Volume) and np.allclose(out.affine, v.affine)
    assert out.meta["provenance"][-1]["kind"] == "ct_lowdose"
    np.testing.assert_allclose(out.array[0], ct, atol=1e-3)
    with pytest.raises(InputError, match="unknown degradation"):
        degrade(hu, "jpeg", seed=0, spacing_mm=sp)
    with pytest.raises(InputError, match="spacing_mm"):
        degrade(hu, "motion_blur", seed=0, length_mm=3.0, angle_deg=0.0)
