"""Low-dose CT noise: simulated in the projection domain, or by its image-domain approximation.

:func:`ct_lowdose_noise` returns the low-dose image, :func:`ct_lowdose_added_noise` the noise it
adds; :func:`local_noise_sd_map` and :func:`shaped_unit_noise` are the two halves of the fast
image-domain method (the local noise level and the noise power spectrum of filtered back-projection).

Physical model of the CT simulation (parallel-beam geometry, monochromatic):

* ``mu = MU_WATER_PER_MM * (1 + HU / 1000)`` in 1/mm, clipped at 0 (air). ``MU_WATER_PER_MM =
  0.0194`` is water at about 70 keV, the effective energy of a 120 kVp beam (NIST XCOM mass
  attenuation 0.1937 cm^2/g, interpolated log-log between 60 and 80 keV).
* Line integrals ``p = integral of mu dl`` (unitless) from ``skimage.transform.radon``, scaled by
  the pixel spacing in mm.
* Counts per ray at full dose ``I = I0 * exp(-p)``. The source image already carries the noise of
  the full-dose scan, so lowering the dose to the fraction ``d`` ADDS, in the count domain, zero-mean
  noise of variance ``(1/d - 1) * I + (1/d**2 - 1) * sigma_e**2`` (Poisson part plus electronic part;
  Gaussian approximation of Zeng et al. 2015, IEEE TNS 62:2226, "A simple low-dose X-ray CT
  simulation from high-dose scan"; Yu et al. 2012, Med Phys 39:2617). In the log (line-integral)
  domain this is a variance of about ``(1/d - 1) e^p / I0 + (1/d**2 - 1) sigma_e**2 e^(2p) / I0**2``.
* The noisy line integrals minus the clean ones are reconstructed with filtered back-projection
  (``skimage.transform.iradon``); since FBP is linear this is the noisy reconstruction minus the
  clean reconstruction, i.e. the added noise, which is then added to the source HU.
* Photon counts are defined per *reference reading*: one detector bin 1 mm wide (at the isocentre)
  in one of 1000 views over 180 degrees. A simulated ray on a bin of ``dx`` mm in one of
  ``n_views`` views aggregates ``m = dx * 1000 / n_views`` reference readings (counts and
  electronic variances add), so the noise level does not depend on the numerical choice of
  ``n_views``, only on the physical fluence and the pixel size.
"""
from __future__ import annotations

import functools
import math
from typing import Literal, Sequence

import numpy as np
from scipy import ndimage as ndi

from ..errors import InputError
from .inputs import Seed, _as_image, _inplane_spacing, _rng


#: Linear attenuation of water in 1/mm at about 70 keV (NIST XCOM: 0.1937 cm^2/g x 1 g/cm^3).
MU_WATER_PER_MM = 0.0194
#: Incident photons per reference reading (1 mm bin, one of 1000 views over 180 deg) at full dose.
#: Calibrated on the Siemens Biograph mCT body CT in ``shared/data/ct/siemens-body-j2k`` (120 kVp,
#: 3 mm slices, Br38f kernel, 0.98 mm pixels): with this value, the default ``cosine`` filter and
#: ``tcm=0.5``, the simulated full-dose noise in the liver equals the measured noise of the scan
#: (~10 HU), so that a 25% dose image has about twice the noise SD of the source.
DEFAULT_PHOTONS = 2.0e6
#: Electronic (read-out) noise variance in photon counts^2 per reference reading (the order of
#: magnitude used by Yu et al. 2012 and Zeng et al. 2015 for clinical scanners).
DEFAULT_ELECTRONIC_NOISE = 10.0
#: Reference sampling that photon counts refer to: bin width (mm) and views per 180 degrees.
_REF_BIN_MM = 1.0
_REF_VIEWS = 1000
#: Pixel size (mm) of the coarse grid on which the line integrals are computed.
_FORWARD_GRID_MM = 2.0
#: Exponent of the angular tube-current modulation (0 = constant tube current).
DEFAULT_TCM = 0.5
_FILTERS = ("ramp", "shepp-logan", "cosine", "hamming", "hann")


def hu_to_mu(hu: np.ndarray, mu_water: float = MU_WATER_PER_MM) -> np.ndarray:
    """Linear attenuation in 1/mm from HU: ``mu_water * (1 + HU/1000)``, clipped at 0 (air).

    Args:
        hu: CT numbers in Hounsfield units, any shape.
        mu_water: attenuation of water in 1/mm at the effective beam energy.
    """
    return np.maximum(mu_water * (1.0 + np.asarray(hu, dtype=np.float64) / 1000.0), 0.0)


def mu_to_hu(mu: np.ndarray, mu_water: float = MU_WATER_PER_MM) -> np.ndarray:
    """HU from linear attenuation in 1/mm: ``1000 * (mu / mu_water - 1)``."""
    return 1000.0 * (np.asarray(mu, dtype=np.float64) / mu_water - 1.0)


# ---------------------------------------------------------------------------- CT geometry
class _Geometry:
    """Parallel-beam geometry around a 2-D slice of shape (h, w) with square pixels of ``dx`` mm.

    The slice is embedded (centred) in an odd square canvas of side ``L`` whose inscribed circle
    holds the whole slice, so no part of the body is cropped by the circular field of view.
    Sinogram bin ``i`` sits at offset ``i - L // 2`` pixels from the centre; reconstruction with
    ``iradon(output_size=n, circle=False)`` covers the central ``n x n`` square (``n = max(h, w)``).
    """

    def __init__(self, shape: tuple[int, int], dx: float, n_views: int):
        self.h, self.w = shape
        self.dx = dx
        self.n = max(shape)
        side = int(math.ceil(self.n * math.sqrt(2.0))) + 4
        self.L = side + 1 if side % 2 == 0 else side
        self.n_views = n_views
        self.theta = np.linspace(0.0, 180.0, n_views, endpoint=False)
        # offsets of the slice inside the n x n square and of the square inside the canvas
        self.oy, self.ox = (self.n - self.h) // 2, (self.n - self.w) // 2
        self.oc = self.L // 2 - self.n // 2

    def embed(self, img: np.ndarray) -> np.ndarray:
        canvas = np.zeros((self.L, self.L), dtype=np.float64)
        y0, x0 = self.oc + self.oy, self.oc + self.ox
        canvas[y0:y0 + self.h, x0:x0 + self.w] = img
        return canvas

    def crop(self, square: np.ndarray) -> np.ndarray:
        return square[self.oy:self.oy + self.h, self.ox:self.ox + self.w]

    def line_integrals(self, mu: np.ndarray) -> np.ndarray:
        """Line integrals ``p`` (unitless) of ``mu`` (1/mm, shape (h, w)), sinogram (L, n_views).

        Computed on a coarse grid (about ``_FORWARD_GRID_MM`` mm pixels, fewer views) with
        ``skimage.transform.radon`` and interpolated linearly onto the full sinogram: the noise
        level depends smoothly on ``p``, and this keeps the forward projection cheap.
        """
        from skimage.transform import radon, resize

        canvas = self.embed(mu)
        factor = max(1, int(round(_FORWARD_GRID_MM / self.dx)))
        lc = int(math.ceil(self.L / factor))
        lc += 1 - lc % 2  # odd, so that the centre pixel maps onto the centre pixel
        coarse = resize(canvas, (lc, lc), order=1, anti_aliasing=factor > 1, preserve_range=True) if lc != self.L else canvas
        px = self.dx * self.L / lc  # coarse pixel size in mm
        nc = max(16, int(math.ceil(self.n_views / factor)))
        theta_c = np.linspace(0.0, 180.0, nc + 1)  # endpoint included: no wrap-around needed
        # the coarse canvas is zero outside its inscribed circle by construction
        p_c = radon(coarse, theta_c, circle=True) * px
        # interpolate along s (bins) then along theta
        s_c = (np.arange(lc) - lc // 2) * (self.L / lc)
        s_f = np.arange(self.L) - self.L // 2
        p_s = np.empty((self.L, nc + 1))
        for k in range(nc + 1):
            p_s[:, k] = np.interp(s_f, s_c, p_c[:, k], left=0.0, right=0.0)
        pos = self.theta / 180.0 * nc
        k0 = np.minimum(np.floor(pos).astype(int), nc - 1)
        t = pos - k0
        return p_s[:, k0] * (1.0 - t) + p_s[:, k0 + 1] * t

    def fbp(self, sino: np.ndarray, filter_name: str) -> np.ndarray:
        """Filtered back-projection of a sinogram of line integrals -> mu in 1/mm, shape (h, w)."""
        from skimage.transform import iradon

        rec = iradon(sino, self.theta, output_size=self.n, circle=False, filter_name=filter_name)
        return self.crop(rec) / self.dx


def _check_ct_args(dose: float, photons: float, electronic_noise: float, filter_name: str,
                   method: str, tcm: float) -> None:
    if not (0.0 < float(dose) <= 1.0):
        raise InputError(f"dose must be a fraction of the full dose in (0, 1], got {dose!r}")
    if not (float(photons) > 0):
        raise InputError(f"photons must be a positive photon count, got {photons!r}")
    if not (float(electronic_noise) >= 0):
        raise InputError(f"electronic_noise must be a variance >= 0 (counts^2), got {electronic_noise!r}")
    if filter_name not in _FILTERS:
        raise InputError(f"filter_name must be one of {_FILTERS}, got {filter_name!r}")
    if method not in ("projection", "image"):
        raise InputError(f"method must be 'projection' or 'image', got {method!r}")
    if not (float(tcm) >= 0):
        raise InputError(f"tcm (tube-current modulation exponent) must be >= 0, got {tcm!r}")


def _tcm_factor(p: np.ndarray, tcm: float) -> np.ndarray:
    """Angular tube-current modulation: relative tube current per view, mean 1 (same total dose).

    The current follows ``A(theta)**tcm`` with ``A = exp(max_s p(theta, s))`` the transmission loss
    of the most attenuating ray of the view (Gies et al. 1999, Med Phys 26:2235: ``tcm = 0.5``
    minimises the noise for a given dose), limited to a 1:10 range like clinical systems.
    """
    if tcm <= 0:
        return np.ones(p.shape[1])
    pmax = p.max(axis=0)
    f = np.exp(tcm * (pmax - pmax.max()))
    f = np.maximum(f, 0.1)
    return f / f.mean()


def _reference_log_variance(p: np.ndarray, dose: float, photons: float, electronic_noise: float,
                            tcm: float) -> np.ndarray:
    """Added variance of the line integrals for ONE reference reading (see module docstring)."""
    e = np.exp(p)
    i0 = photons * _tcm_factor(p, tcm)[None, :]
    return (1.0 / dose - 1.0) * e / i0 + (1.0 / dose**2 - 1.0) * electronic_noise * e * e / i0**2


def _ct_noise_projection_2d(hu: np.ndarray, dx: float, dose: float, photons: float,
                            electronic_noise: float, n_views: int, filter_name: str,
                            mu_water: float, tcm: float, rng: np.random.Generator) -> np.ndarray:
    geo = _Geometry(hu.shape, dx, n_views)
    p = geo.line_integrals(hu_to_mu(hu, mu_water))
    m = (dx / _REF_BIN_MM) * (_REF_VIEWS / n_views)  # reference readings per simulated ray
    i0 = m * photons * _tcm_factor(p, tcm)[None, :]
    counts = i0 * np.exp(-p)  # expected counts per ray at full dose
    var = (1.0 / dose - 1.0) * counts + (1.0 / dose**2 - 1.0) * m * electronic_noise
    noisy = counts + np.sqrt(var) * rng.standard_normal(counts.shape)
    # a detector never reports less than a fraction of a photon after log-calibration
    p_noisy = -np.log(np.maximum(noisy, 0.5) / i0)
    dmu = geo.fbp(p_noisy - p, filter_name)
    return 1000.0 / mu_water * dmu


@functools.lru_cache(maxsize=8)
def _unit_fbp_noise(filter_name: str, size: int = 128, realisations: int = 24) -> tuple[np.ndarray, np.ndarray, float]:
    """NPS of FBP-reconstructed white sinogram noise, estimated from projection-domain realisations.

    White noise of unit variance per sinogram bin, ``size`` views over 180 deg, is reconstructed
    with ``iradon`` on a ``size x size`` grid (pixel units); the central half is analysed.

    Returns:
        (f, nps, kappa): radial frequencies in cycles/pixel, the radially averaged NPS normalised
        to unit integral (variance 1) over the 2-D frequency plane, and ``kappa`` = pixel variance
        x number of views (independent of the number of views).
    """
    from skimage.transform import iradon

    from ..metrics import noise_power_spectrum, radial_average

    rng = np.random.default_rng(20240601)
    theta = np.linspace(0.0, 180.0, size, endpoint=False)
    c0, c1 = size // 4, size // 4 + size // 2
    patches = []
    for _ in range(realisations):
        rec = iradon(rng.standard_normal((size, size)), theta, output_size=size, circle=True,
                     filter_name=filter_name)
        patches.append(rec[c0:c1, c0:c1])
    patches = np.stack(patches)
    variance = float(patches.var())
    nps2d = noise_power_spectrum(patches, (1.0, 1.0))
    f, nps = radial_average(nps2d, (1.0, 1.0))
    nps = nps / variance  # unit variance: sum(nps2d) * df^2 == variance
    return f, nps, variance * size


def shaped_unit_noise(shape: tuple[int, int], filter_name: str, rng: np.random.Generator) -> np.ndarray:
    """Stationary Gaussian noise of unit variance whose NPS is the FBP noise NPS (pixel units)."""
    f_r, nps_r, _ = _unit_fbp_noise(filter_name)
    h, w = shape
    fr = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :])
    amp = np.sqrt(np.maximum(np.interp(fr, f_r, nps_r, right=0.0), 0.0))
    amp /= np.sqrt(np.mean(amp**2))  # output variance = mean(amp^2) for unit white input
    return np.fft.ifft2(np.fft.fft2(rng.standard_normal((h, w))) * amp).real


def local_noise_sd_map(hu: np.ndarray, dx: float, dose: float, photons: float, electronic_noise: float,
                       filter_name: str, mu_water: float, tcm: float) -> np.ndarray:
    """Expected SD (HU) of the projection-domain noise at every pixel, without simulating it.

    For FBP, the noise variance at ``x`` is ``kappa / n_views`` times the mean over views of the
    sinogram variance on the ray through ``x`` (in pixel units). With the reference-reading
    scaling this is ``(1000/mu_w)^2 * kappa / (1000 * dx^3) * mean_theta v_ref(theta, x.theta)``.
    The mean over views is an unfiltered back-projection, evaluated on a grid 4x coarser.
    """
    h, w = hu.shape
    n_views = max(32, int(math.ceil(max(h, w) / 4)))
    geo = _Geometry(hu.shape, dx, n_views)
    p = geo.line_integrals(hu_to_mu(hu, mu_water))
    v = _reference_log_variance(p, dose, photons, electronic_noise, tcm)
    step = 4
    ys = np.arange(0, geo.n, step) - geo.n // 2
    xs = np.arange(0, geo.n, step) - geo.n // 2
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    s_axis = np.arange(geo.L) - geo.L // 2
    acc = np.zeros(yy.shape)
    for k, ang in enumerate(np.deg2rad(geo.theta)):
        t = xx * math.cos(ang) - yy * math.sin(ang)  # skimage's convention (rows = its "x")
        acc += np.interp(t, s_axis, v[:, k])
    mean_v = acc / n_views
    _, _, kappa = _unit_fbp_noise(filter_name)
    var = (1000.0 / mu_water) ** 2 * kappa / (_REF_VIEWS * (dx / _REF_BIN_MM) * dx**2) * mean_v
    sd_coarse = np.sqrt(var)
    zoom = (geo.n / sd_coarse.shape[0], geo.n / sd_coarse.shape[1])
    sd = ndi.zoom(sd_coarse, zoom, order=1, mode="nearest", grid_mode=True)[:geo.n, :geo.n]
    return geo.crop(sd)


def _ct_noise_image_2d(hu: np.ndarray, dx: float, dose: float, photons: float, electronic_noise: float,
                       filter_name: str, mu_water: float, tcm: float, rng: np.random.Generator) -> np.ndarray:
    sd = local_noise_sd_map(hu, dx, dose, photons, electronic_noise, filter_name, mu_water, tcm)
    return shaped_unit_noise(hu.shape, filter_name, rng) * sd


def ct_lowdose_added_noise(
    hu: np.ndarray,
    spacing_mm: Sequence[float],
    dose: float,
    *,
    photons: float = DEFAULT_PHOTONS,
    electronic_noise: float = DEFAULT_ELECTRONIC_NOISE,
    method: Literal["projection", "image"] = "projection",
    n_views: int | None = None,
    filter_name: str = "cosine",
    mu_water: float = MU_WATER_PER_MM,
    tcm: float = DEFAULT_TCM,
    seed: Seed = None,
) -> np.ndarray:
    """The noise (HU) that lowering the dose of a full-dose CT to ``dose`` adds; see :func:`ct_lowdose_noise`."""
    arr = _as_image(hu, "hu")
    dy, dx = _inplane_spacing(spacing_mm)
    _check_ct_args(dose, photons, electronic_noise, filter_name, method, tcm)
    if abs(dy - dx) > 0.01 * max(dy, dx):
        raise InputError(f"CT noise simulation needs square pixels in-plane, got spacing dy={dy} mm, dx={dx} mm")
    rng = _rng(seed)
    slices = arr[None] if arr.ndim == 2 else arr
    out = np.empty(slices.shape, dtype=np.float32)
    if dose == 1.0:
        out[:] = 0.0
        return out[0] if arr.ndim == 2 else out
    for z, sl in enumerate(slices):
        sl = sl.astype(np.float64)
        if method == "projection":
            nv = int(n_views) if n_views else max(slices.shape[-2:])
            if nv < 8:
                raise InputError(f"n_views must be at least 8, got {n_views!r}")
            out[z] = _ct_noise_projection_2d(sl, dx, float(dose), float(photons), float(electronic_noise),
                                             nv, filter_name, mu_water, float(tcm), rng)
        else:
            out[z] = _ct_noise_image_2d(sl, dx, float(dose), float(photons), float(electronic_noise),
                                        filter_name, mu_water, float(tcm), rng)
    return out[0] if arr.ndim == 2 else out


def ct_lowdose_noise(
    hu: np.ndarray,
    spacing_mm: Sequence[float],
    dose: float,
    *,
    photons: float = DEFAULT_PHOTONS,
    electronic_noise: float = DEFAULT_ELECTRONIC_NOISE,
    method: Literal["projection", "image"] = "projection",
    n_views: int | None = None,
    filter_name: str = "cosine",
    mu_water: float = MU_WATER_PER_MM,
    tcm: float = DEFAULT_TCM,
    seed: Seed = None,
) -> np.ndarray:
    """Simulate a lower-dose acquisition of a full-dose CT slice or volume.

    Args:
        hu: CT numbers in HU, ``(y, x)`` or ``(z, y, x)`` (slices treated independently). It is
            taken as a full-dose scan (``dose=1``) that already carries its own noise.
        spacing_mm: pixel spacing in mm, ``(dy, dx)`` or ``(dz, dy, dx)``; in-plane pixels must be
            square. Line integrals are in physical units, so the noise depends on it.
        dose: dose fraction of the simulated scan relative to the source, in (0, 1] (0.25 = 25%).
        photons: incident photons per reference reading (1 mm detector bin, one of 1000 views over
            180 deg) at full dose. The default is calibrated on a real body CT (see
            :data:`DEFAULT_PHOTONS`); noise variance scales as ``1/photons``.
        electronic_noise: electronic read-out noise variance in photon counts^2 per reference reading.
        method: ``"projection"`` (noise drawn per ray and reconstructed with FBP; 2-4 s per
            512x512 slice on 2 CPU cores) or ``"image"`` (white noise shaped with the NPS of projection-domain noise
            and scaled by the local noise level computed from the line integrals; ~10x faster,
            0.2-0.3 s per slice, but without the directional streaks of the projection method).
        n_views: views over 180 deg for the projection method; default ``max(y, x)``. Changes the
            texture only marginally, not the noise level.
        filter_name: FBP filter (``skimage.transform.iradon``): ``ramp``, ``shepp-logan``,
            ``cosine``, ``hamming`` or ``hann``. The default ``cosine`` (with ``tcm=0.5``) gives
            noise whose neighbour correlations in the liver (x 0.58, y 0.34) are the closest of
            these to the real noise of a medium-smooth clinical kernel (Siemens Br38f: x 0.48,
            y 0.24); ``ramp`` and ``shepp-logan`` give finer-grained noise, ``hann`` coarser.
            The calibration of ``photons`` holds for the default filter only.
        mu_water: attenuation of water in 1/mm at the effective energy.
        tcm: exponent of the angular tube-current modulation (relative current per view
            ``~ exp(max p)**tcm``, same total dose); 0 = constant current, 0.5 = the noise-optimal
            modulation of Gies et al. 1999. Without it, lateral rays dominate and noise streaks
            horizontally across a body.
        seed: seed or ``numpy.random.Generator``; the same seed gives the same result.

    Returns:
        float32 array of the input's shape: source HU plus the added noise. Noise is zero-mean
        (bias below 1 HU in soft tissue), spatially correlated, with variance ~ ``(1/dose - 1)``.
    """
    arr = _as_image(hu, "hu")
    noise = ct_lowdose_added_noise(arr, spacing_mm, dose, photons=photons, electronic_noise=electronic_noise,
                                   method=method, n_views=n_views, filter_name=filter_name,
                                   mu_water=mu_water, tcm=tcm, seed=seed)
    return (arr.astype(np.float32) + noise).astype(np.float32)
