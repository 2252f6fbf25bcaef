"""Quick-look plots of a cube: white light, coverage, channel maps and a spectrum.

matplotlib is imported inside the functions (Agg backend when none is chosen),
so importing this module costs nothing. Every function takes an
:class:`xarray.Dataset` cube (from :func:`drizzle3d.io.load_cube` or
``Drizzle3D.to_dataset()``) and returns the :class:`matplotlib.figure.Figure`;
``path=`` also saves it (PNG by suffix).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import xarray as xr

__all__ = [
    "plot_channel_maps",
    "plot_coverage",
    "plot_spectrum",
    "plot_white_light",
    "quicklook",
    "white_light",
]

logger = logging.getLogger(__name__)


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in (
        "agg",
        "pdf",
        "svg",
        "cairo",
    ) and not os.environ.get("DISPLAY"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _celestial(ds: xr.Dataset):
    if "wcs" not in ds.attrs:
        return None
    from astropy.io import fits
    from astropy.wcs import WCS

    return WCS(fits.Header.fromstring(ds.attrs["wcs"])).celestial


def _finish(fig, path):
    if path is not None:
        tmp = f"{os.fspath(path)}.tmp.png"
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
        logger.info("wrote %s", path)
    return fig


def white_light(ds: xr.Dataset) -> xr.DataArray:
    """Weighted mean over wavelength of ``sci`` (weights ``wht``), NaN where empty.

    Parameters
    ----------
    ds : xarray.Dataset
        A cube.

    Returns
    -------
    xarray.DataArray
        ``(y, x)`` image.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> dims = ("wavelength", "y", "x")
    >>> ds = xr.Dataset(
    ...     {"sci": (dims, np.arange(24.0).reshape(2, 3, 4)), "wht": (dims, np.ones((2, 3, 4))),
    ...      "count": (dims, np.full((2, 3, 4), 2))},
    ...     coords={"wavelength": [1.25, 1.75]},
    ... )
    >>> img = white_light(ds)  # planes k and k + 12, equal weights: k + 6
    >>> img.dims, img.values[0].tolist()
    (('y', 'x'), [6.0, 7.0, 8.0, 9.0])
    """
    sci = np.asarray(ds["sci"].values, dtype=float)
    wht = np.asarray(ds["wht"].values, dtype=float) if "wht" in ds else np.isfinite(sci) * 1.0
    good = np.isfinite(sci) & (wht > 0)
    num = np.where(good, sci * wht, 0.0).sum(axis=0)
    den = np.where(good, wht, 0.0).sum(axis=0)
    img = np.full(num.shape, np.nan)
    np.divide(num, den, out=img, where=den > 0)
    return xr.DataArray(img, dims=("y", "x"), name="white_light")


def _image_axes(fig, ds, pos=111):
    wcs = _celestial(ds)
    if wcs is None:
        return fig.add_subplot(pos)
    ax = fig.add_subplot(pos, projection=wcs)
    ax.set_xlabel("RA")
    ax.set_ylabel("Dec")
    return ax


def plot_white_light(ds: xr.Dataset, path=None, *, mark=None):
    """White-light image with sky coordinates.

    Parameters
    ----------
    ds : xarray.Dataset
        A cube.
    path : str or os.PathLike, optional
        Save the figure here.
    mark : tuple of float, optional
        ``(ra, dec)`` to mark with a circle.

    Returns
    -------
    matplotlib.figure.Figure
        The figure (pixel axes when the cube has no ``wcs`` attribute).

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np, xarray as xr
    >>> dims = ("wavelength", "y", "x")
    >>> ds = xr.Dataset(
    ...     {"sci": (dims, np.arange(24.0).reshape(2, 3, 4)), "wht": (dims, np.ones((2, 3, 4))),
    ...      "count": (dims, np.full((2, 3, 4), 2))},
    ...     coords={"wavelength": [1.25, 1.75]},
    ... )
    >>> png = os.path.join(tempfile.mkdtemp(), "white.png")
    >>> fig = plot_white_light(ds, png)
    >>> os.path.getsize(png) > 1000, fig.axes[0].get_title()
    (True, 'white light (weighted mean over wavelength)')
    >>> import matplotlib.pyplot as plt
    >>> plt.close(fig)
    """
    plt = _plt()
    img = white_light(ds).values
    fig = plt.figure(figsize=(6, 5.5))
    ax = _image_axes(fig, ds)
    finite = img[np.isfinite(img)]
    lo, hi = np.percentile(finite, [1, 99.5]) if finite.size else (0, 1)
    im = ax.imshow(img, origin="lower", vmin=lo, vmax=hi, cmap="magma")
    fig.colorbar(im, ax=ax, label=ds["sci"].attrs.get("units", ""))
    if mark is not None:
        wcs = _celestial(ds)
        if wcs is not None:
            x, y = wcs.world_to_pixel_values(*mark)
            ax.plot([x], [y], marker="o", mfc="none", mec="cyan", ms=14)
    ax.set_title("white light (weighted mean over wavelength)")
    return _finish(fig, path)


def plot_coverage(ds: xr.Dataset, path=None):
    """Coverage map: mean number of contributing input pixels per voxel.

    Parameters
    ----------
    ds : xarray.Dataset
        A cube with a ``count`` variable.
    path : str or os.PathLike, optional
        Save the figure here.

    Returns
    -------
    matplotlib.figure.Figure
        The figure: one image of ``count`` averaged over wavelength.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> dims = ("wavelength", "y", "x")
    >>> ds = xr.Dataset(
    ...     {"sci": (dims, np.arange(24.0).reshape(2, 3, 4)), "wht": (dims, np.ones((2, 3, 4))),
    ...      "count": (dims, np.full((2, 3, 4), 2))},
    ...     coords={"wavelength": [1.25, 1.75]},
    ... )
    >>> fig = plot_coverage(ds)
    >>> float(fig.axes[0].images[0].get_array().mean())
    2.0
    >>> import matplotlib.pyplot as plt
    >>> plt.close(fig)
    """
    plt = _plt()
    cov = np.asarray(ds["count"].values, dtype=float).mean(axis=0)
    fig = plt.figure(figsize=(6, 5.5))
    ax = _image_axes(fig, ds)
    im = ax.imshow(cov, origin="lower", cmap="viridis")
    fig.colorbar(im, ax=ax, label="input pixels per voxel (mean over wavelength)")
    ax.set_title("coverage")
    return _finish(fig, path)


def plot_channel_maps(ds: xr.Dataset, path=None, *, n: int = 9):
    """Grid of ``n`` channel maps evenly spread over the wavelength axis.

    Parameters
    ----------
    ds : xarray.Dataset
        A cube.
    path : str or os.PathLike, optional
        Save the figure here.
    n : int, optional
        Number of panels (at most the number of bins).

    Returns
    -------
    matplotlib.figure.Figure
        The figure, one panel per map titled with its wavelength.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> dims = ("wavelength", "y", "x")
    >>> ds = xr.Dataset(
    ...     {"sci": (dims, np.arange(24.0).reshape(2, 3, 4)), "wht": (dims, np.ones((2, 3, 4))),
    ...      "count": (dims, np.full((2, 3, 4), 2))},
    ...     coords={"wavelength": [1.25, 1.75]},
    ... )
    >>> fig = plot_channel_maps(ds, n=9)  # only 2 bins: 2 panels
    >>> [ax.get_title() for ax in fig.axes if ax.images]
    ['1.250 um', '1.750 um']
    >>> import matplotlib.pyplot as plt
    >>> plt.close(fig)
    """
    plt = _plt()
    nz = ds.sizes["wavelength"]
    n = max(1, min(int(n), nz))
    idx = np.unique(np.linspace(0, nz - 1, n).round().astype(int))
    ncol = int(np.ceil(np.sqrt(idx.size)))
    nrow = int(np.ceil(idx.size / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol, 2.6 * nrow), squeeze=False)
    sci = np.asarray(ds["sci"].values, dtype=float)
    finite = sci[np.isfinite(sci)]
    lo, hi = np.percentile(finite, [1, 99.5]) if finite.size else (0, 1)
    for ax, k in zip(axes.flat, idx, strict=False):
        ax.imshow(sci[k], origin="lower", vmin=lo, vmax=hi, cmap="magma")
        ax.set_title(f"{float(ds['wavelength'].values[k]):.3f} um", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[idx.size :]:
        ax.axis("off")
    fig.tight_layout()
    return _finish(fig, path)


def plot_spectrum(spectrum: xr.Dataset, path=None, *, truth=None, label="extracted"):
    """Spectrum with 1-sigma error bars at the effective wavelength of each point.

    Parameters
    ----------
    spectrum : xarray.Dataset
        From :func:`drizzle3d.pipeline.extract_spectrum` (``flux``, ``error``,
        ``wave_eff``).
    path : str or os.PathLike, optional
        Save the figure here.
    truth : tuple of array_like, optional
        ``(wavelength, flux)`` drawn as a line for comparison.
    label : str, optional
        Legend label of the data.

    Returns
    -------
    matplotlib.figure.Figure
        The figure.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> spec = xr.Dataset(
    ...     {"flux": ("wavelength", [1.0, 2.0, 1.5]), "error": ("wavelength", [0.1, 0.1, 0.2]),
    ...      "wave_eff": ("wavelength", [1.1, 1.2, 1.3])},
    ...     coords={"wavelength": [1.1, 1.2, 1.3]}, attrs={"ra": 150.0, "dec": 2.0, "units": "mJy"},
    ... )
    >>> fig = plot_spectrum(spec, truth=([1.0, 1.4], [1.5, 1.5]))
    >>> ax = fig.axes[0]
    >>> ax.get_ylabel(), [t.get_text() for t in ax.get_legend().get_texts()]
    ('flux (mJy)', ['truth', 'extracted'])
    >>> import matplotlib.pyplot as plt
    >>> plt.close(fig)
    """
    plt = _plt()
    x = np.asarray(spectrum["wave_eff"].values, dtype=float)
    if not np.any(np.isfinite(x)):
        x = np.asarray(spectrum["wavelength"].values, dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.errorbar(
        x,
        spectrum["flux"].values,
        yerr=spectrum["error"].values,
        fmt="o",
        ms=4,
        capsize=2,
        label=label,
    )
    if truth is not None:
        ax.plot(np.asarray(truth[0]), np.asarray(truth[1]), "-", color="0.3", label="truth")
    ax.set_xlabel("effective wavelength (um)")
    ax.set_ylabel(f"flux ({spectrum.attrs.get('units', '')})")
    ax.set_title(
        f"spectrum at ({spectrum.attrs.get('ra', 0):.5f}, {spectrum.attrs.get('dec', 0):.5f})"
    )
    ax.legend()
    fig.tight_layout()
    return _finish(fig, path)


def quicklook(
    ds: xr.Dataset, out_dir, *, spectrum: xr.Dataset | None = None, truth=None, stem="cube"
):
    """Write the quick-look PNGs of a cube into ``out_dir``.

    Parameters
    ----------
    ds : xarray.Dataset
        A cube.
    out_dir : str or os.PathLike
        Directory (created).
    spectrum : xarray.Dataset, optional
        A spectrum to plot as well.
    truth : tuple of array_like, optional
        ``(wavelength, flux)`` for the spectrum plot.
    stem : str, optional
        File name prefix.

    Returns
    -------
    dict
        ``{"white_light": Path, "coverage": Path, "channels": Path[, "spectrum": Path]}``.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np, xarray as xr
    >>> dims = ("wavelength", "y", "x")
    >>> ds = xr.Dataset(
    ...     {"sci": (dims, np.arange(24.0).reshape(2, 3, 4)), "wht": (dims, np.ones((2, 3, 4))),
    ...      "count": (dims, np.full((2, 3, 4), 2))},
    ...     coords={"wavelength": [1.25, 1.75]},
    ... )
    >>> paths = quicklook(ds, tempfile.mkdtemp(), stem="demo")
    >>> sorted(paths), paths["coverage"].name, all(p.exists() for p in paths.values())
    (['channels', 'coverage', 'white_light'], 'demo_coverage.png', True)
    """
    from pathlib import Path

    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mark = None
    if spectrum is not None:
        mark = (spectrum.attrs.get("ra"), spectrum.attrs.get("dec"))
    paths = {
        "white_light": out / f"{stem}_white_light.png",
        "coverage": out / f"{stem}_coverage.png",
        "channels": out / f"{stem}_channels.png",
    }
    plt.close(plot_white_light(ds, paths["white_light"], mark=mark))
    plt.close(plot_coverage(ds, paths["coverage"]))
    plt.close(plot_channel_maps(ds, paths["channels"]))
    if spectrum is not None:
        paths["spectrum"] = out / f"{stem}_spectrum.png"
        plt.close(plot_spectrum(spectrum, paths["spectrum"], truth=truth))
    return paths
