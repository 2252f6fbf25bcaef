"""Read SPHEREx Level-2 spectral images: data, variance, flags, zodi, WCSs and wavelengths.

Both releases in the IRSA archive read: QR2 (a ``PSF`` image HDU, flag names as
``HIERARCH MP_<NAME> = bit`` keywords) and QR3 (an ``EPSF`` table instead,
RICE tile-compressed ``FLAGS``, flag names as ``MSKNnnnn = 'NAME'``). The PSF
is never needed and its absence is never an error. IRSA cutouts (all HDUs
kept, ``CRPIXn``, ``CRPIXnA`` and ``CRPIXnW`` rewritten) read like full files.

Pixel boxes
-----------
A ``bbox`` is ``(ymin, ymax, xmin, xmax)``: 0-based, half-open
(``data[ymin:ymax, xmin:xmax]``), in the pixel frame of the file being read
(for a cutout, its own pixels, not the parent detector's).

The spectral WCS
----------------
The ``W`` WCS maps pixels to (central wavelength, bandwidth) in um through the
FITS ``-TAB`` algorithm on the ``WCS-WAVE`` table. astropy needs the HDU list
to read it and wrongly applies the celestial SIP distortion to it
(astropy#13105): :func:`read_spherex` builds it from a header copy with the SIP
keywords removed and sets ``sip=None``. :func:`spectral_wavemap` does not call
astropy per pixel: it evaluates the bilinear table directly (separably: first
along x for every table row, then along y), agreeing with astropy to float64
rounding. ``CWAVE``/``CBAND`` maps from a spectral-WCS calibration file can be
used instead (IRSA recommends them for science; the table is good to ~1 nm).
"""

from __future__ import annotations

import contextvars
import functools
import logging
import math
import mmap
import os
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numba
import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.wcs import WCS, Sip

from drizzle3d import _flags

__all__ = [
    "DEFAULT_EXCLUDE_FLAGS",
    "FLAG_TABLE",
    "ZODI_FIT_EXCLUDE_FLAGS",
    "ImageHeader",
    "SpherexFileError",
    "SpherexImage",
    "SpherexMeta",
    "WaveTable",
    "ZodiFitWarning",
    "band_limits",
    "fit_zodi_scale",
    "flag_bits",
    "flag_names",
    "read_header_wcs",
    "read_spherex",
    "spectral_wavemap",
]

log = logging.getLogger(__name__)

#: Documented SPHEREx flag bits (QR2 files of late 2025, plus the QR3 additions
#: CROSSTALK, STREAK and SATELLITE_HALO). Used when a file's header does not name a bit.
FLAG_TABLE = _flags.FLAG_TABLE

#: Flags excluded from a coadd by default: the pixels whose value is unusable
#: (IRSA's source-discovery tutorial's bad set without FULLSAMPLE, which only says
#: that the full sample history exists). SOURCE is **never** excluded: it marks
#: pixels on known sources, 40-100 % of a frame.
DEFAULT_EXCLUDE_FLAGS = _flags.DEFAULT_EXCLUDE_FLAGS

#: Flags excluded when fitting the zodi amplitude: the default set plus SOURCE
#: (background pixels only).
ZODI_FIT_EXCLUDE_FLAGS = (*DEFAULT_EXCLUDE_FLAGS, "SOURCE")

_REQUIRED_HDUS = ("IMAGE", "FLAGS", "VARIANCE", "ZODI")
_IMAGE_HDUS = ("IMAGE", "FLAGS", "VARIANCE", "ZODI")
_SIP_KEY = re.compile(r"^(A|B|AP|BP)_(\d+_\d+|ORDER|DMAX)$")
_MSKN_KEY = re.compile(r"^MSKN(\d+)$")
_SB = u.MJy / u.sr
_SB2 = _SB**2


class SpherexFileError(ValueError):
    """A SPHEREx file that cannot be read as a Level-2 spectral image.

    A ``ValueError`` subclass whose message names the file.

    Parameters
    ----------
    path : str or os.PathLike
        The offending file (kept as ``str`` in the ``path`` attribute).
    problem : str
        What is wrong with it (kept in the ``problem`` attribute).

    Examples
    --------
    >>> err = SpherexFileError("a.fits", "no such file.")
    >>> str(err), err.problem, isinstance(err, ValueError)
    ('a.fits: no such file.', 'no such file.', True)
    >>> read_spherex("no/such/file.fits")
    Traceback (most recent call last):
    ...
    drizzle3d.spherex.SpherexFileError: no/such/file.fits: no such file.
    """

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ZodiFitWarning(UserWarning):
    """The zodi amplitude could not be fitted; 1.0 was used.

    Issued by :func:`fit_zodi_scale` (and :func:`read_spherex` with
    ``zodi="fit"``) when too few usable background pixels remain.

    Examples
    --------
    >>> import warnings
    >>> import numpy as np
    >>> flags = np.full((4, 4), 1)  # every pixel TRANSIENT: nothing left to fit
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     scale = fit_zodi_scale(np.ones((4, 4)), np.ones((4, 4)), flags, np.ones((4, 4)))
    >>> scale[0], caught[0].category is ZodiFitWarning
    (1.0, True)
    """


# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------
def flag_names(header=None) -> dict[str, int]:
    """Map flag names to bits, read from a ``FLAGS`` header (both keyword styles).

    QR2 writes ``HIERARCH MP_<NAME> = bit``, QR3 ``MSKNnnnn = 'NAME'`` (bit =
    digits of the key). Bits the header does not name are taken from
    :data:`FLAG_TABLE`; names the header gives win.

    Parameters
    ----------
    header : astropy.io.fits.Header, optional
        The ``FLAGS`` header; ``None`` gives the documented table.

    Returns
    -------
    dict
        Upper-case name -> bit.

    Examples
    --------
    >>> flag_names()["SOURCE"]
    21
    """
    out = dict(FLAG_TABLE)
    if header is None:
        return out
    from_header: dict[str, int] = {}
    for key in header:
        key = key.upper()
        if key.startswith("MP_"):
            value = header[key]
            if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                from_header[key[3:]] = int(value)
        elif key.startswith("MSKN"):
            m = _MSKN_KEY.match(key)
            value = header[key]
            if m and isinstance(value, str) and value.strip():
                from_header[value.strip().upper()] = int(m.group(1))
    # A bit renamed in the header replaces the table's name for that bit.
    taken = set(from_header.values())
    out = {k: v for k, v in out.items() if v not in taken}
    out.update(from_header)
    return out


def flag_bits(names, header=None) -> int:
    """Return the bitmask of flag ``names``.

    Parameters
    ----------
    names : str or iterable of str
        Flag names, case-insensitive, with or without the ``MP_`` prefix.
    header : astropy.io.fits.Header or dict, optional
        A ``FLAGS`` header to read the bit numbers from (see :func:`flag_names`),
        or a ready name -> bit dict.

    Returns
    -------
    int
        The OR of ``1 << bit`` over the names.

    Raises
    ------
    ValueError
        If a name is unknown; the message lists the known ones.

    Examples
    --------
    >>> flag_bits(["hot", "COLD"])
    3072
    """
    if isinstance(names, str):
        names = [names]
    table = dict(header) if isinstance(header, dict) else flag_names(header)
    mask = 0
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"'names' must be flag names (str); got {name!r}.")
        key = name.strip().upper()
        if key.startswith("MP_"):
            key = key[3:]
        if key not in table:
            raise ValueError(
                f"'names' must be known flag names ({', '.join(sorted(table))}); got {name!r}."
            )
        mask |= 1 << table[key]
    return mask


# --------------------------------------------------------------------------------------------
# The -TAB wavelength table
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class WaveTable:
    """The ``WCS-WAVE`` lookup table of the ``W`` WCS, with its pixel mapping.

    The table coordinate of 0-based pixel ``p`` of this image is
    ``psi = cdelt * (p + 1 - crpix) + crval`` (FITS Paper III), i.e. the
    1-based parent-detector pixel for real files and cutouts.

    Parameters
    ----------
    x, y : numpy.ndarray
        Control points (float64, strictly increasing).
    values : numpy.ndarray
        ``(len(y), len(x), 2)`` wavelength and bandwidth (um), float64.
    crpix, crval, cdelt : tuple of float
        ``(x, y)`` values of ``CRPIXnW``, ``CRVALnW``, ``CDELTnW``.

    Examples
    --------
    A 2 x 2 table whose wavelength grows by 1 um per 10 pixels along x:

    >>> import numpy as np
    >>> values = np.array([[[1.0, 0.1], [2.0, 0.1]], [[1.0, 0.1], [2.0, 0.1]]])
    >>> t = WaveTable(np.array([1.0, 11.0]), np.array([1.0, 11.0]), values,
    ...               (1.0, 1.0), (1.0, 1.0), (1.0, 1.0))
    >>> t.evaluate(5, 0).tolist()
    [1.5, 0.1]
    """

    x: np.ndarray
    y: np.ndarray
    values: np.ndarray
    crpix: tuple
    crval: tuple
    cdelt: tuple

    def shifted(self, x0: int, y0: int) -> WaveTable:
        """The table for a sub-image whose pixel (0, 0) is this image's ``(x0, y0)``.

        Parameters
        ----------
        x0, y0 : int
            0-based position in this image of the sub-image's first pixel.

        Returns
        -------
        WaveTable
            The same control points with ``crpix`` moved by ``(-x0, -y0)``.

        Examples
        --------
        >>> import numpy as np
        >>> values = np.array([[[1.0, 0.1], [2.0, 0.1]], [[1.0, 0.1], [2.0, 0.1]]])
        >>> t = WaveTable(np.array([1.0, 11.0]), np.array([1.0, 11.0]), values,
        ...               (1.0, 1.0), (1.0, 1.0), (1.0, 1.0))
        >>> sub = t.shifted(5, 0)
        >>> sub.crpix, sub.evaluate(0, 0).tolist() == t.evaluate(5, 0).tolist()
        ((-4.0, 1.0), True)
        """
        return WaveTable(
            self.x,
            self.y,
            self.values,
            (self.crpix[0] - x0, self.crpix[1] - y0),
            self.crval,
            self.cdelt,
        )

    @property
    def parent_origin(self) -> tuple[float, float]:
        """0-based parent-detector ``(x, y)`` of this image's pixel (0, 0) (CDELT 1 assumed).

        Returns
        -------
        tuple of float
            ``(x, y)`` on the parent detector.

        Examples
        --------
        >>> import numpy as np
        >>> values = np.zeros((2, 2, 2))
        >>> t = WaveTable(np.array([1.0, 11.0]), np.array([1.0, 11.0]), values,
        ...               (1.0, 1.0), (1.0, 1.0), (1.0, 1.0))
        >>> t.parent_origin, t.shifted(3, 7).parent_origin
        ((0.0, 0.0), (3.0, 7.0))
        """
        return (
            self.crval[0] - self.crpix[0] * self.cdelt[0] + self.cdelt[0] - 1.0,
            self.crval[1] - self.crpix[1] * self.cdelt[1] + self.cdelt[1] - 1.0,
        )

    def _axis(self, p, axis: int):
        ctrl = self.x if axis == 0 else self.y
        psi = self.cdelt[axis] * (np.asarray(p, dtype=np.float64) + 1.0 - self.crpix[axis])
        psi = psi + self.crval[axis]
        i = np.clip(np.searchsorted(ctrl, psi, side="right") - 1, 0, ctrl.size - 2)
        lo, hi = ctrl[i], ctrl[i + 1]
        t = (psi - lo) / (hi - lo)
        tol = 1e-9 * max(1.0, abs(ctrl[-1]))
        outside = (psi < ctrl[0] - tol) | (psi > ctrl[-1] + tol)
        return i, t, outside

    def evaluate(self, x, y) -> np.ndarray:
        """Wavelength and bandwidth (um) at 0-based pixels ``(x, y)`` (any broadcastable shapes).

        Bilinear interpolation between the control points.

        Parameters
        ----------
        x, y : array_like
            0-based pixel positions in this image (broadcast against each other).

        Returns
        -------
        numpy.ndarray
            float64 of shape ``broadcast(x, y).shape + (2,)``: wavelength and
            bandwidth (um); NaN outside the table.

        Examples
        --------
        >>> import numpy as np
        >>> values = np.array([[[1.0, 0.1], [2.0, 0.1]], [[1.0, 0.1], [2.0, 0.1]]])
        >>> t = WaveTable(np.array([1.0, 11.0]), np.array([1.0, 11.0]), values,
        ...               (1.0, 1.0), (1.0, 1.0), (1.0, 1.0))
        >>> t.evaluate([0, 10, 20], 0)[:, 0].tolist()
        [1.0, 2.0, nan]
        """
        x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
        ix, tx, ox = self._axis(x, 0)
        iy, ty, oy = self._axis(y, 1)
        v = self.values
        tx = tx[..., None]
        ty = ty[..., None]
        out = (1.0 - ty) * ((1.0 - tx) * v[iy, ix] + tx * v[iy, ix + 1]) + ty * (
            (1.0 - tx) * v[iy + 1, ix] + tx * v[iy + 1, ix + 1]
        )
        out[ox | oy] = np.nan
        return out

    def wavemap(self, shape, origin=(0, 0)) -> np.ndarray:
        """The ``(ny, nx, 2)`` float64 wavemap of a box of ``shape`` starting at 0-based ``origin``.

        Parameters
        ----------
        shape : tuple of int
            ``(ny, nx)``.
        origin : tuple of int, optional
            ``(y0, x0)`` of the box in this image's pixels.

        Returns
        -------
        numpy.ndarray
            ``(ny, nx, 2)`` wavelength and bandwidth (um), equal to
            :meth:`evaluate` on the box's pixel grid.

        Examples
        --------
        >>> import numpy as np
        >>> values = np.array([[[1.0, 0.1], [2.0, 0.1]], [[1.0, 0.1], [2.0, 0.1]]])
        >>> t = WaveTable(np.array([1.0, 11.0]), np.array([1.0, 11.0]), values,
        ...               (1.0, 1.0), (1.0, 1.0), (1.0, 1.0))
        >>> m = t.wavemap((2, 3), origin=(0, 4))
        >>> m.shape, m[0, :, 0].tolist()
        ((2, 3, 2), [1.4, 1.5, 1.6])
        """
        ny, nx = (int(n) for n in shape)
        y0, x0 = origin
        ix, tx, ox = self._axis(np.arange(nx) + x0, 0)
        iy, ty, oy = self._axis(np.arange(ny) + y0, 1)
        v = self.values
        # Interpolate every table row along x: (m, nx * 2); then blend two rows per output row.
        rows = v[:, ix] * (1.0 - tx)[None, :, None] + v[:, ix + 1] * tx[None, :, None]
        rows = np.ascontiguousarray(rows.reshape(rows.shape[0], -1))
        out = np.empty((ny, nx, 2), dtype=np.float64)
        flat = out.reshape(ny, 2 * nx)
        iy = iy.astype(np.int64)
        _share_work(
            [
                functools.partial(_blend_rows, rows, iy, ty, flat, j0, j1)
                for j0, j1 in _chunks(ny, ny * nx)
            ],
            parallel=ny * nx >= _PARALLEL_MIN_PIXELS,
        )
        if ox.any():
            out[:, ox] = np.nan
        if oy.any():
            out[oy] = np.nan
        return out


@numba.njit(cache=True, nogil=True)
def _blend_rows(rows, iy, ty, out, j0, j1):  # pragma: no cover - compiled
    """``out[j] = (1 - ty[j]) * rows[iy[j]] + ty[j] * rows[iy[j] + 1]`` for rows ``j0 <= j < j1``.

    ``rows`` and ``out`` are 2-D (the wavelength/bandwidth pairs flattened into
    the last axis), so the inner loop is one contiguous, vectorisable sweep.
    """
    n = out.shape[1]
    for j in range(j0, j1):
        a = 1.0 - ty[j]
        b = ty[j]
        r0 = rows[iy[j]]
        r1 = rows[iy[j] + 1]
        o = out[j]
        for i in range(n):
            o[i] = a * r0[i] + b * r1[i]


# --------------------------------------------------------------------------------------------
# Sharing big memory-bound loops with one helper thread
# --------------------------------------------------------------------------------------------
#: Threads used for full-frame copies and wavemaps (the caller plus helpers). The work is
#: memory-bound numpy copies and a ``nogil`` numba loop, which release the GIL. Set the
#: environment variable ``DRIZZLE3D_READ_THREADS=1`` to keep everything on the caller.
_N_THREADS = 1 if os.environ.get("DRIZZLE3D_READ_THREADS", "").strip() == "1" else 2
#: Below this many pixels, work stays on the caller (a thread hand-off costs ~50 us).
_PARALLEL_MIN_PIXELS = 1 << 20
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(_N_THREADS - 1, thread_name_prefix="drizzle3d-read")
        return _POOL


def _chunks(n: int, pixels: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` in ``_N_THREADS`` contiguous pieces when the job is big enough."""
    k = _N_THREADS if pixels >= _PARALLEL_MIN_PIXELS and n >= _N_THREADS else 1
    edges = [round(i * n / k) for i in range(k + 1)]
    return [(edges[i], edges[i + 1]) for i in range(k)]


def _share_work(tasks, parallel: bool = True) -> None:
    """Run callables: every other one is offered to the helper thread, the caller runs the rest.

    Tasks the helper has not started when the caller is done are taken back
    (cancelled and run by the caller), so a busy helper never makes this slower
    than running everything on the caller. Exceptions propagate.
    """
    if not parallel or len(tasks) < 2 or _N_THREADS < 2:
        for task in tasks:
            task()
        return
    pool = _pool()
    offered = [(task, pool.submit(task)) for task in tasks[1::2]]
    try:
        for task in tasks[0::2]:
            task()
    except BaseException:
        for _, fut in offered:
            fut.cancel()
        raise
    for task, fut in offered:
        if fut.cancel():
            task()
        else:
            fut.result()


def _wave_columns(header, path) -> tuple[str, dict[str, str]]:
    """Check the ``W`` WCS keywords; return the table's EXTNAME and its x/y/values columns."""
    if "CTYPE1W" not in header or "CTYPE2W" not in header:
        raise SpherexFileError(path, "IMAGE header has no spectral WCS (key 'W': CTYPE1W/CTYPE2W).")
    for n in (1, 2):
        ctype = str(header[f"CTYPE{n}W"]).strip().upper()
        if not ctype.endswith("-TAB"):
            raise SpherexFileError(
                path, f"spectral WCS CTYPE{n}W must use the -TAB algorithm; got {ctype!r}."
            )
    extname = str(header.get("PS1_0W", "WCS-WAVE")).strip()
    cols = {
        "x": str(header.get("PS1_2W", "X")).strip(),
        "y": str(header.get("PS2_2W", "Y")).strip(),
        "values": str(header.get("PS1_1W", "VALUES")).strip(),
    }
    return extname, cols


def _wave_table(hdul, header, path) -> WaveTable:
    extname, cols = _wave_columns(header, path)
    try:
        tab = hdul[extname]
    except KeyError as err:
        raise SpherexFileError(
            path, f"missing HDU {extname!r} (the -TAB table named by PS1_0W)."
        ) from err
    try:
        row = tab.data[0]
        xs = np.asarray(row[cols["x"]], dtype=np.float64).ravel()
        ys = np.asarray(row[cols["y"]], dtype=np.float64).ravel()
        vals = np.asarray(row[cols["values"]], dtype=np.float64)
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise SpherexFileError(
            path, f"HDU {extname!r} is not a -TAB table with columns {sorted(cols.values())}: {err}"
        ) from err
    return _make_wave_table(xs, ys, vals, header, path, extname)


def _make_wave_table(xs, ys, vals, header, path, extname) -> WaveTable:
    if vals.shape != (ys.size, xs.size, 2):
        raise SpherexFileError(
            path,
            f"HDU {extname!r} VALUES must have shape (ny={ys.size}, nx={xs.size}, 2); "
            f"got {vals.shape}.",
        )
    if xs.size < 2 or ys.size < 2 or np.any(np.diff(xs) <= 0) or np.any(np.diff(ys) <= 0):
        raise SpherexFileError(path, f"HDU {extname!r} control points must be strictly increasing.")
    vals.setflags(write=False)
    return WaveTable(
        xs,
        ys,
        vals,
        (float(header.get("CRPIX1W", 0.0)), float(header.get("CRPIX2W", 0.0))),
        (float(header.get("CRVAL1W", 0.0)), float(header.get("CRVAL2W", 0.0))),
        (float(header.get("CDELT1W", 1.0)), float(header.get("CDELT2W", 1.0))),
    )


# --------------------------------------------------------------------------------------------
# The image
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpherexMeta:
    """Header metadata of a SPHEREx exposure (also readable as ``meta["detector"]``).

    Built by :func:`read_spherex`; every parameter is kept as an attribute.

    Parameters
    ----------
    path : str
        The file read.
    detector : int
        ``DETECTOR`` (1..6).
    obsid : str or None
        ``OBSID``.
    mjd_beg, mjd_end, mjd_mid : float or None
        Start, end and middle of the exposure (MJD).
    exptime : float or None
        ``XPOSURE`` (s).
    psf_fwhm : float or None
        ``PSF_FWHM`` (arcsec).
    release : str
        ``"qr2"``, ``"qr3"`` or ``"unknown"`` (from the PSF/EPSF HDU, the FLAGS
        keyword style and compression, and the pipeline ``VERSION``).
    version : str or None
        Pipeline version (PRIMARY ``VERSION``).
    bunit : str
        ``BUNIT`` of IMAGE.
    flags : dict
        Flag name -> bit, from the FLAGS header (see :func:`flag_names`).
    parent_shape : tuple
        ``(ny, nx)`` of the file's image HDUs (before ``bbox``).
    zodi_scale : float or None
        Zodi amplitude subtracted from ``data`` (None: not subtracted).
    zodi_scale_err : float or None
        Its 1-sigma uncertainty (0 for static subtraction).

    Examples
    --------
    >>> import tempfile
    >>> from drizzle3d.simulate import simulate_field
    >>> f = simulate_field(tempfile.mkdtemp(), n_exposures=1, shape=(32, 32))
    >>> meta = read_spherex(f.paths[0]).meta
    >>> meta.detector, meta["release"], meta.parent_shape, meta.flags["SOURCE"]
    (3, 'qr2', (32, 32), 21)
    """

    path: str
    detector: int
    obsid: str | None
    mjd_beg: float | None
    mjd_end: float | None
    mjd_mid: float | None
    exptime: float | None
    psf_fwhm: float | None
    release: str
    version: str | None
    bunit: str
    flags: dict = field(default_factory=dict)
    parent_shape: tuple = ()
    zodi_scale: float | None = None
    zodi_scale_err: float | None = None

    def __getitem__(self, key):
        try:
            return getattr(self, key)
        except AttributeError as err:
            raise KeyError(key) from err


@dataclass(frozen=True, eq=False)
class SpherexImage:
    """One SPHEREx Level-2 exposure (or a box of it), read by :func:`read_spherex`.

    Every parameter is kept as an attribute of the same name. The attribute
    ``spectral_wcs`` is the ``W`` WCS (wavelength, bandwidth in um) with SIP
    removed, shifted to ``bbox``; it is built by astropy on first access when the
    file was read by the fast path (:meth:`wavemap` never needs it: it evaluates
    the table directly).

    Parameters
    ----------
    data : numpy.ndarray
        float32 ``(ny, nx)`` surface brightness, MJy/sr (zodi subtracted if asked).
    var : numpy.ndarray
        float32 variance, (MJy/sr)^2.
    flags : numpy.ndarray
        int32 bitmask.
    zodi : numpy.ndarray
        float32 zodi model (MJy/sr) as in the file (unscaled).
    wcs : astropy.wcs.WCS
        Celestial TAN-SIP WCS of these pixels (shifted to ``bbox``).
    meta : SpherexMeta
    bbox : tuple of int
        ``(ymin, ymax, xmin, xmax)`` read, half-open, in the file's pixels.
    wave_table : WaveTable
        The ``-TAB`` table, shifted to these pixels.
    calibration : str or None
        Spectral-WCS calibration file used by :meth:`wavemap` by default.
    _spectral : astropy.wcs.WCS or None, optional
        Internal: the ``W`` WCS, or what the fast reader keeps to build it.

    Examples
    --------
    >>> import tempfile
    >>> from drizzle3d.simulate import simulate_field
    >>> f = simulate_field(tempfile.mkdtemp(), n_exposures=1, shape=(32, 32))
    >>> im = read_spherex(f.paths[0], bbox=(0, 8, 4, 20))
    >>> im.shape, im.data.dtype.name, im.bbox, im.meta.detector
    ((8, 16), 'float32', (0, 8, 4, 20), 3)
    """

    data: np.ndarray
    var: np.ndarray
    flags: np.ndarray
    zodi: np.ndarray
    wcs: WCS
    meta: SpherexMeta
    bbox: tuple
    wave_table: WaveTable
    calibration: str | None = None
    _spectral: object = field(default=None, repr=False)

    @functools.cached_property
    def spectral_wcs(self) -> WCS:
        """The ``W`` WCS (a ready one, or built now from the bytes kept by the fast reader)."""
        spec = self._spectral
        return spec.build() if isinstance(spec, _LazySpectralWcs) else spec

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)`` of the pixels read.

        Returns
        -------
        tuple of int
            ``data.shape``.

        Examples
        --------
        >>> import tempfile
        >>> from drizzle3d.simulate import simulate_field
        >>> f = simulate_field(tempfile.mkdtemp(), n_exposures=1, shape=(32, 32))
        >>> read_spherex(f.paths[0], bbox=(2, 5, 0, 32)).shape
        (3, 32)
        """
        return self.data.shape

    def wavemap(self, calibration=None) -> np.ndarray:
        """Return the ``(ny, nx, 2)`` float64 map of central wavelength and bandwidth (um).

        Parameters
        ----------
        calibration : str or os.PathLike, optional
            A spectral-WCS calibration file with ``CWAVE``/``CBAND``; default the
            one given to :func:`read_spherex`, else the ``WCS-WAVE`` table.

        Returns
        -------
        numpy.ndarray
            ``(ny, nx, 2)`` float64: central wavelength and bandwidth (um) per pixel.

        Raises
        ------
        SpherexFileError
            If the calibration file is missing, unreadable or lacks this detector.

        Examples
        --------
        >>> import tempfile
        >>> from drizzle3d.simulate import simulate_field
        >>> f = simulate_field(tempfile.mkdtemp(), n_exposures=1, shape=(32, 32))
        >>> wm = read_spherex(f.paths[0]).wavemap()
        >>> wm.shape, bool(0.7 < wm[..., 0].min() < wm[..., 0].max() < 5.1)
        ((32, 32, 2), True)
        """
        cal = calibration if calibration is not None else self.calibration
        if cal is not None:
            return _calibration_wavemap(
                cal, self.wave_table, self.shape, (0, 0), self.meta.detector
            )
        return self.wave_table.wavemap(self.shape)

    def exclude_mask(self, names=DEFAULT_EXCLUDE_FLAGS) -> np.ndarray:
        """Boolean mask of pixels carrying any of the flag ``names`` (bits from this file).

        Parameters
        ----------
        names : sequence of str, optional
            Flag names (case-insensitive); default :data:`DEFAULT_EXCLUDE_FLAGS`.

        Returns
        -------
        numpy.ndarray
            bool, ``shape``: True where any of the flags is set.

        Raises
        ------
        ValueError, TypeError
            If a name is not a known flag of this file (see :func:`flag_bits`).

        Examples
        --------
        >>> import tempfile
        >>> from drizzle3d.simulate import simulate_field
        >>> f = simulate_field(tempfile.mkdtemp(), n_exposures=1, shape=(32, 32))
        >>> im = read_spherex(f.paths[0])
        >>> mask = im.exclude_mask(["HOT"])
        >>> mask.shape, bool((mask == ((im.flags & (1 << 10)) != 0)).all())
        ((32, 32), True)
        """
        return (self.flags & flag_bits(names, self.meta.flags)) != 0


def _check_bbox(bbox, shape, path):
    ny, nx = shape
    if bbox is None:
        return 0, ny, 0, nx
    try:
        ymin, ymax, xmin, xmax = (int(v) for v in bbox)
        ok = [float(v) == int(v) for v in bbox]
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"'bbox' must be (ymin, ymax, xmin, xmax) integers; got {bbox!r}."
        ) from err
    if not all(ok) or not (0 <= ymin < ymax <= ny and 0 <= xmin < xmax <= nx):
        raise ValueError(
            f"'bbox' must be (ymin, ymax, xmin, xmax), half-open, inside the {ny}x{nx} frame "
            f"of {path}; got {bbox!r}."
        )
    return ymin, ymax, xmin, xmax


_CEL_KEY = re.compile(
    r"^(WCSAXES|CTYPE[12]|CRPIX[12]|CRVAL[12]|CDELT[12]|CUNIT[12]|PC[12]_[12]|CD[12]_[12]"
    r"|LONPOLE|LATPOLE|RADESYS|EQUINOX)$"
)
_W_KEY = re.compile(
    r"^(WCSAXES|WCSNAME|CTYPE\d|CRPIX\d|CRVAL\d|CDELT\d|CUNIT\d|CNAME\d|PV\d_\d+|PS\d_\d+"
    r"|PC\d_\d|CD\d_\d)W$"
)


def _celestial_wcs(header: fits.Header) -> WCS:
    """The primary (celestial) WCS, SIP attached from the header's coefficients.

    Built from the WCS keywords alone (astropy's own SIP parsing of a full
    Level-2 header costs more than the rest of a box read).
    """
    cards = [c for c in header.cards if _CEL_KEY.match(c.keyword)]
    sip = {c.keyword: c.value for c in header.cards if _SIP_KEY.match(c.keyword)}
    return _attach_sip(WCS(fits.Header(cards)), sip)


def _attach_sip(w: WCS, sip: dict) -> WCS:
    """Attach SIP matrices built from ``{keyword: value}`` (A_ORDER, A_p_q, ...) to ``w``."""
    if sip:
        mats = {}
        for name in ("A", "B", "AP", "BP"):
            order = sip.get(f"{name}_ORDER")
            if order is None:
                mats[name] = None
                continue
            m = np.zeros((int(order) + 1, int(order) + 1))
            for p in range(int(order) + 1):
                for q in range(int(order) + 1 - p):
                    m[p, q] = float(sip.get(f"{name}_{p}_{q}", 0.0))
            mats[name] = m
        if mats["A"] is not None and mats["B"] is not None:
            w.sip = Sip(mats["A"], mats["B"], mats["AP"], mats["BP"], w.wcs.crpix)
    return w


def _spectral_wcs(header: fits.Header, hdul) -> WCS:
    """The ``W`` WCS from its own keywords only, so no celestial SIP can leak into it."""
    cards = [c for c in header.cards if _W_KEY.match(c.keyword)]
    w = WCS(fits.Header(cards), fobj=hdul, key="W")
    w.sip = None  # belt and braces: astropy#13105
    return w


def _check_file(path) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SpherexFileError(path, "no such file.")
    with open(path, "rb") as fh:
        head = fh.read(80)
    if not (head.startswith(b"SIMPLE  =") or head[:2] == b"\x1f\x8b"):
        raise SpherexFileError(path, "not a FITS file (no 'SIMPLE' card at the start).")
    return path


def _open(path):
    path = _check_file(path)
    try:
        hdul = fits.open(path, memmap=True, lazy_load_hdus=False)
    except (OSError, ValueError, TypeError, IndexError) as err:
        raise SpherexFileError(path, f"corrupt or truncated FITS file ({err}).") from err
    return path, hdul


def _check_layout(hdul, path):
    names = [h.name.upper() for h in hdul]
    missing = [n for n in (*_REQUIRED_HDUS, "WCS-WAVE") if n not in names]
    if missing:
        raise SpherexFileError(
            path,
            f"missing HDU(s) {missing}; a Level-2 image needs {[*_REQUIRED_HDUS, 'WCS-WAVE']} "
            f"(found {names}).",
        )
    shapes = {n: tuple(hdul[n].shape) for n in _IMAGE_HDUS}
    if len(shapes["IMAGE"]) != 2:
        raise SpherexFileError(path, f"IMAGE must be 2-D; got shape {shapes['IMAGE']}.")
    bad = {n: s for n, s in shapes.items() if s != shapes["IMAGE"]}
    if bad:
        raise SpherexFileError(
            path, f"shape mismatch between HDUs: IMAGE is {shapes['IMAGE']} but {bad}."
        )
    if not path.endswith(".gz"):
        size = os.path.getsize(path)
        for n in _IMAGE_HDUS:
            info = hdul[n].fileinfo()
            if info is not None and info["datLoc"] + info["datSpan"] > size:
                raise SpherexFileError(
                    path,
                    f"truncated file: HDU {n} needs {info['datLoc'] + info['datSpan']} bytes, "
                    f"the file has {size}.",
                )
    _check_unit(hdul["IMAGE"].header, "IMAGE", _SB, path, required=True)
    _check_unit(hdul["VARIANCE"].header, "VARIANCE", _SB2, path, required=False)
    _check_unit(hdul["ZODI"].header, "ZODI", _SB, path, required=False)
    return shapes["IMAGE"]


def _check_unit(header, name, expected, path, *, required):
    bunit = str(header.get("BUNIT", "")).strip()
    if not bunit:
        if required:
            raise SpherexFileError(path, f"{name} has no BUNIT; expected {expected}.")
        log.debug("%s: %s has no BUNIT; assuming %s", path, name, expected)
        return
    if not _unit_is(bunit, expected):
        raise SpherexFileError(
            path, f"{name} has wrong units BUNIT={bunit!r}; expected {expected}."
        )


@functools.lru_cache(maxsize=64)
def _unit_is(bunit: str, expected) -> bool:
    """Whether ``bunit`` parses to a unit equal to ``expected`` (cached: parsing is slow)."""
    try:
        unit = u.Unit(bunit)
        return unit.is_equivalent(expected) and math.isclose(unit.to(expected), 1.0)
    except (ValueError, TypeError):
        return False


def _release(version, names, flags_compressed: bool, flags_header) -> tuple[str, str | None]:
    version = None if version is None else str(version)
    names = {n.upper() for n in names}
    if "EPSF" in names or flags_compressed:
        return "qr3", version
    if any(_MSKN_KEY.match(k) for k in flags_header):
        return "qr3", version
    if "PSF" in names or any(k.upper().startswith("MP_") for k in flags_header):
        return "qr2", version
    if version:
        m = re.match(r"\s*(\d+)", version)
        if m:
            return ("qr3" if int(m.group(1)) >= 7 else "qr2"), version
    return "unknown", version


def _meta(hdul, path, shape) -> SpherexMeta:
    return _make_meta(
        hdul["IMAGE"].header,
        hdul["FLAGS"].header,
        hdul[0].header.get("VERSION"),
        [h.name for h in hdul],
        isinstance(hdul["FLAGS"], fits.CompImageHDU),
        path,
        shape,
    )


def _make_meta(hdr, fhdr, version, names, flags_compressed, path, shape) -> SpherexMeta:
    if "DETECTOR" not in hdr:
        raise SpherexFileError(path, "IMAGE header has no DETECTOR keyword.")
    try:
        det = int(hdr["DETECTOR"])
    except (TypeError, ValueError) as err:
        raise SpherexFileError(path, f"DETECTOR must be 1..6; got {hdr['DETECTOR']!r}.") from err

    def num(key):
        v = hdr.get(key)
        return None if v is None else float(v)

    beg, end = num("MJD-BEG"), num("MJD-END")
    mid = num("MJD-AVG")
    if mid is None and beg is not None and end is not None:
        mid = 0.5 * (beg + end)
    release, version = _release(version, names, flags_compressed, fhdr)
    obsid = hdr.get("OBSID")
    return SpherexMeta(
        path=path,
        detector=det,
        obsid=None if obsid is None else str(obsid).strip(),
        mjd_beg=beg,
        mjd_end=end,
        mjd_mid=mid,
        exptime=num("XPOSURE"),
        psf_fwhm=num("PSF_FWHM"),
        release=release,
        version=version,
        bunit=str(hdr.get("BUNIT", "")).strip(),
        flags=dict(fhdr.derived("flags", flag_names))
        if isinstance(fhdr, _Cards)
        else flag_names(fhdr),
        parent_shape=tuple(shape),
    )


def _section(hdu, box, dtype, path):
    """Read ``box`` of an image HDU into a native-endian array of ``dtype``.

    Uncompressed HDUs are memory-mapped and only the rows of the box are
    touched; tile-compressed ones decompress only the tiles the box needs.
    """
    ymin, ymax, xmin, xmax = box
    try:
        if isinstance(hdu, fits.CompImageHDU):
            arr = hdu.section[ymin:ymax, xmin:xmax]
        else:
            arr = hdu.data[ymin:ymax, xmin:xmax]
        out = np.empty(arr.shape, dtype=dtype)
        out[...] = arr
    except (OSError, ValueError, TypeError, IndexError) as err:
        raise SpherexFileError(path, f"cannot read HDU {hdu.name} ({err}).") from err
    return out


def _calibration_wavemap(calibration, table: WaveTable, shape, origin, detector) -> np.ndarray:
    cpath = os.fspath(calibration)
    px, py = table.parent_origin
    x0 = round(px) + origin[1]
    y0 = round(py) + origin[0]
    ny, nx = shape
    try:
        with fits.open(cpath, memmap=True) as hdul:
            det = hdul[0].header.get("DETECTOR")
            if det is not None and int(det) != int(detector):
                raise SpherexFileError(
                    cpath, f"calibration is for detector {det}, the image is detector {detector}."
                )
            maps = []
            for name in ("CWAVE", "CBAND"):
                if name not in hdul:
                    raise SpherexFileError(cpath, f"missing HDU {name!r} in the calibration file.")
                hdu = hdul[name]
                cy, cx = hdu.shape
                if not (x0 >= 0 and x0 + nx <= cx and y0 >= 0 and y0 + ny <= cy):
                    raise SpherexFileError(
                        cpath,
                        f"calibration {cy}x{cx} does not cover parent pixels "
                        f"y {y0}..{y0 + ny}, x {x0}..{x0 + nx}.",
                    )
                maps.append(np.asarray(hdu.section[y0 : y0 + ny, x0 : x0 + nx], dtype=np.float64))
    except OSError as err:
        raise SpherexFileError(cpath, f"not a readable calibration FITS file ({err}).") from err
    return np.stack(maps, axis=-1)


def spectral_wavemap(source, *, bbox=None, calibration=None) -> np.ndarray:
    """The ``(ny, nx, 2)`` map of central wavelength and bandwidth (um) of a frame or a box.

    Evaluates the ``-TAB`` table directly (vectorised bilinear interpolation),
    not astropy per pixel; or reads ``CWAVE``/``CBAND`` from a calibration file.

    Parameters
    ----------
    source : str, os.PathLike, astropy.io.fits.HDUList or SpherexImage
        A Level-2 file (only headers and the table are read), an open HDU list,
        or an image from :func:`read_spherex`.
    bbox : tuple of int, optional
        ``(ymin, ymax, xmin, xmax)``, 0-based half-open, in ``source``'s pixels.
    calibration : str or os.PathLike, optional
        Spectral-WCS calibration file (2040 x 2040 ``CWAVE`` and ``CBAND``
        maps, parent-detector pixels); used instead of the table.

    Returns
    -------
    numpy.ndarray
        float64 ``(ny, nx, 2)``: ``[..., 0]`` wavelength, ``[..., 1]`` bandwidth.

    Raises
    ------
    SpherexFileError
        If the file or the calibration is malformed.
    ValueError
        If ``bbox`` is outside the frame.

    Examples
    --------
    >>> import tempfile
    >>> from drizzle3d.simulate import simulate_field
    >>> f = simulate_field(tempfile.mkdtemp(), n_exposures=1, shape=(64, 64))
    >>> spectral_wavemap(f.paths[0], bbox=(0, 4, 0, 8)).shape
    (4, 8, 2)
    """
    if isinstance(source, SpherexImage):
        ymin, ymax, xmin, xmax = _check_bbox(bbox, source.shape, source.meta.path)
        table, det, path = source.wave_table, source.meta.detector, source.meta.path
        cal = calibration if calibration is not None else source.calibration
        shape, origin = (ymax - ymin, xmax - xmin), (ymin, xmin)
    else:
        if isinstance(source, fits.HDUList):
            hdul, path, close = source, str(source.filename() or "<HDUList>"), False
        else:
            path, hdul = _open(source)
            close = True
        try:
            if "IMAGE" not in hdul:
                raise SpherexFileError(path, "missing HDU 'IMAGE'.")
            hdr = hdul["IMAGE"].header
            table = _wave_table(hdul, hdr, path)
            ny, nx = hdul["IMAGE"].shape
            det = int(hdr.get("DETECTOR", 0))
        finally:
            if close:
                hdul.close()
        ymin, ymax, xmin, xmax = _check_bbox(bbox, (ny, nx), path)
        shape, origin, cal = (ymax - ymin, xmax - xmin), (ymin, xmin), calibration
    if cal is not None:
        return _calibration_wavemap(cal, table, shape, origin, det)
    return table.wavemap(shape, origin)


# --------------------------------------------------------------------------------------------
# Zodi
# --------------------------------------------------------------------------------------------
def fit_zodi_scale(
    data,
    var,
    flags,
    zodi,
    *,
    exclude_flags=ZODI_FIT_EXCLUDE_FLAGS,
    flag_table=None,
    min_fraction: float = 0.05,
    min_pixels: int = 100,
    clip: float = 4.0,
    max_iter: int = 10,
) -> tuple[float, float, int]:
    """Fit the zodi amplitude ``s`` in ``data ~ s * zodi`` on unflagged background pixels.

    Inverse-variance weighted least squares, started from the median ratio and
    iterated with asymmetric-robust sigma clipping of the normalised residuals
    (MAD scale), so unflagged sources and cosmic rays do not pull it.

    Parameters
    ----------
    data, var, zodi : numpy.ndarray
        Image, variance and zodi model (same shape).
    flags : numpy.ndarray
        Flag bitmask.
    exclude_flags : sequence of str, optional
        Pixels with these flags are not used (default: bad pixels and SOURCE).
    flag_table : dict, optional
        Name -> bit of the file (``SpherexImage.meta.flags``); default the
        documented table.
    min_fraction : float, optional
        Fall back to ``s = 1`` (with a :class:`ZodiFitWarning`) when fewer than
        this fraction of the pixels (or ``min_pixels``) qualify, or the fit is
        outside (0, 10].
    min_pixels : int, optional
    clip : float, optional
        Clipping threshold (robust sigmas).
    max_iter : int, optional

    Returns
    -------
    scale, scale_err : float
        The amplitude and its 1-sigma uncertainty (0 on fallback).
    n_used : int
        Pixels in the final fit.

    Examples
    --------
    >>> import numpy as np
    >>> z = np.linspace(1.0, 2.0, 10000).reshape(100, 100)
    >>> s, err, n = fit_zodi_scale(1.05 * z, np.full(z.shape, 1e-4), np.zeros(z.shape, int), z)
    >>> round(s, 6)
    1.05
    """
    data = np.asarray(data, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    zodi = np.asarray(zodi, dtype=np.float64)
    flags = np.asarray(flags)
    mask = flag_bits(list(exclude_flags), flag_table)
    good = (
        np.isfinite(data)
        & np.isfinite(var)
        & np.isfinite(zodi)
        & (var > 0)
        & (zodi > 0)
        & ((flags & mask) == 0)
    )
    n_good = int(good.sum())
    need = max(int(min_pixels), math.ceil(min_fraction * data.size))
    if n_good < need:
        warnings.warn(
            f"zodi fit: only {n_good} usable background pixels (< {need}); using scale 1.0.",
            ZodiFitWarning,
            stacklevel=2,
        )
        return 1.0, 0.0, 0
    d, z, w = data[good], zodi[good], 1.0 / var[good]
    s, n_used, wz2 = _clipped_zodi_fit(d, z, w, float(clip), int(max_iter))
    s = float(s)
    n_used = int(n_used)
    err = float(1.0 / math.sqrt(wz2)) if wz2 > 0 else math.inf
    if not (0.0 < s <= 10.0) or n_used < need:
        warnings.warn(
            f"zodi fit: scale {s:.4g} from {n_used} pixels is not usable; using scale 1.0.",
            ZodiFitWarning,
            stacklevel=2,
        )
        return 1.0, 0.0, 0
    return s, err, n_used


@numba.njit(cache=True, nogil=True)
def _clipped_zodi_fit(d, z, w, clip, max_iter):
    """Iteratively clipped weighted fit of ``d = s z``: (s, pixels kept, sum(w z**2) kept).

    Start from the median ratio; each round clips at ``clip`` robust sigmas (1.4826 MAD)
    of the weighted residuals and refits ``s``, until the kept set stops changing. Compiled
    without the GIL, so reading images in threads scales.
    """
    n = d.size
    s = np.median(d / z)
    sw = np.sqrt(w)
    keep = np.ones(n, dtype=np.bool_)
    for _ in range(max_iter):
        r = (d - s * z) * sw
        kept = r[keep]
        med = np.median(kept)
        mad = 1.4826 * np.median(np.abs(kept - med))
        thr = clip * max(mad, 1e-12)
        new_keep = np.abs(r - med) <= thr
        num = 0.0
        den = 0.0
        same = True
        for i in range(n):
            if new_keep[i]:
                num += w[i] * d[i] * z[i]
                den += w[i] * z[i] * z[i]
            if new_keep[i] != keep[i]:
                same = False
        s = num / den
        if same:
            break
        keep = new_keep
    used = 0
    wz2 = 0.0
    for i in range(n):
        if keep[i]:
            used += 1
            wz2 += w[i] * z[i] * z[i]
    return s, used, wz2


# --------------------------------------------------------------------------------------------
# The fast reader: a header scanner and memory-mapped sections
# --------------------------------------------------------------------------------------------
# astropy.io.fits parses every card of every header (the PSF's included) before it reaches
# the data; most of a box read went there. The scanner below walks the 2880-byte blocks,
# keeps each header's cards as raw text, parses only the values asked for, and copies the
# image sections straight out of a memory map. It handles the plain layout of Level-2 files
# (uncompressed float32 images, an int32 or tile-compressed FLAGS, a -TAB table of fixed-size
# columns) and declines (raises _Fallback) on anything else, so that astropy reads the file:
# correctness and error messages never depend on the fast path.

_BLOCK = 2880
_INT_VALUE = re.compile(r"[+-]?\d+")
_FLOAT_VALUE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[EDed][+-]?\d+)?")
_TFORM = re.compile(r"^\s*(\d*)([LXBIJKAEDCMPQ])")
_TFORM_BYTES = {"L": 1, "B": 1, "I": 2, "J": 4, "K": 8, "A": 1, "E": 4, "D": 8, "C": 8, "M": 16}
_TFORM_DTYPE = {"B": "u1", "I": ">i2", "J": ">i4", "K": ">i8", "E": ">f4", "D": ">f8"}
_PLAIN_CEL = re.compile(
    r"^(WCSAXES|CTYPE[12]|CRPIX[12]|CRVAL[12]|CDELT[12]|CUNIT[12]|PC[12]_[12]|LONPOLE|LATPOLE"
    r"|RADESYS|EQUINOX)$"
)
_IMAGE_DTYPES = {"IMAGE": ">f4", "VARIANCE": ">f4", "ZODI": ">f4", "FLAGS": ">i4"}
_IMAGE_BITPIX = {">f4": -32, ">i4": 32}


class _Fallback(Exception):
    """The fast reader met something it does not handle; astropy reads the file instead."""


def _card_value(text: str):
    """The value of one raw header card (80 characters, more with CONTINUE cards).

    Plain strings, logicals, integers and reals are parsed here; anything else
    (long strings, complex numbers, undefined values) by astropy.
    """
    if len(text) == 80:
        if text.startswith("HIERARCH"):
            field_ = text[text.index("=") + 1 :].strip()
        else:
            field_ = text[10:].strip()
        if field_.startswith("'"):
            start = 1
            while True:
                end = field_.find("'", start)
                if end < 0:
                    break
                if field_[end + 1 : end + 2] == "'":
                    start = end + 2
                    continue
                rest = field_[end + 1 :].strip()
                if not rest or rest.startswith("/"):
                    return field_[1:end].replace("''", "'").rstrip()
                break
        else:
            token = field_.split("/", 1)[0].strip()
            if token == "T":
                return True
            if token == "F":
                return False
            if _INT_VALUE.fullmatch(token):
                return int(token)
            if _FLOAT_VALUE.fullmatch(token):
                return float(token.replace("D", "E").replace("d", "e"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fits.Card.fromstring(text).value


class _Cards(Mapping):
    """One header as ``keyword -> raw card text``; values are parsed on first access.

    Keys are upper case; HIERARCH keywords are stored without the prefix (as
    astropy does). Commentary cards are not kept; a repeated keyword keeps its
    first card (as astropy's ``header[key]``).
    """

    def __init__(self, raw: dict[str, str]):
        self._raw = raw
        self._values: dict = {}
        self._derived: dict = {}

    def derived(self, name: str, compute):
        """``compute(self)``, memoised under ``name`` (headers are cached per file)."""
        try:
            return self._derived[name]
        except KeyError:
            value = self._derived[name] = compute(self)
            return value

    def __getitem__(self, key):
        key = key.upper()
        try:
            return self._values[key]
        except KeyError:
            pass
        value = _card_value(self._raw[key])
        self._values[key] = value
        return value

    def __contains__(self, key) -> bool:
        return isinstance(key, str) and key.upper() in self._raw

    def __iter__(self):
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def text(self, keys) -> str:
        """The raw cards whose keyword matches the compiled regex ``keys``, concatenated."""
        return "".join(c for k, c in self._raw.items() if keys.match(k))


@dataclass(frozen=True)
class _RawHdu:
    name: str
    cards: _Cards
    start: int  # byte offset of the header
    data_start: int
    data_bytes: int  # unpadded

    @property
    def end(self) -> int:
        return self.data_start + -(-self.data_bytes // _BLOCK) * _BLOCK


_END_CARD = b"END" + b" " * 77


def _read_header(fh) -> dict[str, str]:
    """Read one header's blocks from ``fh`` (at the header's start): keyword -> raw card."""
    blocks = []
    while True:
        block = fh.read(_BLOCK)
        if len(block) < _BLOCK:
            raise _Fallback("header runs past the end of the file")
        blocks.append(block)
        at = block.find(_END_CARD)
        while at >= 0 and at % 80:
            at = block.find(_END_CARD, at + 1)
        if at >= 0:
            break
    try:
        text = b"".join(blocks).decode("ascii")
    except UnicodeDecodeError as err:
        raise _Fallback("non-ASCII header") from err
    stop = (len(blocks) - 1) * _BLOCK + at
    cards = [text[i : i + 80] for i in range(0, stop, 80)]
    if "HIERARCH" not in text and "CONTINUE" not in text:
        pairs = [(c[:8].rstrip(), c) for c in cards if c[8:10] == "= "]
        raw = dict(pairs)
        if len(raw) == len(pairs):
            return raw
    raw = {}
    last = None
    for card in cards:
        key = card[:8].rstrip()
        if key == "CONTINUE":
            if last is not None:
                raw[last] += card
            continue
        if key == "HIERARCH":
            eq = card.find("=")
            if eq < 0:
                last = None
                continue
            key = card[9:eq].strip().upper()
        elif card[8:10] != "= ":
            last = None
            continue
        if key in raw:
            last = None
            continue
        raw[key] = card
        last = key
    return raw


# Parsed headers of recently read files, keyed by the file's identity and version
# (device, inode, size, modification time): the pipeline reads each file's header, then
# its box, and tiled runs read a file once per tile, so each file is parsed once.
_SCAN_CACHE: OrderedDict = OrderedDict()
_SCAN_CACHE_SIZE = 128
_SCAN_LOCK = threading.Lock()


def _file_version(st: os.stat_result) -> tuple:
    """What tells one version of a file from another (device, inode, size, mtime): the
    key of the per-file caches."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _scan(fh) -> list[_RawHdu]:
    """The headers and data offsets of every HDU of an (uncompressed) open FITS file.

    Results are cached per file version (see ``_SCAN_CACHE``); parsed values are
    memoised in the cached :class:`_Cards`, which callers only read.
    """
    st = os.fstat(fh.fileno())
    key = _file_version(st)
    with _SCAN_LOCK:
        hit = _SCAN_CACHE.get(key)
        if hit is not None:
            _SCAN_CACHE.move_to_end(key)
            return hit
    hdus = _scan_uncached(fh, st.st_size)
    with _SCAN_LOCK:
        _SCAN_CACHE[key] = hdus
        while len(_SCAN_CACHE) > _SCAN_CACHE_SIZE:
            _SCAN_CACHE.popitem(last=False)
    return hdus


def _scan_uncached(fh, size: int) -> list[_RawHdu]:
    hdus: list[_RawHdu] = []
    pos = 0
    while pos < size:
        fh.seek(pos)
        cards = _Cards(_read_header(fh))
        data_start = fh.tell()
        if not hdus and cards.get("SIMPLE") is not True:
            raise _Fallback("no SIMPLE = T")
        if hdus and "XTENSION" not in cards:
            raise _Fallback(f"HDU {len(hdus)} has no XTENSION")
        naxis = int(cards["NAXIS"])
        nbytes = 0
        if naxis:
            n = 1
            for i in range(1, naxis + 1):
                n *= int(cards[f"NAXIS{i}"])
            gcount = int(cards.get("GCOUNT", 1))
            nbytes = abs(int(cards["BITPIX"])) // 8 * gcount * (int(cards.get("PCOUNT", 0)) + n)
        name = str(cards.get("EXTNAME", "PRIMARY" if not hdus else "")).strip().upper()
        hdu = _RawHdu(name, cards, pos, data_start, nbytes)
        hdus.append(hdu)
        pos = hdu.end
    return hdus


_WCS_COPY_LOCK = threading.Lock()


def _celestial_wcs_copy(hdr: _Cards, sl) -> WCS:
    """A new celestial WCS of the file (sliced to ``sl`` if given).

    The full-frame WCS is built once per cached header and copied (or sliced, which
    copies) for each read, under a lock: astropy may update a WCS's internal state on
    first use, and threads may read the same file.
    """
    base = hdr.derived("celestial_wcs", _fast_celestial_wcs)
    with _WCS_COPY_LOCK:
        return base.deepcopy() if sl is None else base.slice(sl)


def _fast_celestial_wcs(hdr: _Cards) -> WCS:
    """The celestial WCS from parsed keyword values; the same object as :func:`_celestial_wcs`.

    The usual keywords (CTYPE, CRPIX, CRVAL, CDELT, CUNIT, PC, LONPOLE, LATPOLE,
    RADESYS, EQUINOX) are set on a new WCS directly, which costs ~40 us instead
    of ~1 ms for astropy's header parser; anything else (CD matrices, ...) goes
    through the header parser with the same cards.
    """
    keys = hdr.derived("cel_keys", lambda h: [k for k in h if _CEL_KEY.match(k)])
    sip = dict(hdr.derived("sip", lambda h: {k: h[k] for k in h if _SIP_KEY.match(k)}))
    if not all(_PLAIN_CEL.match(k) for k in keys) or int(hdr.get("WCSAXES", 2)) != 2:
        w = WCS(fits.Header.fromstring(hdr.text(_CEL_KEY)))
        return _attach_sip(w, sip)
    w = WCS(naxis=2)
    c = w.wcs
    c.dateref = ""  # WCS(naxis=...) sets the MJD epoch; the header parser leaves it undefined
    if "CTYPE1" in hdr or "CTYPE2" in hdr:
        c.ctype = [str(hdr.get("CTYPE1", "")), str(hdr.get("CTYPE2", ""))]
    if "CUNIT1" in hdr or "CUNIT2" in hdr:
        c.cunit = [str(hdr.get("CUNIT1", "")), str(hdr.get("CUNIT2", ""))]
    c.crpix = [float(hdr.get("CRPIX1", 0.0)), float(hdr.get("CRPIX2", 0.0))]
    c.crval = [float(hdr.get("CRVAL1", 0.0)), float(hdr.get("CRVAL2", 0.0))]
    c.cdelt = [float(hdr.get("CDELT1", 1.0)), float(hdr.get("CDELT2", 1.0))]
    if any(k.startswith("PC") for k in keys):
        c.pc = [
            [float(hdr.get("PC1_1", 1.0)), float(hdr.get("PC1_2", 0.0))],
            [float(hdr.get("PC2_1", 0.0)), float(hdr.get("PC2_2", 1.0))],
        ]
    if "LONPOLE" in hdr:
        c.lonpole = float(hdr["LONPOLE"])
    if "LATPOLE" in hdr:
        c.latpole = float(hdr["LATPOLE"])
    if "RADESYS" in hdr:
        c.radesys = str(hdr["RADESYS"])
    if "EQUINOX" in hdr:
        c.equinox = float(hdr["EQUINOX"])
    c.set()
    return _attach_sip(w, sip)


_MIN_PRIMARY = "".join(
    f"{k:<8}= {v:>20}".ljust(80) for k, v in (("SIMPLE", "T"), ("BITPIX", "8"), ("NAXIS", "0"))
) + "END".ljust(_BLOCK - 240)


@dataclass(frozen=True)
class _LazySpectralWcs:
    """What astropy needs to build the ``W`` WCS later: its cards and the table HDU's bytes."""

    path: str
    cards: str
    table_hdu: bytes
    box: tuple | None  # slices, or None for the whole frame

    def build(self) -> WCS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", fits.verify.VerifyWarning)
                hdul = fits.HDUList.fromstring(_MIN_PRIMARY.encode("ascii") + self.table_hdu)
            w = WCS(fits.Header.fromstring(self.cards), fobj=hdul, key="W")
        except (ValueError, KeyError, MemoryError) as err:
            raise SpherexFileError(self.path, f"invalid WCS in IMAGE header ({err}).") from err
        w.sip = None  # belt and braces: astropy#13105
        if self.box is not None:
            w = w.slice(self.box)
            w.sip = None
        return w


def _table_row(fh, hdu: _RawHdu, cols: dict[str, str]) -> dict[str, np.ndarray]:
    """The first row's ``cols`` of a fixed-width binary table, as astropy would return them."""
    c = hdu.cards
    if str(c.get("XTENSION", "")).strip() != "BINTABLE" or int(c.get("PCOUNT", 0)) != 0:
        raise _Fallback(f"HDU {hdu.name} is not a plain binary table")
    if int(c["NAXIS"]) != 2 or int(c["NAXIS2"]) < 1:
        raise _Fallback(f"HDU {hdu.name} has no rows")
    width = int(c["NAXIS1"])
    fh.seek(hdu.data_start)
    row = fh.read(width)
    if len(row) < width:
        raise _Fallback(f"HDU {hdu.name} is truncated")
    wanted = {v.upper(): k for k, v in cols.items()}
    out: dict[str, np.ndarray] = {}
    offset = 0
    for n in range(1, int(c["TFIELDS"]) + 1):
        m = _TFORM.match(str(c[f"TFORM{n}"]))
        if m is None or m.group(2) in "PQ":
            raise _Fallback(f"HDU {hdu.name} column {n} has an unsupported TFORM")
        repeat = int(m.group(1) or 1)
        code = m.group(2)
        nbytes = -(-repeat // 8) if code == "X" else repeat * _TFORM_BYTES[code]
        name = str(c.get(f"TTYPE{n}", "")).strip().upper()
        if name in wanted:
            if name.lower() in (k.lower() for k in out) or code not in _TFORM_DTYPE:
                raise _Fallback(f"HDU {hdu.name} column {name} is repeated or not numeric")
            if f"TSCAL{n}" in c or f"TZERO{n}" in c:
                raise _Fallback(f"HDU {hdu.name} column {name} is scaled")
            arr = np.frombuffer(row, dtype=_TFORM_DTYPE[code], count=repeat, offset=offset)
            if f"TDIM{n}" in c:
                dims = [int(d) for d in str(c[f"TDIM{n}"]).strip().strip("()").split(",")]
                arr = arr.reshape(dims[::-1])
            out[wanted[name]] = arr
        offset += nbytes
    if offset != width or set(out) != set(cols):
        raise _Fallback(f"HDU {hdu.name} does not hold the columns {sorted(cols.values())}")
    return out


def _read_fast(path: str, bbox):
    """Read a plain (uncompressed-file) Level-2 image without astropy's header parser.

    Returns the same tuple as :func:`_read_astropy`, the spectral WCS as a
    :class:`_LazySpectralWcs`. Raises :class:`_Fallback` (or any error) when
    astropy should read the file instead.
    """
    if path.endswith(".gz"):
        raise _Fallback("gzip-compressed file")
    with open(path, "rb") as fh:
        return _read_fast_open(fh, path, bbox)


def _read_fast_open(fh, path: str, bbox):
    hdus = _scan(fh)
    size = os.fstat(fh.fileno()).st_size
    by_name: dict[str, _RawHdu] = {}
    for hdu in hdus:
        if hdu.name in by_name:
            raise _Fallback(f"two HDUs named {hdu.name}")
        by_name[hdu.name] = hdu
    img = by_name.get("IMAGE")
    if img is None or any(n not in by_name for n in (*_REQUIRED_HDUS, "WCS-WAVE")):
        raise _Fallback("a required HDU is missing")
    hdr = img.cards
    shape = (int(hdr["NAXIS2"]), int(hdr["NAXIS1"]))
    flags_compressed = False
    for name, dtype in _IMAGE_DTYPES.items():
        hdu = by_name[name]
        c = hdu.cards
        xt = str(c.get("XTENSION", "")).strip()
        if name == "FLAGS" and xt == "BINTABLE" and c.get("ZIMAGE") is True:
            flags_compressed = True
            dims = (int(c["ZNAXIS"]), int(c.get("ZNAXIS2", 0)), int(c.get("ZNAXIS1", 0)))
        elif xt == "IMAGE" and int(c["BITPIX"]) == _IMAGE_BITPIX[dtype]:
            dims = (int(c["NAXIS"]), int(c.get("NAXIS2", 0)), int(c.get("NAXIS1", 0)))
            if float(c.get("BSCALE", 1.0)) != 1.0 or float(c.get("BZERO", 0.0)) != 0.0:
                raise _Fallback(f"HDU {name} is scaled")
        else:
            raise _Fallback(f"HDU {name} is not a plain {dtype} image")
        if dims != (2, *shape):
            raise _Fallback(f"HDU {name} has another shape")
        if hdu.end > size:
            raise _Fallback(f"HDU {name} is truncated")
    _check_unit(hdr, "IMAGE", _SB, path, required=True)
    _check_unit(by_name["VARIANCE"].cards, "VARIANCE", _SB2, path, required=False)
    _check_unit(by_name["ZODI"].cards, "ZODI", _SB, path, required=False)
    box = _check_bbox(bbox, shape, path)
    ymin, ymax, xmin, xmax = box
    extname, cols = _wave_columns(hdr, path)
    tab = by_name.get(extname.upper())
    if tab is None:
        raise _Fallback(f"no HDU {extname}")
    row = _table_row(fh, tab, cols)
    fh.seek(tab.start)
    table_hdu = fh.read(tab.end - tab.start)
    table = _make_wave_table(
        np.asarray(row["x"], dtype=np.float64).ravel(),
        np.asarray(row["y"], dtype=np.float64).ravel(),
        np.asarray(row["values"], dtype=np.float64),
        hdr,
        path,
        extname,
    )
    meta = _make_meta(
        hdr,
        by_name["FLAGS"].cards,
        hdus[0].cards.get("VERSION"),
        [h.name for h in hdus],
        flags_compressed,
        path,
        shape,
    )
    whole = box == (0, shape[0], 0, shape[1])
    sl = None if whole else (slice(ymin, ymax), slice(xmin, xmax))
    wcs = _celestial_wcs_copy(hdr, sl)
    spec = _LazySpectralWcs(path, hdr.text(_W_KEY), table_hdu, sl)

    out = {
        n: np.empty((ymax - ymin, xmax - xmin), dtype=np.dtype(d).newbyteorder("="))
        for n, d in _IMAGE_DTYPES.items()
    }
    buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    tasks = []
    for name, dtype in _IMAGE_DTYPES.items():
        if name == "FLAGS" and flags_compressed:
            continue
        src = np.ndarray(shape, dtype=dtype, buffer=buf, offset=by_name[name].data_start)
        tasks.append(functools.partial(np.copyto, out[name], src[ymin:ymax, xmin:xmax]))
    if flags_compressed:
        tasks.insert(
            1,
            functools.partial(
                _read_compressed,
                path,
                hdus.index(by_name["FLAGS"]),
                box,
                out["FLAGS"],
                buf,
                by_name["FLAGS"],
            ),
        )
    _share_work(tasks, parallel=(ymax - ymin) * (xmax - xmin) >= _PARALLEL_MIN_PIXELS)
    del tasks, src
    return out["IMAGE"], out["VARIANCE"], out["FLAGS"], out["ZODI"], wcs, spec, meta, box, table


def _read_compressed(path, index, box, out, buf=None, hdu=None) -> None:
    """Decompress ``box`` of the tile-compressed image HDU number ``index`` into ``out``.

    The Level-2 layout (RICE_1, one image row per tile, int32) is decoded straight from
    the memory-mapped heap, only the rows of the box; anything else goes to astropy.
    """
    if buf is not None and hdu is not None and _read_rice_rows(buf, hdu, box, out):
        return
    with fits.open(path, memmap=True, lazy_load_hdus=True) as hdul:
        out[...] = _section(hdul[index], box, out.dtype, path)


_TFORM_HEAP = re.compile(r"^1?([PQ])B")


def _read_rice_rows(buf, hdu, box, out) -> bool:
    """Decode the rows of ``box`` of a RICE_1 tile-per-row int32 image; False if not that layout."""
    try:
        from astropy.io.fits.hdu.compressed._codecs import Rice1
    except ImportError:  # pragma: no cover - a future astropy without this module
        return False
    c = hdu.cards
    try:
        tform = _TFORM_HEAP.match(str(c.get("TFORM1", "")).strip().upper())
        params = {
            str(c[f"ZNAME{i}"]).strip().upper(): c.get(f"ZVAL{i}")
            for i in range(1, 10)
            if f"ZNAME{i}" in c
        }
        nx = int(c["ZNAXIS1"])
        if not (
            str(c.get("ZCMPTYPE", "")).strip().upper() == "RICE_1"
            and int(c.get("ZBITPIX", 0)) == 32
            and int(c.get("ZNAXIS", 0)) == 2
            and int(c.get("ZTILE1", 0)) == nx
            and int(c.get("ZTILE2", 0)) == 1
            and int(c.get("TFIELDS", 0)) == 1
            and str(c.get("TTYPE1", "")).strip().upper() == "COMPRESSED_DATA"
            and tform is not None
            and int(params.get("BYTEPIX", 4)) == 4
            and "ZBLANK" not in c
            and out.dtype == np.int32
        ):
            return False
        desc_dtype = np.dtype(">i4" if tform.group(1) == "P" else ">i8")
        nrows = int(c["NAXIS2"])
        if int(c["NAXIS1"]) != 2 * desc_dtype.itemsize or nrows != int(c["ZNAXIS2"]):
            return False
        heap = hdu.data_start + int(c.get("THEAP", int(c["NAXIS1"]) * nrows))
        ymin, ymax, xmin, xmax = box
        desc = np.ndarray((nrows, 2), dtype=desc_dtype, buffer=buf, offset=hdu.data_start)
        raw = np.frombuffer(buf, dtype=np.uint8)
        codec = Rice1(blocksize=int(params.get("BLOCKSIZE", 32)), bytepix=4, tilesize=nx)
        for j in range(ymin, ymax):
            n, off = int(desc[j, 0]), int(desc[j, 1])
            if n <= 0 or heap + off + n > hdu.end:
                return False
            row = np.asarray(codec.decode(raw[heap + off : heap + off + n]))
            if row.shape != (nx,) or row.dtype.kind != "i":
                return False
            out[j - ymin] = row[xmin:xmax]
    except (KeyError, ValueError, TypeError):
        return False
    return True


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def read_spherex(
    path,
    *,
    bbox=None,
    subtract_zodi: bool = False,
    zodi: str = "static",
    calibration=None,
) -> SpherexImage:
    """Read a SPHEREx Level-2 spectral image (QR2, QR3 or an IRSA cutout).

    Parameters
    ----------
    path : str or os.PathLike
        The file (``.fits`` or ``.fits.gz``).
    bbox : tuple of int, optional
        ``(ymin, ymax, xmin, xmax)``, 0-based half-open; only this section of
        each image HDU is read and both WCSs are shifted to it.
    subtract_zodi : bool, optional
        Subtract the zodi model from ``data``.
    zodi : {"static", "fit"}, optional
        ``"static"``: subtract ``ZODI`` as is (variance unchanged, the model
        being taken as exact). ``"fit"``: subtract ``s * ZODI`` with ``s`` from
        :func:`fit_zodi_scale` on the pixels read, and add ``(s_err * ZODI)**2``
        to the variance.
    calibration : str or os.PathLike, optional
        Spectral-WCS calibration file (``CWAVE``/``CBAND``) for :meth:`SpherexImage.wavemap`.

    Returns
    -------
    SpherexImage

    Raises
    ------
    SpherexFileError
        (a ``ValueError``) naming the file: not FITS, truncated, a missing HDU,
        no ``W`` WCS, shapes differing between HDUs, wrong units.
    ValueError
        If ``bbox`` or ``zodi`` is invalid.

    Examples
    --------
    >>> import tempfile
    >>> from drizzle3d.simulate import simulate_field
    >>> f = simulate_field(tempfile.mkdtemp(), n_exposures=1, shape=(64, 64))
    >>> im = read_spherex(f.paths[0], bbox=(10, 20, 0, 30))
    >>> im.data.shape, im.wavemap().shape
    ((10, 30), (10, 30, 2))
    """
    if zodi not in ("static", "fit"):
        raise ValueError(f"'zodi' must be 'static' or 'fit'; got {zodi!r}.")
    path = _check_file(path)
    try:
        parts = _read_fast(path, bbox)
    except (
        _Fallback,
        SpherexFileError,
        OSError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
    ) as why:
        # Anything unusual (or wrong) is left to astropy, which also words the errors.
        log.debug("%s: fast reader declined (%s); reading with astropy", path, why)
        parts = _read_astropy(path, bbox)
    data, var, flags, zmod, wcs, spec, meta, box, table = parts
    zscale = zerr = None
    if subtract_zodi:
        if zodi == "fit":
            zscale, zerr = _zodi_fit_of_box(path, box, data, var, flags, zmod, meta.flags)
        else:
            zscale, zerr = 1.0, 0.0
        data = (data - np.float32(zscale) * zmod).astype(np.float32, copy=False)
        if zerr:
            var = (var + (np.float32(zerr) * zmod) ** 2).astype(np.float32, copy=False)
        log.debug("%s: subtracted %.5f x ZODI (%s)", path, zscale, zodi)
    meta = SpherexMeta(**{**meta.__dict__, "zodi_scale": zscale, "zodi_scale_err": zerr})
    return SpherexImage(
        data=data,
        var=var,
        flags=flags,
        zodi=zmod,
        wcs=wcs,
        meta=meta,
        bbox=box,
        wave_table=table.shifted(box[2], box[0]),
        calibration=None if calibration is None else os.fspath(calibration),
        _spectral=spec,
    )


def _read_astropy(path, bbox):
    """Read with astropy: the reference path, used for anything the fast reader declines."""
    path, hdul = _open(path)
    with hdul:
        try:
            shape = _check_layout(hdul, path)
            box = _check_bbox(bbox, shape, path)
            img_hdr = hdul["IMAGE"].header
            table = _wave_table(hdul, img_hdr, path)
            meta = _meta(hdul, path, shape)
            ymin, ymax, xmin, xmax = box
            try:
                wcs = _celestial_wcs(img_hdr)
                spec = _spectral_wcs(img_hdr, hdul)
            except (ValueError, KeyError, MemoryError) as err:
                raise SpherexFileError(path, f"invalid WCS in IMAGE header ({err}).") from err
            if box != (0, shape[0], 0, shape[1]):
                sl = (slice(ymin, ymax), slice(xmin, xmax))
                wcs = wcs.slice(sl)
                spec = spec.slice(sl)
                spec.sip = None
            data = _section(hdul["IMAGE"], box, np.float32, path)
            var = _section(hdul["VARIANCE"], box, np.float32, path)
            flags = _section(hdul["FLAGS"], box, np.int32, path)
            zmod = _section(hdul["ZODI"], box, np.float32, path)
        except SpherexFileError:
            raise
        except (OSError, ValueError, TypeError, IndexError) as err:
            raise SpherexFileError(path, f"corrupt or truncated FITS file ({err}).") from err
    return data, var, flags, zmod, wcs, spec, meta, box, table


class ImageHeader(NamedTuple):
    """Header-level facts of a Level-2 file (see :func:`read_header_wcs`).

    Parameters
    ----------
    wcs : astropy.wcs.WCS
        Celestial (TAN-SIP) WCS of the ``IMAGE`` HDU.
    shape : tuple of int
        ``(ny, nx)`` of the image.
    detector : int
        ``DETECTOR`` (1..6).
    obsid : str or None
        ``OBSID`` (None when absent).

    Examples
    --------
    >>> import tempfile
    >>> from drizzle3d.simulate import simulate_field
    >>> f = simulate_field(tempfile.mkdtemp(), n_exposures=1, shape=(32, 32))
    >>> h = read_header_wcs(f.paths[0])
    >>> h.shape, h.detector, h.obsid, h.wcs.celestial.naxis
    ((32, 32), 3, '2026W10_1A_0000_1', 2)
    """

    #: Celestial (TAN-SIP) WCS of the ``IMAGE`` HDU.
    wcs: WCS
    #: ``(ny, nx)`` of the image.
    shape: tuple[int, int]
    #: ``DETECTOR`` (1..6).
    detector: int
    #: ``OBSID`` (None when absent).
    obsid: str | None


def _open_plain(path: str):
    """Open an uncompressed file for the fast readers."""
    if path.endswith(".gz"):
        raise _Fallback("gzip-compressed file")
    return open(path, "rb")  # the caller closes it


def _scan_image(fh) -> tuple[list[_RawHdu], _RawHdu]:
    """The scanned HDUs of an open file and its IMAGE HDU."""
    hdus = _scan(fh)
    img = next((h for h in hdus if h.name == "IMAGE"), None)
    if img is None:
        raise _Fallback("no IMAGE HDU")
    return hdus, img


def _header_fast(path: str) -> ImageHeader:
    with _open_plain(path) as fh:
        _, img = _scan_image(fh)
    hdr = img.cards
    obsid = hdr.get("OBSID")
    return ImageHeader(
        wcs=_celestial_wcs_copy(hdr, None),
        shape=(int(hdr["NAXIS2"]), int(hdr["NAXIS1"])),
        detector=int(hdr["DETECTOR"]),
        obsid=None if obsid is None else str(obsid).strip(),
    )


def _wave_table_fast(path: str) -> WaveTable:
    with _open_plain(path) as fh:
        hdus, img = _scan_image(fh)
        extname, cols = _wave_columns(img.cards, path)
        tab = next((h for h in hdus if h.name == extname.upper()), None)
        if tab is None:
            raise _Fallback(f"no HDU {extname}")
        row = _table_row(fh, tab, cols)
    return _make_wave_table(
        np.asarray(row["x"], dtype=np.float64).ravel(),
        np.asarray(row["y"], dtype=np.float64).ravel(),
        np.asarray(row["values"], dtype=np.float64),
        img.cards,
        path,
        extname,
    )


@functools.lru_cache(maxsize=_SCAN_CACHE_SIZE)
def _wave_table_cached(path: str, version: tuple) -> WaveTable:
    try:
        return _wave_table_fast(path)
    except (_Fallback, OSError, ValueError, TypeError, KeyError, IndexError) as why:
        log.debug("%s: fast table read declined (%s); reading with astropy", path, why)
    path, hdul = _open(path)
    try:
        if "IMAGE" not in hdul:
            raise SpherexFileError(path, "missing HDU 'IMAGE'.")
        return _wave_table(hdul, hdul["IMAGE"].header, path)
    finally:
        hdul.close()


def band_limits(path, bbox) -> tuple[float, float] | None:
    """Lowest and highest band edge (um) of the pixels of a box of a file.

    Reads only the headers and the spectral table (cached per file version), so
    a run can tell cheaply which boxes can reach which wavelengths.

    Parameters
    ----------
    path : str or os.PathLike
        A SPHEREx Level-2 file.
    bbox : tuple of int
        ``(ymin, ymax, xmin, xmax)``, 0-based half-open.

    Returns
    -------
    tuple of float or None
        ``(min(wavelength - bandwidth / 2), max(wavelength + bandwidth / 2))``
        over the box, or None if no pixel has a wavelength.

    Raises
    ------
    SpherexFileError
        If the file or its spectral table is malformed.

    Examples
    --------
    >>> import tempfile
    >>> from drizzle3d.simulate import simulate_field
    >>> f = simulate_field(tempfile.mkdtemp(), n_exposures=1, shape=(64, 64))
    >>> lo, hi = band_limits(f.paths[0], (0, 8, 0, 8))  # a corner of the frame
    >>> frame = band_limits(f.paths[0], (0, 64, 0, 64))
    >>> bool(frame[0] <= lo < hi <= frame[1])
    True
    """
    path = _check_file(path)
    return _band_limits_cached(path, _file_version(os.stat(path)), tuple(int(v) for v in bbox))


@functools.lru_cache(maxsize=4 * _SCAN_CACHE_SIZE)
def _band_limits_cached(path: str, version: tuple, bbox: tuple) -> tuple[float, float] | None:
    table = _wave_table_cached(path, version)
    ymin, ymax, xmin, xmax = bbox
    wm = table.wavemap((ymax - ymin, xmax - xmin), (ymin, xmin))
    lam = wm[..., 0]
    half = 0.5 * wm[..., 1]
    ok = np.isfinite(lam) & np.isfinite(half)
    if not ok.any():
        return None
    return float((lam - half)[ok].min()), float((lam + half)[ok].max())


# Zodi fits by (file version, box), kept only while a caller asks for it (a run over
# spectral slabs reads the same box of an image once per slab; see
# drizzle3d.pipeline._drizzle_slabs): a dict in this context variable, or None.
_ZODI_FITS: contextvars.ContextVar = contextvars.ContextVar("drizzle3d_zodi_fits", default=None)


def _zodi_fit_of_box(path, box, data, var, flags, zmod, flag_table) -> tuple[float, float]:
    cache = _ZODI_FITS.get()
    if cache is None:
        zscale, zerr, _ = fit_zodi_scale(data, var, flags, zmod, flag_table=flag_table)
        return zscale, zerr
    key = (*_file_version(os.stat(path)), tuple(int(v) for v in box))
    if key not in cache:
        zscale, zerr, _ = fit_zodi_scale(data, var, flags, zmod, flag_table=flag_table)
        cache[key] = (zscale, zerr)
    return cache[key]


def read_header_wcs(path) -> ImageHeader:
    """Read a file's celestial WCS, image shape, detector and OBSID from its header only.

    No pixel data are read: this is the cheap first look the pipeline takes at
    every input (footprint checks, routing images to output tiles).

    Parameters
    ----------
    path : str or os.PathLike
        A SPHEREx Level-2 file (or IRSA cutout).

    Returns
    -------
    ImageHeader
        ``(wcs, shape, detector, obsid)``; ``wcs`` is the same celestial WCS
        (SIP included) that :func:`read_spherex` attaches to the full image.

    Raises
    ------
    SpherexFileError
        (a ``ValueError``) naming the file if it is missing, not FITS, or its
        ``IMAGE`` header lacks the shape, ``DETECTOR`` or a valid WCS.

    Examples
    --------
    >>> import tempfile
    >>> from drizzle3d.simulate import simulate_field
    >>> f = simulate_field(tempfile.mkdtemp(), n_exposures=1, shape=(64, 64))
    >>> h = read_header_wcs(f.paths[0])
    >>> h.shape, h.detector
    ((64, 64), 3)
    """
    path = _check_file(path)
    try:
        return _header_fast(path)
    except (_Fallback, OSError, ValueError, TypeError, KeyError, IndexError) as why:
        log.debug("%s: fast header scan declined (%s); reading with astropy", path, why)
    try:
        with fits.open(path, memmap=True, lazy_load_hdus=True) as hdul:
            hdr = hdul["IMAGE"].header
            obsid = hdr.get("OBSID")
            return ImageHeader(
                wcs=_celestial_wcs(hdr),
                shape=(int(hdr["NAXIS2"]), int(hdr["NAXIS1"])),
                detector=int(hdr["DETECTOR"]),
                obsid=None if obsid is None else str(obsid).strip(),
            )
    except (OSError, KeyError, ValueError, TypeError, IndexError, MemoryError) as err:
        raise SpherexFileError(path, f"unreadable IMAGE header ({err}).") from err
