"""Output grids: a celestial pixel grid plus wavelength bin edges.

An :class:`OutputGrid` is what :class:`drizzle3d.Drizzle3D` drizzles onto: a
:class:`SpatialGrid` (a 2-D celestial WCS and its ``(ny, nx)`` shape) and a
:class:`SpectralGrid` (``nz + 1`` increasing wavelength bin edges in micron).

Every grid is immutable, compares with ``==`` and round-trips exactly through a
plain ``dict`` (:meth:`~OutputGrid.to_dict`), YAML (:meth:`~OutputGrid.to_yaml`)
and a FITS header (:meth:`~OutputGrid.to_header`).

Conventions
-----------
* Pixel coordinates are 0-based with pixel centres at integers, as in astropy's
  ``*_values`` methods and drizzle's pixmaps: output pixel ``i`` covers
  ``[i - 0.5, i + 0.5]``.
* Wavelengths are in micron; frequencies in Hz.
* ``rotation`` is the position angle of the grid's +y axis, in degrees measured
  from north through east. With ``rotation=0`` north is up (+y) and east is
  left (-x), the usual sky orientation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from drizzle3d.channels import detector_channels, detector_range

__all__ = ["OutputGrid", "SpatialGrid", "SpectralGrid"]

logger = logging.getLogger(__name__)

#: Speed of light in m/s (exact, SI).
_C_M_PER_S = 299_792_458.0
_C_UM_HZ = _C_M_PER_S * 1e6  # nu [Hz] = _C_UM_HZ / lambda [um]

#: Header keywords holding the exact spectral bin edges.
_NEDGE_KEY = "NWEDGE"
_EDGE_KEY = "WEDG{:04d}"
_MAX_EDGES = 10_000


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------


def _float_image(value: float) -> str:
    """Shortest exact decimal form of a float, in FITS-standard spelling."""
    text = repr(float(value)).upper()
    mantissa, sep, exponent = text.partition("E")
    if "." not in mantissa:
        mantissa += ".0"
    return mantissa + sep + exponent


def _exact_card(key: str, value: float, comment: str = ""):
    """A FITS card whose float value survives a text round trip bit for bit.

    astropy shortens float values to 20 characters, which loses up to one
    decimal digit; a free-format card written from ``repr`` keeps all of them.
    """
    from astropy.io import fits

    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"'{key}' must be finite; got {value!r}.")
    image = f"{key:<8}= {_float_image(value):>20}"
    if comment:
        image += f" / {comment}"
    return fits.Card.fromstring(image[:80])


def _as_angle(value, unit: str, name: str) -> float:
    """Convert a float or an astropy Quantity to a float in ``unit``."""
    to = getattr(value, "to_value", None)
    if to is not None:
        try:
            out = float(to(unit))
        except Exception as err:  # astropy UnitConversionError and friends
            raise ValueError(
                f"'{name}' must be an angle convertible to {unit}; got {value!r}."
            ) from err
    else:
        try:
            out = float(value)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"'{name}' must be a number or an angle Quantity; got {value!r}."
            ) from err
    if not math.isfinite(out):
        raise ValueError(f"'{name}' must be finite; got {value!r}.")
    return out


def _as_edges(edges) -> np.ndarray:
    try:
        arr = np.array(edges, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"'edges' must be a sequence of numbers; got {type(edges).__name__}."
        ) from err
    if arr.ndim != 1 or arr.size < 2:
        raise ValueError(
            f"'edges' must be a 1-D sequence of at least 2 wavelengths (um); got shape {arr.shape}."
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError("'edges' must be finite; got non-finite values.")
    if not np.all(np.diff(arr) > 0):
        raise ValueError("'edges' must be strictly increasing; got a non-increasing sequence.")
    if arr[0] <= 0:
        raise ValueError(f"'edges' must be positive wavelengths in um; got {arr[0]!r}.")
    arr.setflags(write=False)
    return arr


def _log_edges(lam_min: float, lam_max: float, resolving_power: float) -> np.ndarray:
    """Edges with constant ``centre / width == resolving_power`` covering [lam_min, lam_max]."""
    ratio = (2.0 * resolving_power + 1.0) / (2.0 * resolving_power - 1.0)
    n = max(1, math.ceil(math.log(lam_max / lam_min) / math.log(ratio) - 1e-9))
    return lam_min * ratio ** np.arange(n + 1, dtype=np.float64)


# ---------------------------------------------------------------------------
# SpectralGrid
# ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SpectralGrid:
    """Wavelength bin edges of a cube, in micron.

    Parameters
    ----------
    edges : array_like
        ``nz + 1`` strictly increasing, positive wavelengths (um). Stored as a
        read-only float64 copy.

    Raises
    ------
    ValueError
        If the edges are not a finite, positive, strictly increasing 1-D
        sequence of at least two values.

    Notes
    -----
    Bin ``k`` covers ``[edges[k], edges[k + 1]]``. Its centre is the arithmetic
    mean of the edges, its width their difference and its effective resolving
    power ``centre / width``. Frequencies use ``nu = c / lambda``.

    Examples
    --------
    >>> from drizzle3d.grid import SpectralGrid
    >>> g = SpectralGrid.native(3)
    >>> g.nz
    17
    >>> g2 = SpectralGrid.constant_r(0.75, 5.0, 80)
    >>> bool(g2.edges[0] <= 0.75 and g2.edges[-1] >= 5.0)
    True
    """

    edges: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "edges", _as_edges(self.edges))

    # -- builders ---------------------------------------------------------

    @classmethod
    def from_edges(cls, edges: ArrayLike) -> SpectralGrid:
        """Build a grid from explicit bin edges.

        Parameters
        ----------
        edges : array_like
            ``nz + 1`` strictly increasing, positive wavelengths (um).

        Returns
        -------
        SpectralGrid
            The grid.

        Raises
        ------
        ValueError
            If the edges are not valid (see :class:`SpectralGrid`).

        Examples
        --------
        >>> SpectralGrid.from_edges([1.0, 1.5, 2.0]).nz
        2
        """
        return cls(edges)

    @classmethod
    def native(cls, detector) -> SpectralGrid:
        """One bin per SPHEREx sub-channel of a detector (17 bins).

        Parameters
        ----------
        detector : int or str
            ``1..6`` or ``'D1'..'D6'``.

        Returns
        -------
        SpectralGrid
            17 contiguous bins spanning :func:`drizzle3d.channels.detector_range`.

        Raises
        ------
        ValueError
            If ``detector`` is not a SPHEREx detector.

        Notes
        -----
        The channel table gives each sub-channel a ``[wl_min, wl_max]`` range, and
        adjacent ranges overlap slightly (for example D1 channel 1 ends at 0.762 um
        while channel 2 starts at 0.761 um); a gap would be treated the same way.
        Bins of a cube must be contiguous and disjoint, so the boundary between
        channels ``k`` and ``k + 1`` is placed at the midpoint
        ``(wl_max[k] + wl_min[k + 1]) / 2``, which splits the overlap (or gap)
        equally. The outer edges are the first channel's ``wl_min`` and the last
        channel's ``wl_max``, so the grid spans exactly the detector's range.

        Examples
        --------
        >>> g = SpectralGrid.native("D1")
        >>> g.nz, float(g.edges[0]), float(g.edges[-1])
        (17, 0.743, 1.116)
        """
        rows = detector_channels(detector)
        inner = 0.5 * (rows["wl_max"][:-1] + rows["wl_min"][1:])
        lo, hi = detector_range(detector)
        return cls(np.concatenate([[lo], inner, [hi]]))

    @classmethod
    def oversampled(cls, detector, factor: float) -> SpectralGrid:
        """Log-spaced bins at ``factor`` times a detector's mean resolving power.

        Parameters
        ----------
        detector : int or str
            ``1..6`` or ``'D1'..'D6'``.
        factor : float
            Oversampling factor (> 0). The target resolving power is the mean
            ``r`` of the detector's 17 channels times ``factor``.

        Returns
        -------
        SpectralGrid
            Bins of constant resolving power covering the detector's range.

        Raises
        ------
        ValueError
            If ``factor`` is not positive or ``detector`` is invalid.

        Notes
        -----
        See :meth:`constant_r`: the first edge is the detector's ``wl_min`` and
        the last edge is the first one that reaches ``wl_max``, so every bin has
        exactly the target resolving power and the range is covered.

        Examples
        --------
        >>> SpectralGrid.oversampled(3, 2).nz
        33
        """
        try:
            factor = float(factor)
        except (TypeError, ValueError) as err:
            raise TypeError(f"'factor' must be a number; got {factor!r}.") from err
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"'factor' must be a positive number; got {factor!r}.")
        rows = detector_channels(detector)
        lo, hi = detector_range(detector)
        return cls.constant_r(lo, hi, float(np.mean(rows["r"])) * factor)

    @classmethod
    def constant_r(cls, lam_min: float, lam_max: float, R: float) -> SpectralGrid:
        """Log-spaced bins of constant resolving power over any range.

        Parameters
        ----------
        lam_min, lam_max : float
            Wavelength range to cover (um), ``0 < lam_min < lam_max``.
        R : float
            Resolving power ``centre / width`` of every bin (> 0.5).

        Returns
        -------
        SpectralGrid
            Edges ``lam_min * q**k`` with ``q = (2R + 1) / (2R - 1)``; the last
            edge is the first one ``>= lam_max`` (so the grid may extend past
            ``lam_max`` by less than one bin).

        Raises
        ------
        ValueError
            If the range or ``R`` is invalid.

        Examples
        --------
        >>> g = SpectralGrid.constant_r(0.75, 5.0, 80)
        >>> bool(abs(g.resolving_power.mean() - 80) < 1e-9)
        True
        """
        try:
            lam_min, lam_max, R = float(lam_min), float(lam_max), float(R)
        except (TypeError, ValueError) as err:
            raise TypeError(
                "'lam_min', 'lam_max' and 'R' must be numbers; "
                f"got {lam_min!r}, {lam_max!r}, {R!r}."
            ) from err
        if not (math.isfinite(lam_min) and math.isfinite(lam_max) and 0 < lam_min < lam_max):
            raise ValueError(
                f"'lam_min' and 'lam_max' must satisfy 0 < lam_min < lam_max (um); "
                f"got {lam_min!r}, {lam_max!r}."
            )
        if not (math.isfinite(R) and R > 0.5):
            raise ValueError(f"'R' must be a finite resolving power > 0.5; got {R!r}.")
        edges = _log_edges(lam_min, lam_max, R)
        if edges.size > _MAX_EDGES:
            raise ValueError(
                f"'R' must give at most {_MAX_EDGES - 1} bins over the range; got {edges.size - 1}."
            )
        return cls(edges)

    # -- derived quantities -------------------------------------------------

    @property
    def nz(self) -> int:
        """Number of wavelength bins.

        Examples
        --------
        >>> SpectralGrid([1.0, 2.0, 4.0]).nz
        2
        """
        return self.edges.size - 1

    @property
    def centers(self) -> np.ndarray:
        """Bin centres (um), the arithmetic mean of each bin's edges.

        Examples
        --------
        >>> SpectralGrid([1.0, 2.0, 4.0]).centers.tolist()
        [1.5, 3.0]
        """
        return 0.5 * (self.edges[:-1] + self.edges[1:])

    @property
    def widths(self) -> np.ndarray:
        """Bin widths (um).

        Examples
        --------
        >>> SpectralGrid([1.0, 2.0, 4.0]).widths.tolist()
        [1.0, 2.0]
        """
        return np.diff(self.edges)

    @property
    def frequencies(self) -> np.ndarray:
        """Frequency of each bin centre, ``c / centers`` (Hz).

        Examples
        --------
        >>> nu = SpectralGrid([1.0, 2.0, 4.0]).frequencies
        >>> (nu / 1e12).round(3).tolist()  # THz
        [199.862, 99.931]
        """
        return _C_UM_HZ / self.centers

    @property
    def frequency_edges(self) -> np.ndarray:
        """Frequency of each edge, ``c / edges`` (Hz; decreasing).

        Examples
        --------
        >>> nu = SpectralGrid([1.0, 2.0, 4.0]).frequency_edges
        >>> (nu / 1e12).round(3).tolist()  # THz
        [299.792, 149.896, 74.948]
        """
        return _C_UM_HZ / self.edges

    @property
    def frequency_widths(self) -> np.ndarray:
        """Width of each bin in frequency, ``c / lo - c / hi`` (Hz; positive).

        Examples
        --------
        >>> dnu = SpectralGrid([1.0, 2.0, 4.0]).frequency_widths
        >>> (dnu / 1e12).round(3).tolist()  # THz
        [149.896, 74.948]
        """
        return -np.diff(self.frequency_edges)

    @property
    def resolving_power(self) -> np.ndarray:
        """Effective resolving power of each bin, ``centers / widths``.

        Examples
        --------
        >>> SpectralGrid([1.0, 2.0, 4.0]).resolving_power.tolist()
        [1.5, 1.5]
        """
        return self.centers / self.widths

    # -- round trips ------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Return a plain, YAML-safe dict ``{"edges": [...]}`` (exact floats).

        Returns
        -------
        dict
            ``{"edges": list of float}``.

        Examples
        --------
        >>> SpectralGrid([1.0, 2.0]).to_dict()
        {'edges': [1.0, 2.0]}
        """
        return {"edges": [float(e) for e in self.edges]}

    @classmethod
    def from_dict(cls, data: dict) -> SpectralGrid:
        """Rebuild a grid from :meth:`to_dict` output.

        Parameters
        ----------
        data : dict
            Mapping with an ``"edges"`` entry.

        Returns
        -------
        SpectralGrid
            The grid.

        Raises
        ------
        ValueError
            If ``data`` has no ``"edges"``.

        Examples
        --------
        >>> g = SpectralGrid.native(2)
        >>> SpectralGrid.from_dict(g.to_dict()) == g
        True
        """
        if not isinstance(data, dict) or "edges" not in data:
            raise ValueError(f"'data' must be a dict with an 'edges' entry; got {data!r:.80}.")
        return cls(data["edges"])

    def to_header(self, axis: int = 3):
        """FITS cards for a spectral WCS axis plus the exact bin edges.

        Parameters
        ----------
        axis : int, optional
            FITS axis number of the spectral axis (default 3).

        Returns
        -------
        astropy.io.fits.Header
            ``CTYPEn``/``CUNITn``/``CRPIXn``/``CRVALn``/``CDELTn`` and
            ``NWEDGE`` plus ``WEDG0000``... with every edge (um).

        Notes
        -----
        A FITS spectral axis maps pixel centres to wavelengths. The header uses
        ``WAVE`` (linear) when the bins have equal widths, ``WAVE-LOG`` when they
        have a constant ratio (any :meth:`constant_r` grid; the pixel centre is then
        the geometric mean of the edges), and otherwise a linear least-squares
        approximation of the bin centres, marked by a comment. The exact edges are
        always written, each as a full-precision float card, and
        :meth:`from_header` uses them, so the round trip is exact.

        Examples
        --------
        >>> h = SpectralGrid.constant_r(1.0, 2.0, 40).to_header()
        >>> h["CTYPE3"]
        'WAVE-LOG'
        """
        from astropy.io import fits

        e = self.edges
        n = self.nz
        hdr = fits.Header()
        widths = self.widths
        ratios = e[1:] / e[:-1]
        if n == 1 or np.ptp(widths) <= 1e-12 * widths.mean():
            ctype, crval, cdelt = "WAVE", self.centers[0], float(widths.mean())
            note = "linear wavelength axis"
        elif np.ptp(ratios) <= 1e-12 * ratios.mean():
            q = float(np.exp(np.mean(np.log(ratios))))
            crval = math.sqrt(e[0] * e[1])
            ctype, cdelt = "WAVE-LOG", crval * math.log(q)
            note = "log axis: pixel centre = geometric mean"
        else:
            p = np.arange(1, n + 1, dtype=float)
            slope, intercept = np.polyfit(p, self.centers, 1)
            ctype, crval, cdelt = "WAVE", slope + intercept, float(slope)
            note = "approximate: exact bin edges in WEDGnnnn"
        hdr[f"CTYPE{axis}"] = (ctype, note)
        hdr[f"CUNIT{axis}"] = ("um", "wavelength unit")
        hdr.append(_exact_card(f"CRPIX{axis}", 1.0, "reference pixel (first bin)"))
        hdr.append(_exact_card(f"CRVAL{axis}", crval, "[um] wavelength at CRPIX"))
        hdr.append(_exact_card(f"CDELT{axis}", cdelt, "[um] wavelength increment"))
        hdr[_NEDGE_KEY] = (e.size, "number of exact wavelength bin edges")
        for i, value in enumerate(e):
            hdr.append(_exact_card(_EDGE_KEY.format(i), value, "[um] bin edge"))
        return hdr

    @classmethod
    def from_header(cls, header, axis: int | None = None) -> SpectralGrid:
        """Rebuild a grid from a FITS header.

        Parameters
        ----------
        header : astropy.io.fits.Header
            Header written by :meth:`to_header` (exact edges), or any header with a
            spectral WCS axis (``WAVE``, ``FREQ``, ... with ``NAXISn``): the edges
            are then the world coordinates of the pixel boundaries.
        axis : int, optional
            FITS number of the spectral axis. Default: found from the WCS.

        Returns
        -------
        SpectralGrid
            The grid.

        Raises
        ------
        ValueError
            If the header holds neither exact edges nor a spectral axis with a length.

        Examples
        --------
        >>> g = SpectralGrid.native(5)
        >>> SpectralGrid.from_header(g.to_header()) == g
        True
        """
        if _NEDGE_KEY in header:
            n = int(header[_NEDGE_KEY])
            try:
                edges = [float(header[_EDGE_KEY.format(i)]) for i in range(n)]
            except KeyError as err:
                raise ValueError(
                    f"'header' must hold {n} edge cards WEDG0000..; got {err.args[0]} missing."
                ) from err
            return cls(edges)
        import astropy.units as u
        from astropy.wcs import WCS

        wcs = WCS(header)
        if axis is None:
            if not wcs.has_spectral:
                raise ValueError("'header' must contain WEDGnnnn edges or a spectral WCS axis.")
            axis = int(wcs.wcs.spec) + 1
        key = f"NAXIS{axis}"
        if key not in header:
            raise ValueError(f"'header' must give {key} for the spectral axis; got none.")
        nz = int(header[key])
        spec = wcs.sub([axis])
        world = spec.pixel_to_world_values(np.arange(nz + 1, dtype=float) - 0.5)
        unit = u.Unit(spec.wcs.cunit[0])
        world = np.asarray(world, dtype=float) * unit
        edges = world.to_value(u.um, equivalencies=u.spectral())
        return cls(np.sort(edges))

    def __eq__(self, other):
        if not isinstance(other, SpectralGrid):
            return NotImplemented
        return np.array_equal(self.edges, other.edges)

    __hash__ = None

    def __repr__(self) -> str:
        return (
            f"SpectralGrid(nz={self.nz}, {self.edges[0]:.4f}-{self.edges[-1]:.4f} um, "
            f"R={self.resolving_power.min():.1f}-{self.resolving_power.max():.1f})"
        )


# ---------------------------------------------------------------------------
# SpatialGrid
# ---------------------------------------------------------------------------

_ANGLE_KEYS = ("crpix", "crval", "cdelt")


def _wcs_params(wcs) -> dict[str, Any]:
    """Canonical, plain-python description of a distortion-free celestial WCS."""
    core = getattr(wcs, "wcs", None)
    if core is None or getattr(wcs, "pixel_n_dim", None) != 2 or not hasattr(core, "ctype"):
        raise TypeError(f"'wcs' must be a 2-D celestial astropy.wcs.WCS; got {type(wcs).__name__}.")
    if not getattr(wcs, "has_celestial", False) or core.lng != 0 or core.lat != 1:
        raise ValueError(
            f"'wcs' must be celestial with longitude first; got CTYPE {list(core.ctype)}."
        )
    distortions = [
        name for name in ("sip", "cpdis1", "cpdis2", "det2im1", "det2im2") if getattr(wcs, name)
    ]
    if distortions:
        raise ValueError(
            f"'wcs' must be free of distortions for an output grid; got {', '.join(distortions)}."
        )
    core.set()
    if core.has_cd():
        pc = np.array(core.cd, dtype=float)
        cdelt = np.ones(2)
    else:
        pc = np.array(core.get_pc(), dtype=float)
        cdelt = np.array(core.cdelt, dtype=float)
    equinox = float(core.equinox)
    return {
        "ctype": [str(c) for c in core.ctype],
        "cunit": [str(c) for c in core.cunit],
        "crpix": [float(v) for v in core.crpix],
        "crval": [float(v) for v in core.crval],
        "cdelt": [float(v) for v in cdelt],
        "pc": [[float(v) for v in row] for row in pc],
        "lonpole": float(core.lonpole),
        "latpole": float(core.latpole),
        "radesys": str(core.radesys),
        "equinox": None if not math.isfinite(equinox) else equinox,
        "pv": [[int(i), int(m), float(v)] for i, m, v in core.get_pv()],
    }


def _wcs_from_params(params: dict[str, Any], shape: tuple[int, int]):
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    c = w.wcs
    c.ctype = list(params["ctype"])
    c.cunit = list(params["cunit"])
    c.crpix = list(params["crpix"])
    c.crval = list(params["crval"])
    c.cdelt = list(params["cdelt"])
    c.pc = np.array(params["pc"], dtype=float)
    c.lonpole = params["lonpole"]
    c.latpole = params["latpole"]
    if params.get("radesys"):
        c.radesys = params["radesys"]
    if params.get("equinox") is not None:
        c.equinox = params["equinox"]
    if params.get("pv"):
        c.set_pv([tuple(p) for p in params["pv"]])
    c.set()
    w.pixel_shape = (shape[1], shape[0])
    return w


def _rotation_pc(rotation_deg: float) -> np.ndarray:
    """PC matrix for CDELT = (-s, s) whose +y axis has position angle ``rotation_deg``."""
    rho = math.radians(-rotation_deg)  # FITS CROTA2 turns +y from north towards west
    c, s = math.cos(rho), math.sin(rho)
    return np.array([[c, s], [-s, c]])


def _unit_vectors(lon_deg, lat_deg) -> np.ndarray:
    lon, lat = np.radians(lon_deg), np.radians(lat_deg)
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1)


def _edge_samples(shape: tuple[int, int], n_per_side: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Points along the outer boundary (pixel edges, 0-based) of an image."""
    ny, nx = shape
    t = np.linspace(0.0, 1.0, n_per_side, endpoint=False)
    x0, x1, y0, y1 = -0.5, nx - 0.5, -0.5, ny - 0.5
    xs = np.concatenate(
        [x0 + t * (x1 - x0), np.full_like(t, x1), x1 - t * (x1 - x0), np.full_like(t, x0)]
    )
    ys = np.concatenate(
        [np.full_like(t, y0), y0 + t * (y1 - y0), np.full_like(t, y1), y1 - t * (y1 - y0)]
    )
    return xs, ys


def _local_pixel_scale_arcsec(wcs, x: float, y: float) -> float:
    """sqrt(pixel solid angle) at (x, y), arcsec, from a finite-difference Jacobian."""
    h = 0.5
    px = np.array([x, x + h, x, x - h, x])
    py = np.array([y, y, y + h, y, y - h])
    lon, lat = (np.asarray(a, dtype=float) for a in wcs.pixel_to_world_values(px, py))
    v = _unit_vectors(lon, lat)
    dx = (v[1] - v[3]) / (2 * h)
    dy = (v[2] - v[4]) / (2 * h)
    area = np.linalg.norm(np.cross(dx, dy))
    return math.degrees(math.sqrt(area)) * 3600.0


@dataclass(frozen=True, eq=False)
class SpatialGrid:
    """A celestial pixel grid: a distortion-free 2-D WCS and its ``(ny, nx)`` shape.

    Parameters
    ----------
    wcs : astropy.wcs.WCS
        Celestial WCS of the output pixels (longitude axis first; any projection,
        no SIP or lookup-table distortions). The grid keeps its own canonical
        copy, so later changes to ``wcs`` do not affect it.
    shape : tuple of int
        ``(ny, nx)``.

    Raises
    ------
    TypeError
        If ``wcs`` is not a 2-D astropy celestial WCS.
    ValueError
        If ``shape`` is not two positive integers or the WCS has distortions.

    Examples
    --------
    >>> from drizzle3d.grid import SpatialGrid
    >>> g = SpatialGrid.from_center(150.0, 2.0, width=30, height=30)
    >>> g.shape
    (293, 293)
    >>> ra, dec = g.world_coords()
    >>> ra.shape
    (293, 293)
    """

    wcs: object
    shape: tuple

    def __post_init__(self):
        try:
            shape = tuple(int(n) for n in self.shape)
        except (TypeError, ValueError) as err:
            raise ValueError(f"'shape' must be (ny, nx) integers; got {self.shape!r}.") from err
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"'shape' must be (ny, nx) with positive sizes; got {self.shape!r}.")
        params = _wcs_params(self.wcs)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "_params", params)
        object.__setattr__(self, "wcs", _wcs_from_params(params, shape))

    # -- builders ---------------------------------------------------------

    @classmethod
    def from_center(
        cls,
        ra: float,
        dec: float,
        width,
        height,
        pixscale=6.15,
        rotation: float = 0.0,
    ) -> SpatialGrid:
        """A TAN grid centred on ``(ra, dec)``.

        Parameters
        ----------
        ra, dec : float or astropy.units.Quantity
            Centre of the grid (deg). The centre falls on the middle of the grid
            (a pixel centre for odd sizes, a pixel corner for even sizes).
        width, height : float or astropy.units.Quantity
            Extent along x and y (arcmin for floats). The pixel counts are rounded
            up so the grid covers at least this extent.
        pixscale : float or astropy.units.Quantity, optional
            Pixel size (arcsec for floats); default 6.15, SPHEREx's pixel.
        rotation : float or astropy.units.Quantity, optional
            Position angle of the +y axis, deg east of north (default 0: north up,
            east left).

        Returns
        -------
        SpatialGrid
            The grid.

        Raises
        ------
        ValueError
            If a size or the pixel scale is not positive, or ``dec`` is outside
            [-90, 90].

        Examples
        --------
        >>> import astropy.units as u
        >>> g = SpatialGrid.from_center(10.0, -30.0, 0.5 * u.deg, 12.3, pixscale=12.3 * u.arcsec)
        >>> g.shape
        (60, 147)
        """
        from astropy.wcs import WCS

        ra = _as_angle(ra, "deg", "ra")
        dec = _as_angle(dec, "deg", "dec")
        width = _as_angle(width, "arcmin", "width")
        height = _as_angle(height, "arcmin", "height")
        pixscale = _as_angle(pixscale, "arcsec", "pixscale")
        rotation = _as_angle(rotation, "deg", "rotation")
        if not -90.0 <= dec <= 90.0:
            raise ValueError(f"'dec' must be within [-90, 90] deg; got {dec!r}.")
        for name, value in (("width", width), ("height", height), ("pixscale", pixscale)):
            if value <= 0:
                raise ValueError(f"'{name}' must be positive; got {value!r}.")
        nx = max(1, math.ceil(width * 60.0 / pixscale - 1e-9))
        ny = max(1, math.ceil(height * 60.0 / pixscale - 1e-9))
        step = pixscale / 3600.0
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.cunit = ["deg", "deg"]
        w.wcs.crval = [ra % 360.0, dec]
        w.wcs.crpix = [(nx + 1) / 2.0, (ny + 1) / 2.0]
        w.wcs.cdelt = [-step, step]
        w.wcs.pc = _rotation_pc(rotation)
        w.wcs.radesys = "ICRS"
        w.wcs.set()
        return cls(w, (ny, nx))

    @classmethod
    def from_wcs(cls, wcs, shape) -> SpatialGrid:
        """Build a grid from an existing celestial WCS and ``(ny, nx)``.

        Parameters
        ----------
        wcs : astropy.wcs.WCS
            Distortion-free 2-D celestial WCS (copied).
        shape : tuple of int
            ``(ny, nx)``.

        Returns
        -------
        SpatialGrid
            The grid.

        Raises
        ------
        TypeError
            If ``wcs`` is not a 2-D astropy celestial WCS.
        ValueError
            If ``shape`` is invalid or the WCS has distortions.

        Examples
        --------
        >>> g = SpatialGrid.from_center(0.0, 0.0, 1, 1)
        >>> SpatialGrid.from_wcs(g.wcs, g.shape) == g
        True
        """
        return cls(wcs, shape)

    @classmethod
    def covering(
        cls,
        wcs_list,
        shapes,
        pixscale=None,
        rotation=None,
    ) -> SpatialGrid:
        """The smallest TAN grid covering the footprints of the given images.

        Parameters
        ----------
        wcs_list : sequence of WCS
            Celestial WCS of each image (astropy WCS with any distortion, gwcs, or
            any APE-14 object whose ``pixel_to_world_values`` gives (lon, lat) deg).
        shapes : sequence of tuple of int
            ``(ny, nx)`` of each image (one per WCS, or a single shape for all).
        pixscale : float or astropy.units.Quantity, optional
            Output pixel size (arcsec for floats). Default: the smallest input pixel
            scale, measured as sqrt(pixel solid angle) at each image's centre.
        rotation : float or astropy.units.Quantity, optional
            Position angle of the +y axis (deg east of north). Default ``None``
            chooses the rotation that minimises the number of output pixels
            (the minimum-area rectangle around the footprints' convex hull);
            pass ``0`` for a north-up grid.

        Returns
        -------
        SpatialGrid
            A TAN grid, tangent at the normalised mean of the footprint points,
            whose pixels cover every input pixel entirely.

        Raises
        ------
        ValueError
            If no image is given, shapes do not match, or the footprints span more
            than a hemisphere around their mean direction.

        Notes
        -----
        Like reproject's ``find_optimal_celestial_wcs``: each image's outline
        (64 points per side, along the outer pixel edges) is projected onto the
        tangent plane and the grid is the smallest rectangle that holds them.

        Examples
        --------
        >>> a = SpatialGrid.from_center(10.0, 0.0, 10, 10)
        >>> b = SpatialGrid.from_center(10.1, 0.1, 10, 10)
        >>> g = SpatialGrid.covering([a.wcs, b.wcs], [a.shape, b.shape], rotation=0)
        >>> g.shape
        (157, 157)
        """
        from astropy.wcs import WCS

        wcs_list = list(wcs_list)
        if not wcs_list:
            raise ValueError("'wcs_list' must hold at least one WCS; got none.")
        shapes = list(shapes)
        if len(shapes) == 2 and all(isinstance(n, int | np.integer) for n in shapes):
            shapes = [tuple(shapes)] * len(wcs_list)
        if len(shapes) != len(wcs_list):
            raise ValueError(
                f"'shapes' must give one (ny, nx) per WCS; got {len(shapes)} for "
                f"{len(wcs_list)} WCS."
            )
        lons, lats, scales = [], [], []
        for wcs, shape in zip(wcs_list, shapes, strict=True):
            ny, nx = (int(n) for n in shape)
            xs, ys = _edge_samples((ny, nx))
            lon, lat = (np.asarray(a, dtype=float) for a in wcs.pixel_to_world_values(xs, ys))
            lons.append(lon)
            lats.append(lat)
            scales.append(_local_pixel_scale_arcsec(wcs, (nx - 1) / 2.0, (ny - 1) / 2.0))
        lon = np.concatenate(lons)
        lat = np.concatenate(lats)
        good = np.isfinite(lon) & np.isfinite(lat)
        if not good.any():
            raise ValueError("'wcs_list' must map image outlines to finite sky positions.")
        vec = _unit_vectors(lon[good], lat[good])
        mean = vec.mean(axis=0)
        norm = np.linalg.norm(mean)
        if norm < 1e-6:
            raise ValueError("'wcs_list' footprints must not surround the sphere; got mean ~ 0.")
        mean /= norm
        if np.min(vec @ mean) <= 0.05:
            raise ValueError("'wcs_list' footprints must lie within a hemisphere of their centre.")
        ra0 = math.degrees(math.atan2(mean[1], mean[0])) % 360.0
        dec0 = math.degrees(math.asin(np.clip(mean[2], -1.0, 1.0)))
        ps = min(scales) if pixscale is None else _as_angle(pixscale, "arcsec", "pixscale")
        if not ps > 0:
            raise ValueError(f"'pixscale' must be positive; got {ps!r}.")
        step = ps / 3600.0

        # north-up pixel coordinates relative to the tangent point
        probe = WCS(naxis=2)
        probe.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        probe.wcs.crval = [ra0, dec0]
        probe.wcs.crpix = [1.0, 1.0]
        probe.wcs.cdelt = [-step, step]
        probe.wcs.set()
        px, py = probe.world_to_pixel_values(lon[good], lat[good])
        pts = np.stack([px, py], axis=-1)
        if not np.all(np.isfinite(pts)):
            raise ValueError("'wcs_list' footprints must be projectable on one tangent plane.")

        def rotated(rot_deg):
            # pixel = PC^-1 @ north-up-pixel; with _rotation_pc(r) = [[c, s], [-s, c]]
            rho = math.radians(-rot_deg)
            c, s = math.cos(rho), math.sin(rho)
            return np.stack([c * pts[:, 0] - s * pts[:, 1], s * pts[:, 0] + c * pts[:, 1]], -1)

        if rotation is None:
            from scipy.spatial import ConvexHull, QhullError

            try:
                hull = pts[ConvexHull(pts).vertices]
            except QhullError:
                hull = pts
            edge = np.diff(np.vstack([hull, hull[:1]]), axis=0)
            phis = np.degrees(np.arctan2(edge[:, 1], edge[:, 0]))
            candidates = np.unique(np.round(np.concatenate([phis, -phis, [0.0]]) % 90.0, 9))
            areas = []
            for cand in candidates:
                r = rotated(cand)
                areas.append(np.prod(np.ptp(r, axis=0)))
            rot = float(candidates[int(np.argmin(areas))])
            if rot > 45.0:
                rot -= 90.0
        else:
            rot = _as_angle(rotation, "deg", "rotation")
        r = rotated(rot)
        lo, hi = r.min(axis=0), r.max(axis=0)
        n = np.maximum(1, np.ceil(hi - lo - 1e-9)).astype(int)
        slack = n - (hi - lo)
        # 0-based pixel of the tangent point: lo maps to the grid's outer edge -0.5 (+ slack/2)
        crpix0 = -lo - 0.5 + slack / 2.0
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.cunit = ["deg", "deg"]
        w.wcs.crval = [ra0, dec0]
        w.wcs.crpix = list(crpix0 + 1.0)
        w.wcs.cdelt = [-step, step]
        w.wcs.pc = _rotation_pc(rot)
        w.wcs.radesys = "ICRS"
        w.wcs.set()
        logger.debug(
            "covering grid: centre (%.6f, %.6f), rotation %.3f, shape %s", ra0, dec0, rot, n
        )
        return cls(w, (int(n[1]), int(n[0])))

    # -- derived ------------------------------------------------------------

    @property
    def pixel_scale(self) -> float:
        """sqrt(solid angle) of the central pixel, in arcsec.

        Examples
        --------
        >>> round(SpatialGrid.from_center(150.0, 2.0, 1, 1, pixscale=6.15).pixel_scale, 6)
        6.15
        """
        ny, nx = self.shape
        return _local_pixel_scale_arcsec(self.wcs, (nx - 1) / 2.0, (ny - 1) / 2.0)

    def world_coords(self) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(ra, dec)`` in degrees at every pixel centre, each of shape ``(ny, nx)``.

        Returns
        -------
        ra, dec : numpy.ndarray
            float64 arrays of shape ``(ny, nx)``.

        Examples
        --------
        >>> ra, dec = SpatialGrid.from_center(0.0, 0.0, 1, 1).world_coords()
        >>> ra.shape
        (10, 10)
        """
        ny, nx = self.shape
        y, x = np.mgrid[0:ny, 0:nx]
        ra, dec = self.wcs.pixel_to_world_values(x.astype(float), y.astype(float))
        return np.asarray(ra, dtype=float), np.asarray(dec, dtype=float)

    def footprint(self) -> np.ndarray:
        """Sky positions (deg) of the grid's four outer corners, shape ``(4, 2)``.

        Returns
        -------
        numpy.ndarray
            ``[[ra, dec], ...]`` for the corners (-0.5, -0.5), (nx-0.5, -0.5),
            (nx-0.5, ny-0.5), (-0.5, ny-0.5).

        Examples
        --------
        A north-up 1 x 1 arcmin grid: the first corner is south-east of the centre
        (east is to the left, at larger RA).

        >>> corners = SpatialGrid.from_center(150.0, 2.0, 1, 1).footprint()
        >>> corners.shape
        (4, 2)
        >>> bool(corners[0, 0] > 150.0 and corners[0, 1] < 2.0)
        True
        """
        ny, nx = self.shape
        x = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5])
        y = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5])
        ra, dec = self.wcs.pixel_to_world_values(x, y)
        return np.stack([ra, dec], axis=-1)

    # -- round trips ------------------------------------------------------

    def header_string(self) -> str:
        """The WCS as a FITS header string (for metadata).

        Returns
        -------
        str
            :meth:`to_header` as an 80-character-card string.

        Examples
        --------
        >>> text = SpatialGrid.from_center(150.0, 2.0, 1, 1).header_string()
        >>> len(text) % 80, text[:30]
        (0, 'WCSAXES =                    2')
        """
        return self.to_header().tostring()

    def to_header(self):
        """FITS header of the celestial WCS with exact float values and the grid size.

        Returns
        -------
        astropy.io.fits.Header
            ``WCSAXES``, ``GRID_NX``, ``GRID_NY``, ``CTYPE``, ``CUNIT``, ``CRPIX``,
            ``CRVAL``, ``CDELT``, ``PC``, ``LONPOLE``, ``LATPOLE``, ``RADESYS``
            (``EQUINOX``, ``PVi_m`` when set). Float cards are written in full
            precision so :meth:`from_header` restores the grid exactly. No
            ``NAXISn`` cards are written, so the header can be given to any HDU
            (astropy adds ``NAXISn`` from the data).

        Examples
        --------
        >>> g = SpatialGrid.from_center(83.6, 22.0, 5, 5)
        >>> SpatialGrid.from_header(g.to_header()) == g
        True
        """
        return self._header(naxis=2)

    def _header(self, naxis: int):
        from astropy.io import fits

        p = self._params
        hdr = fits.Header()
        hdr["WCSAXES"] = (naxis, "number of WCS axes")
        hdr["GRID_NX"] = (self.shape[1], "grid size along x (NAXIS1 of the data)")
        hdr["GRID_NY"] = (self.shape[0], "grid size along y (NAXIS2 of the data)")
        for i in range(2):
            hdr[f"CTYPE{i + 1}"] = p["ctype"][i]
            hdr[f"CUNIT{i + 1}"] = p["cunit"][i]
        for key in _ANGLE_KEYS:
            for i in range(2):
                hdr.append(_exact_card(f"{key.upper()}{i + 1}", p[key][i]))
        for i in range(2):
            for j in range(2):
                hdr.append(_exact_card(f"PC{i + 1}_{j + 1}", p["pc"][i][j]))
        hdr.append(_exact_card("LONPOLE", p["lonpole"]))
        hdr.append(_exact_card("LATPOLE", p["latpole"]))
        if p["radesys"]:
            hdr["RADESYS"] = p["radesys"]
        if p["equinox"] is not None:
            hdr.append(_exact_card("EQUINOX", p["equinox"]))
        for i, m, v in p["pv"]:
            hdr.append(_exact_card(f"PV{i}_{m}", v))
        return hdr

    @classmethod
    def from_header(cls, header) -> SpatialGrid:
        """Rebuild a grid from a FITS header with a celestial WCS and its size.

        Parameters
        ----------
        header : astropy.io.fits.Header
            A header from :meth:`to_header`, :meth:`OutputGrid.to_header` or any
            image/cube whose first two axes are celestial. The size comes from
            ``NAXIS1``/``NAXIS2`` when present (a header read from a file), else from
            ``GRID_NX``/``GRID_NY``.

        Returns
        -------
        SpatialGrid
            The grid.

        Raises
        ------
        ValueError
            If the size is missing or the WCS is not celestial.

        Examples
        --------
        The size may come from the grid's own ``GRID_NX``/``GRID_NY`` cards or, for a
        header read from an image, from ``NAXIS1``/``NAXIS2``:

        >>> from astropy.io import fits
        >>> g = SpatialGrid.from_center(83.6, 22.0, 2, 1)
        >>> SpatialGrid.from_header(g.to_header()) == g
        True
        >>> hdu = fits.ImageHDU(np.zeros((4, 6), np.float32), header=g.to_header())
        >>> SpatialGrid.from_header(hdu.header).shape
        (4, 6)
        """
        from astropy.wcs import WCS

        if "NAXIS1" in header and "NAXIS2" in header:
            shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
        elif "GRID_NX" in header and "GRID_NY" in header:
            shape = (int(header["GRID_NY"]), int(header["GRID_NX"]))
        else:
            raise ValueError("'header' must contain NAXIS1/NAXIS2 or GRID_NX/GRID_NY; got neither.")
        wcs = WCS(header).celestial
        return cls(wcs, shape)

    def to_dict(self) -> dict[str, Any]:
        """Return a plain, YAML-safe dict (exact floats).

        Returns
        -------
        dict
            ``{"shape": [ny, nx], "wcs": {ctype, cunit, crpix, crval, cdelt, pc,
            lonpole, latpole, radesys, equinox, pv}}``.

        Examples
        --------
        >>> d = SpatialGrid.from_center(150.0, 2.0, 1, 1).to_dict()
        >>> d["shape"], d["wcs"]["ctype"], d["wcs"]["crval"]
        ([10, 10], ['RA---TAN', 'DEC--TAN'], [150.0, 2.0])
        """
        params = {k: (list(v) if isinstance(v, list) else v) for k, v in self._params.items()}
        params["pc"] = [list(row) for row in self._params["pc"]]
        params["pv"] = [list(t) for t in self._params["pv"]]
        return {"shape": list(self.shape), "wcs": params}

    @classmethod
    def from_dict(cls, data: dict) -> SpatialGrid:
        """Rebuild a grid from :meth:`to_dict` output.

        Parameters
        ----------
        data : dict
            Mapping with ``"shape"`` and ``"wcs"`` entries.

        Returns
        -------
        SpatialGrid
            The grid.

        Raises
        ------
        ValueError
            If an entry is missing.

        Examples
        --------
        >>> g = SpatialGrid.from_center(270.0, 66.5, 3, 2, rotation=17.0)
        >>> SpatialGrid.from_dict(g.to_dict()) == g
        True
        """
        try:
            shape = tuple(data["shape"])
            params = dict(data["wcs"])
            wcs = _wcs_from_params(params, shape)
        except (KeyError, TypeError) as err:
            raise ValueError(
                f"'data' must be a dict with 'shape' and 'wcs' entries; got {data!r:.80}."
            ) from err
        return cls(wcs, shape)

    def __eq__(self, other):
        if not isinstance(other, SpatialGrid):
            return NotImplemented
        return self.shape == other.shape and self._params == other._params

    __hash__ = None

    def __repr__(self) -> str:
        p = self._params
        return (
            f"SpatialGrid(shape={self.shape}, {p['ctype'][0]}/{p['ctype'][1]}, "
            f"crval=({p['crval'][0]:.6f}, {p['crval'][1]:.6f}), "
            f"pixscale={self.pixel_scale:.3f} arcsec)"
        )


# ---------------------------------------------------------------------------
# OutputGrid
# ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class OutputGrid:
    """The output cube grid: spatial pixels times wavelength bins.

    Parameters
    ----------
    spatial : SpatialGrid
        Celestial pixel grid.
    spectral : SpectralGrid
        Wavelength bin edges (um).

    Raises
    ------
    TypeError
        If the parts have the wrong types.

    Examples
    --------
    >>> from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid
    >>> grid = OutputGrid(SpatialGrid.from_center(150.1, 2.2, 30, 30), SpectralGrid.native(3))
    >>> grid.shape
    (17, 293, 293)
    >>> OutputGrid.from_yaml(grid.to_yaml()) == grid
    True
    """

    spatial: SpatialGrid
    spectral: SpectralGrid

    def __post_init__(self):
        if not isinstance(self.spatial, SpatialGrid):
            raise TypeError(f"'spatial' must be a SpatialGrid; got {type(self.spatial).__name__}.")
        if not isinstance(self.spectral, SpectralGrid):
            raise TypeError(
                f"'spectral' must be a SpectralGrid; got {type(self.spectral).__name__}."
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(nz, ny, nx)`` of the cube.

        Examples
        --------
        >>> OutputGrid(SpatialGrid.from_center(0.0, 0.0, 1, 2), SpectralGrid([1.0, 1.5, 2.0])).shape
        (2, 20, 10)
        """
        return (self.spectral.nz, *self.spatial.shape)

    @property
    def wave_edges(self) -> np.ndarray:
        """Wavelength bin edges (um), the same array as ``spectral.edges``.

        Examples
        --------
        >>> grid = OutputGrid(SpatialGrid.from_center(0.0, 0.0, 1, 1), SpectralGrid.native(1))
        >>> grid.wave_edges[[0, -1]].tolist()
        [0.743, 1.116]
        """
        return self.spectral.edges

    def to_dict(self) -> dict[str, Any]:
        """Return a plain, YAML-safe dict ``{"spatial": ..., "spectral": ...}``.

        Returns
        -------
        dict
            Nested dicts from :meth:`SpatialGrid.to_dict` and :meth:`SpectralGrid.to_dict`.

        Examples
        --------
        >>> grid = OutputGrid(SpatialGrid.from_center(0.0, 0.0, 1, 1), SpectralGrid([1.0, 2.0]))
        >>> d = grid.to_dict()
        >>> list(d), d["spectral"]
        (['spatial', 'spectral'], {'edges': [1.0, 2.0]})
        """
        return {"spatial": self.spatial.to_dict(), "spectral": self.spectral.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> OutputGrid:
        """Rebuild a grid from :meth:`to_dict` output.

        Parameters
        ----------
        data : dict
            Mapping with ``"spatial"`` and ``"spectral"`` entries.

        Returns
        -------
        OutputGrid
            The grid.

        Raises
        ------
        ValueError
            If an entry is missing or invalid.
        TypeError
            If the spatial WCS entry describes a WCS that is not 2-D celestial.

        Examples
        --------
        >>> grid = OutputGrid(SpatialGrid.from_center(0.0, 0.0, 1, 1), SpectralGrid.native(4))
        >>> OutputGrid.from_dict(grid.to_dict()) == grid
        True
        >>> OutputGrid.from_dict({"spatial": {}})
        Traceback (most recent call last):
        ...
        ValueError: 'data' must be a dict with 'spatial' and 'spectral' entries; got ...
        """
        if not isinstance(data, dict) or "spatial" not in data or "spectral" not in data:
            raise ValueError(
                f"'data' must be a dict with 'spatial' and 'spectral' entries; got {data!r:.80}."
            )
        return cls(SpatialGrid.from_dict(data["spatial"]), SpectralGrid.from_dict(data["spectral"]))

    def to_yaml(self, path: str | Path | None = None) -> str:
        """Serialise to YAML (exact floats); optionally write it to ``path``.

        Parameters
        ----------
        path : str or pathlib.Path, optional
            File to write (atomically: a temporary file renamed into place).

        Returns
        -------
        str
            The YAML text.

        Raises
        ------
        OSError
            If ``path`` cannot be written.

        Examples
        --------
        >>> import tempfile
        >>> from pathlib import Path
        >>> grid = OutputGrid(SpatialGrid.from_center(0.0, 0.0, 1, 1), SpectralGrid([1.0, 2.0]))
        >>> print(grid.to_yaml().splitlines()[-2:])
        ['spectral:', '  edges: [1.0, 2.0]']
        >>> path = Path(tempfile.mkdtemp()) / "grid.yaml"
        >>> text = grid.to_yaml(path)
        >>> path.read_text() == text
        True
        """
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)
        if path is not None:
            path = Path(path)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)
        return text

    @classmethod
    def from_yaml(cls, source: str | Path) -> OutputGrid:
        """Rebuild a grid from YAML text or a YAML file written by :meth:`to_yaml`.

        Parameters
        ----------
        source : str or pathlib.Path
            YAML text, or a path to a file holding it.

        Returns
        -------
        OutputGrid
            The grid.

        Raises
        ------
        ValueError
            If the YAML does not describe a grid.
        OSError
            If ``source`` is a path that cannot be read.

        Examples
        --------
        Text (anything with a line break) is parsed directly; a single-line string or a
        :class:`~pathlib.Path` is read as a file.

        >>> grid = OutputGrid(SpatialGrid.from_center(10.0, 5.0, 2, 2), SpectralGrid.native(6))
        >>> OutputGrid.from_yaml(grid.to_yaml()) == grid
        True
        """
        import yaml

        if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source):
            text = Path(source).read_text()
        else:
            text = source
        return cls.from_dict(yaml.safe_load(text))

    def to_header(self):
        """3-D FITS header: celestial axes 1-2 and a spectral axis 3.

        Returns
        -------
        astropy.io.fits.Header
            :meth:`SpatialGrid.to_header` cards with ``WCSAXES = 3`` and
            :meth:`SpectralGrid.to_header` cards (which hold the exact edges and
            their number, so ``nz`` is known without ``NAXIS3``).

        Examples
        --------
        >>> spectral = SpectralGrid([1.0, 1.5, 2.0])
        >>> h = OutputGrid(SpatialGrid.from_center(0.0, 0.0, 1, 1), spectral).to_header()
        >>> h["WCSAXES"], h["CTYPE1"], h["CTYPE3"], h["NWEDGE"], h["WEDG0001"]
        (3, 'RA---TAN', 'WAVE', 3, 1.5)
        """
        hdr = self.spatial._header(naxis=3)
        hdr["PC3_3"] = 1.0
        hdr.extend(self.spectral.to_header(axis=3))
        return hdr

    @classmethod
    def from_header(cls, header) -> OutputGrid:
        """Rebuild a grid from :meth:`to_header` output (or a cube header).

        Parameters
        ----------
        header : astropy.io.fits.Header
            3-D header with celestial axes 1-2 and a spectral axis.

        Returns
        -------
        OutputGrid
            The grid.

        Raises
        ------
        ValueError
            If the header lacks the spatial size or the spectral axis (see
            :meth:`SpatialGrid.from_header` and :meth:`SpectralGrid.from_header`).

        Examples
        --------
        >>> grid = OutputGrid(SpatialGrid.from_center(0.0, 0.0, 1, 1), SpectralGrid.native(2))
        >>> OutputGrid.from_header(grid.to_header()) == grid
        True
        """
        return cls(SpatialGrid.from_header(header), SpectralGrid.from_header(header))

    def __eq__(self, other):
        if not isinstance(other, OutputGrid):
            return NotImplemented
        return self.spatial == other.spatial and self.spectral == other.spectral

    __hash__ = None
