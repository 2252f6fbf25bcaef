"""Blot and outlier rejection (issue 8): oracles, simulated SPHEREx fields with known truth."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import xarray as xr
from scipy import ndimage

from drizzle3d.blot import Exposure, blot_cube, find_outliers
from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid
from drizzle3d.pixmap import calc_pixmap
from drizzle3d.resample import Drizzle3D
from drizzle3d.simulate import ExtendedSource, Sky, Spectrum, simulate_field
from drizzle3d.spherex import DEFAULT_EXCLUDE_FLAGS, flag_bits, read_spherex

log = logging.getLogger(__name__)

CENTER = (150.0, 2.0)
OUTLIER = 1 << 19
SOURCE = 1 << 21
ARCSEC2_TO_SR = (math.pi / 180 / 3600) ** 2


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _cube(values, edges):
    values = np.asarray(values, dtype=float)
    _, ny, nx = values.shape
    edges = np.asarray(edges, dtype=float)
    return xr.DataArray(
        values,
        dims=("wavelength", "y", "x"),
        coords={
            "wavelength": ("wavelength", 0.5 * (edges[:-1] + edges[1:])),
            "wavelength_min": ("wavelength", edges[:-1]),
            "wavelength_max": ("wavelength", edges[1:]),
            "y": np.arange(ny),
            "x": np.arange(nx),
        },
    )


def _exposures(field, grid):
    out = []
    for path in field.paths:
        im = read_spherex(path)
        pixmap = calc_pixmap(im.wcs, grid.spatial.wcs, shape=im.shape)
        out.append(Exposure(im.data, im.var, im.flags, pixmap, im.wavemap(), name=path.name))
    return out


def _drizzle(grid, exposures, flags=None, data=None, exclude=None):
    excl = flag_bits(DEFAULT_EXCLUDE_FLAGS) if exclude is None else exclude
    d = Drizzle3D(grid, weighting="uniform", exclude_flags=excl)
    for n, e in enumerate(exposures):
        d.add_image(
            e.data if data is None else data[n],
            e.var,
            e.flags if flags is None else flags[n],
            e.pixmap,
            e.wavemap,
        )
    return d


def _inside(pixmap, shape):
    ny, nx = shape
    x, y = pixmap[..., 0], pixmap[..., 1]
    return (x >= -0.5) & (x <= nx - 0.5) & (y >= -0.5) & (y <= ny - 0.5)


# --------------------------------------------------------------------------------------------
# blot_cube: oracles
# --------------------------------------------------------------------------------------------
EDGES = np.array([1.0, 1.2, 1.4, 1.6, 1.8, 2.0])


def _maps(ny_in=20, nx_in=24, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(2.0, 13.0, (ny_in, nx_in))
    y = rng.uniform(2.0, 9.0, (ny_in, nx_in))
    lam = rng.uniform(1.35, 1.65, (ny_in, nx_in))
    bw = rng.uniform(0.05, 0.2, (ny_in, nx_in))
    return np.dstack([x, y]), np.dstack([lam, bw])


def test_blot_linear_cube_is_exact_for_linear_interpolation():
    """A cube linear in x, y and wavelength blots exactly with interp/spectral 'linear'."""
    nz, ny, nx = 5, 12, 16
    centres = 0.5 * (EDGES[:-1] + EDGES[1:])
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    values = 2.0 + 0.3 * i - 0.2 * j + 1.5 * centres[k]
    pixmap, wavemap = _maps()
    expected = 2.0 + 0.3 * pixmap[..., 0] - 0.2 * pixmap[..., 1] + 1.5 * wavemap[..., 0]
    actual = blot_cube(_cube(values, EDGES), pixmap, wavemap, spectral="linear")
    np.testing.assert_allclose(actual, expected, rtol=1e-12)
    # 'constant' is exact only for a spectrum flat in wavelength ...
    flat = 2.0 + 0.3 * i - 0.2 * j
    expected_flat = 2.0 + 0.3 * pixmap[..., 0] - 0.2 * pixmap[..., 1]
    actual_flat = blot_cube(_cube(flat, EDGES), pixmap, wavemap, spectral="constant")
    np.testing.assert_allclose(actual_flat, expected_flat, rtol=1e-12)
    # ... and is not for the sloping one (the test can fail)
    actual_const = blot_cube(_cube(values, EDGES), pixmap, wavemap, spectral="constant")
    assert np.max(np.abs(actual_const - expected)) > 1e-3


def test_blot_constant_spectrum_is_band_overlap_weighted_mean():
    """'constant': the band average of a step spectrum is the overlap-weighted mean of the bins."""
    values = np.broadcast_to(np.arange(5.0)[:, None, None], (5, 4, 4)).copy()
    pixmap = np.array([[[1.5, 1.5]]])
    wavemap = np.array([[[1.4, 0.1]]])  # 1.35..1.45: 50 % in bin 1, 50 % in bin 2
    actual = blot_cube(_cube(values, EDGES), pixmap, wavemap, spectral="constant")
    assert actual[0, 0] == pytest.approx(1.5, rel=1e-12)
    wavemap = np.array([[[1.21, 0.3]]])  # 1.06..1.36: 0.14 in bin 0, 0.16 in bin 1
    expected = (0.14 * 0 + 0.16 * 1) / 0.3
    actual = blot_cube(_cube(values, EDGES), pixmap, wavemap, spectral="constant")
    assert actual[0, 0] == pytest.approx(expected, rel=1e-12)


def test_blot_cubic_reproduces_quadratic_and_nearest_picks_voxel():
    nz, ny, nx = 5, 14, 17  # pixmap x < 13: the 4 x 4 cubic stencil stays inside
    _, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    values = 1.0 + 0.05 * (i - 6.0) ** 2 + 0.02 * (j - 4.0) ** 2
    pixmap, wavemap = _maps()
    expected = 1.0 + 0.05 * (pixmap[..., 0] - 6.0) ** 2 + 0.02 * (pixmap[..., 1] - 4.0) ** 2
    actual = blot_cube(_cube(values, EDGES), pixmap, wavemap, interp="cubic")
    np.testing.assert_allclose(actual, expected, rtol=1e-12)
    # bilinear interpolation of a curved surface is biased high (the test can fail)
    linear = blot_cube(_cube(values, EDGES), pixmap, wavemap, interp="linear")
    assert np.max(linear - expected) > 1e-3
    near = blot_cube(_cube(values, EDGES), pixmap, wavemap, interp="nearest")
    ii = np.floor(pixmap[..., 0] + 0.5).astype(int)
    jj = np.floor(pixmap[..., 1] + 0.5).astype(int)
    np.testing.assert_allclose(near, values[0, jj, ii], rtol=1e-12)


def test_blot_nan_outside_and_min_coverage():
    values = np.ones((5, 6, 6))
    values[3] = np.nan  # bin 1.6..1.8 empty
    pixmap = np.array([[[2.0, 2.0], [-0.6, 2.0], [2.0, 6.0], [2.0, 2.0], [2.0, 2.0], [5.4, 5.4]]])
    wavemap = np.array(
        [[[1.5, 0.1], [1.5, 0.1], [1.5, 0.1], [1.7, 0.1], [1.85, 0.3], [1.95, 0.2]]]
    )  # fmt: skip
    actual = blot_cube(_cube(values, EDGES), pixmap, wavemap)[0]
    expected = [1.0, np.nan, np.nan, np.nan, 1.0, 1.0]
    # [1] and [2] fall outside the cube; [3] lies in the empty bin; [4] has 2/3 of its band in
    # bins with data; [5] has 1/4 of its band beyond 2.0 um and sits at the outer half pixel
    np.testing.assert_array_equal(actual, expected)
    actual = blot_cube(_cube(values, EDGES), pixmap, wavemap, min_coverage=0.8, fillval=-1.0)
    np.testing.assert_array_equal(actual[0], [1.0, -1.0, -1.0, -1.0, -1.0, -1.0])


def test_blot_accepts_drizzle3d_and_transposed_dataarray():
    d = Drizzle3D(out_shape=(5, 8, 8), wave_edges=EDGES, weighting="uniform")
    y, x = np.indices((8, 8), dtype=float)
    wavemap = np.dstack([1.1 + 0.1 * y, np.full((8, 8), 0.15)])
    data = 3.0 + 0.5 * x
    d.add_image(data, np.ones((8, 8)), None, np.dstack([x, y]), wavemap)
    pm = np.dstack([x[2:6, 2:6] + 0.25, y[2:6, 2:6]])
    wm = wavemap[2:6, 2:6]
    expected = 3.0 + 0.5 * pm[..., 0]
    from_da = blot_cube(d.out_sci.transpose("x", "y", "wavelength"), pm, wm, spectral="constant")
    from_d3 = blot_cube(d, pm, wm, spectral="constant")
    np.testing.assert_allclose(from_da, expected, rtol=1e-12)
    np.testing.assert_allclose(from_d3, expected, rtol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"interp": "poly5"}, ValueError, "'interp' must be one of"),
        ({"spectral": "spline"}, ValueError, "'spectral' must be one of"),
        ({"min_coverage": 0.0}, ValueError, "'min_coverage' must be in"),
        ({"fillval": "x"}, TypeError, "'fillval' must be a real number"),
    ],
)
def test_blot_rejects_bad_arguments(kwargs, exc, match):
    pixmap, wavemap = _maps(3, 3)
    with pytest.raises(exc, match=match):
        blot_cube(_cube(np.ones((5, 4, 4)), EDGES), pixmap, wavemap, **kwargs)


def test_blot_rejects_bad_cube_and_maps():
    pixmap, wavemap = _maps(3, 3)
    with pytest.raises(TypeError, match=r"'cube' must be an xarray\.DataArray or a Drizzle3D"):
        blot_cube(np.ones((5, 4, 4)), pixmap, wavemap)
    bare = xr.DataArray(np.ones((5, 4, 4)), dims=("wavelength", "y", "x"))
    with pytest.raises(ValueError, match="'wavelength_min' and 'wavelength_max'"):
        blot_cube(bare, pixmap, wavemap)
    with pytest.raises(ValueError, match="'pixmap' must have shape"):
        blot_cube(_cube(np.ones((5, 4, 4)), EDGES), pixmap[..., 0], wavemap)
    with pytest.raises(ValueError, match="'wavemap' must have the shape of 'pixmap'"):
        blot_cube(_cube(np.ones((5, 4, 4)), EDGES), pixmap, wavemap[:2])


def test_exposure_validates_shapes():
    y, x = np.indices((4, 4), dtype=float)
    wm = np.dstack([np.full((4, 4), 1.5), np.full((4, 4), 0.1)])
    with pytest.raises(ValueError, match="'var' must have the shape of 'data'"):
        Exposure(np.ones((4, 4)), np.ones((4, 5)), None, np.dstack([x, y]), wm)
    with pytest.raises(ValueError, match="'wavemap' must have shape"):
        Exposure(np.ones((4, 4)), np.ones((4, 4)), None, np.dstack([x, y]), wm[:3])
    with pytest.raises(TypeError, match="'flags' must be an integer array"):
        Exposure(np.ones((4, 4)), np.ones((4, 4)), np.ones((4, 4)), np.dstack([x, y]), wm)


# --------------------------------------------------------------------------------------------
# Must show 1: blot of a cube of a smooth sky reproduces each exposure's noise-free truth
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smooth(tmp_path_factory):
    cosd = math.cos(math.radians(CENTER[1]))

    def at(dx, dy):
        return CENTER[0] + dx / 3600 / cosd, CENTER[1] + dy / 3600

    sky = Sky(
        background=Spectrum(0.05, index=-1.0),
        extended_sources=(
            ExtendedSource(*at(60, 30), Spectrum(0.15, index=-0.7), fwhm=180.0),
            ExtendedSource(*at(-100, -80), Spectrum(0.1, index=1.0), fwhm=240.0),
        ),
    )
    field = simulate_field(
        tmp_path_factory.mktemp("smooth"),
        sky,
        n_exposures=12,
        shape=(128, 128),
        center=CENTER,
        noise=False,
        zodi=False,
        flagged_fraction=0.0,
        seed=3,
    )
    grid = OutputGrid(SpatialGrid.from_center(*CENTER, 16, 16), SpectralGrid.native(3))
    exposures = _exposures(field, grid)
    return field, grid, exposures, _drizzle(grid, exposures)


@pytest.mark.parametrize(
    ("interp", "spectral"), [("linear", "constant"), ("cubic", "constant"), ("linear", "linear")]
)
def test_blot_of_smooth_sky_cube_reproduces_truth(smooth, interp, spectral):
    field, grid, exposures, d = smooth
    rel = []
    n_interior = 0
    for e, truth in zip(exposures, field.exposures, strict=True):
        actual = blot_cube(d.out_sci, e.pixmap, e.wavemap, interp=interp, spectral=spectral)
        expected = truth.model.astype(float)  # noise-free, no zodi
        interior = np.zeros(e.shape, dtype=bool)
        interior[8:-8, 8:-8] = True  # away from the exposure's edges ...
        interior &= _inside(
            e.pixmap - 3.0, (grid.shape[1] - 6, grid.shape[2] - 6)
        )  # ... and cube's
        n_interior += interior.sum()
        ok = interior & np.isfinite(actual)
        rel.append(np.abs(actual[ok] / expected[ok] - 1.0))
    rel = np.concatenate(rel)
    print(
        f"\nblot ({interp}, {spectral}) vs noise-free truth, {rel.size} pixels: "
        f"max |rel err| = {rel.max():.4%}, 99th pct = {np.percentile(rel, 99):.4%}, "
        f"median = {np.median(rel):.4%}"
    )
    assert rel.size > 0.98 * n_interior  # the blot covers the interior
    assert np.percentile(rel, 99) < 0.01
    if (interp, spectral) == ("linear", "constant"):  # the defaults: every pixel within 1 %
        assert rel.max() < 0.01
    else:
        assert rel.max() < 0.015


# --------------------------------------------------------------------------------------------
# Must show 2 and 3: unflagged cosmic rays on a field with stars and a nebula
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def crfield(tmp_path_factory):
    field = simulate_field(
        tmp_path_factory.mktemp("cr"),
        n_exposures=16,
        shape=(256, 256),
        center=CENTER,
        zodi=False,
        cosmic_rays=1e-4,
        cosmic_rays_flagged=False,
        seed=5,
    )
    grid = OutputGrid(SpatialGrid.from_center(*CENTER, 16, 16), SpectralGrid.native(3))
    exposures = _exposures(field, grid)
    # The same field without hits: hit pixels redrawn from the noise-free model and VARIANCE.
    rng = np.random.default_rng(99)
    clean = []
    for e, truth in zip(exposures, field.exposures, strict=True):
        data = np.array(e.data, dtype=np.float64)
        hit = truth.cosmic_rays & ~truth.bad_pixels
        data[hit] = truth.model[hit] + np.sqrt(e.var[hit]) * rng.standard_normal(hit.sum())
        clean.append(Exposure(data, e.var, e.flags, e.pixmap, e.wavemap, name=e.name))
    excl = flag_bits(DEFAULT_EXCLUDE_FLAGS)
    flags_cr = find_outliers(exposures, grid, weighting="uniform", exclude_flags=excl)
    flags_clean = find_outliers(clean, grid, weighting="uniform", exclude_flags=excl)
    return field, grid, exposures, clean, flags_cr, flags_clean


def test_outliers_find_hits_without_flagging_sources(crfield):
    field, grid, exposures, _, flags_cr, _ = crfield
    n_hits = n_found = n_src = n_src_false = n_false = n_grow = 0
    for e, truth, new in zip(exposures, field.exposures, flags_cr, strict=True):
        flagged = (new & OUTLIER) != 0
        inside = _inside(e.pixmap, grid.shape[1:])
        hits = truth.cosmic_rays & ~truth.bad_pixels & inside
        n_hits += hits.sum()
        n_found += (hits & flagged).sum()
        ring = ndimage.binary_dilation(truth.cosmic_rays, np.ones((3, 3), dtype=bool))
        real = ~truth.cosmic_rays & ~truth.bad_pixels & inside
        source = real & ((e.flags & SOURCE) != 0)  # the simulator's SOURCE: signal > 1 sigma
        n_src += source.sum()
        n_src_false += (source & flagged).sum()
        n_false += (real & flagged & ~ring).sum()
        n_grow += (real & flagged & ring).sum()
        # a copy: the input flags are untouched, and only the OUTLIER bit was added
        assert np.array_equal(new & ~OUTLIER, e.flags & ~OUTLIER)
    found = n_found / n_hits
    false_src = n_src_false / n_src
    print(
        f"\nhits in the grid: {n_hits}, found {n_found} ({found:.1%}); source pixels {n_src}, "
        f"falsely flagged {n_src_false} ({false_src:.3%}); other false flags away from hits "
        f"{n_false}; grow-ring pixels around hits {n_grow}"
    )
    assert n_hits >= 40
    assert found >= 0.95
    assert false_src <= 0.001  # grow rings included
    assert n_false <= 0.001 * n_src


def test_rejection_brings_cube_error_at_hits_to_hit_free_level(crfield):
    field, grid, exposures, clean, flags_cr, _ = crfield
    models = [t.model.astype(float) for t in field.exposures]
    hitmaps = [(t.cosmic_rays & ~t.bad_pixels).astype(float) for t in field.exposures]
    # voxels the hits fall in
    touched = np.asarray(_drizzle(grid, exposures, data=hitmaps).out_sci)
    at_hits = np.isfinite(touched) & (touched > 0)

    def error(exps, flags):
        cube = np.asarray(_drizzle(grid, exps, flags=flags).out_sci)
        truth = np.asarray(_drizzle(grid, exps, flags=flags, data=models).out_sci)
        diff = (cube - truth)[at_hits]
        return math.sqrt(np.nanmean(diff**2))

    no_rejection = error(exposures, None)
    rejection = error(exposures, flags_cr)
    hit_free = error(clean, None)
    print(
        f"\nRMS cube error at {at_hits.sum()} hit voxels (MJy/sr): "
        f"no rejection {no_rejection:.4g}, with rejection {rejection:.4g}, "
        f"hit-free run {hit_free:.4g} (ratio {rejection / hit_free:.2f})"
    )
    assert no_rejection > 5 * hit_free  # the hits matter
    assert rejection <= 1.5 * hit_free


def test_rejection_does_not_clip_point_source_spectrum(crfield):
    field, grid, _, clean, _, flags_clean = crfield
    star = field.sky.point_sources[0]
    wcs = grid.spatial.wcs
    x0, y0 = (float(v) for v in wcs.world_to_pixel_values(star.ra, star.dec))
    yy, xx = np.indices(grid.shape[1:])
    aper = np.hypot(xx - x0, yy - y0) <= 3.0
    omega = 6.15**2 * ARCSEC2_TO_SR
    # star pixels flagged on the hit-free field
    n_star_flagged = 0
    for e, new in zip(clean, flags_clean, strict=True):
        near = np.hypot(e.pixmap[..., 0] - x0, e.pixmap[..., 1] - y0) <= 3.0
        n_star_flagged += (near & ((new & OUTLIER) != 0)).sum()
    expected = np.asarray(_drizzle(grid, clean).out_sci)[:, aper].sum(axis=1) * omega * 1e9
    actual = np.asarray(_drizzle(grid, clean, flags=flags_clean).out_sci)[:, aper].sum(axis=1)
    actual = actual * omega * 1e9
    ok = np.isfinite(expected)
    rel = np.abs(actual[ok] / expected[ok] - 1.0)
    print(
        f"\nstar: {n_star_flagged} pixels within 3 px flagged on the hit-free field; aperture "
        f"flux (mJy) {np.round(expected[ok], 3)}; max |rel change| with rejection {rel.max():.3%}"
    )
    assert ok.sum() >= 12
    assert rel.max() < 0.01


# --------------------------------------------------------------------------------------------
# find_outliers: small oracles and arguments
# --------------------------------------------------------------------------------------------
def _flat_exposures(n=5, shape=(40, 40), seed=2):
    rng = np.random.default_rng(seed)
    y, x = np.indices(shape, dtype=float)
    out = []
    for k in range(n):
        lam = 1.2 + 0.6 * (y + 3 * k) / (shape[0] + 3 * n)
        wm = np.dstack([lam, np.full(shape, 0.04)])
        data = 1.0 + 0.2 * lam + 0.01 * rng.standard_normal(shape)
        pm = np.dstack([x + 0.3 * k, y - 0.2 * k])
        out.append(Exposure(data, np.full(shape, 1e-4), np.zeros(shape, np.int32), pm, wm))
    return out


class _Grid:
    shape = (3, 40, 40)
    wave_edges = np.array([1.2, 1.4, 1.6, 1.8])


def test_find_outliers_flags_spikes_and_grows():
    exps = _flat_exposures()
    hits = [(5, 7), (20, 30), (33, 12)]
    for (j, i), e in zip(hits, exps, strict=False):
        e.data[j, i] += 0.3  # 30 sigma
    calls = []

    def progress(it):
        calls.append(1)
        return it

    flags = find_outliers(exps, _Grid(), grow=0, weighting="uniform", progress=progress)
    for n, f in enumerate(flags):
        expected = [hits[n]] if n < len(hits) else []
        assert [tuple(map(int, p)) for p in np.argwhere(f & OUTLIER)] == expected
    assert len(calls) == 2
    grown = find_outliers(exps, _Grid(), grow=1, weighting="uniform")
    assert int(np.count_nonzero(grown[0] & OUTLIER)) == 9
    # a custom bit, and flags=None exposures get int32 flags
    bare = [Exposure(e.data, e.var, None, e.pixmap, e.wavemap) for e in exps]
    other = find_outliers(bare, _Grid(), grow=0, outlier_bit=3, weighting="uniform")
    assert other[0].dtype == np.int32
    assert [tuple(map(int, p)) for p in np.argwhere(other[0] & 8)] == [hits[0]]


def test_find_outliers_ignores_excluded_pixels():
    exps = _flat_exposures()
    exps[0].data[5, 7] += 0.3
    exps[0].flags[5, 7] = 1 << 10  # HOT, excluded: neither used nor tested
    flags = find_outliers(exps, _Grid(), grow=0, weighting="uniform", exclude_flags=1 << 10)
    assert not np.any(flags[0] & OUTLIER)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"snr": 5.0}, TypeError, "'snr' must be a pair of numbers"),
        ({"scale": (1.0, -1.0)}, ValueError, "'scale' must be two finite numbers"),
        ({"grow": -1}, ValueError, "'grow' must be an integer >= 0"),
        ({"outlier_bit": 32}, ValueError, "'outlier_bit' must be an integer in 0..31"),
        ({"min_depth": 0}, ValueError, "'min_depth' must be a number > 0"),
        ({"first_pass_edges": [1.5, 1.4]}, ValueError, "'first_pass_edges' must be"),
        ({"wave_edges": [1.0, 2.0]}, TypeError, "must not set \\['wave_edges'\\]"),
    ],
)
def test_find_outliers_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        find_outliers(_flat_exposures(3), _Grid(), **kwargs)


def test_find_outliers_rejects_non_exposures():
    with pytest.raises(TypeError, match="'exposures' must hold Exposure objects; item 0"):
        find_outliers([np.ones((4, 4))], _Grid())
    with pytest.raises(TypeError, match="'grid' must be an OutputGrid"):
        find_outliers(_flat_exposures(3), object())
