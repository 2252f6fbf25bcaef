"""Run configuration: a validated, YAML round-trippable :class:`Drizzle3DConfig`.

A configuration is a tree of frozen dataclasses. :meth:`Drizzle3DConfig.from_dict`
(and :meth:`~Drizzle3DConfig.from_yaml`) reject unknown keys, naming the key and
the allowed ones, and bad values, naming the key and the allowed values;
:meth:`~Drizzle3DConfig.to_yaml` writes every field so that
``Drizzle3DConfig.from_yaml(c.to_yaml()) == c`` exactly (floats are written in
their shortest exact form; explicit spectral edges survive bit for bit).

Examples
--------
>>> from drizzle3d.config import Drizzle3DConfig
>>> c = Drizzle3DConfig.from_dict({"region": {"ra": 150.0, "dec": 2.0, "width": 10.0}})
>>> c.region.height, c.drizzle.weighting
(10.0, 'background')
>>> Drizzle3DConfig.from_yaml(c.to_yaml()) == c
True
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drizzle3d._flags import DEFAULT_EXCLUDE_FLAGS, FLAG_TABLE

__all__ = [
    "EXAMPLE_YAML",
    "DownloadConfig",
    "Drizzle3DConfig",
    "DrizzleConfig",
    "InputsConfig",
    "OutliersConfig",
    "OutputConfig",
    "RegionConfig",
    "SpectralConfig",
]

KERNELS = ("square", "turbo", "point", "gaussian", "lanczos2", "lanczos3", "bilinear")
WEIGHTINGS = ("background", "ivm", "exptime", "uniform")
ZODI = ("none", "static", "fit")
SPECTRAL_MODES = ("native", "oversampled", "constant_r", "edges")
FORMATS = ("fits", "netcdf", "zarr")
DOWNLOAD_MODES = ("full", "cutout")
_DEFAULT_EXCLUDE = DEFAULT_EXCLUDE_FLAGS


# ---------------------------------------------------------------------------
# validation helpers (messages: "'<key>' must <expectation>; got <actual>.")
# ---------------------------------------------------------------------------


def _num(key, value, *, low=None, high=None, low_open=False, allow_inf=False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"'{key}' must be a number; got {value!r}.")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"'{key}' must be finite; got {value!r}.")
    if low is not None and (value <= low if low_open else value < low):
        op = ">" if low_open else ">="
        raise ValueError(f"'{key}' must be {op} {low}; got {value!r}.")
    if high is not None and value > high:
        raise ValueError(f"'{key}' must be <= {high}; got {value!r}.")
    return value


def _int(key, value, *, low=None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"'{key}' must be an integer; got {value!r}.")
    if low is not None and value < low:
        raise ValueError(f"'{key}' must be >= {low}; got {value!r}.")
    return int(value)


def _choice(key, value, allowed) -> str:
    if not isinstance(value, str) or value.lower() not in allowed:
        raise ValueError(f"'{key}' must be one of {list(allowed)}; got {value!r}.")
    return value.lower()


def _opt_str(key, value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike):
        raise TypeError(f"'{key}' must be a string or null; got {value!r}.")
    return os.fspath(value)


def _bool(key, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"'{key}' must be true or false; got {value!r}.")
    return value


def _check_keys(section: str, data, cls) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TypeError(f"'{section}' must be a mapping; got {type(data).__name__}.")
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in allowed:
            where = f"{section}.{key}" if section else str(key)
            raise ValueError(f"'{where}' is not a known key; allowed keys are {allowed}.")
    return dict(data)


class _Section:
    """Mixin: dict round trip of a flat section."""

    _name = ""

    @classmethod
    def from_dict(cls, data: dict | None):
        """Build the section from a mapping (unknown keys rejected)."""
        return cls(**_check_keys(cls._name, data, cls))

    def to_dict(self) -> dict[str, Any]:
        """Return the section as a plain dict."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


# ---------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionConfig(_Section):
    """Sky region: centre (deg), width and height (arcmin), rotation (deg E of N).

    Parameters
    ----------
    ra, dec : float, optional
        Centre (deg).
    width : float, optional
        Size along x (arcmin, > 0).
    height : float or None, optional
        Size along y (arcmin, > 0); default ``width``.
    rotation : float, optional
        Position angle of +y (deg east of north).

    Raises
    ------
    ValueError, TypeError
        If a value is not a number or out of range (the message names the key).

    Examples
    --------
    >>> RegionConfig(ra=10.0, dec=-45.0, width=4.0)
    RegionConfig(ra=10.0, dec=-45.0, width=4.0, height=4.0, rotation=0.0)
    >>> RegionConfig(width=0)
    Traceback (most recent call last):
    ...
    ValueError: 'region.width' must be > 0; got 0.0.
    """

    ra: float = 150.0
    dec: float = 2.0
    width: float = 30.0
    height: float | None = None
    rotation: float = 0.0
    _name = "region"

    def __post_init__(self):
        object.__setattr__(self, "ra", _num("region.ra", self.ra, low=-360.0, high=360.0))
        object.__setattr__(self, "dec", _num("region.dec", self.dec, low=-90.0, high=90.0))
        object.__setattr__(self, "width", _num("region.width", self.width, low=0, low_open=True))
        h = self.width if self.height is None else self.height
        object.__setattr__(self, "height", _num("region.height", h, low=0, low_open=True))
        object.__setattr__(self, "rotation", _num("region.rotation", self.rotation))


@dataclass(frozen=True)
class SpectralConfig(_Section):
    """Spectral grid: ``native``, ``oversampled`` (``factor``), ``constant_r`` or ``edges``.

    Parameters
    ----------
    mode : {"native", "oversampled", "constant_r", "edges"}, optional
        How the wavelength bins are made (see :meth:`build`).
    factor : float, optional
        ``oversampled``: bins per native channel width.
    resolving_power : float, optional
        ``constant_r``: ``lambda / dlambda`` of every bin.
    lam_min, lam_max : float or None, optional
        ``constant_r`` range (um); default the detector's.
    edges : sequence of float or None, optional
        ``edges``: explicit, strictly increasing bin edges (um).

    Raises
    ------
    ValueError, TypeError
        On an unknown mode, a bad number, non-increasing edges, or
        ``mode="edges"`` without edges.

    Examples
    --------
    >>> SpectralConfig(mode="edges", edges=[1.7, 1.8, 1.9]).edges
    (1.7, 1.8, 1.9)
    >>> SpectralConfig(mode="edges")
    Traceback (most recent call last):
    ...
    ValueError: 'spectral.edges' must be given when spectral.mode is 'edges'; got null.
    """

    mode: str = "native"
    factor: float = 2.0
    resolving_power: float = 80.0
    lam_min: float | None = None
    lam_max: float | None = None
    edges: tuple | None = None
    _name = "spectral"

    def __post_init__(self):
        mode = _choice("spectral.mode", self.mode, SPECTRAL_MODES)
        object.__setattr__(self, "mode", mode)
        object.__setattr__(
            self, "factor", _num("spectral.factor", self.factor, low=0, low_open=True)
        )
        object.__setattr__(
            self,
            "resolving_power",
            _num("spectral.resolving_power", self.resolving_power, low=0.5, low_open=True),
        )
        for key in ("lam_min", "lam_max"):
            v = getattr(self, key)
            if v is not None:
                object.__setattr__(self, key, _num(f"spectral.{key}", v, low=0, low_open=True))
        if self.edges is not None:
            if not isinstance(self.edges, list | tuple) or len(self.edges) < 2:
                raise ValueError(
                    f"'spectral.edges' must be a list of >= 2 wavelengths (um); got {self.edges!r}."
                )
            e = tuple(_num("spectral.edges", v, low=0, low_open=True) for v in self.edges)
            if any(b <= a for a, b in itertools.pairwise(e)):
                raise ValueError(f"'spectral.edges' must be strictly increasing; got {list(e)}.")
            object.__setattr__(self, "edges", e)
        elif mode == "edges":
            raise ValueError(
                "'spectral.edges' must be given when spectral.mode is 'edges'; got null."
            )

    def build(self, detector: int):
        """Return the :class:`~drizzle3d.grid.SpectralGrid` for ``detector``.

        Parameters
        ----------
        detector : int
            SPHEREx detector, 1..6 (sets the native channels and default range).

        Returns
        -------
        drizzle3d.grid.SpectralGrid
            The wavelength bins of that detector's cube.

        Examples
        --------
        >>> g = SpectralConfig(mode="edges", edges=[1.7, 1.8, 1.9]).build(3)
        >>> g.edges.tolist()
        [1.7, 1.8, 1.9]
        >>> import numpy as np
        >>> r40 = SpectralConfig(mode="constant_r", resolving_power=40.0).build(1)
        >>> float(r40.edges[0]), bool(np.allclose(r40.resolving_power, 40.0))
        (0.743, True)
        """
        from drizzle3d.channels import detector_range
        from drizzle3d.grid import SpectralGrid

        if self.mode == "native":
            return SpectralGrid.native(detector)
        if self.mode == "oversampled":
            return SpectralGrid.oversampled(detector, self.factor)
        if self.mode == "edges":
            return SpectralGrid(list(self.edges))
        lo, hi = detector_range(detector)
        return SpectralGrid.constant_r(self.lam_min or lo, self.lam_max or hi, self.resolving_power)


@dataclass(frozen=True)
class DrizzleConfig(_Section):
    """Drizzle settings (see :class:`drizzle3d.Drizzle3D` and :func:`drizzle_files`).

    Parameters
    ----------
    kernel : str, optional
        One of ``square``, ``turbo``, ``point``, ``gaussian``, ``lanczos2``,
        ``lanczos3``, ``bilinear``.
    pixfrac, wave_pixfrac : float, optional
        Spatial and spectral drop shrink factors, in (0, 1].
    weighting : {"background", "ivm", "exptime", "uniform"}, optional
        Weight of each input pixel.
    ivar_max : float, optional
        Cap on inverse-variance weights (``ivm``); default no cap.
    min_overlap : float, optional
        Drop voxel overlaps below this fraction of a pixel's volume, in [0, 1).
    exclude_flags : sequence of str, optional
        Flag names whose pixels are not drizzled (upper-cased; SOURCE is kept
        by default).
    zodi : {"none", "static", "fit"}, optional
        Zodiacal-light subtraction.

    Raises
    ------
    ValueError, TypeError
        On an unknown choice or flag name, or a number out of range.

    Examples
    --------
    >>> DrizzleConfig(kernel="Turbo", exclude_flags=["hot", "cold"]).exclude_flags
    ('HOT', 'COLD')
    >>> DrizzleConfig(pixfrac=1.5)
    Traceback (most recent call last):
    ...
    ValueError: 'drizzle.pixfrac' must be <= 1; got 1.5.
    """

    kernel: str = "square"
    pixfrac: float = 1.0
    wave_pixfrac: float = 1.0
    weighting: str = "background"
    ivar_max: float = math.inf
    min_overlap: float = 0.0
    exclude_flags: tuple = _DEFAULT_EXCLUDE
    zodi: str = "fit"
    _name = "drizzle"

    def __post_init__(self):
        object.__setattr__(self, "kernel", _choice("drizzle.kernel", self.kernel, KERNELS))
        object.__setattr__(
            self, "pixfrac", _num("drizzle.pixfrac", self.pixfrac, low=0, low_open=True, high=1)
        )
        object.__setattr__(
            self,
            "wave_pixfrac",
            _num("drizzle.wave_pixfrac", self.wave_pixfrac, low=0, low_open=True, high=1),
        )
        object.__setattr__(
            self, "weighting", _choice("drizzle.weighting", self.weighting, WEIGHTINGS)
        )
        object.__setattr__(
            self,
            "ivar_max",
            _num("drizzle.ivar_max", self.ivar_max, low=0, low_open=True, allow_inf=True),
        )
        mo = _num("drizzle.min_overlap", self.min_overlap, low=0)
        if mo >= 1:
            raise ValueError(f"'drizzle.min_overlap' must be < 1; got {mo!r}.")
        object.__setattr__(self, "min_overlap", mo)
        flags = self.exclude_flags
        if isinstance(flags, str) or not isinstance(flags, list | tuple):
            raise TypeError(f"'drizzle.exclude_flags' must be a list of flag names; got {flags!r}.")
        names = []
        for n in flags:
            key = str(n).strip().upper()
            if key not in FLAG_TABLE:
                raise ValueError(
                    f"'drizzle.exclude_flags' must hold flag names from {sorted(FLAG_TABLE)}; "
                    f"got {n!r}."
                )
            names.append(key)
        object.__setattr__(self, "exclude_flags", tuple(names))
        object.__setattr__(self, "zodi", _choice("drizzle.zodi", self.zodi, ZODI))


@dataclass(frozen=True)
class OutliersConfig(_Section):
    """Outlier rejection (:func:`drizzle3d.blot.find_outliers`): off by default.

    ``snr`` and ``scale`` are the (first pass, second pass) thresholds of
    drizzlepac's ``driz_cr``; ``grow`` dilates the flagged pixels.

    Parameters
    ----------
    enabled : bool, optional
        Run outlier rejection.
    snr : float or pair of float, optional
        Signal-to-noise thresholds (first, second pass); one number is used twice.
    scale : float or pair of float, optional
        Derivative scales (first, second pass).
    grow : int, optional
        Dilate flagged pixels by this many pixels (>= 0).

    Raises
    ------
    ValueError, TypeError
        On a value that is not a boolean, a pair of non-negative numbers or a
        non-negative integer.

    Examples
    --------
    >>> OutliersConfig(enabled=True, snr=4.0).snr
    (4.0, 4.0)
    >>> OutliersConfig(grow=-1)
    Traceback (most recent call last):
    ...
    ValueError: 'outliers.grow' must be >= 0; got -1.
    """

    enabled: bool = False
    snr: tuple = (5.0, 4.0)
    scale: tuple = (1.2, 0.7)
    grow: int = 1
    _name = "outliers"

    def __post_init__(self):
        _bool("outliers.enabled", self.enabled)
        for key, low_open in (("snr", True), ("scale", False)):
            v = getattr(self, key)
            if isinstance(v, int | float) and not isinstance(v, bool):
                v = (v, v)
            if not isinstance(v, list | tuple) or len(v) != 2:
                raise ValueError(f"'outliers.{key}' must be [first, second] numbers; got {v!r}.")
            v = tuple(_num(f"outliers.{key}", x, low=0, low_open=low_open) for x in v)
            object.__setattr__(self, key, v)
        object.__setattr__(self, "grow", _int("outliers.grow", self.grow, low=0))


@dataclass(frozen=True)
class InputsConfig(_Section):
    """Input selection: ``files``, a ``glob``, or an archive ``query`` (with a ``mirror`` root).

    Parameters
    ----------
    files : sequence of str or os.PathLike, optional
        Level-2 files.
    glob : str or None, optional
        A glob pattern (``**`` allowed) naming the files.
    mirror : str or None, optional
        Local copy of the IRSA tree, used instead of downloads.
    query : dict or None, optional
        An archive query: ``mjd_range`` ([start, end]), ``max_images`` (>= 1),
        ``releases``.

    Raises
    ------
    ValueError, TypeError
        If more than one of ``files``, ``glob`` and ``query`` is given, or a
        value or query key is invalid.

    Examples
    --------
    >>> InputsConfig(files=["a.fits", "b.fits"]).files
    ('a.fits', 'b.fits')
    >>> InputsConfig(files=["a.fits"], glob="*.fits")
    Traceback (most recent call last):
    ...
    ValueError: 'inputs' must use one of files, glob or query; got ['files', 'glob'].
    """

    files: tuple = ()
    glob: str | None = None
    mirror: str | None = None
    query: dict | None = None
    _name = "inputs"

    def __post_init__(self):
        if isinstance(self.files, str) or not isinstance(self.files, list | tuple):
            raise TypeError(f"'inputs.files' must be a list of paths; got {self.files!r}.")
        object.__setattr__(self, "files", tuple(os.fspath(p) for p in self.files))
        object.__setattr__(self, "glob", _opt_str("inputs.glob", self.glob))
        object.__setattr__(self, "mirror", _opt_str("inputs.mirror", self.mirror))
        if self.query is not None:
            q = _check_keys("inputs.query", self.query, _QueryKeys)
            if q.get("mjd_range") is not None:
                r = q["mjd_range"]
                if not isinstance(r, list | tuple) or len(r) != 2:
                    raise ValueError(f"'inputs.query.mjd_range' must be [start, end]; got {r!r}.")
                q["mjd_range"] = [None if v is None else _num("inputs.query.mjd_range", v)
                                  for v in r]  # fmt: skip
            if q.get("max_images") is not None:
                q["max_images"] = _int("inputs.query.max_images", q["max_images"], low=1)
            object.__setattr__(self, "query", q)
        n = sum(bool(x) for x in (self.files, self.glob, self.query is not None))
        if n > 1:
            raise ValueError(
                "'inputs' must use one of files, glob or query; got "
                f"{[k for k in ('files', 'glob', 'query') if getattr(self, k)]}."
            )


@dataclass(frozen=True)
class _QueryKeys:
    mjd_range: Any = None
    max_images: Any = None
    releases: Any = None


@dataclass(frozen=True)
class DownloadConfig(_Section):
    """Archive downloads: destination, ``full`` files or ``cutout``, parallel workers.

    Parameters
    ----------
    dest : str or os.PathLike, optional
        Download directory.
    mode : {"cutout", "full"}, optional
        IRSA cutouts of the region, or whole files.
    workers : int, optional
        Parallel downloads (>= 1).
    overwrite : bool, optional
        Download again files that are already present.

    Raises
    ------
    ValueError, TypeError
        On an unknown mode or a bad value.

    Examples
    --------
    >>> DownloadConfig(mode="FULL", workers=2)
    DownloadConfig(dest='spherex_data', mode='full', workers=2, overwrite=False)
    """

    dest: str = "spherex_data"
    mode: str = "cutout"
    workers: int = 4
    overwrite: bool = False
    _name = "download"

    def __post_init__(self):
        object.__setattr__(self, "dest", _opt_str("download.dest", self.dest))
        object.__setattr__(self, "mode", _choice("download.mode", self.mode, DOWNLOAD_MODES))
        object.__setattr__(self, "workers", _int("download.workers", self.workers, low=1))
        _bool("download.overwrite", self.overwrite)


@dataclass(frozen=True)
class OutputConfig(_Section):
    """Output directory, file prefix, formats and overwrite policy.

    Parameters
    ----------
    directory : str or os.PathLike, optional
        Where cubes are written.
    prefix : str, optional
        File stem: cubes are ``<prefix>_D<n>.<ext>``.
    formats : str or sequence of str, optional
        Any of ``fits``, ``netcdf``, ``zarr``.
    overwrite : bool, optional
        Replace existing cubes.
    update : bool, optional
        Keep the accumulator state (``<prefix>_D<n>.state.zarr``) and, when it
        exists, add only the images not yet in the cube.
    checkpoint_every : int, optional
        Save that state every N images (0: at the end).
    tile_size : int or None, optional
        Drizzle tile by tile (>= 8 pixels) into one tile-chunked zarr store.

    Raises
    ------
    ValueError, TypeError
        On an empty or path-like prefix, an unknown format or a bad value.

    Examples
    --------
    >>> OutputConfig(formats="netcdf").formats
    ('netcdf',)
    >>> OutputConfig(prefix="a/b")
    Traceback (most recent call last):
    ...
    ValueError: 'output.prefix' must be a non-empty file stem; got 'a/b'.
    """

    directory: str = "drizzle3d_out"
    prefix: str = "cube"
    formats: tuple = ("fits",)
    overwrite: bool = False
    update: bool = False
    checkpoint_every: int = 0
    tile_size: int | None = None
    _name = "output"

    def __post_init__(self):
        object.__setattr__(self, "directory", _opt_str("output.directory", self.directory))
        if not isinstance(self.prefix, str) or not self.prefix or "/" in self.prefix:
            raise ValueError(f"'output.prefix' must be a non-empty file stem; got {self.prefix!r}.")
        fmts = self.formats
        if isinstance(fmts, str):
            fmts = [fmts]
        if not isinstance(fmts, list | tuple) or not fmts:
            raise ValueError(f"'output.formats' must be a non-empty list of {list(FORMATS)}.")
        object.__setattr__(
            self, "formats", tuple(_choice("output.formats", f, FORMATS) for f in fmts)
        )
        _bool("output.overwrite", self.overwrite)
        _bool("output.update", self.update)
        object.__setattr__(
            self, "checkpoint_every", _int("output.checkpoint_every", self.checkpoint_every, low=0)
        )
        if self.tile_size is not None:
            object.__setattr__(self, "tile_size", _int("output.tile_size", self.tile_size, low=8))


_SECTIONS = {
    "region": RegionConfig,
    "spectral": SpectralConfig,
    "drizzle": DrizzleConfig,
    "outliers": OutliersConfig,
    "inputs": InputsConfig,
    "download": DownloadConfig,
    "output": OutputConfig,
}


@dataclass(frozen=True)
class Drizzle3DConfig:
    """Everything a run needs; see the module docstring and :data:`EXAMPLE_YAML`.

    Parameters
    ----------
    region, spectral, drizzle, outliers, inputs, download, output
        Sections (dataclasses of the same names).
    detectors : list of int or "all"
        Detectors to build, one cube each.
    all_band : bool
        Also build one cube from all those detectors' images on a constant-R
        grid over their whole range (:meth:`all_band_grid`), named ``<prefix>_all``.
    pixel_scale : float
        Output pixel size (arcsec).
    workers : int
        Parallel workers (1: serial; 0: all cores).
    scheduler : str or None
        ``"threads"`` (default when null) or ``"processes"`` for a local pool,
        ``"local"`` for a dask ``LocalCluster``
        (:func:`drizzle3d.pipeline.local_cluster`), or a dask scheduler
        address (``"tcp://host:8786"``).

    Raises
    ------
    ValueError, TypeError
        On bad detectors, pixel scale, workers or scheduler (sections validate
        their own keys when built).

    Examples
    --------
    >>> c = Drizzle3DConfig(detectors=["D1", 3, 3], pixel_scale=3.0)
    >>> c.detectors, c.region.width, c.drizzle.kernel
    ((1, 3), 30.0, 'square')
    >>> Drizzle3DConfig(detectors=[7])
    Traceback (most recent call last):
    ...
    ValueError: 'detectors' must be a list of 1..6 or 'all'; got 7.
    """

    region: RegionConfig = field(default_factory=RegionConfig)
    detectors: tuple = (3,)
    all_band: bool = False
    pixel_scale: float = 6.15
    spectral: SpectralConfig = field(default_factory=SpectralConfig)
    drizzle: DrizzleConfig = field(default_factory=DrizzleConfig)
    outliers: OutliersConfig = field(default_factory=OutliersConfig)
    inputs: InputsConfig = field(default_factory=InputsConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    workers: int = 1
    scheduler: str | None = None

    def __post_init__(self):
        dets = self.detectors
        if dets == "all":
            dets = (1, 2, 3, 4, 5, 6)
        if isinstance(dets, int) and not isinstance(dets, bool):
            dets = (dets,)
        if not isinstance(dets, list | tuple) or not dets:
            raise ValueError(f"'detectors' must be a list of 1..6 or 'all'; got {dets!r}.")
        out = []
        for d in dets:
            if isinstance(d, str) and d.upper().startswith("D"):
                d = d[1:]
            try:
                n = int(d)
            except (TypeError, ValueError):
                n = 0
            if isinstance(d, bool) or n not in range(1, 7):
                raise ValueError(f"'detectors' must be a list of 1..6 or 'all'; got {d!r}.")
            out.append(n)
        object.__setattr__(self, "detectors", tuple(sorted(set(out))))
        object.__setattr__(self, "all_band", _bool("all_band", self.all_band))
        object.__setattr__(
            self, "pixel_scale", _num("pixel_scale", self.pixel_scale, low=0, low_open=True)
        )
        object.__setattr__(self, "workers", _int("workers", self.workers, low=0))
        sched = _opt_str("scheduler", self.scheduler)
        if (
            sched is not None
            and sched not in ("threads", "processes", "local")
            and ("://" not in sched)
        ):
            raise ValueError(
                "'scheduler' must be null, 'threads', 'processes', 'local' or a dask "
                f"scheduler address such as 'tcp://host:8786'; got {sched!r}."
            )
        object.__setattr__(self, "scheduler", sched)

    # -- derived ----------------------------------------------------------

    def detector_list(self) -> list[int]:
        """Return the detectors to build.

        Returns
        -------
        list of int
            Sorted, without duplicates.

        Examples
        --------
        >>> Drizzle3DConfig(detectors="all").detector_list()
        [1, 2, 3, 4, 5, 6]
        """
        return list(self.detectors)

    def all_band_grid(self):
        """Return the :class:`~drizzle3d.grid.OutputGrid` of the all-band cube.

        The region's spatial grid and constant-R bins (``spectral.resolving_power``)
        from the bluest to the reddest edge of the selected detectors (or over
        ``spectral.lam_min`` .. ``lam_max`` when set).

        Returns
        -------
        drizzle3d.grid.OutputGrid
            The grid.

        Examples
        --------
        >>> c = Drizzle3DConfig.from_dict({"detectors": [1, 2],
        ...                                "spectral": {"resolving_power": 40.0}})
        >>> g = c.all_band_grid()
        >>> round(float(g.wave_edges[0]), 2), round(float(g.wave_edges[-1]), 2), g.shape[0]
        (0.74, 1.65, 32)
        """
        from drizzle3d.channels import detector_range
        from drizzle3d.grid import OutputGrid, SpectralGrid

        ranges = [detector_range(d) for d in self.detectors]
        lo = self.spectral.lam_min or min(r[0] for r in ranges)
        hi = self.spectral.lam_max or max(r[1] for r in ranges)
        spectral = SpectralGrid.constant_r(lo, hi, self.spectral.resolving_power)
        return OutputGrid(self._spatial_grid(), spectral)

    def grid(self, detector: int):
        """Return the :class:`~drizzle3d.grid.OutputGrid` of one detector's cube.

        Parameters
        ----------
        detector : int
            SPHEREx detector, 1..6.

        Returns
        -------
        drizzle3d.grid.OutputGrid
            The region's spatial grid at ``pixel_scale`` and the detector's
            spectral grid (:meth:`SpectralConfig.build`).

        Examples
        --------
        >>> c = Drizzle3DConfig.from_dict({
        ...     "region": {"width": 1.0},  # arcmin: 10 pixels of 6 arcsec
        ...     "pixel_scale": 6.0,
        ...     "spectral": {"mode": "edges", "edges": [1.7, 1.8, 1.9]},
        ... })
        >>> c.grid(3).shape
        (2, 10, 10)
        """
        from drizzle3d.grid import OutputGrid

        return OutputGrid(self._spatial_grid(), self.spectral.build(detector))

    def _spatial_grid(self):
        from drizzle3d.grid import SpatialGrid

        r = self.region
        return SpatialGrid.from_center(
            r.ra, r.dec, r.width, r.height, pixscale=self.pixel_scale, rotation=r.rotation
        )

    # -- round trips ------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Return a plain, YAML-safe dict of every field.

        Returns
        -------
        dict
            Nested sections plus ``detectors``, ``pixel_scale``, ``workers``.

        Examples
        --------
        >>> d = Drizzle3DConfig().to_dict()
        >>> d["detectors"], d["region"]["width"], d["output"]["formats"]
        ([3], 30.0, ['fits'])
        """
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, _Section):
                out[f.name] = v.to_dict()
            elif isinstance(v, tuple):
                out[f.name] = list(v)
            else:
                out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: dict | None) -> Drizzle3DConfig:
        """Build and validate a config from a mapping.

        Parameters
        ----------
        data : dict
            Keys as in :meth:`to_dict`; missing keys take defaults.

        Returns
        -------
        Drizzle3DConfig

        Raises
        ------
        ValueError, TypeError
            On an unknown key (named, with the allowed keys) or a bad value
            (named, with the allowed values).

        Examples
        --------
        >>> Drizzle3DConfig.from_dict({"drizzle": {"pixfrac": 0.5}}).drizzle.pixfrac
        0.5
        >>> Drizzle3DConfig.from_dict({"drizzle": {"pixfrak": 0.5}})
        Traceback (most recent call last):
        ...
        ValueError: 'drizzle.pixfrak' is not a known key; allowed keys are [...].
        """
        d = _check_keys("", data, cls)
        kwargs = {}
        for key, value in d.items():
            kwargs[key] = _SECTIONS[key].from_dict(value) if key in _SECTIONS else value
        return cls(**kwargs)

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        """Serialise to YAML (exact floats); optionally write ``path`` atomically.

        Parameters
        ----------
        path : str or os.PathLike, optional
            File to write (temporary file renamed into place).

        Returns
        -------
        str
            The YAML text.

        Examples
        --------
        >>> import os, tempfile
        >>> c = Drizzle3DConfig(pixel_scale=3.0)
        >>> path = os.path.join(tempfile.mkdtemp(), "run.yaml")
        >>> text = c.to_yaml(path)
        >>> "pixel_scale: 3.0" in text, Drizzle3DConfig.from_yaml(path) == c
        (True, True)
        """
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)
        if path is not None:
            _atomic_write(Path(path), text)
        return text

    @classmethod
    def from_yaml(cls, source: str | os.PathLike) -> Drizzle3DConfig:
        """Load a config from YAML text or a YAML file.

        Parameters
        ----------
        source : str or os.PathLike
            YAML text (anything with a newline or a ``:``), or a file path.

        Returns
        -------
        Drizzle3DConfig

        Raises
        ------
        ValueError, TypeError
            On invalid content (see :meth:`from_dict`).
        FileNotFoundError
            If a path does not exist.

        Examples
        --------
        >>> Drizzle3DConfig.from_yaml("{detectors: [1, 2], pixel_scale: 3.1}").detectors
        (1, 2)
        >>> Drizzle3DConfig.from_yaml("pixel_scale: [")
        Traceback (most recent call last):
        ...
        ValueError: 'source' must be valid YAML; got a parse error (...).
        """
        import yaml

        if isinstance(source, os.PathLike) or (
            isinstance(source, str) and "\n" not in source and ":" not in source
        ):
            text = Path(source).read_text()
        else:
            text = str(source)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"'source' must be valid YAML; got a parse error ({err}).") from err
        return cls.from_dict(data or {})


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


#: A commented example configuration (``drizzle3d config --example``).
EXAMPLE_YAML = """\
# drizzle3d run configuration. Every key is optional; shown values are the defaults
# unless marked "example".

region:                  # the sky region of the cube
  ra: 150.0              # centre right ascension (deg)
  dec: 2.0               # centre declination (deg)
  width: 30.0            # arcmin along x
  height: 30.0           # arcmin along y (default: width)
  rotation: 0.0          # position angle of +y, deg east of north

detectors: [3]           # 1..6, a list, or "all": one cube per detector
all_band: false          # also one cube of all those detectors on a constant-R grid
                         # (spectral.resolving_power; spectral.lam_min/lam_max if set)
pixel_scale: 6.15        # output pixel (arcsec); SPHEREx pixels are 6.15"

spectral:                # wavelength bins of each cube
  mode: native           # native | oversampled | constant_r | edges
  factor: 2.0            # oversampled: bins per native channel width
  resolving_power: 80.0  # constant_r: lambda / dlambda of every bin
  lam_min: null          # constant_r range (um); default the detector's
  lam_max: null
  edges: null            # edges: explicit bin edges in um, e.g. [1.7, 1.8, 1.9]

drizzle:
  kernel: square         # square | turbo | point | gaussian | lanczos2 | lanczos3 | bilinear
  pixfrac: 1.0           # spatial drop shrink factor (0, 1]
  wave_pixfrac: 1.0      # spectral drop shrink factor (0, 1]
  weighting: background  # background (unbiased default) | ivm | exptime | uniform
  ivar_max: .inf         # cap on inverse-variance weights (ivm)
  min_overlap: 0.0       # drop voxel overlaps below this fraction of a pixel's volume
  exclude_flags: [TRANSIENT, OVERFLOW, SUR_ERROR, PHANTOM, REFERENCE, NONFUNC, DICHROIC,
    MISSING_DATA, HOT, COLD, PHANMISS, NONLINEAR, PERSIST, OUTLIER]   # SOURCE is kept
  zodi: fit              # none | static | fit (fit the ZODI model's amplitude per image)

outliers:                # outlier rejection by blotting the cube back (drizzle3d.blot)
  enabled: false
  snr: [5.0, 4.0]         # driz_cr thresholds (first, second pass)
  scale: [1.2, 0.7]       # driz_cr derivative scales (first, second pass)
  grow: 1                 # dilate flagged pixels by this many pixels

inputs:                  # exactly one of files, glob or query
  files: []              # example: [data/level2_a.fits, data/level2_b.fits]
  glob: null             # example: "data/**/level2_*D3*.fits"
  mirror: null           # local copy of the IRSA tree, used instead of downloads
  query: null            # example: {mjd_range: [61000, 61100], max_images: 200, releases: qr2}

download:                # only for inputs.query without a mirror
  dest: spherex_data
  mode: cutout           # cutout | full
  workers: 4
  overwrite: false

output:
  directory: drizzle3d_out
  prefix: cube           # files are <prefix>_D<n>.<ext>
  formats: [fits]        # any of fits, netcdf, zarr
  overwrite: false       # never replace an existing cube unless true
  update: false          # keep the accumulator state (<prefix>_D<n>.state.zarr); when it
                         # exists, add only the images not yet in the cube
  checkpoint_every: 0    # save that state every N images (0: at the end); a killed run
                         # restarted with update: true resumes from the last checkpoint
  tile_size: null        # example: 512: drizzle tile by tile into one zarr store chunked
                         # by tile (outputs larger than memory)

workers: 1               # parallel workers (0: all cores)
scheduler: null          # threads (default) | processes | local (dask LocalCluster) |
                         # a dask scheduler address, e.g. tcp://host:8786
"""
