"""Simulated SPHEREx Level-2 exposures of a sky whose truth is known.

This module is the test oracle and the demo data source of drizzle3d. It
writes multi-extension FITS files in the layout of the real SPHEREx Level-2
spectral images (``IMAGE``, ``FLAGS``, ``VARIANCE``, ``ZODI``, ``PSF`` (QR2)
or ``EPSF`` (QR3), ``WCS-WAVE``), with the real header keywords, a TAN-SIP
celestial WCS and the alternate ``W`` WCS that uses the FITS ``-TAB``
algorithm on the ``WCS-WAVE`` table, exactly as astropy reads real files::

    WCS(hdul["IMAGE"].header, fobj=hdul, key="W")

The pieces:

- :class:`Spectrum`, :class:`Line`, :class:`PointSource`,
  :class:`ExtendedSource` and :class:`Sky`: the known truth. Every
  spectrum is a power-law continuum plus Gaussian emission (positive) or
  absorption (negative) lines, and can be averaged analytically over a
  top-hat band, as a SPHEREx pixel integrates it.
- :func:`lvf_wavelength` and :func:`lvf_table`: a model of the linear
  variable filter (LVF) of each detector: central wavelength falling with
  ``y`` (log-linearly from the detector's longest to its shortest channel),
  iso-wavelength lines curved (1 % longer at the left and right edges than in
  the centre column), bandwidth ``lambda / R(lambda)`` from the shipped
  channel table, and the real per-detector ``WCS-WAVE`` grid sizes and
  control points.
- :func:`simulate_field`, :func:`write_exposure`, :func:`make_cutout` and
  :func:`write_spectral_wcs_calibration`: files.

Small frames
------------
A frame smaller than 2040 x 2040 keeps the real pixel scale (6.15 arcsec) but
the LVF is *compressed* onto it: the filter model is defined in normalised
detector coordinates ``u = (x - 1) / (nx - 1)``, ``t = (y - 1) / (ny - 1)``
(1-based pixels), so a 256 x 256 frame still spans the detector's whole
wavelength range from its first to its last row (about 8 times steeper per
pixel than the real filter). The ``WCS-WAVE`` control points are the real ones
scaled by ``(n - 1) / 2039`` and rounded (duplicates dropped), so a full frame
gets exactly the real table layout. The SIP distortion is also defined in
normalised coordinates (about 1.5 pixels at the corners of any frame).
"""

from __future__ import annotations

import gzip as _gzip
import io
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, Sip
from scipy.interpolate import RegularGridInterpolator
from scipy.special import erf

from drizzle3d._flags import FLAG_TABLE
from drizzle3d.channels import detector_channels, detector_range

__all__ = [
    "FLAG_BITS",
    "ExposureTruth",
    "ExtendedSource",
    "Line",
    "PointSource",
    "SimulatedField",
    "Sky",
    "Spectrum",
    "lvf_table",
    "lvf_wavelength",
    "make_cutout",
    "simulate_field",
    "write_exposure",
    "write_spectral_wcs_calibration",
    "zodi_model",
]

log = logging.getLogger(__name__)

#: Pixel scale of SPHEREx spectral images (arcsec per pixel).
PIXEL_SCALE_ARCSEC = 6.15
#: Exposure (integration) time of one SPHEREx exposure (s), header ``XPOSURE``.
EXPTIME = 113.5826
_TELAPSE = 118.1873
_ARCSEC2_TO_SR = (math.pi / 180.0 / 3600.0) ** 2
_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))

#: Flag names and bits written by the simulator: the documented table (the QR2 list of
#: late-2025 files plus the QR3 additions CROSSTALK, STREAK and SATELLITE_HALO).
FLAG_BITS = dict(FLAG_TABLE)
_QR2_ONLY_ABSENT = ("CROSSTALK", "STREAK", "SATELLITE_HALO")
#: Bits the simulator uses to mark its injected bad pixels.
_BAD_PIXEL_FLAGS = ("HOT", "COLD", "NONFUNC", "PERSIST", "NONLINEAR", "OUTLIER", "MISSING_DATA")

# Real WCS-WAVE control points (1-based parent-detector pixels) per detector.
_N_REAL = 2040


def _linpts(start: float, stop: float, num: int) -> np.ndarray:
    return np.floor(np.linspace(start, stop, num) + 0.5).astype(np.int64)


_CONTROL_POINTS = {
    1: (_linpts(1, 2040, 9), _linpts(1, 2040, 9)),
    2: (_linpts(1, 2040, 11), _linpts(1, 2040, 11)),
    3: (
        _linpts(1, 2040, 9),
        np.array([1, 36, 71, 105, 140, 141, 379, 617, 855, 1091, 1326, 1564, 1802, 2040]),
    ),
    4: (
        _linpts(1, 2040, 13),
        np.concatenate([_linpts(1, 1800, 13), _linpts(1801, 2040, 7)]),
    ),
    5: (_linpts(1, 2040, 11), _linpts(1, 2040, 11)),
    6: (_linpts(1, 2040, 9), _linpts(1, 2040, 9)),
}
# Fractional detector row (t) below which D3's bandwidth is narrower (dichroic edge).
_D3_DICHROIC_T = 140.0 / 2039.0
_LVF_CURVATURE = 0.01


# --------------------------------------------------------------------------------------------
# Spectra and sky
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Line:
    """A Gaussian spectral line.

    Parameters
    ----------
    center : float
        Central wavelength (um).
    sigma : float
        Gaussian standard deviation (um).
    amplitude : float
        Peak height, in the units of the spectrum it belongs to; positive for an
        emission line, negative for an absorption line.

    Raises
    ------
    ValueError
        If ``sigma`` is not positive.

    Examples
    --------
    A line's integral is ``amplitude * sigma * sqrt(2 pi)``, so a band that holds
    the whole line averages it to that integral over the bandwidth:

    >>> import math
    >>> line = Line(2.0, sigma=0.01, amplitude=1.0)
    >>> average = Spectrum(0.0, lines=(line,)).band_average(2.0, 1.0)
    >>> math.isclose(float(average), 0.01 * math.sqrt(2.0 * math.pi))
    True
    >>> Line(2.0, sigma=0.0, amplitude=1.0)
    Traceback (most recent call last):
    ...
    ValueError: 'sigma' must be > 0 um; got 0.0.
    """

    center: float
    sigma: float
    amplitude: float

    def __post_init__(self):
        if not self.sigma > 0:
            raise ValueError(f"'sigma' must be > 0 um; got {self.sigma!r}.")


@dataclass(frozen=True)
class Spectrum:
    """A power-law continuum plus Gaussian lines.

    ``f(lam) = amplitude * (lam / ref_wavelength) ** index + sum(lines)``.

    Parameters
    ----------
    amplitude : float
        Continuum value at ``ref_wavelength``.
    index : float, optional
        Power-law index of the continuum.
    ref_wavelength : float, optional
        Reference wavelength (um).
    lines : tuple of Line, optional
        Emission/absorption lines.

    Examples
    --------
    >>> s = Spectrum(2.0, index=-1.0, lines=(Line(1.5, 0.01, 1.0),))
    >>> round(float(s.evaluate(1.5)), 3)
    2.333
    """

    amplitude: float
    index: float = 0.0
    ref_wavelength: float = 1.0
    lines: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "lines", tuple(self.lines))

    def evaluate(self, wavelength) -> np.ndarray:
        """Return the spectrum at ``wavelength`` (um), vectorised.

        Parameters
        ----------
        wavelength : float or array_like
            Wavelength(s) in um.

        Returns
        -------
        numpy.ndarray
            float64 values of the spectrum, of the shape of ``wavelength``.

        Examples
        --------
        >>> Spectrum(1.0, index=-1.0).evaluate([1.0, 2.0, 4.0]).tolist()
        [1.0, 0.5, 0.25]
        """
        lam = np.asarray(wavelength, dtype=np.float64)
        out = self.amplitude * (lam / self.ref_wavelength) ** self.index
        for ln in self.lines:
            out = out + ln.amplitude * np.exp(-0.5 * ((lam - ln.center) / ln.sigma) ** 2)
        return out

    def band_average(self, wavelength, bandwidth) -> np.ndarray:
        """Return the top-hat average of the spectrum over ``wavelength +- bandwidth / 2``.

        Exact (analytic) for the continuum and the lines; ``bandwidth == 0``
        gives :meth:`evaluate`.

        Parameters
        ----------
        wavelength : float or array_like
            Band centre(s) in um.
        bandwidth : float or array_like
            Full band width(s) in um (>= 0), broadcast against ``wavelength``.

        Returns
        -------
        numpy.ndarray
            float64 band averages, of the broadcast shape.

        Examples
        --------
        The average of ``1 / lam`` over [1.9, 2.1] um is ``ln(2.1 / 1.9) / 0.2``,
        slightly above its value at the band centre:

        >>> import math
        >>> s = Spectrum(1.0, index=-1.0)
        >>> math.isclose(float(s.band_average(2.0, 0.2)), math.log(2.1 / 1.9) / 0.2)
        True
        >>> s.band_average([1.0, 2.0], 0.0).tolist()
        [1.0, 0.5]
        """
        lam = np.asarray(wavelength, dtype=np.float64)
        bw = np.broadcast_to(np.asarray(bandwidth, dtype=np.float64), np.broadcast(lam).shape)
        lam, bw = np.broadcast_arrays(lam, bw)
        lo = lam - 0.5 * bw
        hi = lam + 0.5 * bw
        safe = np.where(bw > 0, bw, 1.0)
        ref = self.ref_wavelength
        p = self.index + 1.0
        if abs(p) < 1e-12:
            cont = self.amplitude * ref * np.log(hi / lo) / safe
        else:
            cont = self.amplitude * ref / p * ((hi / ref) ** p - (lo / ref) ** p) / safe
        out = np.where(bw > 0, cont, self.amplitude * (lam / ref) ** self.index)
        for ln in self.lines:
            s2 = math.sqrt(2.0) * ln.sigma
            integ = (
                ln.amplitude
                * ln.sigma
                * math.sqrt(math.pi / 2.0)
                * (erf((hi - ln.center) / s2) - erf((lo - ln.center) / s2))
            )
            peak = ln.amplitude * np.exp(-0.5 * ((lam - ln.center) / ln.sigma) ** 2)
            out = out + np.where(bw > 0, integ / safe, peak)
        return out


@dataclass(frozen=True)
class PointSource:
    """An unresolved source seen through a circular Gaussian PSF.

    Parameters
    ----------
    ra, dec : float
        Position (deg).
    spectrum : Spectrum
        Flux density spectrum in **mJy**.
    fwhm : float, optional
        FWHM of the Gaussian PSF (arcsec).

    Examples
    --------
    A 1 mJy source: its surface brightness integrated over the sky gives back the
    flux density (1 mJy = 1e-9 MJy).

    >>> import numpy as np
    >>> star = PointSource(150.0, 2.0, Spectrum(1.0), fwhm=6.0)
    >>> sky = Sky(point_sources=(star,))
    >>> step = 0.5 / 3600.0  # 0.5 arcsec grid
    >>> dy, dx = np.mgrid[-60:61, -60:61] * step
    >>> sb = sky.evaluate(150.0 + dx / np.cos(np.radians(2.0)), 2.0 + dy, 1.5)  # MJy/sr
    >>> round(float(sb.sum() * np.radians(step) ** 2) * 1e9, 4)  # mJy
    1.0
    """

    ra: float
    dec: float
    spectrum: Spectrum
    fwhm: float = 6.0


@dataclass(frozen=True)
class ExtendedSource:
    """A circular Gaussian blob of surface brightness.

    Parameters
    ----------
    ra, dec : float
        Centre (deg).
    spectrum : Spectrum
        Peak surface brightness spectrum in **MJy/sr**.
    fwhm : float
        FWHM of the blob (arcsec).

    Examples
    --------
    The surface brightness at the centre is the spectrum itself; one FWHM/2 away it
    is half of it.

    >>> blob = ExtendedSource(150.0, 2.0, Spectrum(0.3), fwhm=60.0)
    >>> sky = Sky(extended_sources=(blob,))
    >>> float(sky.evaluate(150.0, 2.0, 2.0))
    0.3
    >>> round(float(sky.evaluate(150.0, 2.0 + 30.0 / 3600.0, 2.0)), 6)
    0.15
    """

    ra: float
    dec: float
    spectrum: Spectrum
    fwhm: float


def _offsets_arcsec(ra, dec, ra0, dec0):
    """Gnomonic offsets (arcsec) of (ra, dec) from (ra0, dec0), all in deg."""
    ra = np.deg2rad(np.asarray(ra, dtype=np.float64))
    dec = np.deg2rad(np.asarray(dec, dtype=np.float64))
    a0, d0 = math.radians(ra0), math.radians(dec0)
    cosc = np.sin(d0) * np.sin(dec) + np.cos(d0) * np.cos(dec) * np.cos(ra - a0)
    xi = np.cos(dec) * np.sin(ra - a0) / cosc
    eta = (np.cos(d0) * np.sin(dec) - np.sin(d0) * np.cos(dec) * np.cos(ra - a0)) / cosc
    k = math.degrees(1.0) * 3600.0
    return xi * k, eta * k


@dataclass(frozen=True)
class Sky:
    """A sky with known truth: a uniform background, point sources and extended sources.

    Surface brightness is in MJy/sr. Point sources are seen through their
    Gaussian PSF, so :meth:`evaluate` is the PSF-convolved scene (point
    sampled); the simulator integrates point sources exactly over each pixel.

    Parameters
    ----------
    background : Spectrum, optional
        Uniform astrophysical background (MJy/sr); default zero.
    point_sources : tuple of PointSource, optional
        Unresolved sources (flux densities in mJy).
    extended_sources : tuple of ExtendedSource, optional
        Gaussian blobs (peak surface brightness in MJy/sr).

    Examples
    --------
    >>> sky = Sky.default(center=(150.0, 2.0))
    >>> v = sky.evaluate(150.0, 2.0, 2.0)
    >>> bool(v > 0)
    True
    """

    background: Spectrum = field(default_factory=lambda: Spectrum(0.0))
    point_sources: tuple = ()
    extended_sources: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "point_sources", tuple(self.point_sources))
        object.__setattr__(self, "extended_sources", tuple(self.extended_sources))

    @classmethod
    def default(cls, center=(150.0, 2.0)) -> Sky:
        """A small field: four point sources and a nebula with emission lines.

        Parameters
        ----------
        center : tuple of float, optional
            ``(ra, dec)`` of the field centre (deg).

        Returns
        -------
        Sky
            Point source 0 sits exactly at ``center``; the nebula (FWHM 90
            arcsec) 60 arcsec east of it carries Pa-beta 1.282, Pa-alpha 1.875,
            Br-alpha 4.052 um and PAH 3.3 um emission plus a 2.3 um CO-like
            absorption on a falling continuum.

        Examples
        --------
        >>> sky = Sky.default(center=(10.0, -45.0))
        >>> len(sky.point_sources), len(sky.extended_sources)
        (4, 1)
        >>> (sky.point_sources[0].ra, sky.point_sources[0].dec)
        (10.0, -45.0)
        >>> [line.center for line in sky.extended_sources[0].spectrum.lines]
        [1.282, 1.875, 2.3, 3.3, 4.052]
        """
        ra0, dec0 = (float(c) for c in center)
        cosd = math.cos(math.radians(dec0))

        def at(dx_arcsec, dy_arcsec):
            return ra0 + dx_arcsec / 3600.0 / cosd, dec0 + dy_arcsec / 3600.0

        stars = (
            PointSource(
                ra0,
                dec0,
                Spectrum(3.0, index=-0.5, lines=(Line(1.6, 0.05, 0.6), Line(3.3, 0.06, -0.5))),
            ),
            PointSource(*at(-150.0, 90.0), Spectrum(1.5, index=-1.5)),
            PointSource(
                *at(120.0, -160.0), Spectrum(0.8, index=0.5, lines=(Line(2.2, 0.04, 0.4),))
            ),
            PointSource(*at(-60.0, -200.0), Spectrum(2.0, index=-2.0)),
        )
        nebula = ExtendedSource(
            *at(60.0, 30.0),
            Spectrum(
                0.15,
                index=-0.7,
                lines=(
                    Line(1.282, 0.006, 0.4),
                    Line(1.875, 0.009, 0.6),
                    Line(2.3, 0.03, -0.05),
                    Line(3.3, 0.02, 0.5),
                    Line(4.052, 0.01, 0.4),
                ),
            ),
            fwhm=90.0,
        )
        return cls(
            background=Spectrum(0.002, index=-1.0),
            point_sources=stars,
            extended_sources=(nebula,),
        )

    def _spatial(self, ra, dec):
        """Yield (profile_per_sr_or_unit, spectrum, scale) per component."""
        for src in self.extended_sources:
            dx, dy = _offsets_arcsec(ra, dec, src.ra, src.dec)
            sig = src.fwhm * _FWHM_TO_SIGMA
            yield np.exp(-0.5 * (dx * dx + dy * dy) / sig**2), src.spectrum
        for src in self.point_sources:
            dx, dy = _offsets_arcsec(ra, dec, src.ra, src.dec)
            sig = src.fwhm * _FWHM_TO_SIGMA
            norm = 1e-9 / (2.0 * math.pi * sig**2 * _ARCSEC2_TO_SR)  # mJy -> MJy/sr per arcsec^2
            yield norm * np.exp(-0.5 * (dx * dx + dy * dy) / sig**2), src.spectrum

    def evaluate(self, ra, dec, wavelength) -> np.ndarray:
        """Surface brightness (MJy/sr) at ``(ra, dec)`` (deg) and ``wavelength`` (um).

        Arguments broadcast against each other.

        Parameters
        ----------
        ra, dec : float or array_like
            Sky position(s) in deg.
        wavelength : float or array_like
            Wavelength(s) in um.

        Returns
        -------
        numpy.ndarray
            float64 surface brightness (MJy/sr), point sampled from the
            PSF-convolved scene, of the broadcast shape.

        Examples
        --------
        >>> sky = Sky(background=Spectrum(0.5, index=-1.0))
        >>> sky.evaluate(150.0, 2.0, [1.0, 2.0]).tolist()
        [0.5, 0.25]
        """
        ra, dec, lam = np.broadcast_arrays(
            np.asarray(ra, float), np.asarray(dec, float), np.asarray(wavelength, float)
        )
        out = self.background.evaluate(lam)
        for prof, spec in self._spatial(ra, dec):
            out = out + prof * spec.evaluate(lam)
        return out

    def band_average(self, ra, dec, wavelength, bandwidth) -> np.ndarray:
        """Surface brightness (MJy/sr) averaged over the band ``wavelength +- bandwidth/2``.

        What a SPHEREx pixel of central wavelength ``wavelength`` and bandwidth
        ``bandwidth`` sees (before pixel integration); see :meth:`Spectrum.band_average`.

        Parameters
        ----------
        ra, dec : float or array_like
            Sky position(s) in deg.
        wavelength : float or array_like
            Band centre(s) in um.
        bandwidth : float or array_like
            Full band width(s) in um (>= 0).

        Returns
        -------
        numpy.ndarray
            float64 band-averaged surface brightness (MJy/sr), of the broadcast shape.

        Examples
        --------
        A narrow line is diluted by a wide band:

        >>> sky = Sky(background=Spectrum(0.0, lines=(Line(2.0, 0.005, 1.0),)))
        >>> float(sky.band_average(150.0, 2.0, 2.0, 0.0))
        1.0
        >>> bool(sky.band_average(150.0, 2.0, 2.0, 0.05) < 0.3)
        True
        """
        ra, dec, lam, bw = np.broadcast_arrays(
            np.asarray(ra, float),
            np.asarray(dec, float),
            np.asarray(wavelength, float),
            np.asarray(bandwidth, float),
        )
        out = self.background.band_average(lam, bw)
        for prof, spec in self._spatial(ra, dec):
            out = out + prof * spec.band_average(lam, bw)
        return out


# --------------------------------------------------------------------------------------------
# The linear variable filter
# --------------------------------------------------------------------------------------------
def _check_detector(detector) -> int:
    try:
        det = int(str(detector).upper().lstrip("D"))
    except ValueError:
        det = -1
    if det not in _CONTROL_POINTS:
        raise ValueError(f"'detector' must be one of 1..6; got {detector!r}.")
    return det


def _check_shape(shape) -> tuple[int, int]:
    try:
        ny, nx = (int(n) for n in shape)
    except (TypeError, ValueError) as err:
        raise ValueError(f"'shape' must be (ny, nx); got {shape!r}.") from err
    if ny < 16 or nx < 16:
        raise ValueError(f"'shape' must be at least (16, 16); got {shape!r}.")
    return ny, nx


def lvf_wavelength(detector, x, y, shape=(2040, 2040)) -> tuple[np.ndarray, np.ndarray]:
    """The model LVF: central wavelength and bandwidth (um) at 1-based pixels ``(x, y)``.

    This is the smooth "science-grade" filter of the simulator (what a
    ``CWAVE``/``CBAND`` calibration holds); the ``WCS-WAVE`` table samples it at
    its control points.

    Parameters
    ----------
    detector : int
        1..6.
    x, y : array_like
        1-based pixel coordinates of a frame of ``shape``.
    shape : tuple of int, optional
        ``(ny, nx)`` of the frame (the filter is compressed onto small frames).

    Returns
    -------
    wavelength, bandwidth : numpy.ndarray
        Central wavelength and bandwidth (um) at each pixel, of the broadcast
        shape of ``x`` and ``y``.

    Raises
    ------
    ValueError
        If ``detector`` is not 1..6 or ``shape`` is smaller than (16, 16).

    Examples
    --------
    >>> lam, bw = lvf_wavelength(3, 1020.5, [1.0, 2040.0])
    >>> bool(lam[0] > lam[1])
    True
    """
    det = _check_detector(detector)
    ny, nx = _check_shape(shape)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    lo, hi = detector_range(det)
    u = (x - 1.0) / (nx - 1.0)
    t = (y - 1.0) / (ny - 1.0)
    lam = hi * (lo / hi) ** t * (1.0 + _LVF_CURVATURE * (2.0 * u - 1.0) ** 2)
    rows = detector_channels(det)
    r = np.interp(lam, rows["wavelength"], rows["r"])
    bw = lam / r
    if det == 3:
        bw = np.where(t <= _D3_DICHROIC_T, 0.75 * bw, bw)
    return lam, bw


def lvf_table(detector, shape=(2040, 2040)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``WCS-WAVE`` lookup table of a detector: control points and values.

    Parameters
    ----------
    detector : int
        1..6.
    shape : tuple of int, optional
        ``(ny, nx)``; a full frame gives the real table sizes and control
        points (D1 9x9, D2 11x11, D3 9x14, D4 13x20, D5 11x11, D6 9x9).

    Returns
    -------
    x, y : numpy.ndarray of int32
        1-based control points along x and y.
    values : numpy.ndarray of float32, shape (len(y), len(x), 2)
        ``values[iy, ix, 0]`` wavelength, ``values[iy, ix, 1]`` bandwidth (um).

    Raises
    ------
    ValueError
        If ``detector`` is not 1..6 or ``shape`` is smaller than (16, 16).

    Examples
    --------
    >>> x, y, values = lvf_table(4)
    >>> x.size, y.size, values.shape
    (13, 20, (20, 13, 2))
    >>> int(x[0]), int(x[-1])
    (1, 2040)
    >>> x, y, values = lvf_table(4, shape=(64, 64))  # control points scaled to the frame
    >>> int(y[-1])
    64
    """
    det = _check_detector(detector)
    ny, nx = _check_shape(shape)
    cx, cy = _CONTROL_POINTS[det]
    xs = np.unique(np.floor(1.0 + (cx - 1.0) * (nx - 1.0) / (_N_REAL - 1.0) + 0.5)).astype(np.int32)
    ys = np.unique(np.floor(1.0 + (cy - 1.0) * (ny - 1.0) / (_N_REAL - 1.0) + 0.5)).astype(np.int32)
    gx, gy = np.meshgrid(xs.astype(float), ys.astype(float))
    lam, bw = lvf_wavelength(det, gx, gy, shape=(ny, nx))
    values = np.stack([lam, bw], axis=-1).astype(np.float32)
    return xs, ys, values


def _table_wavemap(xs, ys, values, shape, origin=(0, 0)) -> np.ndarray:
    """Bilinear evaluation of a -TAB table (scipy), 0-based pixels offset by ``origin``."""
    ny, nx = shape
    y0, x0 = origin
    interp = RegularGridInterpolator(
        (ys.astype(float), xs.astype(float)), values.astype(np.float64), bounds_error=False
    )
    yy, xx = np.meshgrid(
        np.arange(ny, dtype=float) + y0 + 1.0, np.arange(nx, dtype=float) + x0 + 1.0, indexing="ij"
    )
    out = interp(np.stack([yy.ravel(), xx.ravel()], axis=-1))
    return out.reshape(ny, nx, 2)


def zodi_model(wavelength, x, y, shape) -> np.ndarray:
    """The simulator's zodiacal-light model (MJy/sr), written to the ``ZODI`` HDU.

    ``Z = (0.2 lam**1.2 + 0.002 lam**4) * (1 + 0.03 (u - 0.5) - 0.02 (t - 0.5))``
    with ``u, t`` the normalised 1-based pixel coordinates: a scattered plus
    thermal spectrum with a gentle gradient across the frame.

    Parameters
    ----------
    wavelength : float or array_like
        Wavelength(s) in um (the pixel's central wavelength).
    x, y : float or array_like
        1-based pixel coordinates.
    shape : tuple of int
        ``(ny, nx)`` of the frame.

    Returns
    -------
    numpy.ndarray
        Zodiacal light (MJy/sr), of the broadcast shape of the arguments.

    Examples
    --------
    At the frame centre the gradient term is 1:

    >>> z = zodi_model([1.0, 4.0], 1020.5, 1020.5, (2040, 2040))
    >>> [round(float(v), 6) for v in z]
    [0.202, 1.567606]
    """
    ny, nx = shape
    lam = np.asarray(wavelength, dtype=np.float64)
    u = (np.asarray(x, float) - 1.0) / (nx - 1.0)
    t = (np.asarray(y, float) - 1.0) / (ny - 1.0)
    return (0.2 * lam**1.2 + 0.002 * lam**4) * (1.0 + 0.03 * (u - 0.5) - 0.02 * (t - 0.5))


# --------------------------------------------------------------------------------------------
# WCS
# --------------------------------------------------------------------------------------------
_SIP_A = {
    (2, 0): 0.8,
    (1, 1): -0.3,
    (0, 2): 0.5,
    (3, 0): 0.6,
    (2, 1): 0.2,
    (1, 2): 0.4,
    (0, 3): -0.2,
}
_SIP_B = {
    (2, 0): -0.4,
    (1, 1): 0.6,
    (0, 2): 0.3,
    (3, 0): -0.1,
    (2, 1): 0.5,
    (1, 2): -0.3,
    (0, 3): 0.7,
}


def _sip(shape, amplitude=1.5) -> Sip:
    """A 3rd-order SIP distortion (forward and fitted inverse), ~``amplitude`` px at the corners."""
    ny, nx = shape
    crpix = ((nx + 1) / 2.0, (ny + 1) / 2.0)
    h = max(nx - 1, ny - 1) / 2.0
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    for (p, q), c in _SIP_A.items():
        a[p, q] = 0.5 * amplitude * c / h ** (p + q)
    for (p, q), c in _SIP_B.items():
        b[p, q] = 0.5 * amplitude * c / h ** (p + q)
    g = np.linspace(-h, h, 41)
    uu, vv = (m.ravel() for m in np.meshgrid(g, g))

    def poly(c, u, v):
        return sum(c[p, q] * u**p * v**q for p in range(4) for q in range(4) if c[p, q])

    big_u = uu + poly(a, uu, vv)
    big_v = vv + poly(b, uu, vv)
    terms = [(p, q) for p in range(4) for q in range(4) if 1 <= p + q <= 3]
    design = np.stack([(big_u / h) ** p * (big_v / h) ** q for p, q in terms], axis=1)
    sol_u, *_ = np.linalg.lstsq(design, uu - big_u, rcond=None)
    sol_v, *_ = np.linalg.lstsq(design, vv - big_v, rcond=None)
    ap = np.zeros((4, 4))
    bp = np.zeros((4, 4))
    for (p, q), cu, cv in zip(terms, sol_u, sol_v, strict=True):
        ap[p, q] = cu / h ** (p + q)
        bp[p, q] = cv / h ** (p + q)
    return Sip(a, b, ap, bp, crpix)


def _celestial_wcs(shape, crval, rotation_deg, *, sip=True) -> WCS:
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.crpix = [(nx + 1) / 2.0, (ny + 1) / 2.0]
    w.wcs.crval = [float(crval[0]) % 360.0, float(crval[1])]
    s = PIXEL_SCALE_ARCSEC / 3600.0
    th = math.radians(rotation_deg)
    w.wcs.pc = [[-s * math.cos(th), s * math.sin(th)], [s * math.sin(th), s * math.cos(th)]]
    w.wcs.cdelt = [1.0, 1.0]
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.radesys = "ICRS"
    if sip:
        w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
        w.sip = _sip(shape)
    else:
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.set()
    return w


def _pointing_crval(shape, target, pixel, rotation_deg):
    """CRVAL such that 0-based ``pixel`` (x, y) lands on ``target`` (ra, dec), ignoring SIP."""
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.crpix = [pixel[0] + 1.0, pixel[1] + 1.0]
    w.wcs.crval = list(target)
    lin = _celestial_wcs(shape, target, rotation_deg, sip=False)
    w.wcs.pc = lin.wcs.pc
    w.wcs.cdelt = [1.0, 1.0]
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.set()
    ra, dec = w.pixel_to_world_values((nx - 1) / 2.0, (ny - 1) / 2.0)
    return float(ra), float(dec)


def _wcs_w_cards(ny, nx, x0=0, y0=0):
    """The verbatim alternate-WCS ``A`` and ``W`` blocks of a Level-2 header."""
    return [
        ("WCSAXESA", 2, "Number of axes of the A WCS"),
        ("WCSNAMEA", "0-based active pixel coordinates", "WCS label"),
        ("CTYPE1A", "LINEAR", ""),
        ("CTYPE2A", "LINEAR", ""),
        ("CUNIT1A", "pixel", ""),
        ("CUNIT2A", "pixel", ""),
        ("CRPIX1A", float(1 - x0), ""),
        ("CRPIX2A", float(1 - y0), ""),
        ("CRVAL1A", 0.0, ""),
        ("CRVAL2A", 0.0, ""),
        ("CDELT1A", 1.0, ""),
        ("CDELT2A", 1.0, ""),
        ("WCSAXESW", 2, "Two output axes: wavelength and bandwidth"),
        ("WCSNAMEW", "Approximated per-pixel wavelength and bandwidth", "WCS label"),
        ("CNAME1W", "Wavelength", "First output axis is central wavelength"),
        ("CNAME2W", "Bandwidth", "Second output axis is bandwidth"),
        ("CRPIX1W", float(1 - x0), "Lookup table is in raw FITS coordinates"),
        ("CRPIX2W", float(1 - y0), "Lookup table is in raw FITS coordinates"),
        ("CDELT1W", 1, "[pixel] Lookup table is in raw FITS coordinates"),
        ("CDELT2W", 1, "[pixel] Lookup table is in raw FITS coordinates"),
        ("CUNIT1W", "um", "Wavelength is reported in microns"),
        ("CUNIT2W", "um", "Bandpass is reported in microns"),
        ("CTYPE1W", "WAVE-TAB", "Bilinear lookup table, FITS Paper 3, Sect 6.1"),
        ("CTYPE2W", "WAVE-TAB", "Bilinear lookup table, FITS Paper 3, Sect 6.1"),
        ("CRVAL1W", 1, "[pixel] Lookup table is in raw FITS coordinates"),
        ("CRVAL2W", 1, "[pixel] Lookup table is in raw FITS coordinates"),
        ("PV1_3W", 1, "Index of wavelength in VALUES array"),
        ("PV2_3W", 2, "Index of bandwidth in VALUES array"),
        ("PS1_0W", "WCS-WAVE", "Extension with wavelength lookup table"),
        ("PS2_0W", "WCS-WAVE", "Extension with bandwidth lookup table"),
        ("PS1_1W", "VALUES", "Column with values for wavelength"),
        ("PS2_1W", "VALUES", "Column with values for bandwidth"),
        ("PS1_2W", "X", "Column with control points for detector in X"),
        ("PS2_2W", "Y", "Column with control points for detector in Y"),
    ]


def _flag_cards(release: str):
    names = {k: v for k, v in FLAG_BITS.items() if release == "qr3" or k not in _QR2_ONLY_ABSENT}
    if release == "qr3":
        return [(f"MSKN{bit:04d}", name, f"Bit {bit}") for name, bit in names.items()]
    return [(f"HIERARCH MP_{name}", bit, f"Flag bit {bit}") for name, bit in names.items()]


def _wave_table_hdu(xs, ys, values) -> fits.BinTableHDU:
    n, m = xs.size, ys.size
    cols = [
        fits.Column(name="X", format=f"{n}J", dim=f"({n})", array=xs[None, :].astype(np.int32)),
        fits.Column(name="Y", format=f"{m}J", dim=f"({m})", array=ys[None, :].astype(np.int32)),
        fits.Column(
            name="VALUES",
            format=f"{2 * n * m}E",
            dim=f"(2,{n},{m})",
            array=values[None].astype(np.float32),
        ),
    ]
    return fits.BinTableHDU.from_columns(cols, name="WCS-WAVE")


def _psf_hdu(release: str, shape, psf_fwhm: float, psf_size: int):
    """A Gaussian PSF cube (QR2 ``PSF``) or effective-PSF table (QR3 ``EPSF``)."""
    ny, nx = shape
    oversamp = 10 if release == "qr2" else 5
    sig = psf_fwhm * _FWHM_TO_SIGMA / (PIXEL_SCALE_ARCSEC / oversamp)
    g = np.arange(psf_size) - (psf_size - 1) / 2.0
    stamp = np.exp(-0.5 * (g[:, None] ** 2 + g[None, :] ** 2) / sig**2)
    stamp = (stamp / stamp.sum()).astype(np.float32)
    if release == "qr2":
        nz = 11
        cube = np.broadcast_to(stamp, (nz * nz, psf_size, psf_size)).copy()
        hdu = fits.ImageHDU(cube, name="PSF")
        hdu.header["OVERSAMP"] = oversamp
        for i in range(nz):
            hdu.header[f"XCTR_{i}"] = (i + 0.5) * nx / nz + 0.5
            hdu.header[f"YCTR_{i}"] = (i + 0.5) * ny / nz + 0.5
        return hdu
    nz = 21 if (ny, nx) == (2040, 2040) else 5
    bx, by = (m.ravel() for m in np.meshgrid(np.arange(nz), np.arange(nz)))
    rows = bx.size
    lam, _ = lvf_wavelength(3, (bx + 0.5) * nx / nz, (by + 0.5) * ny / nz, shape=shape)
    cols = [
        fits.Column(name="BINX", format="J", array=bx),
        fits.Column(name="BINY", format="J", array=by),
        fits.Column(name="XCENTER", format="E", array=(bx + 0.5) * nx / nz + 0.5),
        fits.Column(name="YCENTER", format="E", array=(by + 0.5) * ny / nz + 0.5),
        fits.Column(name="NEFF_MEAN", format="E", array=np.full(rows, 4.0 * math.pi * sig**2)),
        fits.Column(name="CWAVE", format="E", array=lam),
        fits.Column(
            name="EPSF",
            format=f"{psf_size * psf_size}E",
            dim=f"({psf_size},{psf_size})",
            array=np.broadcast_to(stamp, (rows, psf_size, psf_size)),
        ),
    ]
    hdu = fits.BinTableHDU.from_columns(cols, name="EPSF")
    hdu.header["OVSMPX"] = oversamp
    hdu.header["OVSMPY"] = oversamp
    return hdu


def _atomic_write(hdul: fits.HDUList, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".fits", dir=path.parent)
    os.close(fd)
    try:
        hdul.writeto(tmp, overwrite=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _mjd_to_isot(mjd: float) -> str:
    from astropy.time import Time

    return Time(mjd, format="mjd", scale="utc").isot


def write_exposure(
    path,
    image,
    variance,
    flags,
    zodi,
    wcs: WCS,
    *,
    detector: int,
    obsid: str = "2026W01_1A_0001_1",
    mjd_beg: float = 61000.0,
    psf_fwhm: float = 6.0,
    release: str = "qr2",
    wave_table=None,
    psf_size: int | None = None,
) -> Path:
    """Write one Level-2-layout SPHEREx exposure (temporary file, then rename).

    Parameters
    ----------
    path : str or os.PathLike
        Output file.
    image, variance, zodi : numpy.ndarray
        ``(ny, nx)`` float arrays: surface brightness (MJy/sr, zodi included),
        its variance ((MJy/sr)^2) and the zodi model (MJy/sr).
    flags : numpy.ndarray
        ``(ny, nx)`` int32 bitmask (bits as in :data:`FLAG_BITS`).
    wcs : astropy.wcs.WCS
        Celestial TAN-SIP WCS of the frame.
    detector : int
        1..6.
    obsid : str, optional
        Observation ID (``OBSID``).
    mjd_beg : float, optional
        Start of the exposure (MJD).
    psf_fwhm : float, optional
        ``PSF_FWHM`` (arcsec).
    release : {"qr2", "qr3"}, optional
        ``"qr2"``: a ``PSF`` image HDU and ``MP_<NAME>`` flag keywords;
        ``"qr3"``: an ``EPSF`` table, RICE-compressed ``FLAGS`` and
        ``MSKNnnnn`` flag keywords.
    wave_table : tuple, optional
        ``(x, y, values)`` as returned by :func:`lvf_table`; default the model
        table of ``detector`` for this frame shape.
    psf_size : int, optional
        PSF stamp size (oversampled pixels); default 101 (QR2) / 33 (QR3) for
        full frames, 21 / 11 for small frames, to keep small files small.

    Returns
    -------
    pathlib.Path
        The file written.

    Raises
    ------
    ValueError
        If the arrays disagree in shape or ``release`` is unknown.

    Examples
    --------
    >>> import tempfile
    >>> from astropy.wcs import WCS
    >>> w = WCS(naxis=2)
    >>> w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    >>> w.wcs.crval, w.wcs.crpix = [150.0, 2.0], [16.5, 16.5]
    >>> w.wcs.cdelt = [-PIXEL_SCALE_ARCSEC / 3600.0, PIXEL_SCALE_ARCSEC / 3600.0]
    >>> w.sip = Sip(np.zeros((3, 3)), np.zeros((3, 3)), None, None, [16.5, 16.5])
    >>> a = np.ones((32, 32), np.float32)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> p = write_exposure(Path(tmp.name) / "x.fits", a, 0.01 * a, np.zeros((32, 32), "i4"),
    ...                    0.2 * a, w, detector=3)
    >>> with fits.open(p) as hdul:
    ...     print([hdu.name for hdu in hdul])
    ['PRIMARY', 'IMAGE', 'FLAGS', 'VARIANCE', 'ZODI', 'PSF', 'WCS-WAVE']
    >>> tmp.cleanup()
    """
    release = str(release).lower()
    if release not in ("qr2", "qr3"):
        raise ValueError(f"'release' must be 'qr2' or 'qr3'; got {release!r}.")
    image = np.asarray(image, dtype=np.float32)
    ny, nx = image.shape
    arrays = {"variance": variance, "flags": flags, "zodi": zodi}
    for name, arr in arrays.items():
        if np.shape(arr) != image.shape:
            raise ValueError(
                f"'{name}' must have the shape of 'image' {image.shape}; got {np.shape(arr)}."
            )
    det = _check_detector(detector)
    if wave_table is None:
        wave_table = lvf_table(det, (ny, nx))
    xs, ys, values = wave_table
    if psf_size is None:
        full = (ny, nx) == (2040, 2040)
        psf_size = (101 if full else 21) if release == "qr2" else (33 if full else 11)

    mjd_end = mjd_beg + _TELAPSE / 86400.0
    mjd_avg = 0.5 * (mjd_beg + mjd_end)
    primary = fits.PrimaryHDU()
    primary.header["VERSION"] = ("6.5.6" if release == "qr2" else "7.0.2", "Pipeline version")
    primary.header["ORIGIN"] = ("drizzle3d.simulate", "Simulated SPHEREx Level-2 exposure")

    cel = wcs.to_header(relax=True)
    for key in ("MJDREF", "DATE-OBS", "MJD-OBS", "MJD-BEG", "MJD-END", "DATEREF", "TIMESYS"):
        cel.remove(key, ignore_missing=True, remove_all=True)
    w_cards = _wcs_w_cards(ny, nx)

    img_hdr = fits.Header()
    img_hdr["BUNIT"] = ("MJy / sr", "Unit of pixel value")
    img_hdr["DETECTOR"] = (det, "1-3: SWIR, 4-6: MWIR")
    img_hdr["OBSID"] = (obsid, "Observation ID")
    img_hdr["EXPIDN"] = (abs(hash(obsid)) % 10**15, "Integer Exposure ID")
    img_hdr["DETCOORD"] = ("sky", "MWIR pixels flipped on X to match SWIR view")
    img_hdr["HIERARCH OMEGA_MEDIAN"] = (PIXEL_SCALE_ARCSEC**2, "[arcsec**2] solid angle pixel map")
    img_hdr["PSF_FWHM"] = (float(psf_fwhm), "[arcsec] PSF FWHM Median")
    img_hdr["TIMESYS"] = ("UTC", "Time scale")
    img_hdr["MJDREF"] = (0.0, "[d] MJD of fiducial time")
    img_hdr["DATE-OBS"] = (_mjd_to_isot(mjd_beg), "ISO-8601 time of observation")
    img_hdr["MJD-OBS"] = (mjd_beg, "[d] MJD of observation")
    img_hdr["DATE-BEG"] = (_mjd_to_isot(mjd_beg), "ISO-8601 time at start of observation")
    img_hdr["MJD-BEG"] = (mjd_beg, "[d] MJD at start of observation")
    img_hdr["DATE-AVG"] = (_mjd_to_isot(mjd_avg), "ISO-8601 time at midpoint of observation")
    img_hdr["MJD-AVG"] = (mjd_avg, "[d] MJD at midpoint of observation")
    img_hdr["DATE-END"] = (_mjd_to_isot(mjd_end), "ISO-8601 time at end of observation")
    img_hdr["MJD-END"] = (mjd_end, "[d] MJD at end of observation")
    img_hdr["XPOSURE"] = (EXPTIME, "[s] Exposure (integration) time")
    img_hdr["TELAPSE"] = (_TELAPSE, "[s] Elapsed time (start to stop)")
    img_hdr.extend(cel)
    img_hdr.extend(w_cards)
    img_hdr["HISTORY"] = "[CALIB] spectral_wcs simulated-lvf-model"

    flag_hdr = fits.Header()
    flag_hdr["BUNIT"] = ""
    flag_hdr["EXTTYPE"] = "MASK"
    flag_hdr.extend(cel)
    flag_hdr.extend(w_cards)
    flag_hdr.extend(_flag_cards(release))

    var_hdr = fits.Header()
    var_hdr["BUNIT"] = ("MJy2 / sr2", "Unit of pixel value")
    var_hdr.extend(cel)
    zod_hdr = fits.Header()
    zod_hdr["BUNIT"] = ("MJy / sr", "Unit of pixel value")
    zod_hdr.extend(cel)

    flags = np.asarray(flags, dtype=np.int32)
    if release == "qr3":
        flag_hdu = fits.CompImageHDU(
            flags, header=flag_hdr, name="FLAGS", compression_type="RICE_1", tile_shape=(1, nx)
        )
    else:
        flag_hdu = fits.ImageHDU(flags, header=flag_hdr, name="FLAGS")

    hdul = fits.HDUList(
        [
            primary,
            fits.ImageHDU(image, header=img_hdr, name="IMAGE"),
            flag_hdu,
            fits.ImageHDU(np.asarray(variance, np.float32), header=var_hdr, name="VARIANCE"),
            fits.ImageHDU(np.asarray(zodi, np.float32), header=zod_hdr, name="ZODI"),
            _psf_hdu(release, (ny, nx), psf_fwhm, psf_size),
            _wave_table_hdu(xs, ys, values),
        ]
    )
    path = Path(path)
    _atomic_write(hdul, path)
    return path


def write_spectral_wcs_calibration(path, detector, shape=(2040, 2040)) -> Path:
    """Write a spectral-WCS calibration file (``CWAVE``, ``CBAND``, ``WCS-WAVE``).

    ``CWAVE``/``CBAND`` hold the simulator's smooth filter model
    (:func:`lvf_wavelength`) at every pixel centre, i.e. the "science-grade"
    wavelengths the bilinear ``WCS-WAVE`` table approximates.

    Parameters
    ----------
    path : str or os.PathLike
        Output file (written through a temporary file and a rename).
    detector : int
        1..6.
    shape : tuple of int, optional
        ``(ny, nx)`` of the parent frame.

    Returns
    -------
    pathlib.Path
        The file written.

    Raises
    ------
    ValueError
        If ``detector`` is not 1..6 or ``shape`` is smaller than (16, 16).

    Examples
    --------
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> p = write_spectral_wcs_calibration(Path(tmp.name) / "cal.fits", 3, shape=(32, 32))
    >>> with fits.open(p) as hdul:
    ...     print([hdu.name for hdu in hdul], hdul["CWAVE"].shape, hdul["CWAVE"].header["BUNIT"])
    ['PRIMARY', 'CWAVE', 'CBAND', 'WCS-WAVE'] (32, 32) um
    >>> tmp.cleanup()
    """
    ny, nx = _check_shape(shape)
    yy, xx = np.mgrid[1 : ny + 1, 1 : nx + 1].astype(np.float64)
    lam, bw = lvf_wavelength(detector, xx, yy, shape=(ny, nx))
    hdr = fits.Header()
    hdr["DETECTOR"] = _check_detector(detector)
    hdr["DETCOORD"] = "sky"
    hdul = fits.HDUList(
        [
            fits.PrimaryHDU(header=hdr),
            fits.ImageHDU(
                lam.astype(np.float32), name="CWAVE", header=fits.Header([("BUNIT", "um")])
            ),
            fits.ImageHDU(
                bw.astype(np.float32), name="CBAND", header=fits.Header([("BUNIT", "um")])
            ),
            _wave_table_hdu(*lvf_table(detector, (ny, nx))),
        ]
    )
    path = Path(path)
    _atomic_write(hdul, path)
    return path


# --------------------------------------------------------------------------------------------
# Field simulation
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ExposureTruth:
    """What the simulator put into one exposure (an entry of :attr:`SimulatedField.exposures`).

    Parameters
    ----------
    path : pathlib.Path
        The Level-2 file written.
    detector : int
        Detector number 1..6.
    obsid : str
        Observation ID (header ``OBSID``).
    mjd_beg : float
        Start of the exposure (MJD).
    crval : tuple of float
        ``(ra, dec)`` at the frame centre (deg).
    rotation : float
        Rotation of the pixel grid on the sky (deg).
    center_pixel : tuple of float
        0-based ``(x, y)`` where the field centre falls (ignoring SIP).
    zodi_scale : float
        True amplitude of the zodi in ``IMAGE`` relative to the ``ZODI`` model.
    model : numpy.ndarray
        Noise-free ``IMAGE`` (sky + scaled zodi), float32.
    sky_model : numpy.ndarray
        Noise-free sky alone (no zodi), float32.
    cosmic_rays : numpy.ndarray
        Boolean mask of injected cosmic-ray hits.
    bad_pixels : numpy.ndarray
        Boolean mask of injected, flagged bad pixels.
    wavemap : numpy.ndarray
        ``(ny, nx, 2)`` wavelength and bandwidth (um) the image was simulated with
        (the bilinear ``WCS-WAVE`` table).
    wcs : astropy.wcs.WCS
        Celestial WCS written.

    Examples
    --------
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> field = simulate_field(tmp.name, n_exposures=1, shape=(32, 32), noise=False)
    >>> truth = field.exposures[0]
    >>> truth.detector, truth.model.shape, truth.wavemap.shape
    (3, (32, 32), (32, 32, 2))
    >>> with fits.open(truth.path) as hdul:
    ...     bool(np.allclose(hdul["IMAGE"].data[~truth.bad_pixels], truth.model[~truth.bad_pixels]))
    True
    >>> tmp.cleanup()
    """

    path: Path
    detector: int
    obsid: str
    mjd_beg: float
    crval: tuple
    rotation: float
    center_pixel: tuple
    zodi_scale: float
    model: np.ndarray
    sky_model: np.ndarray
    cosmic_rays: np.ndarray
    bad_pixels: np.ndarray
    wavemap: np.ndarray
    wcs: WCS


@dataclass(frozen=True, eq=False)
class SimulatedField:
    """Result of :func:`simulate_field`: the files and their per-exposure truth.

    Iterating over it (and ``len``) goes over the file paths, so it can be passed
    wherever a list of input files is expected.

    Parameters
    ----------
    paths : list of pathlib.Path
        The files written, detector by detector, in exposure order.
    exposures : list of ExposureTruth
        What was put into each file, in the order of ``paths``.
    sky : Sky
        The simulated truth.
    seed : int
        The random seed everything was drawn from.

    Examples
    --------
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> field = simulate_field(tmp.name, detectors=(1, 4), n_exposures=1, shape=(32, 32))
    >>> len(field), [e.detector for e in field.exposures]
    (2, [1, 4])
    >>> [p.suffix for p in field]
    ['.fits', '.fits']
    >>> tmp.cleanup()
    """

    paths: list
    exposures: list
    sky: Sky
    seed: int

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self):
        return iter(self.paths)


def _render_point_sources(sky: Sky, wcs: WCS, shape, wavemap) -> np.ndarray:
    """Point sources integrated exactly over each pixel (locally linear WCS), MJy/sr."""
    ny, nx = shape
    out = np.zeros(shape, dtype=np.float64)
    if not sky.point_sources:
        return out
    ras = np.array([s.ra for s in sky.point_sources])
    decs = np.array([s.dec for s in sky.point_sources])
    xs, ys = wcs.world_to_pixel_values(ras, decs)
    for src, xs_, ys_ in zip(sky.point_sources, np.atleast_1d(xs), np.atleast_1d(ys), strict=True):
        if not (np.isfinite(xs_) and np.isfinite(ys_)):
            continue
        # Local pixel scale (arcsec) from the Jacobian at the source.
        pts = wcs.pixel_to_world_values([xs_, xs_ + 1.0, xs_], [ys_, ys_, ys_ + 1.0])
        dx1, dy1 = _offsets_arcsec(pts[0][1], pts[1][1], pts[0][0], pts[1][0])
        dx2, dy2 = _offsets_arcsec(pts[0][2], pts[1][2], pts[0][0], pts[1][0])
        area = abs(dx1 * dy2 - dx2 * dy1)  # arcsec^2 per pixel
        scale = math.sqrt(area)
        sig = src.fwhm * _FWHM_TO_SIGMA / scale
        half = math.ceil(6.0 * sig + 2.0)
        x0, x1 = max(0, round(xs_) - half), min(nx, round(xs_) + half + 1)
        y0, y1 = max(0, round(ys_) - half), min(ny, round(ys_) + half + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        gx = np.arange(x0, x1) - xs_
        gy = np.arange(y0, y1) - ys_
        s2 = math.sqrt(2.0) * sig
        fx = 0.5 * (erf((gx + 0.5) / s2) - erf((gx - 0.5) / s2))
        fy = 0.5 * (erf((gy + 0.5) / s2) - erf((gy - 0.5) / s2))
        frac = fy[:, None] * fx[None, :]
        wm = wavemap[y0:y1, x0:x1]
        flux = src.spectrum.band_average(wm[..., 0], wm[..., 1]) * 1e-9  # MJy
        out[y0:y1, x0:x1] += flux * frac / (area * _ARCSEC2_TO_SR)
    return out


def _extended(sky: Sky, ra, dec, wavemap) -> np.ndarray:
    lam, bw = wavemap[..., 0], wavemap[..., 1]
    out = sky.background.band_average(lam, bw)
    for src in sky.extended_sources:
        dx, dy = _offsets_arcsec(ra, dec, src.ra, src.dec)
        sig = src.fwhm * _FWHM_TO_SIGMA
        prof = np.exp(-0.5 * (dx * dx + dy * dy) / sig**2)
        mask = prof > 1e-12
        if np.any(mask):
            out = out + np.where(mask, prof, 0.0) * src.spectrum.band_average(lam, bw)
    return out


def simulate_field(
    out_dir,
    sky: Sky | None = None,
    *,
    detectors=(3,),
    n_exposures: int = 12,
    shape=(256, 256),
    center=(150.0, 2.0),
    release: str = "qr2",
    noise: bool = True,
    flagged_fraction: float = 0.002,
    cosmic_rays: float = 0.0,
    cosmic_rays_flagged: bool = True,
    zodi: bool = True,
    zodi_scale=None,
    read_noise: float = 0.015,
    shot_factor: float = 2e-3,
    psf_fwhm: float = 6.0,
    seed: int = 0,
) -> SimulatedField:
    """Simulate dithered SPHEREx exposures of one field and write them as Level-2 files.

    Each exposure places the field centre at a different detector row (rows
    stratified over 10-90 % of the frame, so with a dozen exposures one sky
    position is seen at a dozen wavelengths spread over the detector's range),
    jitters it along x, and rotates the frame by a random angle in +-20 deg plus
    180 deg on every other exposure (SPHEREx's PA 0 / 180).

    Parameters
    ----------
    out_dir : str or os.PathLike
        Directory for the files (created).
    sky : Sky, optional
        The truth; default ``Sky.default(center)``.
    detectors : sequence of int, optional
        Detectors to simulate, each seeing the same pointings.
    n_exposures : int, optional
        Pointings per detector.
    shape : tuple of int, optional
        ``(ny, nx)``; ``(2040, 2040)`` is a real full frame (see the module
        notes on how the LVF is compressed onto small frames).
    center : tuple of float, optional
        ``(ra, dec)`` of the field (deg).
    release : {"qr2", "qr3"}, optional
        File layout (see :func:`write_exposure`).
    noise : bool, optional
        Add Gaussian noise drawn from the written ``VARIANCE``.
    flagged_fraction : float, optional
        Fraction of pixels made bad (corrupted by +-20..200 sigma or set to NaN)
        and flagged with one of HOT, COLD, NONFUNC, PERSIST, NONLINEAR, OUTLIER or
        MISSING_DATA.
    cosmic_rays : float, optional
        Fraction of pixels hit by cosmic rays (+10..1000 sigma).
    cosmic_rays_flagged : bool, optional
        Set TRANSIENT on the hits.
    zodi : bool, optional
        Add ``zodi_scale * ZODI`` to the image (the ``ZODI`` HDU is always written).
    zodi_scale : float or sequence, optional
        True zodi amplitude(s); default drawn uniformly from 0.9..1.1 per exposure.
    read_noise : float, optional
        Read/background noise sigma (MJy/sr).
    shot_factor : float, optional
        ``VARIANCE = read_noise**2 + shot_factor * max(signal, 0)`` (MJy/sr):
        every source's and the zodi's own shot noise.
    psf_fwhm : float, optional
        ``PSF_FWHM`` header value (arcsec); point sources carry their own FWHM.
    seed : int, optional
        Everything is reproducible from it.

    Returns
    -------
    SimulatedField
        ``paths`` and per-exposure :class:`ExposureTruth`.

    Raises
    ------
    ValueError
        For invalid arguments.

    Examples
    --------
    >>> import tempfile
    >>> f = simulate_field(tempfile.mkdtemp(), n_exposures=2, shape=(64, 64))
    >>> len(f.paths)
    2
    """
    shape = _check_shape(shape)
    ny, nx = shape
    if int(n_exposures) < 1:
        raise ValueError(f"'n_exposures' must be >= 1; got {n_exposures!r}.")
    n_exposures = int(n_exposures)
    if not 0.0 <= float(flagged_fraction) < 0.5:
        raise ValueError(f"'flagged_fraction' must be in [0, 0.5); got {flagged_fraction!r}.")
    if not 0.0 <= float(cosmic_rays) < 0.5:
        raise ValueError(f"'cosmic_rays' must be in [0, 0.5); got {cosmic_rays!r}.")
    dets = [_check_detector(d) for d in np.atleast_1d(detectors)]
    center = (float(center[0]), float(center[1]))
    if sky is None:
        sky = Sky.default(center=center)
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    order = rng.permutation(n_exposures)
    fy = 0.1 + 0.8 * (order + rng.uniform(0.0, 1.0, n_exposures)) / n_exposures
    fx = 0.5 + rng.uniform(-0.1, 0.1, n_exposures)
    rot = rng.uniform(-20.0, 20.0, n_exposures) + 180.0 * (np.arange(n_exposures) % 2)
    if zodi_scale is None:
        scales = rng.uniform(0.9, 1.1, n_exposures)
    else:
        scales = np.broadcast_to(np.asarray(zodi_scale, dtype=float), (n_exposures,)).copy()

    yy, xx = np.mgrid[0:ny, 0:nx]
    xx1 = xx + 1.0
    yy1 = yy + 1.0
    paths: list[Path] = []
    truths: list[ExposureTruth] = []
    for det in dets:
        table = lvf_table(det, shape)
        wavemap = _table_wavemap(*table, shape)
        zmodel = zodi_model(wavemap[..., 0], xx1, yy1, shape)
        for i in range(n_exposures):
            pix = (fx[i] * (nx - 1), fy[i] * (ny - 1))
            crval = _pointing_crval(shape, center, pix, rot[i])
            wcs = _celestial_wcs(shape, crval, rot[i])
            ra, dec = wcs.pixel_to_world_values(xx.astype(float), yy.astype(float))
            ext = _extended(sky, ra, dec, wavemap)
            pts = _render_point_sources(sky, wcs, shape, wavemap)
            sky_img = ext + pts
            zsc = float(scales[i]) if zodi else 0.0
            model = sky_img + zsc * zmodel
            var = read_noise**2 + shot_factor * np.maximum(model, 0.0)
            sig = np.sqrt(var)
            data = model + (rng.standard_normal(shape) * sig if noise else 0.0)
            flags = np.zeros(shape, dtype=np.int32)
            src_signal = sky_img - sky.background.band_average(wavemap[..., 0], wavemap[..., 1])
            flags[src_signal > sig] |= 1 << FLAG_BITS["SOURCE"]
            bad = rng.random(shape) < flagged_fraction
            nbad = int(bad.sum())
            if nbad:
                kinds = rng.integers(0, len(_BAD_PIXEL_FLAGS), nbad)
                bits = np.array([1 << FLAG_BITS[n] for n in _BAD_PIXEL_FLAGS], dtype=np.int32)
                flags[bad] |= bits[kinds]
                amp = rng.uniform(20.0, 200.0, nbad) * rng.choice([-1.0, 1.0], nbad)
                vals = data[bad] + amp * sig[bad]
                vals[kinds == _BAD_PIXEL_FLAGS.index("MISSING_DATA")] = np.nan
                data[bad] = vals
            crs = rng.random(shape) < cosmic_rays
            ncr = int(crs.sum())
            if ncr:
                data[crs] += rng.uniform(10.0, 1000.0, ncr) * sig[crs]
                if cosmic_rays_flagged:
                    flags[crs] |= 1 << FLAG_BITS["TRANSIENT"]
            obsid = f"2026W{10 + i // 4:02d}_1A_{i:04d}_{i % 4 + 1}"
            mjd = 61100.0 + 0.01 * i
            fname = f"level2_{obsid}D{det}_spx_l2b-v20-2026-001.fits"
            path = write_exposure(
                out_dir / fname,
                data.astype(np.float32),
                var.astype(np.float32),
                flags,
                zmodel.astype(np.float32),
                wcs,
                detector=det,
                obsid=obsid,
                mjd_beg=mjd,
                psf_fwhm=psf_fwhm,
                release=release,
                wave_table=table,
            )
            log.debug("wrote %s (detector %d, rotation %.1f deg)", path, det, rot[i])
            paths.append(path)
            truths.append(
                ExposureTruth(
                    path=path,
                    detector=det,
                    obsid=obsid,
                    mjd_beg=mjd,
                    crval=crval,
                    rotation=float(rot[i]),
                    center_pixel=pix,
                    zodi_scale=zsc,
                    model=model.astype(np.float32),
                    sky_model=sky_img.astype(np.float32),
                    cosmic_rays=crs,
                    bad_pixels=bad,
                    wavemap=wavemap,
                    wcs=wcs,
                )
            )
    return SimulatedField(paths=paths, exposures=truths, sky=sky, seed=seed)


# --------------------------------------------------------------------------------------------
# Cutouts (IRSA's cutout service)
# --------------------------------------------------------------------------------------------
_SIZE_UNITS = {
    "px": None,
    "pix": None,
    "pixels": None,
    "arcsec": 1 / 3600,
    "arcmin": 1 / 60,
    "deg": 1.0,
}


def make_cutout(
    path_in,
    path_out,
    center,
    size,
    *,
    center_unit: str = "deg",
    size_unit: str = "deg",
    gzip: bool = False,
) -> tuple[int, int, int, int]:
    """Cut a box out of a Level-2 file, as IRSA's cutout service does.

    All HDUs are kept; ``IMAGE``, ``FLAGS``, ``VARIANCE`` and ``ZODI`` are
    trimmed; their celestial ``CRPIXn`` and the ``CRPIXnA``/``CRPIXnW`` of the
    alternate WCSs are shifted; ``WCS-WAVE`` and ``PSF``/``EPSF`` are copied
    unchanged. The box is clipped at the frame edges.

    Parameters
    ----------
    path_in : str or os.PathLike
        A full (or already cut) Level-2 file.
    path_out : str, os.PathLike or binary file object
        Where to write (a path is written through a temporary file + rename).
    center : tuple of float
        ``(ra, dec)`` in deg, or ``(x, y)`` 0-based pixels with ``center_unit="px"``.
    size : float or tuple of float
        Box size, ``(w, h)`` with ``w`` along NAXIS1 (x).
    center_unit : {"deg", "px"}, optional
    size_unit : {"deg", "arcmin", "arcsec", "px"}, optional
    gzip : bool, optional
        gzip the output (IRSA's default for the service).

    Returns
    -------
    tuple of int
        The box cut, ``(ymin, ymax, xmin, xmax)`` half-open, 0-based in the input.

    Raises
    ------
    ValueError
        If the box does not overlap the frame (IRSA answers HTTP 400) or a unit
        is unknown.

    Examples
    --------
    An 8 x 6 pixel box around pixel (10, 12) of a simulated exposure, written to
    memory:

    >>> import io, tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> field = simulate_field(tmp.name, n_exposures=1, shape=(32, 32), noise=False)
    >>> buf = io.BytesIO()
    >>> make_cutout(field.paths[0], buf, (10, 12), (8, 6), center_unit="px", size_unit="px")
    (9, 15, 6, 14)
    >>> _ = buf.seek(0)
    >>> with fits.open(buf) as cut, fits.open(field.paths[0]) as full:
    ...     same = np.array_equal(cut["IMAGE"].data, full["IMAGE"].data[9:15, 6:14])
    ...     print(cut["IMAGE"].shape, same)
    (6, 8) True
    >>> tmp.cleanup()
    """
    size = np.broadcast_to(np.asarray(size, dtype=float), (2,))
    su = str(size_unit).lower()
    if su not in _SIZE_UNITS:
        raise ValueError(f"'size_unit' must be one of {sorted(_SIZE_UNITS)}; got {size_unit!r}.")
    cu = str(center_unit).lower()
    if cu not in ("deg", "px", "pix", "pixels"):
        raise ValueError(f"'center_unit' must be 'deg' or 'px'; got {center_unit!r}.")
    with fits.open(path_in, memmap=True) as hdul:
        img_hdr = hdul["IMAGE"].header
        ny, nx = hdul["IMAGE"].shape
        wcs = WCS(img_hdr)
        if cu == "deg":
            cx, cy = (float(v) for v in wcs.world_to_pixel_values(center[0], center[1]))
        else:
            cx, cy = float(center[0]), float(center[1])
        if _SIZE_UNITS[su] is None:
            w_px, h_px = size
        else:
            w_px, h_px = size * _SIZE_UNITS[su] * 3600.0 / PIXEL_SCALE_ARCSEC
        xmin = math.floor(cx - w_px / 2.0 + 0.5)
        ymin = math.floor(cy - h_px / 2.0 + 0.5)
        xmax = xmin + max(1, round(w_px))
        ymax = ymin + max(1, round(h_px))
        xmin, xmax = max(0, xmin), min(nx, xmax)
        ymin, ymax = max(0, ymin), min(ny, ymax)
        if not (np.isfinite(cx) and np.isfinite(cy)) or xmin >= xmax or ymin >= ymax:
            raise ValueError(
                f"'center' must give a box overlapping the {nx}x{ny} frame of {path_in}; "
                f"got center={tuple(center)!r}, size={tuple(size)!r}."
            )
        out = []
        for hdu in hdul:
            name = hdu.name
            if name in ("IMAGE", "FLAGS", "VARIANCE", "ZODI"):
                hdr = hdu.header.copy()
                for key, off in (
                    ("CRPIX1", xmin),
                    ("CRPIX2", ymin),
                    ("CRPIX1A", xmin),
                    ("CRPIX2A", ymin),
                    ("CRPIX1W", xmin),
                    ("CRPIX2W", ymin),
                ):
                    if key in hdr:
                        hdr[key] = float(hdr[key]) - off
                sec = np.array(hdu.section[ymin:ymax, xmin:xmax])
                if isinstance(hdu, fits.CompImageHDU):
                    out.append(
                        fits.CompImageHDU(
                            sec,
                            header=_strip_structural(hdr),
                            name=name,
                            compression_type=hdu.compression_type,
                            tile_shape=(1, xmax - xmin),
                        )
                    )
                else:
                    out.append(fits.ImageHDU(sec, header=_strip_structural(hdr), name=name))
            else:
                out.append(hdu.copy())
        cut = fits.HDUList(out)
        if isinstance(path_out, (str, os.PathLike)):
            path_out = Path(path_out)
            if gzip:
                buf = io.BytesIO()
                cut.writeto(buf)
                fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path_out.parent)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(_gzip.compress(buf.getvalue()))
                os.replace(tmp, path_out)
            else:
                _atomic_write(cut, path_out)
        else:
            if gzip:
                buf = io.BytesIO()
                cut.writeto(buf)
                path_out.write(_gzip.compress(buf.getvalue()))
            else:
                cut.writeto(path_out)
    return ymin, ymax, xmin, xmax


def _strip_structural(hdr: fits.Header) -> fits.Header:
    hdr = hdr.copy()
    for key in ("XTENSION", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "PCOUNT", "GCOUNT"):
        hdr.remove(key, ignore_missing=True)
    return hdr
