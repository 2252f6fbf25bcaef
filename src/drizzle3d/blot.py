"""Blot (cube -> exposure) and outlier rejection for the 3-D drizzle.

:func:`blot_cube` is the inverse of :class:`~drizzle3d.Drizzle3D`: it evaluates a
``(wavelength, y, x)`` cube at each input pixel's output position, averaged over
the pixel's band, giving an image of the input's shape, as STScI drizzle's
``blot_image`` does for 2-D images. :func:`find_outliers` builds the classic
two-pass outlier rejection on it (drizzlepac's ``driz_cr``): a robust first cube
from the per-voxel median of single-exposure drizzles, blotted back to every
exposure, and a test of each pixel against the blot with a noise term and a
term proportional to the blot's local derivative.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numba
import numpy as np
from numpy.typing import ArrayLike, NDArray

from drizzle3d._validate import as_map, exclude_mask

__all__ = ["INTERPOLATIONS", "Exposure", "blot_cube", "find_outliers"]

logger = logging.getLogger(__name__)

#: Spatial interpolations accepted by :func:`blot_cube`.
INTERPOLATIONS = ("nearest", "linear", "cubic")
#: Spectral models accepted by :func:`blot_cube`.
SPECTRAL_MODELS = ("linear", "constant")
_INTERP_IDS = {"nearest": 0, "linear": 1, "cubic": 2}
_SPECTRAL_IDS = {"constant": 0, "linear": 1}


def _jit(func):
    return numba.njit(cache=True, nogil=True, error_model="numpy")(func)


# --------------------------------------------------------------------------------------------
# Exposure
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Exposure:
    """One input exposure, ready to drizzle: pixels plus where they land.

    Parameters
    ----------
    data, var : numpy.ndarray, shape (ny, nx)
        Surface brightness and its variance.
    flags : numpy.ndarray of int, shape (ny, nx), or None
        Flag bits (``None``: no flags).
    pixmap : numpy.ndarray, shape (ny, nx, 2)
        Output ``x, y`` (0-based) of each pixel centre, as for
        :meth:`Drizzle3D.add_image <drizzle3d.Drizzle3D.add_image>`.
    wavemap : numpy.ndarray, shape (ny, nx, 2)
        Central wavelength and bandwidth (um) of each pixel.
    weight_map : numpy.ndarray, shape (ny, nx), optional
        Extra per-pixel weights passed to ``add_image``.
    exptime : float, optional
        Exposure time passed to ``add_image``.
    name : str, optional
        A label for logs (e.g. the file name).

    Raises
    ------
    ValueError
        If the arrays do not share the image shape.

    Examples
    --------
    >>> import numpy as np
    >>> y, x = np.indices((4, 4), dtype=float)
    >>> e = Exposure(np.ones((4, 4)), np.ones((4, 4)), None, np.dstack([x, y]),
    ...              np.dstack([np.full((4, 4), 2.0), np.full((4, 4), 0.05)]))
    >>> e.shape
    (4, 4)
    """

    data: np.ndarray
    var: np.ndarray
    flags: np.ndarray | None
    pixmap: np.ndarray
    wavemap: np.ndarray
    weight_map: np.ndarray | None = None
    exptime: float = 1.0
    name: str = field(default="")

    def __post_init__(self):
        data = np.asarray(self.data)
        if data.ndim != 2:
            raise ValueError(f"'data' must be 2-D (ny, nx); got shape {data.shape}.")
        shape = data.shape
        for name in ("var", "flags", "weight_map"):
            arr = getattr(self, name)
            if arr is not None and np.shape(arr) != shape:
                raise ValueError(
                    f"'{name}' must have the shape of 'data' {shape}; got {np.shape(arr)}."
                )
        for name in ("pixmap", "wavemap"):
            arr = getattr(self, name)
            if np.shape(arr) != (*shape, 2):
                raise ValueError(f"'{name}' must have shape {(*shape, 2)}; got {np.shape(arr)}.")
        if self.flags is not None and np.asarray(self.flags).dtype.kind not in "iu":
            raise TypeError(
                f"'flags' must be an integer array; got dtype {np.asarray(self.flags).dtype}."
            )

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)`` of the exposure.

        Returns
        -------
        tuple of int
            The shape of ``data``.

        Examples
        --------
        >>> import numpy as np
        >>> y, x = np.indices((3, 5), dtype=float)
        >>> e = Exposure(np.ones((3, 5)), np.ones((3, 5)), None, np.dstack([x, y]),
        ...              np.dstack([np.full((3, 5), 2.0), np.full((3, 5), 0.05)]))
        >>> e.shape
        (3, 5)
        """
        return tuple(np.shape(self.data))


# --------------------------------------------------------------------------------------------
# Compiled kernels
# --------------------------------------------------------------------------------------------
@_jit
def _clamp(i, n):
    if i < 0:
        return 0
    if i > n - 1:
        return n - 1
    return i


@_jit
def _keys(t):
    """Keys (a = -0.5) cubic convolution weights for offsets -1, 0, 1, 2."""
    t2 = t * t
    t3 = t2 * t
    w0 = -0.5 * t3 + t2 - 0.5 * t
    w1 = 1.5 * t3 - 2.5 * t2 + 1.0
    w2 = -1.5 * t3 + 2.0 * t2 + 0.5 * t
    w3 = 0.5 * t3 - 0.5 * t2
    return w0, w1, w2, w3


@_jit
def _spatial_weights(x, y, nx, ny, interp, wts, iis, jjs):
    """Fill interpolation weights and (clamped) cube indices; return how many."""
    if interp == 0:
        iis[0] = _clamp(math.floor(x + 0.5), nx)
        jjs[0] = _clamp(math.floor(y + 0.5), ny)
        wts[0] = 1.0
        return 1
    i0 = math.floor(x)
    j0 = math.floor(y)
    tx = x - i0
    ty = y - j0
    n = 0
    if interp == 1:
        wx = (1.0 - tx, tx)
        wy = (1.0 - ty, ty)
        for b in range(2):
            for a in range(2):
                w = wy[b] * wx[a]
                if w != 0.0:
                    wts[n] = w
                    iis[n] = _clamp(i0 + a, nx)
                    jjs[n] = _clamp(j0 + b, ny)
                    n += 1
        return n
    kx = _keys(tx)
    ky = _keys(ty)
    for b in range(4):
        for a in range(4):
            w = ky[b] * kx[a]
            if w != 0.0:
                wts[n] = w
                iis[n] = _clamp(i0 - 1 + a, nx)
                jjs[n] = _clamp(j0 - 1 + b, ny)
                n += 1
    return n


@_jit
def _integrate_linear(mu, v, m, lo, hi):
    """Mean over [lo, hi] of the piecewise-linear curve through (mu, v), flat beyond its ends."""
    total = 0.0
    b = min(hi, mu[0])
    if b > lo:
        total += v[0] * (b - lo)
    for s in range(m - 1):
        a = max(lo, mu[s])
        b = min(hi, mu[s + 1])
        span = mu[s + 1] - mu[s]
        if b > a and span > 0.0:
            va = v[s] + (v[s + 1] - v[s]) * (a - mu[s]) / span
            vb = v[s] + (v[s + 1] - v[s]) * (b - mu[s]) / span
            total += 0.5 * (va + vb) * (b - a)
    a = max(lo, mu[m - 1])
    if hi > a:
        total += v[m - 1] * (hi - a)
    return total / (hi - lo)


@_jit
def _blot_kernel(
    cube, nodes, has_nodes, centres, bin_lo, bin_hi, pixmap, wavemap,
    interp, spectral, min_coverage, fillval, y0, y1, x0, x1, only_missing, out,
):  # fmt: skip
    """Blot ``cube`` (nz, ny, nx) onto ``out`` (ny_in, nx_in) over the input box y0..y1, x0..x1.

    With ``only_missing``, pixels of ``out`` that are already finite are kept.
    """
    nz, ny, nx = cube.shape
    wts = np.empty(16)
    iis = np.empty(16, dtype=np.int64)
    jjs = np.empty(16, dtype=np.int64)
    vbuf = np.empty(nz)
    mbuf = np.empty(nz)
    okbuf = np.empty(nz, dtype=np.bool_)
    mu = np.empty(nz)
    vv = np.empty(nz)
    nfilled = 0
    for j in range(y0, y1 + 1):
        for i in range(x0, x1 + 1):
            if only_missing and math.isfinite(out[j, i]):
                continue
            x = pixmap[j, i, 0]
            y = pixmap[j, i, 1]
            lam = wavemap[j, i, 0]
            bw = wavemap[j, i, 1]
            out[j, i] = fillval
            if not (
                math.isfinite(x) and math.isfinite(y) and math.isfinite(lam) and math.isfinite(bw)
            ):
                continue
            if bw <= 0.0 or x < -0.5 or y < -0.5 or x > nx - 0.5 or y > ny - 0.5:
                continue
            lo = lam - 0.5 * bw
            hi = lam + 0.5 * bw
            # bins overlapping the band: first with bin_hi > lo, last with bin_lo < hi
            kl = np.searchsorted(bin_hi, lo, side="right")
            kh = np.searchsorted(bin_lo, hi, side="left") - 1
            if kl > kh:
                continue
            nw = _spatial_weights(x, y, nx, ny, interp, wts, iis, jjs)
            k0 = max(kl - 1, 0) if spectral == 1 else kl
            k1 = min(kh + 1, nz - 1) if spectral == 1 else kh
            for k in range(k0, k1 + 1):
                s = 0.0
                sm = 0.0
                ok = True
                for n in range(nw):
                    c = cube[k, jjs[n], iis[n]]
                    if not math.isfinite(c):
                        ok = False
                        break
                    s += wts[n] * c
                    if has_nodes:
                        sm += wts[n] * nodes[k, jjs[n], iis[n]]
                if ok and has_nodes and not math.isfinite(sm):
                    ok = False
                okbuf[k - k0] = ok
                vbuf[k - k0] = s
                if has_nodes:
                    mbuf[k - k0] = min(max(sm, bin_lo[k]), bin_hi[k])
                else:
                    mbuf[k - k0] = centres[k]
            num = 0.0
            cov = 0.0
            for k in range(kl, kh + 1):
                if okbuf[k - k0]:
                    o = min(hi, bin_hi[k]) - max(lo, bin_lo[k])
                    if o > 0.0:
                        num += o * vbuf[k - k0]
                        cov += o
            if cov <= 0.0 or cov < min_coverage * bw:
                continue
            if spectral == 0:
                out[j, i] = num / cov
            else:
                m = 0
                for k in range(k0, k1 + 1):
                    if okbuf[k - k0]:
                        mu[m] = mbuf[k - k0]
                        vv[m] = vbuf[k - k0]
                        m += 1
                out[j, i] = _integrate_linear(mu, vv, m, lo, hi)
            nfilled += 1
    return nfilled


@_jit
def _robust_combine(stack, wstack, out, wout):
    """Per-voxel robust combination of a (nz, ny, nx, n_exp) float32 stack.

    Median of the finite values when there are 3 or more, the smaller of two
    (cosmic rays are positive), NaN for fewer. ``wout`` gets the matching
    value of ``wstack`` (the effective wavelength of the sample(s) chosen).
    """
    nz, ny, nx, n = stack.shape
    buf = np.empty(n)
    wbuf = np.empty(n)
    for k in range(nz):
        for j in range(ny):
            for i in range(nx):
                m = 0
                for e in range(n):
                    v = stack[k, j, i, e]
                    if math.isfinite(v):
                        # insertion sort as we gather
                        p = m
                        while p > 0 and buf[p - 1] > v:
                            buf[p] = buf[p - 1]
                            wbuf[p] = wbuf[p - 1]
                            p -= 1
                        buf[p] = v
                        wbuf[p] = wstack[k, j, i, e]
                        m += 1
                if m < 2:
                    out[k, j, i] = np.nan
                    wout[k, j, i] = np.nan
                elif m == 2:
                    out[k, j, i] = buf[0]
                    wout[k, j, i] = wbuf[0]
                elif m % 2 == 1:
                    out[k, j, i] = buf[m // 2]
                    wout[k, j, i] = wbuf[m // 2]
                else:
                    out[k, j, i] = 0.5 * (buf[m // 2 - 1] + buf[m // 2])
                    wout[k, j, i] = 0.5 * (wbuf[m // 2 - 1] + wbuf[m // 2])


@_jit
def _broadband_combine(stack, wstack, out, wout):
    """Robust broad-band image: per exposure the mean over its bins, then as ``_robust_combine``.

    ``out`` and ``wout`` are (1, ny, nx): a one-bin cube covering all the bins.
    """
    nz, ny, nx, n = stack.shape
    buf = np.empty(n)
    wbuf = np.empty(n)
    for j in range(ny):
        for i in range(nx):
            m = 0
            for e in range(n):
                s = 0.0
                sw = 0.0
                c = 0
                for k in range(nz):
                    v = stack[k, j, i, e]
                    if math.isfinite(v):
                        s += v
                        sw += wstack[k, j, i, e]
                        c += 1
                if c == 0:
                    continue
                v = s / c
                p = m
                while p > 0 and buf[p - 1] > v:
                    buf[p] = buf[p - 1]
                    wbuf[p] = wbuf[p - 1]
                    p -= 1
                buf[p] = v
                wbuf[p] = sw / c
                m += 1
            if m < 2:
                out[0, j, i] = np.nan
                wout[0, j, i] = np.nan
            elif m == 2:
                out[0, j, i] = buf[0]
                wout[0, j, i] = wbuf[0]
            elif m % 2 == 1:
                out[0, j, i] = buf[m // 2]
                wout[0, j, i] = wbuf[m // 2]
            else:
                out[0, j, i] = 0.5 * (buf[m // 2 - 1] + buf[m // 2])
                wout[0, j, i] = 0.5 * (wbuf[m // 2 - 1] + wbuf[m // 2])


# --------------------------------------------------------------------------------------------
# blot_cube
# --------------------------------------------------------------------------------------------
def _cube_arrays(cube, wave):
    """(values (nz, ny, nx) float64 with NaN where empty, nodes or None, bin_lo, bin_hi)."""
    from drizzle3d.resample import Drizzle3D  # a sibling layer; imported late to stay light

    if isinstance(cube, Drizzle3D):
        wht = np.asarray(cube.out_wht, dtype=np.float64)
        values = np.asarray(cube.out_sci, dtype=np.float64).copy()
        values[~(wht > 0)] = np.nan
        edges = np.asarray(cube.wave_edges, dtype=np.float64)
        lo, hi = edges[:-1].copy(), edges[1:].copy()
        if wave is None:
            try:
                wave = np.asarray(cube.out_wave, dtype=np.float64)
            except AttributeError:  # built with track_wave=False
                wave = None
    else:
        try:
            import xarray as xr
        except ImportError as err:  # pragma: no cover - xarray is a hard dependency
            raise TypeError("'cube' must be an xarray.DataArray or a Drizzle3D.") from err
        if not isinstance(cube, xr.DataArray):
            raise TypeError(
                f"'cube' must be an xarray.DataArray or a Drizzle3D; got {type(cube).__name__}."
            )
        if set(cube.dims) != {"wavelength", "y", "x"}:
            raise ValueError(f"'cube' must have dims ('wavelength', 'y', 'x'); got {cube.dims}.")
        cube = cube.transpose("wavelength", "y", "x")
        if "wavelength_min" not in cube.coords or "wavelength_max" not in cube.coords:
            raise ValueError(
                "'cube' must carry 'wavelength_min' and 'wavelength_max' coordinates (the bin "
                f"edges, as Drizzle3D.out_sci does); got coords {list(cube.coords)}."
            )
        values = np.array(cube.values, dtype=np.float64)
        lo = np.asarray(cube["wavelength_min"].values, dtype=np.float64).copy()
        hi = np.asarray(cube["wavelength_max"].values, dtype=np.float64).copy()
    if values.ndim != 3:
        raise ValueError(f"'cube' must be 3-D (wavelength, y, x); got shape {values.shape}.")
    if not (np.all(hi > lo) and np.all(np.diff(lo) > 0) and np.all(np.diff(hi) > 0)):
        raise ValueError("'cube' wavelength bins must be increasing with wavelength_max > _min.")
    nodes = None
    if wave is not None:
        if hasattr(wave, "transpose") and hasattr(wave, "dims"):
            wave = wave.transpose("wavelength", "y", "x")
        nodes = np.ascontiguousarray(np.asarray(wave, dtype=np.float64))
        if nodes.shape != values.shape:
            raise ValueError(
                f"'wave' must have the cube's shape {values.shape}; got {nodes.shape}."
            )
    return np.ascontiguousarray(values), nodes, lo, hi


def _blot_arrays(
    values, nodes, lo, hi, pixmap, wavemap, interp, spectral, fillval, min_cov, box, out=None
):  # fmt: skip
    """Blot onto a new image, or (``out`` given) fill only its non-finite pixels."""
    ny_in, nx_in = pixmap.shape[:2]
    only_missing = out is not None
    if out is None:
        out = np.empty((ny_in, nx_in), dtype=np.float64)
        if box is not None:
            out.fill(fillval)
    if box is None:
        y0, y1, x0, x1 = 0, ny_in - 1, 0, nx_in - 1
    else:
        y0, y1, x0, x1 = box
    has_nodes = nodes is not None
    _blot_kernel(
        values,
        nodes if has_nodes else np.zeros((1, 1, 1)),
        has_nodes,
        0.5 * (lo + hi),
        lo,
        hi,
        pixmap,
        wavemap,
        _INTERP_IDS[interp],
        _SPECTRAL_IDS[spectral],
        float(min_cov),
        float(fillval),
        y0,
        y1,
        x0,
        x1,
        only_missing,
        out,
    )
    return out


def blot_cube(
    cube,
    pixmap: ArrayLike,
    wavemap: ArrayLike,
    *,
    interp: str = "linear",
    fillval: float = np.nan,
    spectral: str = "constant",
    wave: ArrayLike | None = None,
    min_coverage: float = 0.5,
) -> NDArray[np.float64]:
    """Evaluate a cube at each input pixel's position, averaged over the pixel's band.

    The inverse of :meth:`Drizzle3D.add_image <drizzle3d.Drizzle3D.add_image>`
    (the 3-D counterpart of STScI drizzle's ``blot_image``): for every input
    pixel, the cube is interpolated spatially at the pixel's output position
    ``pixmap`` and its spectrum is averaged over the pixel's band, a top-hat of
    width ``bandwidth`` about the central wavelength (``wavemap``), across the
    wavelength bins the band overlaps. The result is surface brightness, like the
    cube (not flux conserving, as in drizzle).

    Parameters
    ----------
    cube : xarray.DataArray or Drizzle3D
        A cube with dims ``("wavelength", "y", "x")`` and coordinates
        ``wavelength_min`` / ``wavelength_max`` (bin edges, um), such as
        :attr:`Drizzle3D.out_sci <drizzle3d.Drizzle3D.out_sci>`; or the
        ``Drizzle3D`` itself (its voxels without weight are treated as empty, and
        its :attr:`~drizzle3d.Drizzle3D.out_wave` gives the spectral nodes). NaN
        voxels are empty.
    pixmap : array_like, shape (ny_in, nx_in, 2)
        Output ``x, y`` (0-based pixel coordinates of the cube) of each input
        pixel centre; NaN maps nowhere.
    wavemap : array_like, shape (ny_in, nx_in, 2)
        Central wavelength and bandwidth (um) of each input pixel.
    interp : {"linear", "nearest", "cubic"}, optional
        Spatial interpolation: bilinear, nearest voxel, or Keys cubic convolution
        (``a = -0.5``, 4 x 4 voxels). Positions up to half a pixel outside the
        cube's outer pixel centres use the edge voxels.
    fillval : float, optional
        Value of pixels where the cube has no data (default NaN).
    spectral : {"constant", "linear"}, optional
        Model of the spectrum between bins. ``"constant"`` (default, the drizzle
        model of a voxel): each bin's value is constant over the bin, so the band
        average is the overlap-weighted mean of the bins the band overlaps.
        ``"linear"``: the spectrum is piecewise linear through one node per bin
        (at the bin's effective wavelength ``wave``, or its centre), flat beyond
        the outer nodes, and is integrated exactly over the band; this follows a
        sloping continuum far better when bins are much wider than the band (as
        in the robust cube of :func:`find_outliers`).
    wave : array_like, shape (nz, ny, nx), optional
        Wavelength (um) of each voxel's node for ``spectral="linear"``, e.g.
        ``Drizzle3D.out_wave``. Default: the ``Drizzle3D``'s ``out_wave`` when
        ``cube`` is one, else the bin centres. Clipped to each bin.
    min_coverage : float, optional
        Smallest fraction of the band that must fall in bins with data (the rest
        lies outside the cube's wavelength range or in empty voxels); other pixels
        get ``fillval``. The average is taken over the covered part.

    Returns
    -------
    numpy.ndarray
        float64 ``(ny_in, nx_in)`` image.

    Raises
    ------
    TypeError
        If ``cube`` is not a DataArray or Drizzle3D, or a map is not numeric.
    ValueError
        For inconsistent shapes, unknown ``interp``/``spectral``, or a cube
        without wavelength bin edges.

    Notes
    -----
    A spatial interpolation touching an empty voxel makes that bin unusable at
    that pixel (no partial renormalisation), so the blot of a cube shrinks by
    about one voxel at the edges of its coverage. Compiled with numba; one pass
    over the input pixels, touching only the 1-3 bins each band overlaps.

    Examples
    --------
    >>> import numpy as np
    >>> from drizzle3d import Drizzle3D
    >>> d = Drizzle3D(out_shape=(2, 6, 6), wave_edges=[1.0, 1.5, 2.0], weighting="uniform")
    >>> y, x = np.indices((6, 6), dtype=float)
    >>> pixmap = np.dstack([x, y])
    >>> wavemap = np.dstack([np.full((6, 6), 1.5), np.full((6, 6), 0.4)])
    >>> _ = d.add_image(np.full((6, 6), 3.0), np.ones((6, 6)), None, pixmap, wavemap)
    >>> float(blot_cube(d.out_sci, pixmap, wavemap)[2, 3])
    3.0
    """
    if not isinstance(interp, str) or interp.lower() not in INTERPOLATIONS:
        raise ValueError(f"'interp' must be one of {INTERPOLATIONS}; got {interp!r}.")
    if not isinstance(spectral, str) or spectral.lower() not in SPECTRAL_MODELS:
        raise ValueError(f"'spectral' must be one of {SPECTRAL_MODELS}; got {spectral!r}.")
    if isinstance(fillval, bool) or not isinstance(fillval, numbers.Real):
        raise TypeError(f"'fillval' must be a real number (NaN allowed); got {fillval!r}.")
    if isinstance(min_coverage, bool) or not isinstance(min_coverage, numbers.Real):
        raise TypeError(f"'min_coverage' must be a real number; got {min_coverage!r}.")
    if not 0.0 < float(min_coverage) <= 1.0:
        raise ValueError(f"'min_coverage' must be in (0, 1]; got {min_coverage!r}.")
    pixmap = as_map("pixmap", pixmap)
    wavemap = as_map("wavemap", wavemap)
    if wavemap.shape != pixmap.shape:
        raise ValueError(
            f"'wavemap' must have the shape of 'pixmap' {pixmap.shape}; got {wavemap.shape}."
        )
    values, nodes, lo, hi = _cube_arrays(cube, wave)
    return _blot_arrays(
        values,
        nodes,
        lo,
        hi,
        pixmap,
        wavemap,
        interp.lower(),
        spectral.lower(),
        float(fillval),
        float(min_coverage),
        None,
    )


# --------------------------------------------------------------------------------------------
# Outlier rejection
# --------------------------------------------------------------------------------------------
def _pair(name, value) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"'{name}' must be a pair of numbers; got {value!r}.") from err
    if not (math.isfinite(a) and math.isfinite(b)) or a < 0 or b < 0:
        raise ValueError(f"'{name}' must be two finite numbers >= 0; got {value!r}.")
    return a, b


def _landing(pixmap, ny, nx):
    """Input box (y0, y1, x0, x1) of the pixels landing in the grid and the output box they hit."""
    x = pixmap[..., 0]
    y = pixmap[..., 1]
    with np.errstate(invalid="ignore"):
        inside = (x >= -0.5) & (x <= nx - 0.5) & (y >= -0.5) & (y <= ny - 0.5)
    rows = np.flatnonzero(inside.any(axis=1))
    cols = np.flatnonzero(inside.any(axis=0))
    if rows.size == 0:
        return None, None
    in_box = (int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1]))
    xs = x[inside]
    ys = y[inside]
    # a pixel reaches about one input pixel beyond its centre; 2 output pixels of margin
    ox0 = max(int(np.floor(xs.min())) - 2, 0)
    ox1 = min(int(np.ceil(xs.max())) + 2, nx - 1)
    oy0 = max(int(np.floor(ys.min())) - 2, 0)
    oy1 = min(int(np.ceil(ys.max())) + 2, ny - 1)
    return in_box, (oy0, oy1, ox0, ox1)


def _first_pass_edges(exposures, edges, ny, nx, min_depth, step=4, block=8):
    """Merge consecutive bins of ``edges`` until each holds ~``min_depth`` exposures.

    The depth of a wavelength range ``[a, b]`` at a random sky point of the
    cube's footprint is estimated as the sum over exposures of (the fraction of
    the footprint the exposure covers) x (the fraction of its landing pixels whose
    band overlaps ``[a, b]``), from every ``step``-th pixel.
    """
    nby, nbx = ny // block + 1, nx // block + 1
    union = np.zeros(nby * nbx, dtype=bool)
    per_exp = []
    for exp in exposures:
        pm = np.asarray(exp.pixmap)[::step, ::step]
        wm = np.asarray(exp.wavemap)[::step, ::step]
        x, y = pm[..., 0], pm[..., 1]
        lam, bw = wm[..., 0], wm[..., 1]
        with np.errstate(invalid="ignore"):
            ok = (
                (x >= -0.5) & (x <= nx - 0.5) & (y >= -0.5) & (y <= ny - 0.5)
                & np.isfinite(lam) & np.isfinite(bw) & (bw > 0)
            )  # fmt: skip
        if not ok.any():
            continue
        cells = np.unique(
            np.floor((y[ok] + 0.5) / block).astype(np.int64) * nbx
            + np.floor((x[ok] + 0.5) / block).astype(np.int64)
        )
        union[cells] = True
        per_exp.append((cells.size, np.sort(lam[ok]), float(np.median(bw[ok]))))
    n_union = max(int(union.sum()), 1)

    def depth(a, b):
        total = 0.0
        for ncell, lams, bw in per_exp:
            n_in = np.searchsorted(lams, b + 0.5 * bw, "right") - np.searchsorted(
                lams, a - 0.5 * bw, "left"
            )
            total += (ncell / n_union) * n_in / lams.size
        return total

    out = [edges[0]]
    start = 0
    nz = edges.size - 1
    for k in range(1, nz + 1):
        if depth(edges[start], edges[k]) >= min_depth:
            out.append(edges[k])
            start = k
    if start < nz:  # a thin tail joins the last group
        if len(out) > 1:
            out[-1] = edges[nz]
        else:
            out.append(edges[nz])
    return np.asarray(out, dtype=np.float64)


@_jit
def _usable(data, flags, exclude, j, i):
    return math.isfinite(data[j, i]) and (np.int64(flags[j, i]) & exclude) == 0


@_jit
def _cr_test(
    data, var, blot, flags, exclude, snr1, snr2, sc1, sc2, local, y0, y1, x0, x1, first, second
):  # fmt: skip
    """The two driz_cr thresholds on the input box; marks ``first`` and ``second``.

    ``D = hypot(Dx, Dy)``, ``Dx`` (``Dy``) the blot's largest absolute difference
    with its x (y) neighbours, as drizzlepac's ``quickDeriv``. With ``local``,
    a residual is first reduced by the 3 x 3 median of the residuals around it
    when that has the same sign (what the robust cube misses over several pixels,
    such as a narrow emission line smeared by its coarse bins, is not a hit; a
    cosmic ray is an isolated spike; a sharp source's negative wings must not
    raise its peak). Only pixels above the lower threshold pay for the median.
    """
    ny, nx = data.shape
    buf = np.empty(9)
    lo_snr = min(snr1, snr2)
    lo_sc = min(sc1, sc2)
    n_first = 0
    for j in range(y0, y1 + 1):
        for i in range(x0, x1 + 1):
            b = blot[j, i]
            if not math.isfinite(b) or not _usable(data, flags, exclude, j, i):
                continue
            v = var[j, i]
            if not (math.isfinite(v) and v >= 0.0):
                continue
            sig = math.sqrt(v)
            dx = 0.0
            dy = 0.0
            for a in (i - 1, i + 1):
                if 0 <= a < nx and math.isfinite(blot[j, a]):
                    dx = max(dx, abs(b - blot[j, a]))
            for c in (j - 1, j + 1):
                if 0 <= c < ny and math.isfinite(blot[c, i]):
                    dy = max(dy, abs(b - blot[c, i]))
            deriv = math.sqrt(dx * dx + dy * dy)
            r = data[j, i] - b
            diff = abs(r)
            if diff <= lo_snr * sig + lo_sc * deriv:
                continue
            if local:
                m = 0
                for c in range(max(j - 1, 0), min(j + 2, ny)):
                    for a in range(max(i - 1, 0), min(i + 2, nx)):
                        if not math.isfinite(blot[c, a]) or not _usable(data, flags, exclude, c, a):
                            continue
                        q = data[c, a] - blot[c, a]
                        p = m
                        while p > 0 and buf[p - 1] > q:
                            buf[p] = buf[p - 1]
                            p -= 1
                        buf[p] = q
                        m += 1
                level = buf[m // 2] if m % 2 == 1 else 0.5 * (buf[m // 2 - 1] + buf[m // 2])
                same = level if r > 0 else -level
                if same > 0.0:
                    diff = max(diff - same, 0.0)
            if diff > snr1 * sig + sc1 * deriv:
                first[j, i] = True
                n_first += 1
            if diff > snr2 * sig + sc2 * deriv:
                second[j, i] = True
    return n_first


@_jit
def _mark_hits(first, second, grow, y0, y1, x0, x1, flags, bit):
    """Hits are ``second`` pixels in the 3 x 3 of a ``first`` one; grow them; set ``bit``."""
    ny, nx = first.shape
    hit = np.zeros((y1 - y0 + 1, x1 - x0 + 1), dtype=np.bool_)
    for j in range(y0, y1 + 1):
        for i in range(x0, x1 + 1):
            if first[j, i]:
                for c in range(max(j - 1, y0), min(j + 2, y1 + 1)):
                    for a in range(max(i - 1, x0), min(i + 2, x1 + 1)):
                        if second[c, a]:
                            hit[c - y0, a - x0] = True
    n = 0
    for j in range(y0, y1 + 1):
        for i in range(x0, x1 + 1):
            if hit[j - y0, i - x0]:
                for c in range(max(j - grow, 0), min(j + grow + 1, ny)):
                    for a in range(max(i - grow, 0), min(i + grow + 1, nx)):
                        if (flags[c, a] & bit) == 0:
                            flags[c, a] |= bit
                            n += 1
    return n


def _robust_cube(exposures, ny, nx, coarse, drizzle_kwargs, wrap):
    """Pass 1: single-exposure drizzles on ``coarse`` bins, then the per-voxel median.

    Returns the robust cube and its effective wavelengths (both (nz, ny, nx)),
    the robust broad-band image and its wavelengths (both (1, ny, nx)), and each
    exposure's input box landing in the grid (None if it misses).
    """
    from drizzle3d.resample import Drizzle3D  # a sibling layer

    nzc = coarse.size - 1
    n = len(exposures)
    stack = np.full((nzc, ny, nx, n), np.nan, dtype=np.float32)
    wstack = np.full((nzc, ny, nx, n), np.nan, dtype=np.float32)
    boxes = []
    for e, exp in enumerate(wrap(exposures)):
        pixmap = np.asarray(exp.pixmap, dtype=np.float64)
        in_box, out_box = _landing(pixmap, ny, nx)
        boxes.append(in_box)
        if in_box is None:
            logger.info("find_outliers: exposure %s misses the grid", exp.name or e)
            continue
        y0, y1, x0, x1 = in_box
        oy0, oy1, ox0, ox1 = out_box
        sl = (slice(y0, y1 + 1), slice(x0, x1 + 1))
        d = Drizzle3D(
            out_shape=(nzc, oy1 - oy0 + 1, ox1 - ox0 + 1),
            wave_edges=coarse,
            disable_ctx=True,
            track_wave=True,
            **drizzle_kwargs,
        )
        pm = pixmap[sl] - np.array([ox0, oy0], dtype=np.float64)
        d.add_image(
            np.asarray(exp.data)[sl],
            np.asarray(exp.var)[sl],
            None if exp.flags is None else np.asarray(exp.flags)[sl],
            pm,
            np.asarray(exp.wavemap)[sl],
            weight_map=None if exp.weight_map is None else np.asarray(exp.weight_map)[sl],
            exptime=exp.exptime,
        )
        wht = np.asarray(d.out_wht)
        sci = np.where(wht > 0, np.asarray(d.out_sci), np.nan)
        wav = np.where(wht > 0, np.asarray(d.out_wave), np.nan)
        stack[:, oy0 : oy1 + 1, ox0 : ox1 + 1, e] = sci
        wstack[:, oy0 : oy1 + 1, ox0 : ox1 + 1, e] = wav
        del d
    robust = np.empty((nzc, ny, nx), dtype=np.float64)
    rwave = np.empty((nzc, ny, nx), dtype=np.float64)
    _robust_combine(stack, wstack, robust, rwave)
    broad = np.empty((1, ny, nx), dtype=np.float64)
    bwave = np.empty((1, ny, nx), dtype=np.float64)
    _broadband_combine(stack, wstack, broad, bwave)
    del stack, wstack
    return robust, rwave, broad, bwave, boxes


def find_outliers(
    exposures: Sequence[Exposure],
    grid,
    *,
    snr: tuple[float, float] = (5.0, 4.0),
    scale: tuple[float, float] = (1.2, 0.7),
    grow: int = 1,
    outlier_bit: int = 19,
    min_depth: float = 3.0,
    first_pass_edges: ArrayLike | None = None,
    local: bool = True,
    progress: Callable[[Iterable], Iterable] | None = None,
    **drizzle_kwargs,
) -> list[np.ndarray]:
    """Find cosmic rays and other outliers by comparing each exposure with a robust cube.

    The two-pass scheme of drizzlepac's ``driz_cr``, in 3-D:

    1. Each exposure is drizzled alone onto the grid's pixels with coarser
       wavelength bins (consecutive bins of ``grid`` merged until each is seen by
       about ``min_depth`` exposures: SPHEREx sees a sky point at one wavelength
       per exposure, so a native-resolution voxel holds only one or two).
    2. The robust cube is the per-voxel median over those single-exposure cubes
       (the smaller value where only two cover a voxel; empty where only one
       does), with each voxel's effective wavelength carried along. A robust
       broad-band image (per exposure the mean over its bins, then the same
       median) is the fallback where a voxel is empty.
    3. It is blotted back onto every exposure (:func:`blot_cube`, bilinear, with
       the spectrum piecewise linear through the effective wavelengths).
    4. With ``D = hypot(Dx, Dy)`` (``Dx``, ``Dy``: the blot's largest absolute
       difference with its neighbours along x and y, as drizzlepac's
       ``quickDeriv``) and ``sigma = sqrt(var)``, a pixel is a first-pass hit if
       ``|data - blot| > snr[0] * sigma + scale[0] * D``; a hit, or a neighbour
       of one, is flagged if ``|data - blot| > snr[1] * sigma + scale[1] * D``;
       the flagged pixels are grown by ``grow`` pixels (a square). With
       ``local``, ``|data - blot|`` is first reduced by the 3 x 3 median of the
       residuals around the pixel when that has the same sign: the coarse robust
       bins smear narrow emission lines, which leaves residuals spread over many
       pixels, while a cosmic ray is an isolated spike.

    The final drizzle should then exclude ``outlier_bit``
    (``exclude_flags=... | 1 << outlier_bit``).

    Parameters
    ----------
    exposures : sequence of Exposure
        The exposures of one field (with pixmaps onto ``grid``).
    grid : OutputGrid
        The output grid (anything with ``shape`` ``(nz, ny, nx)`` and ``wave_edges``).
    snr : tuple of float, optional
        Thresholds in units of ``sigma`` for the first and second tests.
    scale : tuple of float, optional
        Multipliers of the blot derivative ``D`` for the two tests; they protect
        sharp, undersampled sources whose blot is necessarily smoothed.
    grow : int, optional
        Radius (pixels) by which flagged pixels are grown; 0 disables.
    outlier_bit : int, optional
        Flag bit to set (SPHEREx ``OUTLIER`` is 19).
    min_depth : float, optional
        Target number of exposures per voxel of the robust cube (see step 1).
    first_pass_edges : array_like, optional
        Wavelength edges (um) of the robust cube, overriding ``min_depth``.
    local : bool, optional
        Remove the residual's local level before the tests (see step 4).
    progress : callable, optional
        Wraps an iterable to report progress (e.g. ``tqdm.tqdm``); called for the
        drizzle loop and the blot loop.
    **drizzle_kwargs
        Passed to :class:`~drizzle3d.Drizzle3D` for the single-exposure drizzles
        (``kernel``, ``pixfrac``, ``weighting``, ``exclude_flags``, ...). Pixels
        with ``exclude_flags`` bits are neither used nor tested.

    Returns
    -------
    list of numpy.ndarray
        One new flag array per exposure (a copy of its flags, or int32 zeros, with
        ``outlier_bit`` set on the outliers).

    Raises
    ------
    TypeError, ValueError
        For bad arguments.

    Notes
    -----
    Pixels that land outside the grid, or where neither the robust cube nor the
    broad-band image has two exposures, cannot be tested and are never flagged.
    The noise term uses the exposure's own ``var``; SPHEREx ``VARIANCE`` includes
    the source's shot noise, which is what protects bright sources.

    **Memory.** The single-exposure cubes are held as a float32 stack of
    ``nz_robust x ny x nx x n_exposures`` values plus as many effective
    wavelengths: ``8 * nz_robust * ny * nx * n_exposures`` bytes, with
    ``nz_robust`` the number of coarse bins (typically 3-6 for one SPHEREx
    detector). Each single-exposure drizzle adds a ``Drizzle3D`` on the box the
    exposure covers (``56 * nz_robust`` bytes per output pixel of the box),
    released before the next one; the blot and its tests use a few float64
    images of the exposure's size.

    **Time.** One drizzle of every exposure on a few bins, a per-voxel median,
    one blot per exposure: about the cost of one extra drizzle pass.

    References
    ----------
    Fruchter, A. S. & Hook, R. N. 2002, PASP 114, 144, doi:10.1086/338393;
    drizzlepac's ``driz_cr`` (the derivative term and the grow step).

    Examples
    --------
    >>> import numpy as np
    >>> from drizzle3d import Drizzle3D
    >>> rng = np.random.default_rng(1)
    >>> y, x = np.indices((32, 32), dtype=float)
    >>> wm = np.dstack([np.full((32, 32), 1.5), np.full((32, 32), 0.05)])
    >>> class Grid:
    ...     shape, wave_edges = (1, 32, 32), np.array([1.4, 1.6])
    >>> exps = [Exposure(1 + 0.01 * rng.standard_normal((32, 32)), np.full((32, 32), 1e-4),
    ...                  None, np.dstack([x, y]), wm) for _ in range(5)]
    >>> exps[0].data[10, 12] += 5.0  # a cosmic ray
    >>> flags = find_outliers(exps, Grid(), grow=0, weighting="uniform")
    >>> [tuple(map(int, np.argwhere(f)[0])) for f in flags if f.any()]
    [(10, 12)]
    """
    exposures = list(exposures)
    for n, exp in enumerate(exposures):
        if not isinstance(exp, Exposure):
            raise TypeError(
                f"'exposures' must hold Exposure objects; item {n} is {type(exp).__name__}."
            )
    shape = getattr(grid, "shape", None)
    edges = getattr(grid, "wave_edges", None)
    if shape is None or edges is None or len(tuple(shape)) != 3:
        raise TypeError(
            "'grid' must be an OutputGrid (with .shape and .wave_edges); "
            f"got {type(grid).__name__}."
        )
    _, ny, nx = (int(v) for v in shape)
    edges = np.asarray(edges, dtype=np.float64)
    snr = _pair("snr", snr)
    scale = _pair("scale", scale)
    if isinstance(grow, bool) or not isinstance(grow, numbers.Integral) or grow < 0:
        raise ValueError(f"'grow' must be an integer >= 0; got {grow!r}.")
    if (
        isinstance(outlier_bit, bool)
        or not isinstance(outlier_bit, numbers.Integral)
        or not 0 <= outlier_bit < 32
    ):
        raise ValueError(f"'outlier_bit' must be an integer in 0..31; got {outlier_bit!r}.")
    if isinstance(min_depth, bool) or not isinstance(min_depth, numbers.Real) or min_depth <= 0:
        raise ValueError(f"'min_depth' must be a number > 0; got {min_depth!r}.")
    reserved = {"grid", "out_shape", "wave_edges", "state", "disable_ctx", "track_wave"}
    bad = sorted(reserved & set(drizzle_kwargs))
    if bad:
        raise TypeError(f"'drizzle_kwargs' must not set {bad}; find_outliers sets them.")
    exclude = exclude_mask(drizzle_kwargs.get("exclude_flags", 0))
    wrap = progress if progress is not None else (lambda it: it)

    if first_pass_edges is None:
        coarse = _first_pass_edges(exposures, edges, ny, nx, float(min_depth))
    else:
        coarse = np.asarray(first_pass_edges, dtype=np.float64)
        if coarse.ndim != 1 or coarse.size < 2 or not np.all(np.diff(coarse) > 0):
            raise ValueError(
                f"'first_pass_edges' must be >= 2 strictly increasing wavelengths; got {coarse!r}."
            )
    nzc = coarse.size - 1
    n = len(exposures)
    logger.info(
        "find_outliers: %d exposures, robust cube of %d bins on %d x %d pixels (%.0f MB stack)",
        n, nzc, ny, nx, 8.0 * nzc * ny * nx * n / 1e6,
    )  # fmt: skip

    robust, rwave, broad, bwave, boxes = _robust_cube(
        exposures, ny, nx, coarse, drizzle_kwargs, wrap
    )
    lo, hi = coarse[:-1].copy(), coarse[1:].copy()
    blo, bhi = coarse[:1].copy(), coarse[-1:].copy()

    # ---- pass 2: blot and test each exposure ---------------------------------------------
    bit_value = 1 << int(outlier_bit)
    out = []
    n_flagged = 0
    for exp, in_box in zip(wrap(exposures), boxes, strict=True):
        flags = (
            np.zeros(exp.shape, dtype=np.int32)
            if exp.flags is None
            else np.array(exp.flags, copy=True)
        )
        if in_box is None:
            out.append(flags)
            continue
        pixmap = np.ascontiguousarray(exp.pixmap, dtype=np.float64)
        wavemap = np.ascontiguousarray(exp.wavemap, dtype=np.float64)
        blot = _blot_arrays(
            robust, rwave, lo, hi, pixmap, wavemap, "linear", "linear", np.nan, 0.5, in_box
        )
        # where fewer than two exposures cover a robust voxel, fall back on the robust
        # broad-band image (its continuum mismatch is smooth: the local level removes it)
        _blot_arrays(
            broad, bwave, blo, bhi, pixmap, wavemap, "linear", "linear", np.nan, 0.5, in_box, blot
        )
        y0, y1, x0, x1 = in_box
        first = np.zeros(exp.shape, dtype=np.bool_)
        second = np.zeros(exp.shape, dtype=np.bool_)
        _cr_test(
            np.asarray(exp.data),
            np.asarray(exp.var),
            blot,
            flags,
            np.int64(exclude),
            snr[0],
            snr[1],
            scale[0],
            scale[1],
            bool(local),
            y0,
            y1,
            x0,
            x1,
            first,
            second,
        )
        bit = np.asarray(bit_value).astype(flags.dtype, casting="unsafe")[()]
        n_flagged += _mark_hits(first, second, int(grow), y0, y1, x0, x1, flags, bit)
        out.append(flags)
    logger.info("find_outliers: flagged %d pixels in %d exposures", n_flagged, n)
    return out
