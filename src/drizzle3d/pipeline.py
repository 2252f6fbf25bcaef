"""Orchestration: SPHEREx files -> one drizzled cube per detector.

The run is a *map* over input files followed by a *reduce* (merge) of partial
cubes, so it scales out without change (issue 7). For each file the map step is

1. :func:`image_footprint` - read the header only and find the input-pixel box
   whose pixels land on the output grid (``None``: the file does not overlap);
2. :func:`read_image_box` - read only that box (zodi subtracted as asked);
3. :func:`image_maps` - pixmap (fast spline mode when its error estimate is
   below 0.01 output pixel, else exact) and wavemap of the box;
4. :func:`image_weights` - the per-image weight (see *Weighting*);
5. ``Drizzle3D.add_image``.

A file that cannot be read is logged (``WARNING``, file name and reason) and
skipped; the run summary (:class:`RunSummary`) lists every input as used,
skipped (with its reason) or not overlapping, and is attached to the returned
cube (``d.run_summary``) and stored in every saved cube's metadata.

Weighting
---------
SPHEREx ``VARIANCE`` includes each source's own shot noise, so plain inverse
variance weights (``weighting="ivm"``) give the exposures in which a source
happens to be faint (low variance) more weight and bias bright sources low.
The default ``weighting="background"`` gives every pixel of an exposure the
same weight ``1 / median(VARIANCE)``, the median taken over the unflagged,
non-``SOURCE`` pixels of the box drizzled: the exposure's background noise
level. The weight does not depend on a pixel's own signal, so fluxes are
unbiased, while noisier exposures still count less. ``out_var`` stays exact:
it propagates each pixel's full ``VARIANCE`` with the weights actually used.

Honest spectrum errors
----------------------
Drizzling correlates neighbouring voxels, so summing ``out_var`` over an
aperture understates the variance of the aperture sum. :func:`extract_spectrum`
computes it exactly: for each wavelength bin ``k`` the aperture sum is
``S_k = sum_p c_p F_p`` over input pixels ``p`` with
``c = Drizzle3D.transpose(aperture_k / out_wht)``, hence
``Var(S_k) = sum_p c_p**2 var_p`` (covariances included). It re-reads only the
input pixels that reach the aperture, using the boxes and weights recorded in
the cube's ``inputs`` metadata. Without access to the inputs it falls back to
the naive sum, says so in ``attrs["error_method"]`` and logs a warning.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import logging
import math
import os
import queue
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # xarray is imported where outputs are built (a light import path)
    import xarray as xr

from drizzle3d import spherex
from drizzle3d._kernels import N_FIELDS
from drizzle3d.channels import detector_range
from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid
from drizzle3d.pixmap import BBox, calc_pixmap, footprint_bbox
from drizzle3d.resample import Drizzle3D, _accumulator_shape_of
from drizzle3d.spherex import (
    DEFAULT_EXCLUDE_FLAGS,
    SpherexFileError,
    band_limits,
    flag_bits,
    read_header_wcs,
    read_spherex,
)

__all__ = [
    "DUPLICATES",
    "EXECUTORS",
    "PIPELINE_WEIGHTINGS",
    "SLAB_STATE_BYTES",
    "ZODI_MODES",
    "ImageFootprint",
    "PreparedImage",
    "RunSummary",
    "drizzle",
    "drizzle_files",
    "drizzle_tiled",
    "extract_spectrum",
    "file_hash",
    "image_footprint",
    "image_maps",
    "image_weights",
    "local_cluster",
    "prepare_image",
    "read_image_box",
]

logger = logging.getLogger(__name__)

#: Weightings accepted by the pipeline ("background" is the default; see module notes).
PIPELINE_WEIGHTINGS = ("background", "ivm", "exptime", "uniform")
#: Zodi handling: none, subtract the ZODI model as is, or fit its amplitude per image.
ZODI_MODES = ("none", "static", "fit")
#: Largest pixmap error (output pixels) accepted from the fast spline mode.
FAST_PIXMAP_TOL = 0.01
_FAST_STEP = 16
_ARCSEC2_TO_SR = (math.pi / 180.0 / 3600.0) ** 2
_SOURCE_BIT_NAME = "SOURCE"


def _noop_progress(iterable, **_kwargs):
    return iterable


# ---------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------


@dataclass
class RunSummary:
    """What happened to every input of a run.

    Every parameter is kept as an attribute of the same name.

    Parameters
    ----------
    used : list of dict
        One entry per drizzled file: ``path``, ``obsid``, ``detector``, ``bbox``
        (inclusive ``[xmin, xmax, ymin, ymax]`` of the pixels read), ``wht_scale``,
        ``zodi_scale``, ``ctx_id``, ``nmiss``.
    skipped : list of dict
        ``{"path", "reason"}`` for each file that could not be used.
    not_overlapping : list of str
        Files whose footprint (or wavelength range) misses the grid.
    already_included : list of str
        Files left out because the cube already held them (incremental runs).

    Examples
    --------
    >>> rs = RunSummary(used=[{"path": "a.fits"}],
    ...                 skipped=[{"path": "b.fits", "reason": "corrupt file (bad header)"}],
    ...                 not_overlapping=["c.fits"])
    >>> print(rs.text())
    1 image(s) used, 1 skipped, 1 not overlapping
      skipped b.fits: corrupt file (bad header)
      not overlapping: c.fits
    """

    used: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    not_overlapping: list = field(default_factory=list)
    already_included: list = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Return the number of inputs used, skipped and not overlapping.

        Returns
        -------
        dict
            ``{"used", "skipped", "not_overlapping", "already_included"}`` -> int.

        Examples
        --------
        >>> RunSummary(used=[{"path": "a.fits"}], not_overlapping=["c.fits"]).counts()
        {'used': 1, 'skipped': 0, 'not_overlapping': 1, 'already_included': 0}
        """
        return {
            "used": len(self.used),
            "skipped": len(self.skipped),
            "not_overlapping": len(self.not_overlapping),
            "already_included": len(self.already_included),
        }

    def reasons(self) -> dict[str, int]:
        """Return skipped-file counts per reason (first clause of the message).

        Returns
        -------
        dict
            Reason (the message up to its first ``" ("`` or ``":"``) -> count.

        Examples
        --------
        >>> rs = RunSummary(skipped=[{"path": "a", "reason": "corrupt file (x)"},
        ...                          {"path": "b", "reason": "corrupt file (y)"}])
        >>> rs.reasons()
        {'corrupt file': 2}
        """
        out: dict[str, int] = {}
        for item in self.skipped:
            key = str(item["reason"]).split(" (")[0].split(":")[0]
            out[key] = out.get(key, 0) + 1
        return out

    def merge(self, other: RunSummary) -> RunSummary:
        """Append another partial run's records (for map/reduce runs).

        Parameters
        ----------
        other : RunSummary
            The records to append (left unchanged).

        Returns
        -------
        RunSummary
            ``self``, extended.

        Examples
        --------
        >>> a = RunSummary(used=[{"path": "a.fits"}])
        >>> a.merge(RunSummary(used=[{"path": "b.fits"}], not_overlapping=["c.fits"])).counts()
        {'used': 2, 'skipped': 0, 'not_overlapping': 1, 'already_included': 0}
        """
        self.used.extend(other.used)
        self.skipped.extend(other.skipped)
        self.not_overlapping.extend(other.not_overlapping)
        self.already_included.extend(other.already_included)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict (``counts``, ``reasons``, and the record lists).

        Returns
        -------
        dict
            ``counts``, ``reasons``, ``used``, ``skipped``, ``not_overlapping``,
            ``already_included``.

        Examples
        --------
        >>> import json
        >>> rs = RunSummary(used=[{"path": "a.fits"}],
        ...                 skipped=[{"path": "b.fits", "reason": "corrupt file (bad header)"}],
        ...                 not_overlapping=["c.fits"])
        >>> d = json.loads(json.dumps(rs.to_dict()))
        >>> d["counts"]["skipped"], d["reasons"]
        (1, {'corrupt file': 1})
        """
        return {
            "counts": self.counts(),
            "reasons": self.reasons(),
            "used": [dict(u) for u in self.used],
            "skipped": [dict(s) for s in self.skipped],
            "not_overlapping": list(self.not_overlapping),
            "already_included": list(self.already_included),
        }

    @classmethod
    def from_dict(cls, data: dict) -> RunSummary:
        """Rebuild from :meth:`to_dict` output.

        Parameters
        ----------
        data : dict
            As returned by :meth:`to_dict` (``counts`` and ``reasons`` are
            ignored: they are derived); missing lists are empty.

        Returns
        -------
        RunSummary
            The records.

        Examples
        --------
        >>> rs = RunSummary(used=[{"path": "a.fits"}],
        ...                 skipped=[{"path": "b.fits", "reason": "corrupt file (bad header)"}],
        ...                 not_overlapping=["c.fits"])
        >>> RunSummary.from_dict(rs.to_dict()) == rs
        True
        """
        return cls(
            used=list(data.get("used", [])),
            skipped=list(data.get("skipped", [])),
            not_overlapping=list(data.get("not_overlapping", [])),
            already_included=list(data.get("already_included", [])),
        )

    def text(self) -> str:
        """Return a one-paragraph human summary.

        Returns
        -------
        str
            A counts line, then one line per skipped or non-overlapping file.

        Examples
        --------
        >>> print(RunSummary(used=[{"path": "a.fits"}]).text())
        1 image(s) used, 0 skipped, 0 not overlapping
        """
        c = self.counts()
        lines = [
            f"{c['used']} image(s) used, {c['skipped']} skipped, "
            f"{c['not_overlapping']} not overlapping"
        ]
        lines += [f"  skipped {s['path']}: {s['reason']}" for s in self.skipped]
        lines += [f"  not overlapping: {p}" for p in self.not_overlapping]
        return "\n".join(lines)


@dataclass(frozen=True)
class ImageFootprint:
    """Header-level facts of one input file and the box of it that reaches the grid.

    Returned by :func:`image_footprint`; every parameter is kept as an attribute.

    Parameters
    ----------
    path : str
        The file.
    detector : int
        ``DETECTOR`` (1..6).
    shape : tuple of int
        ``(ny, nx)`` of the file's image.
    bbox : drizzle3d.pixmap.BBox or None
        Inclusive input-pixel box that lands on the grid (None: none does).
    wcs : astropy.wcs.WCS, optional
        The celestial WCS read from the header.

    Examples
    --------
    >>> from drizzle3d.pixmap import BBox
    >>> fp = ImageFootprint("a.fits", 3, (32, 32), BBox(0, 9, 0, 4))
    >>> fp.bbox.shape, fp.wcs is None
    ((5, 10), True)
    """

    path: str
    detector: int
    shape: tuple
    bbox: BBox | None
    wcs: Any = field(repr=False, default=None)


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """Everything ``add_image`` needs for one file's box.

    Made by :func:`prepare_image`; every parameter is kept as an attribute.

    Parameters
    ----------
    path : str
        The file.
    obsid : str or None
        Its ``OBSID``.
    detector : int
        ``DETECTOR`` (1..6).
    bbox : drizzle3d.pixmap.BBox
        Inclusive input-pixel box read.
    data, var : numpy.ndarray
        Surface brightness (MJy/sr, zodi handled) and variance of the box.
    flags : numpy.ndarray
        Flag bitmask of the box.
    pixmap, wavemap : numpy.ndarray
        ``(ny, nx, 2)`` output-pixel positions and (wavelength, bandwidth) in um.
    wht_scale : float, optional
        Per-image weight scale (see :func:`image_weights`).
    exptime : float, optional
        Exposure time (s).
    zodi_scale : float or None, optional
        Zodi amplitude subtracted (None: not subtracted).

    Examples
    --------
    >>> import tempfile
    >>> from drizzle3d.simulate import simulate_field
    >>> from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid
    >>> f = simulate_field(tempfile.mkdtemp(), n_exposures=1, shape=(32, 32))
    >>> grid = OutputGrid(SpatialGrid.from_center(150.0, 2.0, 1.0, 1.0), SpectralGrid.native(3))
    >>> p = prepare_image(f.paths[0], grid)
    >>> p.data.shape == p.pixmap.shape[:2] == p.wavemap.shape[:2] == p.bbox.shape
    True
    """

    path: str
    obsid: str | None
    detector: int
    bbox: BBox
    data: np.ndarray = field(repr=False)
    var: np.ndarray = field(repr=False)
    flags: np.ndarray = field(repr=False)
    pixmap: np.ndarray = field(repr=False)
    wavemap: np.ndarray = field(repr=False)
    wht_scale: float = 1.0
    exptime: float = 1.0
    zodi_scale: float | None = None

    def add_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``add_image`` / ``transpose`` besides the arrays.

        Returns
        -------
        dict
            ``{"wht_scale": float, "exptime": float}``.

        Examples
        --------
        >>> import numpy as np
        >>> from drizzle3d.pixmap import BBox
        >>> a = np.zeros((2, 2))
        >>> p = PreparedImage("a.fits", None, 3, BBox(0, 1, 0, 1), a, a, a, a, a,
        ...                   wht_scale=2.0, exptime=100.0)
        >>> p.add_kwargs()
        {'wht_scale': 2.0, 'exptime': 100.0}
        """
        return {"wht_scale": self.wht_scale, "exptime": self.exptime}


# ---------------------------------------------------------------------------
# step functions
# ---------------------------------------------------------------------------


def _header_wcs(path: str):
    """Detector, shape and celestial WCS of a Level-2 file, from its IMAGE header only."""
    h = read_header_wcs(path)
    return h.detector, h.shape, h.wcs


def image_footprint(path: str | os.PathLike, grid: OutputGrid, *, margin: float = 2.0):
    """Read a file's header and find the input box that lands on ``grid``.

    Parameters
    ----------
    path : str or os.PathLike
        SPHEREx Level-2 file.
    grid : OutputGrid
        Output grid.
    margin : float, optional
        Extra border in output pixels (see :func:`drizzle3d.pixmap.footprint_bbox`).

    Returns
    -------
    ImageFootprint
        ``bbox`` is None when no pixel lands on the grid or the detector's
        wavelength range misses the grid's.

    Raises
    ------
    drizzle3d.spherex.SpherexFileError
        If the header cannot be read.

    Examples
    --------
    >>> import tempfile
    >>> from drizzle3d.simulate import simulate_field
    >>> from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid
    >>> f = simulate_field(tempfile.mkdtemp(), n_exposures=1, shape=(32, 32))
    >>> grid = OutputGrid(SpatialGrid.from_center(150.0, 2.0, 1.0, 1.0), SpectralGrid.native(3))
    >>> image_footprint(f.paths[0], grid).bbox
    BBox(xmin=6, xmax=22, ymin=11, ymax=27)
    >>> blue = OutputGrid(grid.spatial, SpectralGrid.native(1))  # D1's range misses D3's
    >>> print(image_footprint(f.paths[0], blue).bbox)
    None
    """
    path = os.fspath(path)
    det, shape, wcs = _header_wcs(path)
    lo, hi = detector_range(det)
    edges = grid.wave_edges
    if hi <= edges[0] or lo >= edges[-1]:
        return ImageFootprint(path, det, shape, None, wcs)
    box = footprint_bbox(wcs, shape, grid.spatial.wcs, grid.spatial.shape, margin=margin)
    if box is not None and min(box.shape) < 2:
        # a square drop needs 2x2 pixels to place its corners: grow a 1-wide box
        ny, nx = shape
        box = BBox(
            max(0, box.xmin - 1), min(nx - 1, box.xmax + 1),
            max(0, box.ymin - 1), min(ny - 1, box.ymax + 1),
        )  # fmt: skip
    # the LVF: a box sees only part of the detector's range; a box whose bands all miss
    # the grid's wavelengths (e.g. one spectral slab of it) lands nowhere
    if box is not None and not _band_reaches(_box_band_limits(path, box), edges):
        box = None
    return ImageFootprint(path, det, shape, box, wcs)


def _box_band_limits(path: str, box: BBox) -> tuple[float, float] | None:
    """:func:`~drizzle3d.spherex.band_limits` of an (inclusive) input-pixel box."""
    return band_limits(path, (box.ymin, box.ymax + 1, box.xmin, box.xmax + 1))


def _band_reaches(lim: tuple[float, float] | None, edges) -> bool:
    """Whether bands spanning ``lim`` (:func:`~drizzle3d.spherex.band_limits`) overlap
    the bins ``edges``."""
    return lim is not None and lim[1] > edges[0] and lim[0] < edges[-1]


def read_image_box(path: str | os.PathLike, bbox: BBox, *, zodi: str = "fit"):
    """Read the ``bbox`` of a SPHEREx file, zodi subtracted as asked.

    Parameters
    ----------
    path : str or os.PathLike
        SPHEREx Level-2 file.
    bbox : BBox
        Inclusive input-pixel box (from :func:`image_footprint`).
    zodi : {"none", "static", "fit"}, optional
        Zodi handling (see :func:`drizzle3d.spherex.read_spherex`).

    Returns
    -------
    drizzle3d.spherex.SpherexImage
        The box.

    Raises
    ------
    drizzle3d.spherex.SpherexFileError
        If the file cannot be read.
    ValueError
        If ``zodi`` is not one of :data:`ZODI_MODES`.

    Examples
    --------
    >>> import tempfile
    >>> from drizzle3d.pixmap import BBox
    >>> from drizzle3d.simulate import simulate_field
    >>> f = simulate_field(tempfile.mkdtemp(), n_exposures=1, shape=(32, 32))
    >>> im = read_image_box(f.paths[0], BBox(xmin=6, xmax=22, ymin=11, ymax=27), zodi="static")
    >>> im.shape, im.bbox, im.meta.zodi_scale
    ((17, 17), (11, 28, 6, 23), 1.0)
    """
    if zodi not in ZODI_MODES:
        raise ValueError(f"'zodi' must be one of {ZODI_MODES}; got {zodi!r}.")
    half_open = (bbox.ymin, bbox.ymax + 1, bbox.xmin, bbox.xmax + 1)
    return read_spherex(
        path,
        bbox=half_open,
        subtract_zodi=zodi != "none",
        zodi="fit" if zodi == "fit" else "static",
    )


def image_maps(image, grid: OutputGrid, *, fast: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Pixmap and wavemap of an image (box) onto ``grid``.

    Parameters
    ----------
    image : drizzle3d.spherex.SpherexImage
        A box read by :func:`read_image_box` (its WCS is the box's).
    grid : OutputGrid
        Output grid.
    fast : bool, optional
        Try the bicubic spline pixmap (every 16th pixel) and keep it when its
        error estimate is below :data:`FAST_PIXMAP_TOL` output pixels.

    Returns
    -------
    pixmap, wavemap : numpy.ndarray
        ``(ny, nx, 2)`` float64 each.

    Examples
    --------
    >>> import tempfile
    >>> from drizzle3d.simulate import simulate_field
    >>> from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid
    >>> f = simulate_field(tempfile.mkdtemp(), n_exposures=1, shape=(32, 32))
    >>> grid = OutputGrid(SpatialGrid.from_center(150.0, 2.0, 1.0, 1.0), SpectralGrid.native(3))
    >>> im = read_image_box(f.paths[0], image_footprint(f.paths[0], grid).bbox)
    >>> pixmap, wavemap = image_maps(im, grid)
    >>> pixmap.shape, wavemap.shape, bool((wavemap[..., 0] > 0).all())
    ((17, 17, 2), (17, 17, 2), True)
    """
    shape = image.shape
    pixmap = None
    if fast and min(shape) >= 4 * _FAST_STEP:
        pm, err = calc_pixmap(
            image.wcs, grid.spatial.wcs, shape, stepsize=_FAST_STEP, return_error=True
        )
        if err < FAST_PIXMAP_TOL:
            pixmap = pm
        else:
            logger.debug("fast pixmap error %.3g px too large; mapping exactly", err)
    if pixmap is None:
        pixmap = calc_pixmap(image.wcs, grid.spatial.wcs, shape)
    return pixmap, image.wavemap()


def image_weights(image, weighting: str, exclude_mask: int) -> float:
    """Per-image weight scale for ``add_image(..., wht_scale=...)``.

    Parameters
    ----------
    image : drizzle3d.spherex.SpherexImage
        The box.
    weighting : {"background", "ivm", "exptime", "uniform"}
        Pipeline weighting. Only ``"background"`` gives a scale other than 1:
        ``1 / median(var)`` over finite, positive-variance pixels without the
        ``exclude_mask`` flags or SOURCE.
    exclude_mask : int
        Bitmask of excluded flags.

    Returns
    -------
    float
        The scale (1.0 for the other weightings).

    Examples
    --------
    >>> import tempfile
    >>> from drizzle3d.simulate import simulate_field
    >>> from drizzle3d.spherex import read_spherex
    >>> f = simulate_field(tempfile.mkdtemp(), n_exposures=1, shape=(32, 32))
    >>> im = read_spherex(f.paths[0])
    >>> image_weights(im, "ivm", 0)
    1.0
    >>> w = image_weights(im, "background", 0)  # 1 / median background variance
    >>> bool(0.5 < w * float(np.median(im.var)) < 2.0)
    True
    """
    if weighting != "background":
        return 1.0
    flags = image.flags.astype(np.int64) & 0xFFFFFFFF
    try:
        src = flag_bits(_SOURCE_BIT_NAME, image.meta.flags or None)
    except ValueError:
        src = 0
    v = image.var
    good = np.isfinite(v) & (v > 0) & np.isfinite(image.data) & ((flags & exclude_mask) == 0)
    bg = good & ((flags & src) == 0)
    sel = v[bg] if bg.sum() >= max(10, good.sum() // 20) else v[good]
    if sel.size == 0:
        return 0.0
    return float(1.0 / np.median(sel))


def prepare_image(
    path: str | os.PathLike,
    grid: OutputGrid,
    *,
    weighting: str = "background",
    exclude_mask: int = 0,
    zodi: str = "fit",
    fast_pixmap: bool = True,
    bbox: BBox | None = None,
    footprint: ImageFootprint | None = None,
) -> PreparedImage | None:
    """Run steps 1-4 for one file; None when it does not overlap the grid.

    Parameters
    ----------
    path : str or os.PathLike
        SPHEREx Level-2 file.
    grid : OutputGrid
        Output grid.
    weighting, exclude_mask, zodi, fast_pixmap
        See :func:`drizzle_files`.
    bbox : BBox, optional
        Read this box instead of the footprint box.
    footprint : ImageFootprint, optional
        Result of :func:`image_footprint` if already known.

    Returns
    -------
    PreparedImage or None
        The prepared box, or None when no pixel of the file reaches the grid.

    Raises
    ------
    drizzle3d.spherex.SpherexFileError
        If the file cannot be read.

    Examples
    --------
    >>> import tempfile
    >>> from drizzle3d.simulate import simulate_field
    >>> from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid
    >>> f = simulate_field(tempfile.mkdtemp(), n_exposures=1, shape=(32, 32))
    >>> grid = OutputGrid(SpatialGrid.from_center(150.0, 2.0, 1.0, 1.0), SpectralGrid.native(3))
    >>> p = prepare_image(f.paths[0], grid, weighting="uniform")
    >>> p.detector, p.bbox, p.wht_scale
    (3, BBox(xmin=6, xmax=22, ymin=11, ymax=27), 1.0)
    >>> print(prepare_image(f.paths[0], OutputGrid(grid.spatial, SpectralGrid.native(1))))
    None
    """
    path = os.fspath(path)
    if bbox is None:
        fp = footprint if footprint is not None else image_footprint(path, grid)
        if fp.bbox is None:
            return None
        bbox = fp.bbox
    im = read_image_box(path, bbox, zodi=zodi)
    pixmap, wavemap = image_maps(im, grid, fast=fast_pixmap)
    exptime = im.meta.exptime if im.meta.exptime and im.meta.exptime > 0 else 1.0
    return PreparedImage(
        path=path,
        obsid=im.meta.obsid,
        detector=im.meta.detector,
        bbox=BBox(*bbox),
        data=im.data,
        var=im.var,
        flags=im.flags,
        pixmap=pixmap,
        wavemap=wavemap,
        wht_scale=image_weights(im, weighting, exclude_mask),
        exptime=float(exptime),
        zodi_scale=im.meta.zodi_scale,
    )


# ---------------------------------------------------------------------------
# map / reduce
# ---------------------------------------------------------------------------


def _core_weighting(weighting: str) -> str:
    return "uniform" if weighting == "background" else weighting


def _exclude_mask(exclude_flags) -> int:
    if exclude_flags is None:
        return flag_bits(DEFAULT_EXCLUDE_FLAGS)
    if isinstance(exclude_flags, int | np.integer) and not isinstance(exclude_flags, bool):
        return int(exclude_flags)
    if isinstance(exclude_flags, str):
        exclude_flags = [exclude_flags]
    names = list(exclude_flags)
    if not names:
        return 0
    if all(isinstance(n, str) for n in names):
        return flag_bits(names)
    raise TypeError(f"'exclude_flags' must be flag names or an int bitmask; got {exclude_flags!r}.")


def _check_options(weighting, zodi):
    if weighting not in PIPELINE_WEIGHTINGS:
        raise ValueError(f"'weighting' must be one of {PIPELINE_WEIGHTINGS}; got {weighting!r}.")
    if zodi not in ZODI_MODES:
        raise ValueError(f"'zodi' must be one of {ZODI_MODES}; got {zodi!r}.")


def _new_cube(grid, settings: dict[str, Any], n_inputs: int) -> Drizzle3D:
    return Drizzle3D(
        grid,
        kernel=settings["kernel"],
        pixfrac=settings["pixfrac"],
        wave_pixfrac=settings["wave_pixfrac"],
        weighting=_core_weighting(settings["weighting"]),
        ivar_max=settings["ivar_max"],
        min_overlap=settings["min_overlap"],
        exclude_flags=settings["exclude_mask"],
        max_ctx_id=max(0, n_inputs - 1),
    )


def _map_one(path, ctx_id: int, grid, settings) -> tuple[PreparedImage | None, dict]:
    """Map step for one file: (prepared image or None, record)."""
    path = os.fspath(path)
    known = (settings.get("footprints") or {}).get(path)
    options = {key: settings[key] for key in ("weighting", "exclude_mask", "zodi", "fast_pixmap")}
    try:
        if known is not None:  # one spectral slab of a run: the box is the whole grid's
            bbox, lim = known
            reaches = bbox is not None and _band_reaches(lim, grid.wave_edges)
            prep = prepare_image(path, grid, bbox=BBox(*bbox), **options) if reaches else None
        else:
            prep = prepare_image(path, grid, **options)
    except SpherexFileError as err:
        reason = getattr(err, "problem", None) or str(err)
        logger.warning("skipping %s: %s", path, reason)
        return None, {"path": path, "status": "skipped", "reason": str(reason)}
    except (OSError, ValueError) as err:
        logger.warning("skipping %s: %s", path, err)
        return None, {"path": path, "status": "skipped", "reason": f"{type(err).__name__}: {err}"}
    if prep is None:
        logger.info("%s does not overlap the grid", path)
        return None, {"path": path, "status": "not_overlapping"}
    if prep.wht_scale <= 0:
        logger.warning("skipping %s: no valid pixels in the box", path)
        return None, {"path": path, "status": "skipped", "reason": "no valid pixels"}
    return prep, {"path": path, "status": "used", "ctx_id": ctx_id}


def _add_one(d: Drizzle3D, prep: PreparedImage, ctx_id: int, flags=None, slab=None) -> dict:
    if slab is not None:
        # one spectral slab of a larger grid: count each missed pixel in one slab only
        # (see _kernels.drizzle_image); pixels outside the grid go to the image's first slab
        lam_min, lam_max, own_lo = slab
        lim = _box_band_limits(prep.path, prep.bbox)
        first = own_lo == -math.inf or (lim is not None and lim[0] >= own_lo)
        d._band_range = (lam_min, lam_max, own_lo, first)
    nmiss, _ = d.add_image(
        prep.data,
        prep.var,
        prep.flags if flags is None else flags,
        prep.pixmap,
        prep.wavemap,
        ctx_id=ctx_id,
        **prep.add_kwargs(),
    )
    return {
        "path": prep.path,
        "obsid": prep.obsid,
        "detector": prep.detector,
        "bbox": [int(v) for v in prep.bbox],
        "wht_scale": prep.wht_scale,
        "exptime": prep.exptime,
        "zodi_scale": prep.zodi_scale,
        "ctx_id": ctx_id,
        "nmiss": int(nmiss),
    }


def _record(summary: RunSummary, rec: dict) -> None:
    if rec["status"] == "skipped":
        summary.skipped.append({"path": rec["path"], "reason": rec["reason"]})
    elif rec["status"] == "not_overlapping":
        summary.not_overlapping.append(rec["path"])


def _run_with_outliers(items, grid, settings, n_inputs, progress):
    """Two passes: prepare every image, find outliers (drizzle3d.blot), then drizzle."""
    try:
        from drizzle3d import blot
    except ImportError as err:  # pragma: no cover - depends on blot.py having landed
        raise ValueError(
            "'outliers.enabled' needs drizzle3d.blot (outlier rejection), which is not "
            "installed in this version; set outliers.enabled: false."
        ) from err
    progress = progress or _noop_progress
    summary = RunSummary()
    preps = []
    for ctx_id, path in progress(list(items), desc="reading", unit="img"):
        prep, rec = _map_one(path, ctx_id, grid, settings)
        if prep is None:
            _record(summary, rec)
        else:
            preps.append((ctx_id, prep))
    exposures = [
        blot.Exposure(
            p.data,
            p.var,
            p.flags,
            p.pixmap,
            p.wavemap,
            weight_map=np.full(p.data.shape, p.wht_scale),
            exptime=p.exptime,
            name=p.path,
        )
        for _, p in preps
    ]
    opts = settings["outliers"]
    kwargs = {
        "kernel": settings["kernel"],
        "pixfrac": settings["pixfrac"],
        "wave_pixfrac": settings["wave_pixfrac"],
        "weighting": _core_weighting(settings["weighting"]),
        "exclude_flags": settings["exclude_mask"],
    }
    snr = opts.get("snr", (5.0, 4.0))
    scale = opts.get("scale", (1.2, 0.7))
    new_flags = blot.find_outliers(
        exposures,
        grid,
        snr=tuple(snr) if isinstance(snr, list | tuple) else (snr, snr),
        scale=tuple(scale) if isinstance(scale, list | tuple) else (scale, scale),
        grow=int(opts.get("grow", 1)),
        progress=progress,
        **kwargs,
    )
    d = _new_cube(grid, settings, n_inputs)
    for (ctx_id, prep), flags in zip(preps, new_flags, strict=True):
        summary.used.append(_add_one(d, prep, ctx_id, flags=flags))
    return d, summary


# ---------------------------------------------------------------------------
# inputs: identity keys (incremental runs refuse images already included)
# ---------------------------------------------------------------------------

_HASH_BLOCK = 1 << 20


def file_hash(path: str | os.PathLike) -> str:
    """A quick content hash of an input file (hex blake2b, 32 characters).

    Hashes the file size, its first MiB (the primary and ``IMAGE`` headers,
    with ``OBSID`` and the processing keywords, and the start of the pixels)
    and its last MiB (the end of the ``ZODI`` pixels and the ``WCS-WAVE``
    table), so it costs ~1 ms per file instead of reading 67 MB, yet
    tells a reprocessed file from the original.

    Parameters
    ----------
    path : str or os.PathLike
        The file.

    Returns
    -------
    str
        Hex digest.

    Raises
    ------
    OSError
        If the file cannot be read.

    Examples
    --------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "x.bin")
    >>> with open(path, "wb") as fh:
    ...     _ = fh.write(b"SIMPLE" * 1000)
    >>> h = file_hash(path)
    >>> len(h), h == file_hash(path)
    (32, True)
    >>> with open(path, "ab") as fh:
    ...     _ = fh.write(b"!")
    >>> h == file_hash(path)
    False
    """
    path = os.fspath(path)
    return _file_hash(path, spherex._file_version(os.stat(path)))


@functools.lru_cache(maxsize=1024)
def _file_hash(path: str, version: tuple) -> str:
    """:func:`file_hash` of one version of a file (cached: runs over spectral slabs or
    resumed runs ask for the same files again)."""
    size = version[2]
    h = hashlib.blake2b(digest_size=16)
    h.update(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(_HASH_BLOCK))
        if size > _HASH_BLOCK:
            fh.seek(max(_HASH_BLOCK, size - _HASH_BLOCK))
            h.update(fh.read(_HASH_BLOCK))
    return h.hexdigest()


def _input_key(path: str) -> dict | None:
    """``{"obsid", "detector", "hash"}`` of a file (None if its header is unreadable)."""
    try:
        h = read_header_wcs(path)
        return {"obsid": h.obsid, "detector": h.detector, "hash": file_hash(path)}
    except (SpherexFileError, OSError, ValueError):
        return None


# ---------------------------------------------------------------------------
# the map step over a list of inputs (shared by serial, thread, process and dask runs)
# ---------------------------------------------------------------------------


def _drizzle_items(
    items, grid, settings, n_inputs, tick=None, cube=None
) -> tuple[Drizzle3D, RunSummary]:
    """Drizzle ``(ctx_id, path, key)`` items into ``cube`` (default a new partial cube);
    never raises per file."""
    d = _new_cube(grid, settings, n_inputs) if cube is None else cube
    summary = RunSummary()
    for ctx_id, path, key in items:
        try:
            prep, rec = _map_one(path, ctx_id, grid, settings)
            if prep is not None:
                used = _add_one(d, prep, ctx_id, slab=settings.get("slab"))
                used["hash"] = key["hash"] if key else file_hash(path)
                summary.used.append(used)
            else:
                _record(summary, rec)
        except Exception as err:  # a bug or resource error must not lose the other inputs
            logger.warning("skipping %s: %s: %s", path, type(err).__name__, err)
            summary.skipped.append({"path": path, "reason": f"{type(err).__name__}: {err}"})
        if tick is not None:
            tick()
    return d, summary


def drizzle_partial(
    items: Iterable[tuple],
    grid: OutputGrid,
    settings: dict[str, Any],
    n_inputs: int,
    progress: Callable | None = None,
) -> tuple[Drizzle3D, RunSummary]:
    """Drizzle ``(ctx_id, path)`` pairs into a new partial cube (the map step of a run).

    Parameters
    ----------
    items : iterable of (int, str)
        Context id (the input's index in the full list) and path.
    grid : OutputGrid
        Output grid.
    settings : dict
        Normalised run settings (from :func:`drizzle_files`).
    n_inputs : int
        Size of the full input list (for the context planes).
    progress : callable, optional
        tqdm-like wrapper of an iterable.

    Returns
    -------
    Drizzle3D, RunSummary
        The partial cube and its records; partials of disjoint inputs
        ``merge`` into the serial result.
    """
    progress = progress or _noop_progress
    items = [(it[0], os.fspath(it[1]), it[2] if len(it) > 2 else None) for it in items]
    return _drizzle_items(progress(items, desc="images", unit="img"), grid, settings, n_inputs)


def _merge_pair(a, b):
    """Merge two ``(Drizzle3D, RunSummary)`` partials (the reduce step)."""
    a[0].merge(b[0])
    a[1].merge(b[1])
    return a


def _tree_reduce(parts: list) -> tuple[Drizzle3D, RunSummary] | None:
    """Pairwise (tree) reduction of partials, in a fixed order."""
    parts = list(parts)
    while len(parts) > 1:
        merged = [_merge_pair(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
        if len(parts) % 2:
            merged.append(parts[-1])
        parts = merged
    return parts[0] if parts else None


def _split(items: list, n: int) -> list[list]:
    """Round-robin partition into at most ``n`` non-empty chunks (deterministic)."""
    return [items[i::n] for i in range(min(n, len(items)))]


def _pump(progress, total: int, ticks, finished: Callable[[], bool]) -> None:
    """Advance a progress bar once per tick from workers until all ``total`` arrived.

    Once every task has finished, ticks still on their way (a process queue delivers
    them in the background, after the task may have returned) get ``_TICK_GRACE``
    seconds each to arrive; then the bar stops where it is (inputs lost with a worker
    never tick).
    """
    for _ in progress(range(total), desc="images", unit="img"):
        while True:
            done = finished()
            try:
                ticks.get(timeout=_TICK_GRACE if done else 0.1)
                break
            except queue.Empty:
                if done:
                    return


#: Seconds a finished run waits for each progress tick still on its way.
_TICK_GRACE = 1.0


# -- threads ---------------------------------------------------------------


def _run_threads(items, grid, settings, n_inputs, n_workers, progress):
    ticks: queue.SimpleQueue = queue.SimpleQueue()
    chunks = _split(items, n_workers)
    with ThreadPoolExecutor(len(chunks), thread_name_prefix="drizzle3d") as ex:
        futs = [
            ex.submit(_drizzle_items, c, grid, settings, n_inputs, lambda: ticks.put(1))
            for c in chunks
        ]
        _pump(progress, len(items), ticks, lambda: all(f.done() for f in futs))
        parts = [f.result() for f in futs]
    return _tree_reduce(parts)


# -- processes ---------------------------------------------------------------
# Worker processes are started once and reused by later runs of the same size
# (spawning one costs ~2 s of imports and kernel loading, more than a typical run);
# they are shut down at exit. Workers on this machine (the pool, or a LocalCluster)
# take inputs first come, first served from the whole list (:func:`_claimed`), so a
# worker that drew cheap images does not idle while another finishes a fixed share.
# Each accumulates straight into a shared-memory file that this process keeps mapped
# (:func:`_acc_files`), so no accumulator is copied, pickled or piped; with the pool,
# this process drizzles a share of its own into which the others are merged.

_WORKER_TICKS = None
_POOL: dict[str, Any] = {}
_POOL_LOCK = threading.Lock()
_DASK_LOCK = threading.Lock()


def _init_process(ticks) -> None:
    global _WORKER_TICKS
    _WORKER_TICKS = ticks


def _shared_dir(nbytes: int = 0) -> str:
    """Where workers' accumulator files go: the RAM-backed ``/dev/shm`` when it has room
    for ``nbytes`` more (containers often give it 64 MB), else the temporary directory
    (a disk file, but its pages stay in the page cache)."""
    import tempfile

    shm = "/dev/shm"
    if os.name == "posix" and os.path.isdir(shm) and os.access(shm, os.W_OK):
        try:
            st = os.statvfs(shm)
            if st.f_bavail * st.f_frsize >= nbytes + _SHM_MARGIN:
                return shm
        except OSError:
            pass
    return tempfile.gettempdir()


@functools.cache
def _host_tag() -> str:
    """Six hex digits naming this machine in shared file names (a container sharing
    ``/dev/shm`` has another host name, and other process ids)."""
    import socket

    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def _shared_name(directory: str) -> str:
    """A new shared file name: ``drizzle3d-<pid>-<host tag><random>`` in ``directory``."""
    return os.path.join(directory, f"drizzle3d-{os.getpid()}-{_host_tag()}{uuid.uuid4().hex[:12]}")


def _shared_array(path: str, shape: tuple, *, create: bool = False) -> np.ndarray:
    """A float64 array of ``shape`` backed by the file ``path`` (created zero-filled).

    A new file's space is allocated at once (``posix_fallocate``: a full file system
    fails here with ``OSError``, not later with ``SIGBUS`` on first touch), and it is
    mapped with ``MAP_POPULATE`` where the system has it (one call instead of a page
    fault per 4 KiB).
    """
    import mmap

    size = int(np.prod(shape)) * 8
    fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
    try:
        if create:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, size)
            else:  # pragma: no cover - macOS, Windows
                os.ftruncate(fd, size)
        if os.name == "posix":
            buf = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        else:  # pragma: no cover - Windows
            buf = mmap.mmap(fd, size)
    except BaseException:
        if create:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    finally:
        os.close(fd)
    return np.frombuffer(buf, dtype=np.float64).reshape(shape)


def _claimed(items, claim_dir: str, taken: list):
    """Yield the items of a shared list that this worker claims, first come, first served.

    Item ``i`` is claimed by creating the file ``claim_dir/i`` (``O_EXCL``: exactly one
    worker succeeds); its index is appended to ``taken``. Stops as soon as ``claim_dir``
    is gone (:func:`_close_claims`: the round is over).
    """
    for i, item in enumerate(items):
        try:
            fd = os.open(os.path.join(claim_dir, str(i)), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        except FileNotFoundError:
            return
        os.close(fd)
        taken.append(i)
        yield item


def _close_claims(claim_dir: str) -> None:
    """End a round's claiming: once this returns, no worker claims another item (the
    directory is renamed away in one step, then removed)."""
    import shutil

    closed = f"{claim_dir}.closed"
    try:
        os.rename(claim_dir, closed)
    except FileNotFoundError:
        return
    shutil.rmtree(closed, ignore_errors=True)


#: In a worker process: accumulator files of the caller's, mapped once and reused.
_WORKER_ACC: dict[tuple, np.ndarray] = {}


_WORKER_ACC_LOCK = threading.Lock()  # (a dask worker runs tasks in several threads)


def _worker_acc(path: str, shape: tuple) -> np.ndarray:
    """This worker's mapping of the accumulator file ``path``; mappings of files the
    caller has removed since (or of another grid) are let go."""
    with _WORKER_ACC_LOCK:
        for key in list(_WORKER_ACC):
            if key != (path, shape) and (key[1] != shape or not os.path.exists(key[0])):
                _WORKER_ACC.pop(key, None)
        acc = _WORKER_ACC.get((path, shape))
        if acc is None:
            acc = _WORKER_ACC[(path, shape)] = _shared_array(path, shape)
        return acc


def _claiming_task(items, shipped, settings, n_inputs, tick, acc_path, claim_dir, keep=True):
    """Drizzle the items this worker claims; ``(acc_path, cube, summary, indices)``.

    A worker accumulates straight into the shared-memory file ``acc_path`` that the
    caller keeps mapped (:func:`_acc_files`; zeroed here first, as it is reused round
    after round), so its partial is never copied or sent: the cube comes back without
    its accumulators, or None if the worker claimed no item. ``keep=False``: the caller
    removes the file after this round, so the mapping is not kept either. With
    ``acc_path`` None (the caller's own share, in a thread) the cube keeps its own
    memory and is always returned.
    """
    grid = shipped if isinstance(shipped, OutputGrid) else shipped.grid()
    d = _new_cube(grid, settings, n_inputs)
    if acc_path is not None:
        marker = os.path.join(claim_dir, os.path.basename(acc_path) + ".used")
        try:  # one attempt per file and round: a re-run of a task whose worker died
            # must not touch the file (the dead attempt's items are retried by the caller)
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except (FileExistsError, FileNotFoundError):
            return None
        acc = _worker_acc(acc_path, d._accumulator_shape())
        acc[...] = 0.0
        d._adopt_accumulators(acc)
    taken: list[int] = []
    try:
        d, summary = _drizzle_items(
            _claimed(items, claim_dir, taken), grid, settings, n_inputs, tick, cube=d
        )
    finally:
        if acc_path is not None:
            d._acc = None  # the caller has the file mapped: only the rest travels
            if not keep:
                with _WORKER_ACC_LOCK:
                    _WORKER_ACC.pop((acc_path, d._accumulator_shape()), None)
    if acc_path is not None and not taken:
        return None
    return acc_path, d, summary, taken


def _process_task(items, shipped, settings, n_inputs, acc_path, claim_dir, keep):
    ticks = _WORKER_TICKS
    tick = None if ticks is None else (lambda: ticks.put(1))
    return _claiming_task(items, shipped, settings, n_inputs, tick, acc_path, claim_dir, keep)


# Accumulator files of workers on this machine, by back-end ("pool", or ("dask",
# workers)): ``{key: (shape, [(path, array), ...])}``. Creating and mapping one costs
# more than zeroing it (the file system allocates it page by page: ~45 ms for 82 MB,
# against ~18 ms), so each worker task gets one for the session and zeroes it at the start
# of a round. They are removed when the pool, the cluster made by ``client="local"`` or
# the session ends, at once after a run when together larger than _KEEP_ACC_BYTES (the
# workers then let go of their mappings too), and after a round that did not end
# normally (a task of it may still be writing: the next round gets new files); files of
# dead sessions on this machine are removed when new ones are made.
_ACC_FILES: dict[Any, tuple[tuple, list]] = {}
_ACC_LOCK = threading.RLock()
#: Free space left on /dev/shm by accumulator files.
_SHM_MARGIN = 64 * 2**20
#: Accumulator files larger than this (together) are not kept between runs.
_KEEP_ACC_BYTES = 512 * 2**20


def _keep_acc_files(shape: tuple, n: int) -> bool:
    return n * int(np.prod(shape)) * 8 <= _KEEP_ACC_BYTES


def _acc_files(key, shape: tuple, n: int) -> list[tuple[str, np.ndarray]]:
    """``n`` zero-filled accumulator files of ``shape`` for ``key``'s workers, mapped here."""
    with _ACC_LOCK:
        entry = _ACC_FILES.get(key)
        if entry is not None and entry[0] == shape and len(entry[1]) >= n:
            for path, _ in entry[1][n:]:  # fewer workers than before: no spare files kept
                with contextlib.suppress(OSError):
                    os.unlink(path)
            _ACC_FILES[key] = (shape, entry[1][:n])
            return entry[1][:n]
        for old in [k for k in _ACC_FILES if k == key or (k[0] == "dask" == key[0])]:
            _drop_acc_files(old)  # (one cluster's files at a time)
        _remove_stale_files()
        if not _ACC_FILES.get("atexit"):
            import atexit

            atexit.register(lambda: [_drop_acc_files(k) for k in list(_ACC_FILES)])
            _ACC_FILES["atexit"] = ((), [])
        files: list[tuple[str, np.ndarray]] = []
        try:
            for _ in range(n):
                try:
                    path = _shared_name(_shared_dir(n * int(np.prod(shape)) * 8))
                    files.append((path, _shared_array(path, shape, create=True)))
                except OSError:  # /dev/shm filled up meanwhile: a disk-backed file
                    import tempfile

                    path = _shared_name(tempfile.gettempdir())
                    files.append((path, _shared_array(path, shape, create=True)))
        except BaseException:
            for path, _ in files:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise
        _ACC_FILES[key] = (shape, files)
        return files


def _drop_acc_files(key) -> None:
    with _ACC_LOCK:
        entry = _ACC_FILES.pop(key, None)
    for path, _ in entry[1] if entry else []:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _drop_dask_files() -> None:
    with _DASK_LOCK, _ACC_LOCK:  # (not while a dask run uses them)
        for key in [k for k in _ACC_FILES if k[0] == "dask"]:
            _drop_acc_files(key)


def _remove_stale_files() -> None:
    """Remove shared files left by drizzle3d sessions on this machine that no longer run."""
    import glob
    import shutil
    import tempfile

    if os.name != "posix":  # pragma: no cover - no cheap liveness test of a pid there
        return
    paths = []
    for d in {_shared_dir(), "/dev/shm", tempfile.gettempdir()}:
        if os.path.isdir(d):
            paths += glob.glob(os.path.join(glob.escape(d), "drizzle3d-*-*"))
    for path in paths:
        parts = os.path.basename(path).split("-")
        if not parts[1].isdigit() or not parts[2].startswith(_host_tag()):
            continue
        if int(parts[1]) == os.getpid():
            continue
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.unlink(path)
        except OSError:  # another user's process: alive
            continue


def _claim_round(items: list, key, acc_files: list, submit: Callable, keep: bool = True):
    """One first-come-first-served round over ``items`` by workers on this machine.

    ``submit(claim_dir, acc_paths)`` starts one task per accumulator file (and, if it
    likes, the caller's own share first), returning the futures of
    :func:`_claiming_task`. Returns ``(partials, [(missing items, error)])``: one
    partial in this process's own memory (the workers' files are merged into the first
    private partial, or a copy of the first file), and the items no finished task
    accounts for (lost with a dead worker). If the round does not end normally, or a
    worker was lost, ``key``'s files are dropped (a task may still be writing to them);
    with ``keep`` False they are dropped after the round in any case.
    """
    try:
        return _claim_round_files(items, key, acc_files, submit)
    finally:
        if not keep:
            _drop_acc_files(key)


def _claim_round_files(items: list, key, acc_files: list, submit: Callable):
    claim_dir = _shared_name(_shared_dir()) + "-claims"
    os.mkdir(claim_dir, 0o700)
    mapped = dict(acc_files)
    parts, covered, err = [], set(), None
    try:
        for f in submit(claim_dir, list(mapped)):
            try:
                res = f.result()
            except Exception as e:  # BrokenProcessPool / KilledWorker: a worker died
                err = e
                continue
            if res is not None:
                path, d, summary, taken = res
                if path is not None:
                    d._adopt_accumulators(mapped[path])
                parts.append((d, summary, path is not None))
                covered.update(taken)
        # the files are reused by the next round: nothing may keep them
        own = [(d, s) for d, s, shared in parts if not shared]
        shared = [(d, s) for d, s, is_shared in parts if is_shared]
        if shared and not own:
            d, s = shared.pop(0)
            d._adopt_accumulators(d._acc.copy())
            own = [(d, s)]
        merged = _tree_reduce(own + shared)
    except BaseException:
        _close_claims(claim_dir)
        _drop_acc_files(key)
        raise
    _close_claims(claim_dir)
    missing = [it for i, it in enumerate(items) if i not in covered]
    ok = [merged] if merged is not None else []
    if not missing:
        return ok, []
    _drop_acc_files(key)
    if err is None:  # a dask worker died: its task ran again elsewhere and took nothing
        err = RuntimeError("a worker was lost during the round")
    return ok, [(missing, err)]


def _process_pool(n_workers: int):
    """The shared pool of ``n_workers`` processes (started on first use)."""
    entry = _POOL.get("pool")
    if entry is not None and entry[0] == n_workers and not getattr(entry[1], "_broken", False):
        return entry[1], entry[2]
    _shutdown_pool(drop_files=False)  # its workers are gone: the files can serve the next
    import atexit
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context(_START_METHOD)
    ticks = ctx.Queue()
    ex = ProcessPoolExecutor(
        n_workers, mp_context=ctx, initializer=_init_process, initargs=(ticks,)
    )
    if not _POOL.get("atexit"):
        atexit.register(_shutdown_pool)
        _POOL["atexit"] = True
    _POOL["pool"] = (n_workers, ex, ticks)
    return ex, ticks


def _shutdown_pool(drop_files: bool = True) -> None:
    if drop_files:
        _drop_acc_files("pool")
    entry = _POOL.pop("pool", None)
    if entry is not None:
        entry[1].shutdown(wait=True, cancel_futures=True)
        entry[2].close()
        entry[2].join_thread()


def _process_round(chunks, grid, settings, n_inputs, n_workers, progress, own=True):
    """One round over the chunks' items, first come, first served, on the process pool
    and (``own``) in this process: (partials, [(missing items, error)]).

    Retry rounds run without this process's share: an input that killed a worker must
    not run here."""
    from concurrent.futures.process import BrokenProcessPool

    items = [it for c in chunks for it in c]
    shipped = _ShippedGrid(grid)
    n_procs = max(1, n_workers - 1)
    n_pool = min(n_procs, len(items))
    shape = _accumulator_shape_of(grid.shape)
    keep = _keep_acc_files(shape, n_pool)
    with _POOL_LOCK:  # one run at a time on the shared pool (and its progress queue)
        ex, ticks = _process_pool(n_procs)
        with contextlib.suppress(queue.Empty, OSError, ValueError):
            while True:  # ticks left over by an interrupted run
                ticks.get_nowait()

        def submit(claim_dir, acc_paths):
            nonlocal ex, ticks

            def start():
                return [ex.submit(_process_task, items, shipped, settings, n_inputs, p,
                                  claim_dir, keep) for p in acc_paths]  # fmt: skip

            try:
                futs = start()
            except BrokenProcessPool:  # a worker of the kept pool died since its last run
                _shutdown_pool(drop_files=False)  # (the files are this round's)
                ex, ticks = _process_pool(n_procs)
                futs = start()
            with ThreadPoolExecutor(1, thread_name_prefix="drizzle3d") as mine:
                if own:
                    # this process is a worker too: its share never travels, and the
                    # final merge adds the pool's shares (mapped here) into it
                    futs.insert(0, mine.submit(_claiming_task, items, grid, settings,
                                               n_inputs, lambda: ticks.put(1), None,
                                               claim_dir))  # fmt: skip
                try:
                    _pump(progress, len(items), ticks, lambda: all(f.done() for f in futs))
                except BaseException:
                    _close_claims(claim_dir)  # every worker stops at its next claim
                    raise
            return futs

        ok, bad = _claim_round(items, "pool", _acc_files("pool", shape, n_pool), submit, keep)
        if bad:
            _shutdown_pool()  # a broken pool is not reused; the retry starts a new one
    return ok, bad


def _staged(run_round, chunks):
    """Run chunks; retry failed ones file by file, then each file in isolation.

    Returns the partials and a RunSummary of the files that failed every attempt.
    """
    parts, failed = [], RunSummary()
    pending = [(c, None) for c in chunks]
    for stage in ("chunks", "singles", "isolated"):
        if not pending:
            break
        if stage != "chunks":
            logger.warning(
                "%d input(s) lost to a failed worker (%s); retrying them one by one",
                sum(len(c) for c, _ in pending),
                pending[0][1],
            )
            pending = [([it], err) for c, err in pending for it in c]
        groups = [[c for c, _ in pending]]
        if stage == "isolated":
            groups = [[c] for c, _ in pending]
        nxt = []
        for group in groups:
            ok, bad = run_round(group, stage)
            parts += ok
            nxt += bad
        pending = nxt
    for c, err in pending:
        for _, path, _ in c:
            reason = f"worker failed on every retry ({type(err).__name__}: {err})"
            logger.warning("skipping %s: %s", path, reason)
            failed.skipped.append({"path": path, "reason": reason})
    return parts, failed


def _run_processes(items, grid, settings, n_inputs, n_workers, progress):
    parts, failed = _staged(
        lambda group, stage: _process_round(
            group, grid, settings, n_inputs, n_workers, progress, own=stage == "chunks"
        ),
        [items],
    )
    return _finish_parts(parts, failed, grid, settings, n_inputs)


def _finish_parts(parts, failed, grid, settings, n_inputs):
    """Reduce worker partials into a cube on this process's own ``grid`` object."""
    res = (_new_cube(grid, settings, n_inputs), RunSummary())
    reduced = _tree_reduce(parts)
    if reduced is not None:
        res[0]._merge(reduced[0], steal=True)  # the empty cube takes the accumulators
        res[1].merge(reduced[1])
    res[1].merge(failed)
    return res


# -- dask.distributed -------------------------------------------------------


def _dask_tick(topic):
    """In a dask task: a progress callback that logs one event on ``topic`` (None: no
    progress)."""
    if topic is None:
        return None
    from distributed import get_worker

    worker = get_worker()

    def tick():
        worker.log_event(topic, 1)

    return tick


def _dask_task(items, shipped, settings, n_inputs, topic):
    return _drizzle_items(items, shipped.grid(), settings, n_inputs, _dask_tick(topic))


def _dask_task_shared(items, shipped, settings, n_inputs, topic, acc_path, claim_dir, keep):
    """:func:`_claiming_task` on a worker on the client's machine (accumulating into
    the shared-memory file ``acc_path``)."""
    tick = _dask_tick(topic)
    return _claiming_task(items, shipped, settings, n_inputs, tick, acc_path, claim_dir, keep)


def _scheduler_workers(client) -> dict:
    """``{address: info}`` of every worker of ``client`` (some versions of distributed
    list only five unless asked for all)."""
    try:
        return client.scheduler_info(n_workers=-1)["workers"]
    except TypeError:  # pragma: no cover - versions without the argument list them all
        return client.scheduler_info()["workers"]


def _task_slots(nthreads: dict, n_tasks: int | None, n_items: int) -> list:
    """Worker addresses for one task per worker thread, spread over the workers first
    (``{a: 2, b: 2}`` -> ``[a, b, a, b]``), at most ``n_tasks`` and ``n_items``."""
    workers = sorted(nthreads)
    most = max((max(1, int(nthreads[w] or 1)) for w in workers), default=0)
    slots = [w for i in range(most) for w in workers if max(1, int(nthreads[w] or 1)) > i]
    return slots[: max(1, min(len(slots), n_tasks or len(slots), n_items))]


def _local_cluster(client) -> bool:
    """True when every worker of ``client`` runs on this machine."""
    import socket

    try:
        hosts = {w.get("host") for w in _scheduler_workers(client).values()}
        here = {"127.0.0.1", "localhost", "::1", socket.gethostname()}
        with contextlib.suppress(OSError):
            here.add(socket.gethostbyname(socket.gethostname()))
    except Exception:
        return False
    return bool(hosts) and hosts <= here


def _dask_round_shared(chunks, grid, settings, n_inputs, client, progress, n_tasks=None):
    """One round on workers on this machine, first come, first served: one task per
    worker thread (at most ``n_tasks``), each accumulating into a shared-memory file
    mapped here (nothing large crosses the network stack)."""
    from distributed import wait

    items = [it for c in chunks for it in c]
    ticks: queue.SimpleQueue = queue.SimpleQueue()
    topic = _subscribe(client, ticks)
    shipped = _ShippedGrid(grid)
    nthreads = client.nthreads()
    slots = _task_slots(nthreads, n_tasks, len(items))
    shape = _accumulator_shape_of(grid.shape)
    keep = _keep_acc_files(shape, len(slots))
    key = ("dask", tuple(sorted(nthreads)))

    def submit(claim_dir, acc_paths):
        # tasks pinned to their worker (the scheduler may otherwise queue two on one worker
        # while another idles); a task still moves if its worker dies
        futs = [
            client.submit(_dask_task_shared, items, shipped, settings, n_inputs, topic, p,
                          claim_dir, keep, pure=False, workers=[w], allow_other_workers=True)
            for w, p in zip(slots, acc_paths, strict=True)
        ]  # fmt: skip
        _pump(progress, len(items), ticks, lambda: all(f.done() for f in futs))
        wait(futs)
        return futs

    try:
        with _DASK_LOCK:  # one run at a time on the workers' accumulator files
            files = _acc_files(key, shape, len(slots))
            return _claim_round(items, key, files, submit, keep)
    finally:
        _unsubscribe(client, topic)


def _subscribe(client, ticks) -> str | None:
    topic = f"drizzle3d-progress-{uuid.uuid4().hex}"
    try:
        client.subscribe_topic(topic, lambda _event: ticks.put(1))
    except (AttributeError, TypeError, ValueError):  # pragma: no cover - old distributed
        return None
    return topic


def _unsubscribe(client, topic) -> None:
    if topic is not None:
        with contextlib.suppress(Exception):
            client.unsubscribe_topic(topic)


def _dask_round(chunks, grid, settings, n_inputs, client, progress):
    """Submit chunks, tree-reduce the partials on the cluster, gather one partial."""
    from distributed import as_completed

    ticks: queue.SimpleQueue = queue.SimpleQueue()
    topic = _subscribe(client, ticks)
    futs = [
        client.submit(
            _dask_task, c, _ShippedGrid(grid), settings, n_inputs, topic, retries=2, pure=False
        )
        for c in chunks
    ]
    chunk_of = {f.key: c for f, c in zip(futs, chunks, strict=True)}
    out: dict[str, Any] = {"ready": [], "bad": []}

    def reduce():
        ac = as_completed(futs)
        for f in ac:
            if f.status != "finished":
                if f.key in chunk_of:
                    out["bad"].append((chunk_of[f.key], f.exception()))
                    continue
                raise f.exception()
            out["ready"].append(f)
            if len(out["ready"]) == 2:
                a, b = out["ready"]
                out["ready"] = []
                ac.add(client.submit(_merge_pair, a, b, retries=2, pure=False))

    th = threading.Thread(target=reduce, name="drizzle3d-reduce", daemon=True)
    th.start()
    _pump(progress, sum(len(c) for c in chunks), ticks, lambda: not th.is_alive())
    th.join()
    _unsubscribe(client, topic)
    ok = [out["ready"][0].result()] if out["ready"] else []
    return ok, out["bad"]


def _run_dask(items, grid, settings, n_inputs, client, n_chunks, progress):
    if _local_cluster(client):
        chunks = [items]

        def run_round(group, _stage):
            return _dask_round_shared(group, grid, settings, n_inputs, client, progress, n_chunks)
    else:
        chunks = _split(items, n_chunks)

        def run_round(group, _stage):
            return _dask_round(group, grid, settings, n_inputs, client, progress)

    parts, failed = _staged(run_round, chunks)
    return _finish_parts(parts, failed, grid, settings, n_inputs)


def _dask_workers(client) -> int:
    try:
        n = sum(client.nthreads().values())
    except Exception:
        n = 0
    return max(1, n)


#: glibc settings of the workers of :func:`local_cluster`: freed blocks up to 32 MiB
#: are kept for reuse (up to 128 MiB of free memory before trimming).
_WORKER_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(128 * 2**20),
}


def local_cluster(n_workers: int | None = None, **kwargs):
    """A dask ``LocalCluster`` of single-threaded worker processes set up for drizzle3d.

    dask starts its workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (its
    ``distributed.nanny.pre-spawn-environ`` setting, which a first cluster also
    leaves in this process's environment), so that freed memory goes back to the
    system at once: every large temporary of a run (an image box, its maps and
    weights) then comes back as fresh memory that is page-faulted in again, and
    drizzle3d spends 30-60 % longer per image (16 full-frame exposures, 8 per
    worker: 0.80-0.88 s per worker, against 0.49-0.53 s here). The workers of this
    cluster keep freed blocks of up to 32 MiB for reuse and return free memory
    beyond 128 MiB (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``); every
    other setting is dask's. Only the workers started here get these settings
    (workers added later by ``scale`` or ``adapt`` start with dask's).
    ``drizzle_files(..., client="local")`` and a configuration's ``scheduler:
    local`` use it.

    Parameters
    ----------
    n_workers : int, optional
        Worker processes (default: all cores).
    **kwargs
        Passed to ``distributed.LocalCluster`` (they override the defaults:
        ``threads_per_worker=1, processes=True, dashboard_address=":0"``: a free
        port).

    Returns
    -------
    distributed.LocalCluster
        Close it (or use it as a context manager) when done.

    Examples
    --------
    >>> import tempfile
    >>> from distributed import Client
    >>> from drizzle3d.simulate import simulate_field
    >>> from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid
    >>> f = simulate_field(tempfile.mkdtemp(), n_exposures=2, shape=(64, 64))
    >>> grid = OutputGrid(SpatialGrid.from_center(150.0, 2.0, 2, 2), SpectralGrid.native(3))
    >>> with local_cluster(1) as cluster, Client(cluster) as client:
    ...     cube = drizzle_files(f.paths, grid, client=client)
    >>> cube.n_images
    2
    """
    import dask
    from distributed import LocalCluster

    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    env.update(_WORKER_MALLOC_ENV)
    opts = {
        "n_workers": _resolve_workers(n_workers),
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": ":0",
    }
    opts.update(kwargs)
    # dask takes these from this process's environment when set there (a first cluster
    # leaves its own in it), so they are set here too while the workers start
    saved = {k: os.environ.get(k) for k in _WORKER_MALLOC_ENV}
    try:
        os.environ.update(_WORKER_MALLOC_ENV)
        with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
            return LocalCluster(**opts)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _client_for(client, n_workers):
    """Yield a ``distributed.Client`` for ``client`` (a Client, an address or "local")."""
    if client is None or hasattr(client, "submit"):
        yield client
        return
    from distributed import Client

    if client == "local":
        try:
            with local_cluster(n_workers) as cluster, Client(cluster) as c:
                yield c
        finally:
            _drop_dask_files()  # its workers are gone
        return
    with Client(client) as c:
        yield c


def _run_items(items, grid, settings, n_inputs, *, n_workers, executor, client, progress):
    """Dispatch one batch of items to the chosen backend; returns (Drizzle3D, RunSummary)."""
    progress = progress or _noop_progress
    if client is not None:
        # the default (1) and None/0 mean the whole cluster: one task per worker thread
        n_chunks = n_workers if n_workers and n_workers > 1 else _dask_workers(client)
        return _run_dask(items, grid, settings, n_inputs, client, n_chunks, progress)
    if n_workers <= 1 or len(items) <= 1:
        return _drizzle_items(progress(items, desc="images", unit="img"), grid, settings, n_inputs)
    if executor == "threads":
        return _run_threads(items, grid, settings, n_inputs, n_workers, progress)
    return _run_processes(items, grid, settings, n_inputs, n_workers, progress)


#: ``((lam_min, lam_max, own_lo), footprints)`` while :func:`_drizzle_slabs` drizzles one
#: spectral slab of a grid spanning ``[lam_min, lam_max]`` whose lower edge is ``own_lo``
#: (``-inf`` for the first slab); ``footprints``: ``{path: (box, band limits)}`` on the
#: whole grid. Read by :func:`drizzle_files` into its settings.
_SLAB: contextvars.ContextVar = contextvars.ContextVar("drizzle3d_slab", default=None)

#: Local parallel back-ends of :func:`drizzle_files`.
EXECUTORS = ("threads", "processes")
#: How duplicate inputs (already in the cube, or listed twice) are treated.
DUPLICATES = ("error", "skip")
_START_METHOD = "spawn"


def _portable(grid: OutputGrid) -> OutputGrid:
    """The grid exactly as every worker rebuilds it (see :class:`_ShippedGrid`)."""
    return _ShippedGrid(grid).grid()


class _ShippedGrid:
    """A grid as sent to workers: its FITS header text (exact) and the spectral grid.

    astropy pickles a WCS through a header printed with 17 significant digits,
    so ``CDELT`` can change in its last bit and pixmaps by ~1e-13 pixel; the
    header round trip of :class:`~drizzle3d.grid.SpatialGrid` is exact and
    idempotent, so every back-end drizzles onto the same bits.
    """

    def __init__(self, grid: OutputGrid):
        self.header = grid.spatial.to_header().tostring()
        self.spectral = grid.spectral

    def grid(self) -> OutputGrid:
        from astropy.io import fits

        return OutputGrid(SpatialGrid.from_header(fits.Header.fromstring(self.header)),
                          self.spectral)  # fmt: skip


def _resolve_workers(n_workers) -> int:
    if n_workers is None or n_workers == 0:
        return os.cpu_count() or 1
    if isinstance(n_workers, bool) or not isinstance(n_workers, int | np.integer) or n_workers < 0:
        raise ValueError(f"'n_workers' must be None or an int >= 0; got {n_workers!r}.")
    return int(n_workers)


def _open_resume(resume):
    """(Drizzle3D, run metadata) of a state store path or a cube from :func:`drizzle_files`."""
    if isinstance(resume, Drizzle3D):
        d = Drizzle3D(resume.grid, **_drizzle_kwargs(resume), track_wave=True, state=resume.state)
        summary = getattr(resume, "run_summary", None) or RunSummary()
        meta = {"run_settings": getattr(resume, "run_settings", None), "used": summary.used}
        return d, meta
    from drizzle3d.io import load_state

    return load_state(resume)


def _drizzle_kwargs(d: Drizzle3D) -> dict[str, Any]:
    st = d.state["settings"]
    keys = ("kernel", "pixfrac", "wave_pixfrac", "weighting", "ivar_max", "min_overlap")
    out = {k: st[k] for k in keys}
    out["exclude_flags"] = st["exclude_flags"]
    out["effective_wavelength"] = st.get("effective_wavelength", "band")
    return out


def _check_resume(base: Drizzle3D, meta: dict, grid: OutputGrid, settings: dict) -> None:
    if base.grid is None or not (base.grid == grid):
        raise ValueError("'resume' holds a cube on a different output grid than 'grid'.")
    old = meta.get("run_settings") or {}
    for key in ("kernel", "pixfrac", "wave_pixfrac", "weighting", "ivar_max", "min_overlap",
                "exclude_mask", "zodi", "fast_pixmap"):  # fmt: skip
        if key in old and old[key] != settings[key]:
            raise ValueError(
                f"'{key}' must match the resumed cube's setting; got {settings[key]!r}, "
                f"the cube was made with {old[key]!r}."
            )


def _plan(paths, base_used, start_ctx, fresh, duplicates):
    """Assign context ids and drop inputs already included; returns (items, refused)."""
    ids = {(u.get("obsid"), u.get("detector")) for u in base_used if u.get("obsid")}
    hashes = {u.get("hash") for u in base_used if u.get("hash")}
    items, refused = [], []
    for i, path in enumerate(paths):
        key = _input_key(path)
        if key is not None:
            ident = (key["obsid"], key["detector"])
            # OBSID + detector against the cube (a reprocessed file of an included
            # exposure); the content hash against the cube and the rest of the list
            if (key["obsid"] and ident in ids) or key["hash"] in hashes:
                refused.append(path)
                continue
            hashes.add(key["hash"])
        ctx_id = i if fresh else start_ctx + len(items)
        items.append((ctx_id, path, key))
    if refused and duplicates == "error":
        raise ValueError(
            f"'paths' must not repeat images already in the cube; got {len(refused)} "
            f"already included (first: {refused[0]!r}). Pass duplicates='skip' to leave them out."
        )
    for p in refused:
        logger.info("%s is already in the cube; not added again", p)
    return items, refused


def drizzle_files(
    paths: Sequence[str | os.PathLike],
    grid: OutputGrid,
    *,
    kernel: str = "square",
    pixfrac: float = 1.0,
    wave_pixfrac: float = 1.0,
    weighting: str = "background",
    ivar_max: float = math.inf,
    min_overlap: float = 0.0,
    exclude_flags=None,
    zodi: str = "fit",
    fast_pixmap: bool = True,
    outliers: dict | None = None,
    n_workers: int | None = 1,
    executor: str = "threads",
    client=None,
    resume=None,
    duplicates: str = "error",
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    progress: Callable | None = None,
) -> Drizzle3D:
    """Drizzle SPHEREx files onto a grid, serially, in parallel or on a cluster.

    Every input is mapped independently (footprint, box read, maps, weights,
    ``add_image`` into a worker's own partial cube) and the partials are merged
    pairwise (a tree reduction). Each input keeps its index as its context id,
    so any partition gives the serial result (to float64 rounding, ~1e-16
    relative). Bad files are reported and skipped.

    Parameters
    ----------
    paths : sequence of str or os.PathLike
        SPHEREx Level-2 files (any detectors: those whose wavelengths miss the
        grid count as not overlapping).
    grid : OutputGrid
        Output grid.
    kernel, pixfrac, wave_pixfrac, ivar_max, min_overlap
        As for :class:`~drizzle3d.Drizzle3D`.
    weighting : {"background", "ivm", "exptime", "uniform"}, optional
        Default ``"background"``: one weight per image, ``1/median(VARIANCE)`` of its
        background pixels; unbiased for bright sources (see the module notes).
    exclude_flags : sequence of str or int, optional
        Flag names (or a bitmask) whose pixels get no weight. Default
        :data:`drizzle3d.spherex.DEFAULT_EXCLUDE_FLAGS` (bad pixels; not SOURCE).
    zodi : {"none", "static", "fit"}, optional
        Zodi handling; default fits the ZODI model's amplitude per image.
    fast_pixmap : bool, optional
        Use the spline pixmap when its error estimate is below 0.01 pixel.
    outliers : dict, optional
        ``{"enabled": bool, "snr": ..., "scale": ..., "grow": ...}``; when enabled,
        :func:`drizzle3d.blot.find_outliers` flags outliers before drizzling
        (a serial two-pass run; not combined with ``resume`` or checkpoints).
    n_workers : int or None, optional
        Local workers (default 1: serial, in this thread). ``None`` or 0: all
        cores. With a ``client``: the number of tasks; the default, ``None`` or
        0 mean one per thread of the cluster's workers.
    executor : {"threads", "processes"}, optional
        Local back-end. The kernels release the GIL, so ``"threads"`` (the
        default) scales without shipping partial cubes between processes. With
        ``"processes"`` this process is one of the ``n_workers`` (a kept pool
        runs the others, accumulating in shared memory).
    client : distributed.Client or str, optional
        Run on a dask cluster: a Client, a scheduler address, or ``"local"``
        for a :func:`local_cluster` of ``n_workers`` processes. Tasks read their
        own files; only partial cubes travel (workers on this machine
        accumulate in shared memory and take files first come, first served).
        Inputs lost with a failed worker are retried (on a remote cluster the
        chunk twice on the cluster), then file by file; files that fail every
        time are reported as skipped, never dropped.
    resume : str, os.PathLike or Drizzle3D, optional
        Continue this cube: a state store (:func:`drizzle3d.io.save_state`, as
        written by checkpoints) or a cube returned by this function. Grid and
        settings must match. New images get context ids after the cube's.
    duplicates : {"error", "skip"}, optional
        An input already in the cube (same OBSID and detector, or same
        :func:`file_hash`) or listed twice (same hash): ``"error"`` (default) refuses the
        run before any work, ``"skip"`` leaves it out (listed in
        ``run_summary.already_included``).
    checkpoint : str or os.PathLike, optional
        State store to write (atomically) every ``checkpoint_every`` images and
        at the end; a killed run resumes from it with ``resume=checkpoint``.
    checkpoint_every : int, optional
        Images per checkpoint (0: only at the end, when ``checkpoint`` is set).
    progress : callable, optional
        tqdm-like wrapper (``progress(iterable, desc=..., unit=...)``); ticks once
        per image in every back-end.

    Returns
    -------
    Drizzle3D
        The filled cube, with ``run_summary`` (:class:`RunSummary`) and
        ``run_settings`` (dict) attributes.

    Raises
    ------
    ValueError
        On invalid settings, a resumed cube that does not match, or duplicate
        inputs with ``duplicates="error"``.

    Examples
    --------
    >>> import tempfile
    >>> from drizzle3d.simulate import simulate_field
    >>> from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid
    >>> f = simulate_field(tempfile.mkdtemp(), n_exposures=2, shape=(64, 64))
    >>> grid = OutputGrid(SpatialGrid.from_center(150.0, 2.0, 2, 2), SpectralGrid.native(3))
    >>> d = drizzle_files(f.paths, grid, n_workers=2)
    >>> d.run_summary.counts()
    {'used': 2, 'skipped': 0, 'not_overlapping': 0, 'already_included': 0}
    """
    if not isinstance(grid, OutputGrid):
        raise TypeError(f"'grid' must be an OutputGrid; got {type(grid).__name__}.")
    _check_options(weighting, zodi)
    grid = _portable(grid)
    if executor not in EXECUTORS:
        raise ValueError(f"'executor' must be one of {EXECUTORS}; got {executor!r}.")
    if duplicates not in DUPLICATES:
        raise ValueError(f"'duplicates' must be one of {DUPLICATES}; got {duplicates!r}.")
    if (
        isinstance(checkpoint_every, bool)
        or not isinstance(checkpoint_every, int)
        or (checkpoint_every < 0)
    ):
        raise ValueError(f"'checkpoint_every' must be an int >= 0; got {checkpoint_every!r}.")
    n_workers = _resolve_workers(n_workers) if client is None or n_workers else n_workers
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("'paths' must name at least one file; got none.")
    outl = dict(outliers or {})
    settings = {
        "kernel": kernel,
        "pixfrac": float(pixfrac),
        "wave_pixfrac": float(wave_pixfrac),
        "weighting": weighting,
        "ivar_max": float(ivar_max),
        "min_overlap": float(min_overlap),
        "exclude_mask": _exclude_mask(exclude_flags),
        "zodi": zodi,
        "fast_pixmap": bool(fast_pixmap),
        "outliers": outl,
    }
    slab = _SLAB.get()
    if slab is not None:
        settings["slab"], settings["footprints"] = slab
    if outl.get("enabled") and (resume is not None or checkpoint is not None):
        raise ValueError(
            "'outliers' must be disabled for incremental or checkpointed runs; got enabled."
        )
    base, base_used = None, []
    if resume is not None:
        base, meta = _open_resume(resume)
        _check_resume(base, meta, grid, settings)
        base_used = list(meta.get("used") or [])
    start = max((int(u["ctx_id"]) for u in base_used), default=-1) + 1
    items, refused = _plan(paths, base_used, start, base is None, duplicates)
    n_inputs = max([it[0] for it in items], default=0) + 1
    if outl.get("enabled"):
        d, summary = _run_with_outliers([(c, p) for c, p, _ in items], grid, settings,
                                        n_inputs, progress)  # fmt: skip
        for u in summary.used:
            u["hash"] = file_hash(u["path"])
    else:
        step = checkpoint_every if (checkpoint is not None and checkpoint_every) else len(items)
        batches = [items[i : i + step] for i in range(0, len(items), max(1, step))] or [[]]
        d, summary = base, RunSummary(used=list(base_used))
        with _client_for(client, n_workers) as cl:
            for k, batch in enumerate(batches):
                part, s = _run_items(
                    batch, grid, settings, n_inputs, n_workers=n_workers, executor=executor,
                    client=cl, progress=progress,
                )  # fmt: skip
                d = part if d is None else d.merge(part)
                summary.merge(s)
                if checkpoint is not None:
                    _save_checkpoint(d, summary, settings, checkpoint, k == len(batches) - 1)
    summary.already_included.extend(refused)
    order = {p: i for i, p in enumerate(paths)}
    summary.used.sort(key=lambda u: u["ctx_id"])
    summary.skipped.sort(key=lambda s: order.get(s["path"], -1))
    summary.not_overlapping.sort(key=lambda p: order.get(p, -1))
    d.run_summary = summary
    d.run_settings = settings
    level = logging.WARNING if summary.skipped else logging.INFO
    logger.log(level, "run summary: %s", summary.text())
    return d


def _save_checkpoint(d, summary, settings, path, complete: bool) -> None:
    from drizzle3d.io import save_state

    meta = {"run_settings": settings, "used": summary.used, "complete": bool(complete)}
    save_state(d, path, meta=meta)


# ---------------------------------------------------------------------------
# tiled runs: outputs larger than memory
# ---------------------------------------------------------------------------


def _tile_grid(grid: OutputGrid, y0: int, y1: int, x0: int, x1: int) -> OutputGrid:
    w = grid.spatial.wcs.slice((slice(y0, y1), slice(x0, x1)))
    return OutputGrid(SpatialGrid(w, (y1 - y0, x1 - x0)), grid.spectral)


def _image_plan(ctx_id: int, path: str, grid: OutputGrid, settings: dict) -> dict:
    """Per-image constants of a tiled run, fixed on the image's full-grid box.

    The weight and the zodi amplitude are what an untiled run would use, so
    every tile drizzles the image identically.
    """
    try:
        hdr = read_header_wcs(path)
        fp = image_footprint(path, grid)
        if fp.bbox is None:
            return {"path": path, "status": "not_overlapping"}
        im = read_image_box(path, fp.bbox, zodi=settings["zodi"])
        wht = image_weights(im, settings["weighting"], settings["exclude_mask"])
    except (SpherexFileError, OSError, ValueError) as err:
        reason = getattr(err, "problem", None) or f"{type(err).__name__}: {err}"
        logger.warning("skipping %s: %s", path, reason)
        return {"path": path, "status": "skipped", "reason": str(reason)}
    if wht <= 0:
        return {"path": path, "status": "skipped", "reason": "no valid pixels"}
    exptime = im.meta.exptime if im.meta.exptime and im.meta.exptime > 0 else 1.0
    return {
        "path": path,
        "status": "used",
        "ctx_id": ctx_id,
        "obsid": im.meta.obsid,
        "detector": im.meta.detector,
        "bbox": [int(v) for v in fp.bbox],
        "wht_scale": wht,
        "exptime": float(exptime),
        "zodi_scale": im.meta.zodi_scale,
        "zodi_scale_err": im.meta.zodi_scale_err,
        "hash": file_hash(path),
        "_wcs": hdr.wcs,
        "_shape": hdr.shape,
    }


def _add_to_tile(d: Drizzle3D, plan: dict, tile: OutputGrid, settings: dict, grid_wcs,
                 origin) -> bool:  # fmt: skip
    """Drizzle the part of one planned image that reaches ``tile``; False if none does."""
    box = footprint_bbox(plan["_wcs"], plan["_shape"], tile.spatial.wcs, tile.spatial.shape,
                         margin=2)  # fmt: skip
    if box is None:
        return False
    full = BBox(*plan["bbox"])
    box = BBox(
        max(box.xmin, full.xmin), min(box.xmax, full.xmax),
        max(box.ymin, full.ymin), min(box.ymax, full.ymax),
    )  # fmt: skip
    if box.xmax - box.xmin < 1 or box.ymax - box.ymin < 1:
        return False
    im = read_spherex(plan["path"], bbox=(box.ymin, box.ymax + 1, box.xmin, box.xmax + 1))
    data, var = im.data, im.var
    if settings["zodi"] != "none":  # the same arithmetic as read_spherex, with the fixed scale
        data = (data - np.float32(plan["zodi_scale"]) * im.zodi).astype(np.float32, copy=False)
        if plan.get("zodi_scale_err"):
            zerr = np.float32(plan["zodi_scale_err"])
            var = (var + (zerr * im.zodi) ** 2).astype(np.float32, copy=False)
    if settings["fast_pixmap"]:
        pixmap = None
        if min(im.shape) >= 4 * _FAST_STEP:
            pm, err = calc_pixmap(im.wcs, tile.spatial.wcs, im.shape, stepsize=_FAST_STEP,
                                  return_error=True)  # fmt: skip
            pixmap = pm if err < FAST_PIXMAP_TOL else None
        if pixmap is None:
            pixmap = calc_pixmap(im.wcs, tile.spatial.wcs, im.shape)
    else:
        # exactly the untiled run's pixmap: the image box's WCS onto the whole grid,
        # evaluated on the tile's sub-box, then shifted by the tile's origin
        box_wcs = plan["_wcs"].slice((slice(full.ymin, full.ymax + 1),
                                      slice(full.xmin, full.xmax + 1)))  # fmt: skip
        sub = BBox(box.xmin - full.xmin, box.xmax - full.xmin,
                   box.ymin - full.ymin, box.ymax - full.ymin)  # fmt: skip
        pixmap = calc_pixmap(box_wcs, grid_wcs, bbox=sub)
        pixmap[..., 0] -= origin[1]
        pixmap[..., 1] -= origin[0]
    d.add_image(
        data, var, im.flags, pixmap, im.wavemap(), ctx_id=plan["ctx_id"],
        wht_scale=plan["wht_scale"], exptime=plan["exptime"],
    )  # fmt: skip
    return True


def _tiles(shape, tile_shape) -> list[tuple[int, int, int, int]]:
    ny, nx = shape
    ty, tx = tile_shape
    return [
        (y0, min(ny, y0 + ty), x0, min(nx, x0 + tx))
        for y0 in range(0, ny, ty)
        for x0 in range(0, nx, tx)
    ]


def _tiled_template(grid: OutputGrid, settings: dict, n_inputs: int, plans: list):
    """A lazy Dataset with the mosaic's variables, coordinates and attributes."""
    import dask.array as da

    ny, nx = grid.spatial.shape
    small = _new_cube(_tile_grid(grid, 0, 1, 0, 1), settings, n_inputs).to_dataset()
    small = small.drop_vars(["ra", "dec"], errors="ignore")
    data_vars = {}
    for name, var in small.data_vars.items():
        shape = tuple({"y": ny, "x": nx}.get(dim, var.sizes[dim]) for dim in var.dims)
        data_vars[name] = (var.dims, da.zeros(shape, dtype=var.dtype, chunks=-1), var.attrs)
    coords = {
        name: small[name] for name in small.coords if "y" not in small[name].dims
        and "x" not in small[name].dims
    }  # fmt: skip
    coords["y"] = ("y", np.arange(ny))
    coords["x"] = ("x", np.arange(nx))
    import xarray as xr

    ds = xr.Dataset(data_vars, coords=coords, attrs=dict(small.attrs))
    ds.attrs["wcs"] = grid.spatial.header_string()
    used = [p for p in plans if p["status"] == "used"]
    ds.attrs["n_images"] = len(used)
    ds.attrs["total_exptime"] = float(sum(p["exptime"] for p in used))
    return ds


def drizzle_tiled(
    paths: Sequence[str | os.PathLike],
    grid: OutputGrid,
    store: str | os.PathLike,
    *,
    tile_shape: int | tuple[int, int] = 256,
    kernel: str = "square",
    pixfrac: float = 1.0,
    wave_pixfrac: float = 1.0,
    weighting: str = "background",
    ivar_max: float = math.inf,
    min_overlap: float = 0.0,
    exclude_flags=None,
    zodi: str = "fit",
    fast_pixmap: bool = True,
    n_workers: int | None = 1,
    overwrite: bool = False,
    progress: Callable | None = None,
) -> Path:
    """Drizzle onto a mosaic tile by tile, writing each tile to one zarr store.

    The output grid is split into spatial tiles of ``tile_shape`` pixels, each
    its own :class:`~drizzle3d.Drizzle3D`. A first pass reads each image's
    header and its box on the whole grid once, to fix the image's weight and
    zodi amplitude exactly as an untiled run would; then every tile drizzles
    only the images whose footprint touches it (reading only the part that
    lands on the tile) and is written to its chunk of the store as soon as it
    is done. Peak memory is about ``n_workers`` tiles' accumulators (56 bytes
    per voxel plus the output copies) plus one image box per worker, whatever
    the size of the mosaic.

    Parameters
    ----------
    paths : sequence of str or os.PathLike
        SPHEREx Level-2 files.
    grid : OutputGrid
        The mosaic's grid.
    store : str or os.PathLike
        Output zarr directory (chunked by tile; ``xarray.open_zarr`` reads it lazily).
    tile_shape : int or (int, int), optional
        Tile size in output pixels (``y``, ``x``).
    kernel, pixfrac, wave_pixfrac, weighting, ivar_max, min_overlap, exclude_flags, zodi
        As for :func:`drizzle_files`.
    fast_pixmap : bool, optional
        Spline pixmaps per tile box (error below 0.01 pixel). With exact pixmaps
        (False) the tiled cube equals the untiled one to float64 rounding.
    n_workers : int or None, optional
        Tiles drizzled at once (threads; the kernels release the GIL).
        ``None`` or 0: all cores.
    overwrite : bool, optional
        Replace an existing store.
    progress : callable, optional
        tqdm-like wrapper; ticks once per tile.

    Returns
    -------
    pathlib.Path
        The store. Its attributes hold the run summary and the inputs.

    Raises
    ------
    FileExistsError
        If ``store`` exists and ``overwrite`` is False.
    ValueError
        On invalid settings.

    Examples
    --------
    >>> import os
    >>> import xarray as xr
    >>> import tempfile
    >>> from drizzle3d.simulate import simulate_field
    >>> from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid
    >>> f = simulate_field(tempfile.mkdtemp(), n_exposures=1, shape=(32, 32))
    >>> grid = OutputGrid(SpatialGrid.from_center(150.0, 2.0, 1.0, 1.0), SpectralGrid.native(3))
    >>> store = drizzle_tiled(f.paths, grid, os.path.join(tempfile.mkdtemp(), "m.zarr"),
    ...                       tile_shape=5, zodi="static")
    >>> cube = xr.open_zarr(store, consolidated=False)
    >>> cube.sci.shape, cube.sci.encoding["chunks"]
    ((17, 10, 10), (17, 5, 5))
    """
    from drizzle3d.io import _jsonable, init_tiled_store, write_tile

    if not isinstance(grid, OutputGrid):
        raise TypeError(f"'grid' must be an OutputGrid; got {type(grid).__name__}.")
    _check_options(weighting, zodi)
    grid = _portable(grid)
    if isinstance(tile_shape, int | np.integer):
        tile_shape = (int(tile_shape), int(tile_shape))
    tile_shape = tuple(int(v) for v in tile_shape)
    if len(tile_shape) != 2 or min(tile_shape) < 1:
        raise ValueError(f"'tile_shape' must be a positive int or (ny, nx); got {tile_shape!r}.")
    n_workers = _resolve_workers(n_workers)
    store = Path(store)
    if store.exists() and not overwrite:
        raise FileExistsError(f"'store' must not exist unless overwrite=True; got {str(store)!r}.")
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("'paths' must name at least one file; got none.")
    settings = {
        "kernel": kernel, "pixfrac": float(pixfrac), "wave_pixfrac": float(wave_pixfrac),
        "weighting": weighting, "ivar_max": float(ivar_max), "min_overlap": float(min_overlap),
        "exclude_mask": _exclude_mask(exclude_flags), "zodi": zodi,
        "fast_pixmap": bool(fast_pixmap), "outliers": {},
    }  # fmt: skip
    progress = progress or _noop_progress
    with ThreadPoolExecutor(n_workers, thread_name_prefix="drizzle3d-plan") as ex:
        plans = list(ex.map(lambda a: _image_plan(a[0], a[1], grid, settings), enumerate(paths)))
    used = [p for p in plans if p["status"] == "used"]
    summary = RunSummary()
    for p in plans:
        if p["status"] == "used":
            summary.used.append({k: v for k, v in p.items() if not k.startswith("_")
                                 and k != "status"})  # fmt: skip
        else:
            _record(summary, p)
    n_inputs = len(paths)
    tmp = store.with_name(f".{store.name}.{uuid.uuid4().hex[:8]}.tmp")
    template = _tiled_template(grid, settings, n_inputs, plans)
    template.attrs["run_summary"] = json.dumps(_jsonable(summary.to_dict()))
    template.attrs["inputs"] = json.dumps(_jsonable(summary.used))
    template.attrs["pipeline_weighting"] = weighting
    template.attrs["exclude_flags"] = int(settings["exclude_mask"])
    template.attrs["zodi"] = zodi
    template.attrs["tile_shape"] = list(tile_shape)
    try:
        init_tiled_store(tmp, template, tile_shape)
        del template

        def one_tile(t):
            y0, y1, x0, x1 = t
            sub = _tile_grid(grid, y0, y1, x0, x1)
            d = _new_cube(sub, settings, n_inputs)
            for plan in used:
                _add_to_tile(d, plan, sub, settings, grid.spatial.wcs, (y0, x0))
            write_tile(tmp, d.to_dataset(), y0, x0)

        tiles = _tiles(grid.spatial.shape, tile_shape)
        with ThreadPoolExecutor(n_workers, thread_name_prefix="drizzle3d-tile") as ex:
            for _ in progress(ex.map(one_tile, tiles), total=len(tiles), desc="tiles",
                              unit="tile"):  # fmt: skip
                pass
        if store.exists():
            import shutil

            shutil.rmtree(store)
        tmp.rename(store)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("tiled run: %s; %d tiles written to %s", summary.text(), len(tiles), store)
    return store


def cube_dataset(d: Drizzle3D, *, detector=None) -> xr.Dataset:
    """The cube as a Dataset with the run summary and inputs in its attributes.

    Parameters
    ----------
    d : Drizzle3D
        A cube from :func:`drizzle_files`.
    detector : int or str, optional
        Recorded as ``attrs["detector"]``.

    Returns
    -------
    xarray.Dataset
        ``d.to_dataset()`` plus attributes ``run_summary`` (JSON), ``inputs``
        (JSON list of the used inputs with their boxes and weights),
        ``pipeline_weighting``, ``exclude_flags``, ``zodi``.
    """
    ds = d.to_dataset()
    ds.attrs.update(_run_attrs(d, detector))
    return ds


def _run_attrs(d, detector=None) -> dict[str, Any]:
    """The attributes :func:`cube_dataset` adds to a cube's own."""
    attrs: dict[str, Any] = {}
    summary = getattr(d, "run_summary", None)
    settings = getattr(d, "run_settings", None)
    if summary is not None:
        sd = summary.to_dict()
        attrs["run_summary"] = json.dumps(
            {k: sd[k] for k in ("counts", "reasons", "skipped", "not_overlapping")}
        )
        attrs["inputs"] = json.dumps(sd["used"])
    if settings is not None:
        attrs["pipeline_weighting"] = settings["weighting"]
        attrs["exclude_flags"] = int(settings["exclude_mask"])
        attrs["zodi"] = settings["zodi"]
        attrs["ivar_max"] = float(settings["ivar_max"])
        attrs["min_overlap"] = float(settings["min_overlap"])
    if detector is not None:
        attrs["detector"] = str(detector)
    return attrs


# ---------------------------------------------------------------------------
# spectral slabs: a FITS cube whose accumulators would not fit a memory budget
# ---------------------------------------------------------------------------

#: Accumulator memory (bytes) above which :func:`drizzle` makes a FITS-only cube in
#: spectral slabs (see :func:`_drizzle_slabs`).
SLAB_STATE_BYTES = 32 * 2**20


def _n_slabs(grid: OutputGrid) -> int:
    nz, ny, nx = grid.shape
    return max(1, min(nz, math.ceil(nz * ny * nx * N_FIELDS * 8 / SLAB_STATE_BYTES)))


class _SlabbedCube:
    """A cube drizzled slab by slab: each slab's outputs wait in a temporary directory
    and are served whole, one output at a time, to :func:`drizzle3d.io.save_cube`."""

    def __init__(self, cube: Drizzle3D, tmp, bounds, meta: dict, summary, settings):
        self._cube = cube  # the whole grid, accumulators never touched
        self._tmp = tmp
        self._bounds = bounds
        self._meta = meta  # output name -> (dtype, units, long_name)
        self.run_summary = summary
        self.run_settings = settings

    def _output_items(self, plain: bool = False):
        for name, (dtype, units, long_name) in self._meta.items():
            if name == "ctx":
                values = None
            else:
                nz, ny, nx = self._cube._shape
                values = np.empty((nz, ny, nx), dtype=dtype)
                for k, (z0, z1) in enumerate(self._bounds):
                    values[z0:z1] = np.load(os.path.join(self._tmp.name, f"{name}-{k}.npy"))
            with self._cube._outputs_as(plain):
                if values is None:
                    item = self._cube.out_ctx
                else:
                    item = self._cube._cube(name, values, units, long_name)
            del values
            yield name, item

    def _coords(self) -> dict:
        return self._cube._coords()

    def _dataset_attrs(self) -> dict:
        return self._cube._dataset_attrs()

    def close(self) -> None:
        self._tmp.cleanup()


def _union_summaries(parts: list[RunSummary], paths: list[str]) -> RunSummary:
    """One run's summary from its slabs': an input is used if any slab used it (its
    ``nmiss`` summed: each missed pixel is counted by one slab), skipped if a slab
    could not read it, else not overlapping."""
    used: dict[str, dict] = {}
    skipped: dict[str, dict] = {}
    for part in parts:
        for u in part.used:
            if u["path"] in used:
                used[u["path"]]["nmiss"] += u["nmiss"]
            else:
                used[u["path"]] = dict(u)
        for sk in part.skipped:
            skipped.setdefault(sk["path"], sk)
    for path in set(used) & set(skipped):
        logger.warning("%s failed in some spectral slabs only: %s", path, skipped[path]["reason"])
    order = {p: i for i, p in enumerate(paths)}
    return RunSummary(
        used=sorted(used.values(), key=lambda u: u["ctx_id"]),
        skipped=sorted(skipped.values(), key=lambda sk: order.get(sk["path"], -1)),
        not_overlapping=[p for p in paths if p not in used and p not in skipped],
    )


def _drizzle_slabs(paths: list[str], grid: OutputGrid, n_slabs: int, kwargs: dict) -> _SlabbedCube:
    """:func:`drizzle_files` over ``n_slabs`` contiguous ranges of wavelength bins, one
    at a time, so only one slab's accumulators are in memory.

    Every voxel gets exactly the contributions of a whole-grid run, in the same order
    (a slab reads the same box of each image, with the same zodi fit and weight), so
    the outputs are identical; an image is read only for the slabs its bands reach.
    """
    import tempfile

    edges = np.asarray(grid.wave_edges, dtype=np.float64)
    nz = edges.size - 1
    bounds = [(nz * k // n_slabs, nz * (k + 1) // n_slabs) for k in range(n_slabs)]
    footprints = {}  # every slab has the same boxes: find them (and their bands) once
    for path in paths:
        path = os.fspath(path)
        try:
            box = image_footprint(path, grid).bbox
            lim = None if box is None else _box_band_limits(path, box)
        except Exception:  # each slab's run reports the file as a whole-grid run would
            continue
        footprints[path] = (None if box is None else tuple(box), lim)
    tmp = tempfile.TemporaryDirectory(prefix="drizzle3d-slabs-")
    meta: dict[str, tuple] = {}
    ctx, parts, settings = None, [], {}
    fits_token = spherex._ZODI_FITS.set({})  # each box's zodi fit, once for all slabs
    try:
        for k, (z0, z1) in enumerate(bounds):
            sub = OutputGrid(grid.spatial, SpectralGrid(edges[z0 : z1 + 1]))
            own_lo = -math.inf if k == 0 else float(edges[z0])
            token = _SLAB.set(((float(edges[0]), float(edges[-1]), own_lo), footprints))
            try:
                d = drizzle_files(paths, sub, **kwargs)
            finally:
                _SLAB.reset(token)
            for name, arr in d._output_items(plain=True):
                if name == "ctx":
                    ctx = arr.values.copy() if ctx is None else ctx | arr.values
                else:
                    np.save(os.path.join(tmp.name, f"{name}-{k}.npy"), arr.values)
                meta[name] = (arr.dtype, arr.attrs.get("units", ""), arr.attrs.get("long_name"))
                del arr
            parts.append(d.run_summary)
            settings = {
                key: v for key, v in d.run_settings.items() if key not in ("slab", "footprints")
            }
            del d
        summary = _union_summaries(parts, [os.fspath(p) for p in paths])
        whole = _new_cube(grid, settings, len(paths))
        if ctx is not None:
            whole._ctx = ctx
        whole._ctx_ids = [int(u["ctx_id"]) for u in summary.used]
        whole._ctx_id = max(whole._ctx_ids, default=-1) + 1
        whole._n_images = len(summary.used)
        total = 0.0
        for u in summary.used:
            total += u["exptime"]
        whole._total_exptime = total
    except BaseException:
        tmp.cleanup()
        raise
    finally:
        spherex._ZODI_FITS.reset(fits_token)
    return _SlabbedCube(whole, tmp, bounds, meta, summary, settings)


# ---------------------------------------------------------------------------
# drizzle(config)
# ---------------------------------------------------------------------------


def _resolve_inputs(config) -> list[str]:
    inp = config.inputs
    if inp.files:
        return [os.fspath(p) for p in inp.files]
    if inp.glob:
        import glob

        return sorted(glob.glob(os.path.expanduser(inp.glob), recursive=True))
    if inp.query:
        from drizzle3d import archive

        region = (
            (config.region.ra, config.region.dec),
            (config.region.width / 60.0, config.region.height / 60.0),
        )
        table = archive.query_spherex(
            region,
            detectors=config.detectors,
            mjd_range=tuple(inp.query.get("mjd_range") or (None, None)),
            releases=inp.query.get("releases"),
            max_images=inp.query.get("max_images"),
        )
        mode = "mirror" if inp.mirror else config.download.mode
        res = archive.fetch(
            table,
            config.download.dest,
            mode=mode,
            mirror_root=inp.mirror,
            workers=config.download.workers,
            overwrite=config.download.overwrite,
        )
        return [os.fspath(p) for p in res if p is not None]
    raise ValueError("'inputs' must give files, a glob or a query; got none.")


def _detector_of(path: str) -> int | None:
    """DETECTOR keyword of a file's IMAGE header (None if unreadable)."""
    from astropy.io import fits

    try:
        with fits.open(path, memmap=True, lazy_load_hdus=True) as hdul:
            return int(hdul["IMAGE"].header["DETECTOR"])
    except (OSError, KeyError, ValueError, TypeError, IndexError):
        return None


def _config_kwargs(config) -> dict[str, Any]:
    c = config.drizzle
    return {
        "kernel": c.kernel, "pixfrac": c.pixfrac, "wave_pixfrac": c.wave_pixfrac,
        "weighting": c.weighting, "ivar_max": c.ivar_max, "min_overlap": c.min_overlap,
        "exclude_flags": list(c.exclude_flags), "zodi": c.zodi,
    }  # fmt: skip


def drizzle(config, *, progress: Callable | None = None) -> dict[str, Path]:
    """Run the whole pipeline of a :class:`~drizzle3d.config.Drizzle3DConfig`.

    Inputs are resolved (files, glob, or archive query + download/mirror), then
    :func:`drizzle_files` runs once per detector and each cube is written to
    ``output.directory`` as ``<prefix>_D<n>.<ext>`` in every requested format.
    ``workers``/``scheduler`` choose the parallel back-end; with
    ``output.update`` (or ``output.checkpoint_every``) the accumulator state is
    kept in ``<prefix>_D<n>.state.zarr`` and a later (or restarted) run adds
    only the images not yet included; with ``output.tile_size`` the cube is
    drizzled tile by tile into ``<prefix>_D<n>.zarr`` (:func:`drizzle_tiled`). With
    ``all_band``, one more cube of all the detectors' images on a constant-R grid
    (:meth:`~drizzle3d.config.Drizzle3DConfig.all_band_grid`) is written as
    ``<prefix>_all.<ext>`` (key ``"all.<ext>"``). A
    FITS-only cube whose accumulators would exceed :data:`SLAB_STATE_BYTES` is
    drizzled one range of wavelength bins at a time (the same file, a fraction of
    the memory).

    Parameters
    ----------
    config : Drizzle3DConfig
        The run configuration.
    progress : callable, optional
        tqdm-like wrapper.

    Returns
    -------
    dict
        ``{"D3.fits": Path, ...}``: every file written.

    Raises
    ------
    ValueError
        If no input is found.

    Examples
    --------
    >>> import tempfile
    >>> from drizzle3d.config import Drizzle3DConfig
    >>> from drizzle3d.simulate import simulate_field
    >>> f = simulate_field(tempfile.mkdtemp(), n_exposures=1, shape=(32, 32))
    >>> config = Drizzle3DConfig.from_dict({
    ...     "region": {"ra": 150.0, "dec": 2.0, "width": 1.0},
    ...     "inputs": {"files": [str(p) for p in f.paths]},
    ...     "drizzle": {"zodi": "static"},
    ...     "output": {"directory": tempfile.mkdtemp(), "formats": ["fits"]},
    ... })
    >>> {key: path.name for key, path in drizzle(config).items()}
    {'D3.fits': 'cube_D3.fits'}
    """
    paths = _resolve_inputs(config)
    if not paths:
        raise ValueError("'inputs' matched no files.")
    out_dir = Path(config.output.directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_det: dict[int, list[str]] = {}
    unreadable = []
    for p in paths:
        det = _detector_of(p)
        if det is None:
            unreadable.append(p)
        else:
            by_det.setdefault(det, []).append(p)
    written: dict[str, Path] = {}
    for det in config.detector_list():
        if not by_det.get(det):
            logger.warning("no input files for detector D%d", det)
            continue
        grid = config.grid(det)
        files = by_det[det] + unreadable
        written.update(_make_cube(config, files, grid, f"D{det}", det, out_dir, progress))
    if config.all_band:
        files = [p for det in config.detector_list() for p in by_det.get(det, [])]
        if files:
            label = ",".join(f"D{d}" for d in config.detector_list() if by_det.get(d))
            grid = config.all_band_grid()
            files += unreadable
            written.update(_make_cube(config, files, grid, "all", label, out_dir, progress))
        else:
            logger.warning("no input files for the all-band cube")
    return written


def _make_cube(config, files, grid, name, detector, out_dir, progress) -> dict[str, Path]:
    """One cube of :func:`drizzle` (a detector's, or the all-band one) in every format."""
    from drizzle3d.io import save_cube

    out = config.output
    n_workers = config.workers or None
    if out.tile_size:
        target = out_dir / f"{out.prefix}_{name}.zarr"
        return {f"{name}.zarr": drizzle_tiled(
            files, grid, target, tile_shape=out.tile_size, n_workers=n_workers,
            overwrite=out.overwrite, progress=progress, **_config_kwargs(config),
        )}  # fmt: skip
    sched = config.scheduler
    parallel = {
        "n_workers": n_workers,
        "executor": "processes" if sched == "processes" else "threads",
        "client": sched if sched not in (None, "threads", "processes") else None,
    }
    state = out_dir / f"{out.prefix}_{name}.state.zarr"
    keep_state = out.update or out.checkpoint_every > 0
    n_slabs = _n_slabs(grid)
    if (
        n_slabs > 1
        and list(out.formats) == ["fits"]
        and not keep_state
        and not (config.outliers.enabled)
    ):
        # a FITS cube is written output by output: drizzle it slab by slab too, so
        # memory stays near SLAB_STATE_BYTES whatever the grid
        target = out_dir / f"{out.prefix}_{name}.fits"
        kwargs = {"progress": progress, **parallel, **_config_kwargs(config)}
        cube = _drizzle_slabs(files, grid, n_slabs, kwargs)
        try:
            save_cube(cube, target, "fits", overwrite=out.overwrite,
                      attrs=_run_attrs(cube, detector))  # fmt: skip
        finally:
            cube.close()
        return {f"{name}.fits": target}
    resume = state if keep_state and state.exists() else None
    d = drizzle_files(
        files, grid, outliers=config.outliers.to_dict(), progress=progress,
        resume=resume, duplicates="skip" if resume is not None else "error",
        checkpoint=state if keep_state else None, checkpoint_every=out.checkpoint_every,
        **parallel, **_config_kwargs(config),
    )  # fmt: skip
    attrs = _run_attrs(d, detector)
    ds = None
    written = {}
    for fmt in out.formats:
        ext = {"fits": "fits", "netcdf": "nc", "zarr": "zarr"}[fmt]
        target = out_dir / f"{out.prefix}_{name}.{ext}"
        if fmt == "fits":  # streamed from the accumulators, one output at a time
            cube = d
        else:
            ds = cube_dataset(d, detector=detector) if ds is None else ds
            cube = ds
        save_cube(cube, target, fmt, overwrite=out.overwrite or resume is not None,
                  attrs=attrs)  # fmt: skip
        written[f"{name}.{ext}"] = target
    return written


# ---------------------------------------------------------------------------
# spectra
# ---------------------------------------------------------------------------


def _subgrid(ds: xr.Dataset, y0: int, y1: int, x0: int, x1: int) -> OutputGrid:
    from astropy.io import fits

    spatial = SpatialGrid.from_header(fits.Header.fromstring(ds.attrs["wcs"]))
    w = spatial.wcs.slice((slice(y0, y1), slice(x0, x1)))
    edges = np.concatenate([ds["wavelength_min"].values, ds["wavelength_max"].values[-1:]])
    return OutputGrid(SpatialGrid(w, (y1 - y0, x1 - x0)), SpectralGrid(edges))


def _exact_aperture_variance(ds, aper, y0, y1, x0, x1) -> np.ndarray | None:
    """Exact per-bin variance of the aperture sums of ``sci`` via ``Drizzle3D.transpose``."""
    try:
        inputs = json.loads(ds.attrs["inputs"])
        weighting = ds.attrs.get("pipeline_weighting", ds.attrs["weighting"])
        exclude = int(ds.attrs.get("exclude_flags", 0))
        zodi = ds.attrs.get("zodi", "fit")
    except (KeyError, TypeError, ValueError):
        return None
    if not inputs or any(not os.path.isfile(i["path"]) for i in inputs):
        return None
    sub = _subgrid(ds, y0, y1, x0, x1)
    d = Drizzle3D(
        sub,
        kernel=ds.attrs["kernel"],
        pixfrac=float(ds.attrs["pixfrac"]),
        wave_pixfrac=float(ds.attrs["wave_pixfrac"]),
        weighting=_core_weighting(weighting),
        ivar_max=float(ds.attrs.get("ivar_max", math.inf)),
        min_overlap=float(ds.attrs.get("min_overlap", 0.0)),
        exclude_flags=exclude,
        disable_ctx=True,
        track_wave=False,
    )
    wht = np.asarray(ds["wht"].values[:, y0:y1, x0:x1], dtype=np.float64)
    inv = np.zeros_like(wht)
    np.divide(1.0, wht, out=inv, where=wht > 0)
    nz = wht.shape[0]
    total = np.zeros(nz)
    for rec in inputs:
        fp = image_footprint(rec["path"], sub)
        if fp.bbox is None:
            continue
        run_box = BBox(*rec["bbox"])
        box = BBox(
            max(fp.bbox.xmin, run_box.xmin), min(fp.bbox.xmax, run_box.xmax),
            max(fp.bbox.ymin, run_box.ymin), min(fp.bbox.ymax, run_box.ymax),
        )  # fmt: skip
        if box.xmax - box.xmin < 1 or box.ymax - box.ymin < 1:
            continue
        im = read_image_box(rec["path"], box, zodi=zodi)
        pixmap = calc_pixmap(im.wcs, sub.spatial.wcs, im.shape)
        wavemap = im.wavemap()
        var = np.asarray(im.var, dtype=np.float64)
        for k in range(nz):
            cube = np.zeros(wht.shape)
            cube[k] = aper * inv[k]
            if not cube[k].any():
                continue
            c = d.transpose(
                cube, im.var, im.flags, pixmap, wavemap,
                wht_scale=rec["wht_scale"], exptime=rec.get("exptime", 1.0),
            )  # fmt: skip
            ok = c != 0
            total[k] += float(np.sum(c[ok] ** 2 * var[ok]))
    return total


def extract_spectrum(
    ds: xr.Dataset,
    ra: float,
    dec: float,
    radius: float | None = None,
    *,
    errors: str = "auto",
) -> xr.Dataset:
    """Spectrum at a sky position, with honestly propagated uncertainties.

    Parameters
    ----------
    ds : xarray.Dataset
        A cube (from :func:`cube_dataset` or :func:`drizzle3d.io.load_cube`).
    ra, dec : float
        Position (deg).
    radius : float, optional
        Aperture radius (arcsec). ``None``: the single spaxel containing the
        position, in surface brightness (MJy/sr). With a radius: the sum over the
        spaxels whose centres are within ``radius``, times the spaxel solid
        angle, as flux density in mJy.
    errors : {"auto", "exact", "naive"}, optional
        ``"exact"``: aperture variance with covariances, from the inputs recorded
        in ``ds.attrs["inputs"]`` via ``Drizzle3D.transpose`` (see module notes);
        ``"naive"``: the sum of voxel variances (understates aperture errors);
        ``"auto"`` (default): exact when the inputs are readable, else naive
        with a warning. A single spaxel's variance is always exact.

    Returns
    -------
    xarray.Dataset
        Dim ``wavelength``; variables ``flux``, ``error``, ``wave_eff`` (the
        effective wavelength of each point, weighted like the flux, um),
        ``npix`` (spaxels with data in the aperture); ``attrs["error_method"]``
        and ``attrs["units"]``. Points without full coverage are NaN.

    Raises
    ------
    ValueError
        If the position is off the cube or ``errors`` is invalid.

    Examples
    --------
    >>> import tempfile
    >>> from drizzle3d.simulate import simulate_field
    >>> from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid
    >>> f = simulate_field(tempfile.mkdtemp(), n_exposures=1, shape=(32, 32))
    >>> grid = OutputGrid(SpatialGrid.from_center(150.0, 2.0, 1.0, 1.0), SpectralGrid.native(3))
    >>> ds = cube_dataset(drizzle_files(f.paths, grid, zodi="static"), detector=3)
    >>> spec = extract_spectrum(ds, 150.0, 2.0)  # the spaxel at the position, MJy/sr
    >>> spec.flux.dims, spec.attrs["units"], spec.attrs["error_method"]
    (('wavelength',), 'MJy/sr', 'exact (single spaxel)')
    >>> extract_spectrum(ds, 151.0, 2.0)
    Traceback (most recent call last):
    ...
    ValueError: 'ra', 'dec' must fall on the cube; got (151.0, 2.0) at pixel (...).
    """
    if errors not in ("auto", "exact", "naive"):
        raise ValueError(f"'errors' must be 'auto', 'exact' or 'naive'; got {errors!r}.")
    from astropy.io import fits
    from astropy.wcs import WCS

    if "wcs" not in ds.attrs:
        raise ValueError("'ds' must carry its celestial WCS in attrs['wcs']; got none.")
    wcs = WCS(fits.Header.fromstring(ds.attrs["wcs"])).celestial
    ny, nx = ds.sizes["y"], ds.sizes["x"]
    xc, yc = (float(v) for v in wcs.world_to_pixel_values(ra, dec))
    if not (-0.5 <= xc < nx - 0.5 and -0.5 <= yc < ny - 0.5):
        raise ValueError(
            f"'ra', 'dec' must fall on the cube; got ({ra}, {dec}) at pixel ({xc:.1f}, {yc:.1f})."
        )
    sci = np.asarray(ds["sci"].values, dtype=np.float64)
    var = np.asarray(ds["var"].values, dtype=np.float64)
    wave = np.asarray(ds["wave"].values) if "wave" in ds else None
    centres = np.asarray(ds["wavelength"].values)
    if radius is None:
        iy, ix = round(yc), round(xc)
        flux = sci[:, iy, ix]
        err = np.sqrt(var[:, iy, ix])
        weff = wave[:, iy, ix] if wave is not None else centres.copy()
        npix = np.isfinite(flux).astype(int)
        method = "exact (single spaxel)"
        units = ds["sci"].attrs.get("units", "MJy/sr")
    else:
        scale = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix)))) * 3600.0
        r_pix = float(radius) / scale
        half = math.ceil(r_pix) + 1
        y0, y1 = max(0, round(yc) - half), min(ny, round(yc) + half + 1)
        x0, x1 = max(0, round(xc) - half), min(nx, round(xc) + half + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        aper = np.hypot(xx - xc, yy - yc) <= r_pix
        s = sci[:, y0:y1, x0:x1]
        v = var[:, y0:y1, x0:x1]
        full = np.all(np.isfinite(s[:, aper]), axis=1)
        npix = np.sum(np.isfinite(s[:, aper]), axis=1)
        omega = (scale**2) * _ARCSEC2_TO_SR * 1e9  # MJy/sr -> mJy per spaxel
        flux = np.where(full, np.nansum(s[:, aper], axis=1) * omega, np.nan)
        naive = np.where(full, np.nansum(v[:, aper], axis=1), np.nan)
        exact = None
        if errors in ("auto", "exact"):
            exact = _exact_aperture_variance(ds, aper.astype(float), y0, y1, x0, x1)
            if exact is None and errors == "exact":
                raise ValueError(
                    "'errors'='exact' needs the input files recorded in ds.attrs['inputs']; "
                    "they are missing or unreadable."
                )
        if exact is None:
            logger.warning(
                "aperture errors are the naive sum of voxel variances (inputs not available): "
                "they understate the true error because drizzled voxels are correlated"
            )
            err = np.sqrt(naive) * omega
            method = "naive (sum of voxel variances; correlations ignored)"
        else:
            err = np.where(full, np.sqrt(exact) * omega, np.nan)
            method = "exact (transpose of the drizzle operator; covariances included)"
        if wave is not None:
            wv = wave[:, y0:y1, x0:x1][:, aper]
            wgt = np.clip(np.nan_to_num(s[:, aper]), 0.0, None)
            norm = wgt.sum(axis=1)
            nfin = np.isfinite(wv).sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                plain = np.where(nfin > 0, np.nansum(wv, axis=1) / nfin, np.nan)
                weighted = np.nansum(wgt * np.nan_to_num(wv), axis=1) / norm
            weff = np.where(norm > 0, weighted, plain)
            weff = np.where(full, weff, np.nan)
        else:
            weff = centres.copy()
        units = "mJy"
    import xarray as xr

    out = xr.Dataset(
        {
            "flux": ("wavelength", np.asarray(flux, dtype=float), {"units": units}),
            "error": ("wavelength", np.asarray(err, dtype=float), {"units": units}),
            "wave_eff": (
                "wavelength",
                np.asarray(weff, dtype=float),
                {"units": "um", "long_name": "effective wavelength"},
            ),
            "npix": ("wavelength", np.asarray(npix)),
        },
        coords={"wavelength": ("wavelength", centres, {"units": "um"})},
        attrs={
            "ra": float(ra),
            "dec": float(dec),
            "radius_arcsec": -1.0 if radius is None else float(radius),
            "error_method": method,
            "units": units,
        },
    )
    return out
