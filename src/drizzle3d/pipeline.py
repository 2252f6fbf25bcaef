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

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from drizzle3d.channels import detector_range
from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid
from drizzle3d.pixmap import BBox, calc_pixmap, footprint_bbox
from drizzle3d.resample import Drizzle3D
from drizzle3d.spherex import (
    DEFAULT_EXCLUDE_FLAGS,
    SpherexFileError,
    flag_bits,
    read_spherex,
)

__all__ = [
    "PIPELINE_WEIGHTINGS",
    "ZODI_MODES",
    "ImageFootprint",
    "PreparedImage",
    "RunSummary",
    "drizzle",
    "drizzle_files",
    "extract_spectrum",
    "image_footprint",
    "image_maps",
    "image_weights",
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

    Attributes
    ----------
    used : list of dict
        One entry per drizzled file: ``path``, ``obsid``, ``detector``, ``bbox``
        (inclusive ``[xmin, xmax, ymin, ymax]`` of the pixels read), ``wht_scale``,
        ``zodi_scale``, ``ctx_id``, ``nmiss``.
    skipped : list of dict
        ``{"path", "reason"}`` for each file that could not be used.
    not_overlapping : list of str
        Files whose footprint (or wavelength range) misses the grid.
    """

    used: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    not_overlapping: list = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Return the number of inputs used, skipped and not overlapping."""
        return {
            "used": len(self.used),
            "skipped": len(self.skipped),
            "not_overlapping": len(self.not_overlapping),
        }

    def reasons(self) -> dict[str, int]:
        """Return skipped-file counts per reason (first clause of the message)."""
        out: dict[str, int] = {}
        for item in self.skipped:
            key = str(item["reason"]).split(" (")[0].split(":")[0]
            out[key] = out.get(key, 0) + 1
        return out

    def merge(self, other: RunSummary) -> RunSummary:
        """Append another partial run's records (for map/reduce runs)."""
        self.used.extend(other.used)
        self.skipped.extend(other.skipped)
        self.not_overlapping.extend(other.not_overlapping)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict (``counts``, ``reasons``, and the three lists)."""
        return {
            "counts": self.counts(),
            "reasons": self.reasons(),
            "used": [dict(u) for u in self.used],
            "skipped": [dict(s) for s in self.skipped],
            "not_overlapping": list(self.not_overlapping),
        }

    @classmethod
    def from_dict(cls, data: dict) -> RunSummary:
        """Rebuild from :meth:`to_dict` output."""
        return cls(
            used=list(data.get("used", [])),
            skipped=list(data.get("skipped", [])),
            not_overlapping=list(data.get("not_overlapping", [])),
        )

    def text(self) -> str:
        """Return a one-paragraph human summary."""
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
    """Header-level facts of one input file and the box of it that reaches the grid."""

    path: str
    detector: int
    shape: tuple
    bbox: BBox | None
    wcs: Any = field(repr=False, default=None)


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """Everything ``add_image`` needs for one file's box."""

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
        """Keyword arguments of ``add_image`` / ``transpose`` besides the arrays."""
        return {"wht_scale": self.wht_scale, "exptime": self.exptime}


# ---------------------------------------------------------------------------
# step functions
# ---------------------------------------------------------------------------


def _header_wcs(path: str):
    """Detector, shape and celestial WCS of a Level-2 file, from its IMAGE header only."""
    from astropy.io import fits

    from drizzle3d import spherex

    if not os.path.isfile(path):
        raise SpherexFileError(path, "no such file.")
    try:
        with fits.open(path, memmap=True, lazy_load_hdus=True) as hdul:
            hdr = hdul["IMAGE"].header
            shape = (int(hdr["NAXIS2"]), int(hdr["NAXIS1"]))
            det = int(hdr["DETECTOR"])
            wcs = spherex._celestial_wcs(hdr)
    except SpherexFileError:
        raise
    except (OSError, KeyError, ValueError, TypeError, IndexError) as err:
        raise SpherexFileError(path, f"unreadable header ({err}).") from err
    return det, shape, wcs


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
    return ImageFootprint(path, det, shape, box, wcs)


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

    Raises
    ------
    drizzle3d.spherex.SpherexFileError
        If the file cannot be read.
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
    try:
        prep = prepare_image(
            path,
            grid,
            weighting=settings["weighting"],
            exclude_mask=settings["exclude_mask"],
            zodi=settings["zodi"],
            fast_pixmap=settings["fast_pixmap"],
        )
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


def _add_one(d: Drizzle3D, prep: PreparedImage, ctx_id: int, flags=None) -> dict:
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


def drizzle_partial(
    items: Iterable[tuple[int, str]],
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
    items = list(items)
    d = _new_cube(grid, settings, n_inputs)
    summary = RunSummary()
    for ctx_id, path in progress(items, desc="images", unit="img"):
        prep, rec = _map_one(path, ctx_id, grid, settings)
        if prep is not None:
            summary.used.append(_add_one(d, prep, ctx_id))
        else:
            _record(summary, rec)
    return d, summary


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
    progress: Callable | None = None,
) -> Drizzle3D:
    """Drizzle SPHEREx files onto a grid; bad files are reported and skipped.

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
        :func:`drizzle3d.blot.find_outliers` flags outliers before drizzling.
    progress : callable, optional
        tqdm-like wrapper (``progress(iterable, desc=..., unit=...)``).

    Returns
    -------
    Drizzle3D
        The filled cube, with ``run_summary`` (:class:`RunSummary`) and
        ``run_settings`` (dict) attributes.

    Raises
    ------
    ValueError
        On invalid settings.

    Examples
    --------
    >>> import tempfile
    >>> from drizzle3d.simulate import simulate_field
    >>> from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid
    >>> f = simulate_field(tempfile.mkdtemp(), n_exposures=2, shape=(64, 64))
    >>> grid = OutputGrid(SpatialGrid.from_center(150.0, 2.0, 2, 2), SpectralGrid.native(3))
    >>> d = drizzle_files(f.paths, grid)
    >>> d.run_summary.counts()
    {'used': 2, 'skipped': 0, 'not_overlapping': 0}
    """
    if not isinstance(grid, OutputGrid):
        raise TypeError(f"'grid' must be an OutputGrid; got {type(grid).__name__}.")
    _check_options(weighting, zodi)
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
    items = list(enumerate(paths))
    if outl.get("enabled"):
        d, summary = _run_with_outliers(items, grid, settings, len(paths), progress)
    else:
        d, summary = drizzle_partial(items, grid, settings, len(paths), progress)
    d.run_summary = summary
    d.run_settings = settings
    level = logging.WARNING if summary.skipped else logging.INFO
    logger.log(level, "run summary: %s", summary.text())
    return d


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
    summary = getattr(d, "run_summary", None)
    settings = getattr(d, "run_settings", None)
    if summary is not None:
        sd = summary.to_dict()
        ds.attrs["run_summary"] = json.dumps(
            {k: sd[k] for k in ("counts", "reasons", "skipped", "not_overlapping")}
        )
        ds.attrs["inputs"] = json.dumps(sd["used"])
    if settings is not None:
        ds.attrs["pipeline_weighting"] = settings["weighting"]
        ds.attrs["exclude_flags"] = int(settings["exclude_mask"])
        ds.attrs["zodi"] = settings["zodi"]
        ds.attrs["ivar_max"] = float(settings["ivar_max"])
        ds.attrs["min_overlap"] = float(settings["min_overlap"])
    if detector is not None:
        ds.attrs["detector"] = str(detector)
    return ds


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


def drizzle(config, *, progress: Callable | None = None) -> dict[str, Path]:
    """Run the whole pipeline of a :class:`~drizzle3d.config.Drizzle3DConfig`.

    Inputs are resolved (files, glob, or archive query + download/mirror), then
    :func:`drizzle_files` runs once per detector and each cube is written to
    ``output.directory`` as ``<prefix>_D<n>.<ext>`` in every requested format.

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
    """
    from drizzle3d.io import save_cube

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
        files = by_det.get(det, []) + unreadable
        if not by_det.get(det):
            logger.warning("no input files for detector D%d", det)
            continue
        grid = config.grid(det)
        d = drizzle_files(
            files,
            grid,
            kernel=config.drizzle.kernel,
            pixfrac=config.drizzle.pixfrac,
            wave_pixfrac=config.drizzle.wave_pixfrac,
            weighting=config.drizzle.weighting,
            ivar_max=config.drizzle.ivar_max,
            min_overlap=config.drizzle.min_overlap,
            exclude_flags=list(config.drizzle.exclude_flags),
            zodi=config.drizzle.zodi,
            outliers=config.outliers.to_dict(),
            progress=progress,
        )
        ds = cube_dataset(d, detector=det)
        for fmt in config.output.formats:
            ext = {"fits": "fits", "netcdf": "nc", "zarr": "zarr"}[fmt]
            target = out_dir / f"{config.output.prefix}_D{det}.{ext}"
            save_cube(ds, target, fmt, overwrite=config.output.overwrite)
            written[f"D{det}.{ext}"] = target
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
