"""Cube files: write and read drizzled cubes as FITS, netCDF or zarr.

:func:`save_cube` takes a :class:`~drizzle3d.Drizzle3D` (or its
:meth:`~drizzle3d.Drizzle3D.to_dataset`) and :func:`load_cube` returns an
:class:`xarray.Dataset` with the same variables, coordinates and attributes,
whatever the format.

FITS layout
-----------
The layout SPHEREx users already load from the existing cube tool:

========================  ==========================================================
HDU                       content
========================  ==========================================================
``PRIMARY``               no data; run metadata (``DETECTOR``, ``NINPUTS``, ``KERNEL``,
                          ``PIXFRAC``, ``WPIXFRAC``, ``WEIGHTNG``, ``WAVEMIN``, ``WAVEMAX``,
                          ``D3DVERS``)
``SCI``                   surface brightness (float32 by default), 3-D WCS
``VARIANCE``              variance of ``SCI``, 3-D WCS
``AND_MASK``/``OR_MASK``  uint32 bitwise AND / OR of input flags
``COUNT``                 int32 contributing input pixels
``WHT``                   total weight
``WAVE_EFF``              effective wavelength of each voxel (um), issue 10
``WAVE_SPREAD``           RMS spread of contributing wavelengths (um)
``CTX``                   int32 context planes (which images contributed)
``WAVELENGTH``            table: ``INDEX``, ``LAMBDA``, ``LAMBDA_MIN``, ``LAMBDA_MAX``,
                          ``DLAMBDA`` (um), ``NU``, ``DNU`` (Hz), ``R_EFF``
``ATTRS``                 table ``SCOPE``, ``NAME``, ``VALUE`` (JSON): every attribute of the
                          dataset, its variables and coordinates, for an exact round trip
========================  ==========================================================

``SCI`` and ``VARIANCE`` carry the celestial TAN WCS of the grid on axes 1-2 and a
spectral axis 3 (``WAVE`` or ``WAVE-LOG``, with the exact bin edges in
``WEDGnnnn`` cards), so astropy, DS9, CARTA and spectral-cube read them.

Every write goes to a temporary file (or directory, for zarr) next to the target
and is renamed into place only when complete; an existing output is never
replaced unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # imported where Datasets are made (FITS writing needs none)
    import xarray as xr

__all__ = [
    "FORMATS",
    "STATE_VERSION",
    "fits_wcs",
    "guess_format",
    "init_tiled_store",
    "load_cube",
    "load_state",
    "save_cube",
    "save_state",
    "write_tile",
]

logger = logging.getLogger(__name__)

#: Cube formats understood by :func:`save_cube` and :func:`load_cube`.
FORMATS = ("fits", "netcdf", "zarr")

_C_UM_HZ = 299_792_458.0 * 1e6
# dataset variable -> (FITS extension name, on-disk dtype for "single" precision)
_FITS_VARS = {
    "sci": ("SCI", np.float32),
    "var": ("VARIANCE", np.float32),
    "and_mask": ("AND_MASK", np.uint32),
    "or_mask": ("OR_MASK", np.uint32),
    "count": ("COUNT", np.int32),
    "wht": ("WHT", np.float32),
    "wave": ("WAVE_EFF", np.float64),
    "wave_spread": ("WAVE_SPREAD", np.float32),
    "ctx": ("CTX", np.int32),
}
_EXT_TO_VAR = {ext: name for name, (ext, _) in _FITS_VARS.items()}
_WCS_EXTS = ("SCI", "VARIANCE")
_SUFFIXES = {".fits": "fits", ".fit": "fits", ".nc": "netcdf", ".zarr": "zarr"}


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def guess_format(path: str | os.PathLike) -> str:
    """Return the cube format implied by a file name (``.fits``, ``.nc`` or ``.zarr``).

    Parameters
    ----------
    path : str or os.PathLike
        File or directory name.

    Returns
    -------
    str
        One of :data:`FORMATS`.

    Raises
    ------
    ValueError
        If the suffix is not one of ``.fits``, ``.fit``, ``.nc``, ``.zarr``.

    Examples
    --------
    >>> guess_format("cube_D3.nc")
    'netcdf'
    """
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(
            f"'path' must end in one of {sorted(_SUFFIXES)} to infer the format; got {str(path)!r}."
        )
    return _SUFFIXES[suffix]


def _jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays (recursively) into plain JSON types."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _summary_json(summary) -> str:
    to_dict = getattr(summary, "to_dict", None)
    return json.dumps(_jsonable(to_dict() if callable(to_dict) else summary))


def _as_dataset(cube) -> xr.Dataset:
    import xarray as xr

    if isinstance(cube, xr.Dataset):
        return cube
    to_dataset = getattr(cube, "to_dataset", None)
    if callable(to_dataset):
        ds = to_dataset()
        summary = getattr(cube, "run_summary", None)
        if summary is not None and "run_summary" not in ds.attrs:
            ds.attrs["run_summary"] = _summary_json(summary)
        return ds
    raise TypeError(f"'cube' must be a Drizzle3D or an xarray.Dataset; got {type(cube).__name__}.")


def _check_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"'path' must not exist unless overwrite=True; got existing {str(path)!r}."
        )
    if not path.parent.is_dir():
        raise FileNotFoundError(f"'path' must be in an existing directory; got {str(path)!r}.")


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _replace(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` onto ``path`` (removing an old directory first for zarr stores)."""
    if path.is_dir():
        old = _tmp_name(path)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def save_cube(
    cube,
    path: str | os.PathLike,
    format: str | None = None,
    *,
    overwrite: bool = False,
    precision: str = "single",
    attrs: dict | None = None,
) -> Path:
    """Write a cube to FITS, netCDF or zarr, atomically.

    Parameters
    ----------
    cube : Drizzle3D or xarray.Dataset
        The cube (a :class:`~drizzle3d.Drizzle3D` is converted with
        :meth:`~drizzle3d.Drizzle3D.to_dataset`; its ``run_summary`` is kept).
        A Drizzle3D is written to FITS straight from its accumulators, one
        output at a time, so saving needs little memory beyond the cube itself.
    path : str or os.PathLike
        Output file (a directory for zarr).
    format : {"fits", "netcdf", "zarr"}, optional
        Default: from the suffix of ``path`` (see :func:`guess_format`).
    overwrite : bool, optional
        Replace an existing output. Default False: an existing output raises.
    precision : {"single", "double"}, optional
        FITS only: ``"single"`` writes SCI, VARIANCE, WHT and WAVE_SPREAD as float32
        (as the SPHEREx tools do; WAVE_EFF stays float64), ``"double"`` keeps float64.
        netCDF and zarr always keep the dataset's dtypes.
    attrs : dict, optional
        Extra dataset attributes to store (they override the cube's own).

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    ValueError
        If ``format`` or ``precision`` is invalid.
    TypeError
        If ``cube`` is neither a Drizzle3D nor a Dataset.

    Notes
    -----
    The data go to a temporary name in the same directory, which is renamed to
    ``path`` only after the write finished; an exception during the write removes
    the temporary file and leaves ``path`` untouched.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from drizzle3d import Drizzle3D
    >>> d = Drizzle3D(out_shape=(2, 4, 4), wave_edges=[1.0, 1.5, 2.0])
    >>> p = save_cube(d, os.path.join(tempfile.mkdtemp(), "cube.nc"))
    >>> load_cube(p).sci.shape
    (2, 4, 4)
    """
    path = Path(path)
    fmt = guess_format(path) if format is None else str(format).lower()
    if fmt not in FORMATS:
        raise ValueError(f"'format' must be one of {FORMATS}; got {format!r}.")
    if precision not in ("single", "double"):
        raise ValueError(f"'precision' must be 'single' or 'double'; got {precision!r}.")
    stream = fmt == "fits" and hasattr(cube, "_output_items")
    ds = None if stream else _as_dataset(cube)
    if ds is not None and attrs:
        ds = ds.copy()
        ds.attrs.update(attrs)
    _check_target(path, overwrite)
    tmp = _tmp_name(path)
    try:
        if stream:
            extra = dict(attrs or {})
            summary = getattr(cube, "run_summary", None)
            if summary is not None and "run_summary" not in extra:
                extra["run_summary"] = _summary_json(summary)
            meta = _PlainMeta(cube._coords(), {**cube._dataset_attrs(), **extra})
            _write_fits_items(cube._output_items(plain=True), meta.attrs, tmp, precision, meta)

        elif fmt == "fits":
            _write_fits(ds, tmp, precision)
        elif fmt == "netcdf":
            _clean_for_netcdf(ds).to_netcdf(tmp, engine="h5netcdf")
        else:
            _clean_for_netcdf(ds).to_zarr(tmp, mode="w", consolidated=False)
        _replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    logger.info("wrote %s cube %s", fmt, path)
    return path


def load_cube(path: str | os.PathLike, format: str | None = None) -> xr.Dataset:
    """Read a cube written by :func:`save_cube` into an :class:`xarray.Dataset`.

    Parameters
    ----------
    path : str or os.PathLike
        FITS, netCDF file or zarr directory.
    format : {"fits", "netcdf", "zarr"}, optional
        Default: from the suffix.

    Returns
    -------
    xarray.Dataset
        Variables ``sci``, ``var``, ... with dims ``("wavelength", "y", "x")``,
        coordinates ``wavelength`` (bin centres, um), ``wavelength_min``,
        ``wavelength_max``, ``y``, ``x``, ``ra``, ``dec``, and all attributes.
        Values are loaded into memory.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the format is unknown or a FITS file lacks the cube layout.

    Examples
    --------
    >>> import os, tempfile
    >>> from drizzle3d import Drizzle3D
    >>> d = Drizzle3D(out_shape=(2, 4, 6), wave_edges=[1.0, 1.5, 2.0])
    >>> ds = load_cube(save_cube(d, os.path.join(tempfile.mkdtemp(), "cube.fits")))
    >>> ds.sci.dims, ds.sci.shape, ds.wavelength.values.tolist()
    (('wavelength', 'y', 'x'), (2, 4, 6), [1.25, 1.75])
    >>> load_cube("no-such-cube.nc")
    Traceback (most recent call last):
    ...
    FileNotFoundError: 'path' must be an existing cube; got 'no-such-cube.nc'.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"'path' must be an existing cube; got {str(path)!r}.")
    fmt = guess_format(path) if format is None else str(format).lower()
    if fmt not in FORMATS:
        raise ValueError(f"'format' must be one of {FORMATS}; got {format!r}.")
    if fmt == "fits":
        return _read_fits(path)
    if fmt == "netcdf":
        import xarray as xr

        with xr.open_dataset(path, engine="h5netcdf") as ds:
            return _restore(ds.load())
    import xarray as xr

    with xr.open_zarr(path, consolidated=False) as ds:
        return _restore(ds.load())


# ---------------------------------------------------------------------------
# netCDF / zarr
# ---------------------------------------------------------------------------


def _clean_for_netcdf(ds: xr.Dataset) -> xr.Dataset:
    """Store non-netCDF attribute values (bool, dict, None, lists) as JSON strings."""
    out = ds.copy(deep=False)
    out.attrs = _encode_attrs(ds.attrs)
    for name in out.variables:
        out[name].attrs = _encode_attrs(ds[name].attrs)
        out[name].encoding = {}
    return out


def _encode_attrs(attrs: dict) -> dict:
    res = {}
    for key, value in attrs.items():
        if isinstance(value, str) or (
            isinstance(value, int | float | np.integer | np.floating)
            and not isinstance(value, bool | np.bool_)
        ):
            res[key] = value
        else:
            res[key] = "json:" + json.dumps(_jsonable(value))
    return res


def _decode_attrs(attrs: dict) -> dict:
    res = {}
    for key, value in attrs.items():
        if isinstance(value, str) and value.startswith("json:"):
            res[key] = json.loads(value[5:])
        elif isinstance(value, np.generic):
            res[key] = value.item()
        else:
            res[key] = value
    return res


def _restore(ds: xr.Dataset) -> xr.Dataset:
    ds.attrs = _decode_attrs(ds.attrs)
    for name in ds.variables:
        ds[name].attrs = _decode_attrs(ds[name].attrs)
        ds[name].encoding = {}
    return ds


# ---------------------------------------------------------------------------
# FITS
# ---------------------------------------------------------------------------


def _cube_header(ds: xr.Dataset):
    """3-D header (celestial + spectral) of the cube, or None without a WCS attribute."""
    from astropy.io import fits

    from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid

    edges = np.concatenate(
        [np.asarray(ds["wavelength_min"].values), np.asarray(ds["wavelength_max"].values)[-1:]]
    )
    spectral = SpectralGrid(edges)
    wcs_text = ds.attrs.get("wcs")
    if not wcs_text:
        return spectral.to_header(axis=3)
    spatial = SpatialGrid.from_header(fits.Header.fromstring(wcs_text))
    return OutputGrid(spatial, spectral).to_header()


def _wavelength_table(ds: xr.Dataset):
    from astropy.io import fits

    lam = np.asarray(ds["wavelength"].values, dtype=np.float64)
    lo = np.asarray(ds["wavelength_min"].values, dtype=np.float64)
    hi = np.asarray(ds["wavelength_max"].values, dtype=np.float64)
    nu = _C_UM_HZ / lam
    dnu = _C_UM_HZ / lo - _C_UM_HZ / hi
    cols = [
        fits.Column("INDEX", "J", array=np.arange(lam.size, dtype=np.int32)),
        fits.Column("LAMBDA", "D", unit="um", array=lam),
        fits.Column("LAMBDA_MIN", "D", unit="um", array=lo),
        fits.Column("LAMBDA_MAX", "D", unit="um", array=hi),
        fits.Column("DLAMBDA", "D", unit="um", array=hi - lo),
        fits.Column("NU", "D", unit="Hz", array=nu),
        fits.Column("DNU", "D", unit="Hz", array=dnu),
        fits.Column("R_EFF", "D", array=lam / (hi - lo)),
    ]
    return fits.BinTableHDU.from_columns(cols, name="WAVELENGTH")


def _attrs_table(ds: xr.Dataset, var_attrs: dict[str, dict]):
    from astropy.io import fits

    rows = [("dataset", "", ds.attrs)]
    rows += [("var", str(n), a) for n, a in var_attrs.items()]
    rows += [("coord", str(n), ds[n].attrs) for n in ds.coords]
    scope = [r[0] for r in rows]
    names = [r[1] for r in rows]
    values = [json.dumps(_jsonable(dict(r[2]))) for r in rows]
    width = max(1, *(len(v.encode()) for v in values))
    cols = [
        fits.Column("SCOPE", "16A", array=np.array(scope)),
        fits.Column("NAME", "32A", array=np.array(names)),
        fits.Column("VALUE", f"{width}A", array=np.array(values)),
    ]
    return fits.BinTableHDU.from_columns(cols, name="ATTRS")


def _primary(ds: xr.Dataset, bunit: str = ""):
    from astropy.io import fits

    from drizzle3d import __version__

    hdr = fits.Header()
    a = ds.attrs
    if "detector" in a:
        hdr["DETECTOR"] = (str(a["detector"]), "SPHEREx detector(s) of the inputs")
    hdr["NINPUTS"] = (int(a.get("n_images", 0)), "number of input images drizzled")
    for key, card, comment in (
        ("kernel", "KERNEL", "spatial drizzle kernel"),
        ("pixfrac", "PIXFRAC", "spatial drop shrink factor"),
        ("wave_pixfrac", "WPIXFRAC", "spectral drop shrink factor"),
        ("weighting", "WEIGHTNG", "input weighting"),
        ("total_exptime", "TEXPTIME", "[s] summed exposure time"),
    ):
        if key in a:
            value = a[key]
            hdr[card] = (value.item() if isinstance(value, np.generic) else value, comment)
    hdr["WAVEMIN"] = (float(ds["wavelength_min"].values[0]), "[um] lower edge of first bin")
    hdr["WAVEMAX"] = (float(ds["wavelength_max"].values[-1]), "[um] upper edge of last bin")
    hdr["NWAVE"] = (int(ds.sizes["wavelength"]), "number of wavelength bins")
    hdr["BUNIT"] = bunit
    hdr["D3DVERS"] = (__version__, "drizzle3d version")
    hdr["ORIGIN"] = "drizzle3d"
    return fits.PrimaryHDU(header=hdr)


def _write_fits(ds: xr.Dataset, tmp: Path, precision: str) -> None:
    if "sci" not in ds:
        raise ValueError("'cube' must have a 'sci' variable to be written as FITS; got none.")
    names = ["sci", *(str(n) for n in ds.data_vars if n != "sci")]
    _write_fits_items(((n, ds[n]) for n in names), ds.attrs, tmp, precision, meta=ds)


def _write_fits_items(items, attrs: dict, tmp: Path, precision: str, meta=None) -> None:
    """Write ``(name, DataArray)`` items (``sci`` first) as one FITS cube, HDU by HDU:
    each array is converted, appended to the file and released before the next.
    ``meta``: the Dataset whose coordinates and attributes are stored (default: the
    coordinates of ``sci`` and ``attrs``)."""
    from astropy.io import fits

    var_attrs: dict[str, dict] = {}
    started = False
    for name, arr in items:
        var_attrs[name] = dict(arr.attrs)
        if not started:
            if name != "sci":
                raise ValueError(
                    "'cube' must have a 'sci' variable to be written as FITS; got none."
                )
            if meta is None:
                import xarray as xr

                meta = xr.Dataset(coords=arr.coords, attrs=dict(attrs))
            started = True
            cube_hdr = _cube_header(meta)
            bunit = str(arr.attrs.get("units", ""))
            fits.HDUList([_primary(meta, bunit)]).writeto(tmp, output_verify="exception")
        if name not in _FITS_VARS:
            continue
        ext, single = _FITS_VARS[name]
        values = np.asarray(arr.values)
        del arr
        if values.dtype.kind == "f":
            dtype = single if precision == "single" else np.float64
        else:
            dtype = single
        hdr = fits.Header()
        if ext in _WCS_EXTS:
            hdr.extend(cube_hdr)
        units = var_attrs[name].get("units")
        if units:
            hdr["BUNIT"] = str(units)
        hdu = fits.ImageHDU(np.ascontiguousarray(values.astype(dtype)), header=hdr, name=ext)
        del values
        _append_hdu(tmp, hdu)
        del hdu
    if not started:
        raise ValueError("'cube' must have a 'sci' variable to be written as FITS; got none.")
    _append_hdu(tmp, _wavelength_table(meta))
    _append_hdu(tmp, _attrs_table(meta, var_attrs))


class _PlainMeta:
    """What the FITS writers read of a Dataset (coordinates with their attributes, the
    dataset's attributes), from a cube's ``_coords()`` without building one."""

    def __init__(self, coords: dict, attrs: dict):
        from drizzle3d.resample import _PlainArray

        self._coords = {name: _PlainArray(np.asarray(c[1]), dict(c[2]) if len(c) > 2 else {})
                        for name, c in coords.items()}  # fmt: skip
        self.attrs = dict(attrs)
        self.coords = list(self._coords)
        self.sizes = {"wavelength": self._coords["wavelength"].values.size}

    def __getitem__(self, name):
        return self._coords[name]

    def __contains__(self, name):
        return name in self._coords


def _append_hdu(path: Path, hdu) -> None:
    from astropy.io import fits

    hdu.verify("exception")
    fits.append(path, hdu.data, hdu.header, verify=False)


def _read_fits(path: Path) -> xr.Dataset:
    from astropy.io import fits

    from drizzle3d.grid import SpatialGrid

    with fits.open(path, memmap=False) as hdul:
        names = [h.name for h in hdul]
        for needed in ("SCI", "WAVELENGTH"):
            if needed not in names:
                raise ValueError(
                    f"'path' must be a drizzle3d FITS cube with a {needed} HDU; got HDUs {names}."
                )
        attrs: dict[str, dict] = {"dataset": {}, "var": {}, "coord": {}}
        if "ATTRS" in names:
            for row in hdul["ATTRS"].data:
                scope, name, value = (str(row[k]).strip() for k in ("SCOPE", "NAME", "VALUE"))
                if scope == "dataset":
                    attrs["dataset"] = json.loads(value)
                else:
                    attrs[scope][name] = json.loads(value)
        table = hdul["WAVELENGTH"].data
        lam = np.asarray(table["LAMBDA"], dtype=np.float64)
        lo = np.asarray(table["LAMBDA_MIN"], dtype=np.float64)
        hi = np.asarray(table["LAMBDA_MAX"], dtype=np.float64)
        data_vars = {}
        for hdu in hdul[1:]:
            var = _EXT_TO_VAR.get(hdu.name)
            if var is None:
                continue
            arr = np.asarray(hdu.data)
            arr = arr.astype(arr.dtype.newbyteorder("="))
            dims = ("ctx_plane", "y", "x") if var == "ctx" else ("wavelength", "y", "x")
            data_vars[var] = (dims, arr, attrs["var"].get(var, {}))
        sci_hdr = hdul["SCI"].header
        ny, nx = sci_hdr["NAXIS2"], sci_hdr["NAXIS1"]
        coords = {
            "wavelength": ("wavelength", lam),
            "wavelength_min": ("wavelength", lo),
            "wavelength_max": ("wavelength", hi),
            "y": ("y", np.arange(ny)),
            "x": ("x", np.arange(nx)),
        }
        if "CTYPE1" in sci_hdr and "GRID_NX" in sci_hdr:
            spatial = SpatialGrid.from_header(sci_hdr)
            ra, dec = spatial.world_coords()
            coords["ra"] = (("y", "x"), ra)
            coords["dec"] = (("y", "x"), dec)
    import xarray as xr

    ds = xr.Dataset(data_vars, coords=coords)
    for name in list(ds.coords):
        ds[name].attrs = attrs["coord"].get(name, {})
    ds.attrs = attrs["dataset"]
    return ds


def fits_wcs(path: str | os.PathLike):
    """Return the 3-D :class:`astropy.wcs.WCS` of a FITS cube's ``SCI`` extension.

    Parameters
    ----------
    path : str or os.PathLike
        A FITS cube written by :func:`save_cube`.

    Returns
    -------
    astropy.wcs.WCS
        Axes (RA, Dec, wavelength in um).

    Raises
    ------
    OSError
        (from astropy) if ``path`` is missing or not a FITS file.
    KeyError
        If it has no ``SCI`` extension.

    Examples
    --------
    >>> import os, tempfile
    >>> from drizzle3d import Drizzle3D
    >>> from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid
    >>> g = OutputGrid(SpatialGrid.from_center(150.0, 2.0, 1.0, 1.0), SpectralGrid.native(3))
    >>> w = fits_wcs(save_cube(Drizzle3D(g), os.path.join(tempfile.mkdtemp(), "c.fits")))
    >>> w.naxis, list(w.wcs.ctype)
    (3, ['RA---TAN', 'DEC--TAN', 'WAVE'])
    """
    from astropy.io import fits
    from astropy.wcs import WCS

    with fits.open(path) as hdul:
        return WCS(hdul["SCI"].header)


# ---------------------------------------------------------------------------
# accumulator state (incremental cubes, checkpoints)
# ---------------------------------------------------------------------------

#: Layout version of the state stores written by :func:`save_state`.
STATE_VERSION = 1
_STATE_ATTR = "drizzle3d_state"


def save_state(d, path: str | os.PathLike, *, meta: dict | None = None) -> Path:
    """Write a cube's raw accumulators, grid and settings to a zarr store, atomically.

    The store holds everything needed to continue the cube later
    (:func:`load_state`): the float64 accumulators of
    :attr:`drizzle3d.Drizzle3D.state`, the output grid, the drizzle settings and
    any run metadata (the pipeline stores its settings and the inputs already
    included, with their OBSIDs and file hashes).

    Parameters
    ----------
    d : Drizzle3D
        The cube (built on an :class:`~drizzle3d.grid.OutputGrid`).
    path : str or os.PathLike
        Store directory (conventionally ``*.state.zarr``). An existing store is
        replaced only once the new one is complete.
    meta : dict, optional
        JSON-serialisable run metadata, returned by :func:`load_state`.

    Returns
    -------
    pathlib.Path
        The store written.

    Raises
    ------
    ValueError
        If ``d`` has no output grid.

    Examples
    --------
    >>> import tempfile, os
    >>> from drizzle3d import Drizzle3D
    >>> from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid
    >>> g = OutputGrid(SpatialGrid.from_center(150.0, 2.0, 1.0, 1.0), SpectralGrid.native(3))
    >>> p = save_state(Drizzle3D(g), os.path.join(tempfile.mkdtemp(), "c.state.zarr"))
    >>> d, meta = load_state(p)
    >>> d.out_shape == g.shape
    True
    """
    import zarr

    path = Path(path)
    if getattr(d, "grid", None) is None:
        raise ValueError("'d' must be built on an OutputGrid to save its state; got no grid.")
    st = d.state
    info = {
        "version": STATE_VERSION,
        "grid": _jsonable(d.grid.to_dict()),
        "settings": _jsonable(st["settings"]),
        "ctx_id": int(st["ctx_id"]),
        "n_images": int(st["n_images"]),
        "total_exptime": float(st["total_exptime"]),
        "meta": _jsonable(meta or {}),
    }
    if not path.parent.is_dir():
        raise FileNotFoundError(f"'path' must be in an existing directory; got {str(path)!r}.")
    tmp = _tmp_name(path)
    try:
        group = zarr.open_group(tmp, mode="w")
        for name, value in st.items():
            if isinstance(value, np.ndarray):
                group.create_array(name, data=value)
        group.attrs[_STATE_ATTR] = json.dumps(info)
        _replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    logger.info("saved accumulator state (%d images) to %s", info["n_images"], path)
    return path


def load_state(path: str | os.PathLike):
    """Reopen a store written by :func:`save_state`.

    Parameters
    ----------
    path : str or os.PathLike
        The store directory.

    Returns
    -------
    d : Drizzle3D
        The cube, exactly as saved (further images can be added or merged).
    meta : dict
        The run metadata passed to :func:`save_state`.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If ``path`` is not a drizzle3d state store.

    Examples
    --------
    >>> import os, tempfile
    >>> from drizzle3d import Drizzle3D
    >>> from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid
    >>> g = OutputGrid(SpatialGrid.from_center(150.0, 2.0, 1.0, 1.0), SpectralGrid.native(3))
    >>> store = os.path.join(tempfile.mkdtemp(), "c.state.zarr")
    >>> d, meta = load_state(save_state(Drizzle3D(g), store, meta={"run": 1}))
    >>> d.out_shape == g.shape, meta
    (True, {'run': 1})
    """
    import zarr

    from drizzle3d.grid import OutputGrid
    from drizzle3d.resample import SETTINGS, Drizzle3D

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"'path' must be an existing state store; got {str(path)!r}.")
    try:
        group = zarr.open_group(path, mode="r")
        info = json.loads(group.attrs[_STATE_ATTR])
    except (KeyError, ValueError, OSError, TypeError) as err:
        raise ValueError(
            f"'path' must be a drizzle3d state store (save_state); got {str(path)!r} ({err})."
        ) from err
    st: dict[str, Any] = {name: np.asarray(arr[...]) for name, arr in group.arrays()}
    st["settings"] = info["settings"]
    st["ctx_id"] = info["ctx_id"]
    st["n_images"] = info["n_images"]
    st["total_exptime"] = info["total_exptime"]
    kwargs = {k: info["settings"][k] for k in SETTINGS if k in info["settings"]}
    grid = OutputGrid.from_dict(info["grid"])
    d = Drizzle3D(grid, track_wave="sum_wl" in st, state=st, **kwargs)
    return d, info["meta"]


# ---------------------------------------------------------------------------
# tiled cubes (outputs larger than memory)
# ---------------------------------------------------------------------------


def init_tiled_store(
    path: str | os.PathLike, template: xr.Dataset, tile_shape: tuple[int, int]
) -> Path:
    """Create an empty zarr cube store chunked by spatial tile, ready for :func:`write_tile`.

    Only metadata (and the coordinates) are written: data variables are lazy
    dask arrays of ``template``'s dtypes, so no mosaic-sized array is built.

    Parameters
    ----------
    path : str or os.PathLike
        Store directory (must not exist).
    template : xarray.Dataset
        A dataset with the full mosaic's dims, coordinates, dtypes and
        attributes (its data variables may be lazy).
    tile_shape : tuple of int
        ``(ny, nx)`` chunk size along ``y`` and ``x``; whole along the others.

    Returns
    -------
    pathlib.Path
        The store.

    Raises
    ------
    FileExistsError
        (from xarray/zarr) if ``path`` already exists.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np, xarray as xr
    >>> template = xr.Dataset({"sci": (("wavelength", "y", "x"), np.zeros((2, 4, 6)))})
    >>> store = init_tiled_store(os.path.join(tempfile.mkdtemp(), "m.zarr"), template, (4, 3))
    >>> xr.open_zarr(store, consolidated=False).sci.encoding["chunks"]
    (2, 4, 3)
    """
    path = Path(path)
    ty, tx = (int(v) for v in tile_shape)
    out = _clean_for_netcdf(template)
    for name in out.data_vars:
        var = out[name]
        chunks = tuple(
            ty if dim == "y" else tx if dim == "x" else var.sizes[dim] for dim in var.dims
        )
        out[name].encoding = {"chunks": chunks}
    out.to_zarr(path, mode="w-", compute=False, consolidated=False)
    return path


def write_tile(path: str | os.PathLike, tile: xr.Dataset, y0: int, x0: int) -> None:
    """Write one tile's data variables into a store made by :func:`init_tiled_store`.

    Parameters
    ----------
    path : str or os.PathLike
        The store.
    tile : xarray.Dataset
        The tile's variables (dims as in the store; ``y``/``x`` sized like the tile).
    y0, x0 : int
        Position of the tile's first pixel in the mosaic.

    Raises
    ------
    ValueError
        (from xarray) if it rejects the region: tiles must match the store's
        variables and lie on its chunk grid (the same ``tile_shape``).

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np, xarray as xr
    >>> template = xr.Dataset({"sci": (("wavelength", "y", "x"), np.zeros((2, 4, 6)))})
    >>> store = init_tiled_store(os.path.join(tempfile.mkdtemp(), "m.zarr"), template, (4, 3))
    >>> tile = xr.Dataset({"sci": (("wavelength", "y", "x"), np.full((2, 4, 3), 7.0))})
    >>> write_tile(store, tile, 0, 3)
    >>> cube = xr.open_zarr(store, consolidated=False)
    >>> cube.sci.isel(x=slice(3, 6)).values.tolist() == tile.sci.values.tolist()
    True
    """
    keep = [n for n in tile.data_vars if "y" in tile[n].dims]
    ds = tile[keep].drop_vars(list(tile.coords), errors="ignore")
    for name in ds.data_vars:
        ds[name].attrs = {}
        ds[name].encoding = {}
    ds.attrs = {}
    region = {
        "y": slice(y0, y0 + tile.sizes["y"]),
        "x": slice(x0, x0 + tile.sizes["x"]),
    }
    for dim in ds.dims:
        if dim not in region:
            region[dim] = slice(0, ds.sizes[dim])
    ds.to_zarr(path, region=region, consolidated=False)
