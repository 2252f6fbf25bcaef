"""Tests for drizzle3d.pixmap: exact and fast pixmaps, gwcs, footprint boxes."""

from __future__ import annotations

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import ICRS
from astropy.modeling import models
from astropy.wcs import WCS
from hypothesis import given, settings
from hypothesis import strategies as st
from spherex_wcs import FULL, spherex_like_wcs

from drizzle3d.grid import SpatialGrid
from drizzle3d.pixmap import BBox, calc_pixmap, estimate_pixel_scale_ratio, footprint_bbox

# ------------------------------------------------------------------ helpers


def gwcs_from_fits(w):
    """A gwcs with the same (SIP +) linear + TAN transform as an astropy WCS."""
    from gwcs import coordinate_frames as cf
    from gwcs import wcs as gwcs_wcs

    crpix = w.wcs.crpix
    pipe = models.Shift(1.0 - crpix[0]) & models.Shift(1.0 - crpix[1])
    if w.sip is not None:

        def poly(coef, linear):
            order = coef.shape[0] - 1
            kw = {f"c{p}_{q}": coef[p, q] for p in range(order + 1) for q in range(order + 1 - p)}
            kw[linear] += 1.0
            return models.Polynomial2D(order, **kw)

        pipe = pipe | models.Mapping((0, 1, 0, 1)) | (poly(w.sip.a, "c1_0") & poly(w.sip.b, "c0_1"))
    cd = w.wcs.get_pc() * w.wcs.cdelt[:, None]
    pipe = (
        pipe
        | models.AffineTransformation2D(matrix=cd)
        | models.Pix2Sky_TAN()
        | models.RotateNative2Celestial(w.wcs.crval[0], w.wcs.crval[1], 180.0)
    )
    det = cf.Frame2D(name="detector", axes_names=("x", "y"), unit=(u.pix, u.pix))
    sky = cf.CelestialFrame(reference_frame=ICRS(), name="world", unit=(u.deg, u.deg))
    return gwcs_wcs.WCS(forward_transform=pipe, input_frame=det, output_frame=sky)


def brute_force_pixmap(wcs_from, wcs_to, shape):
    """spxquery-style: every pixel through all_pix2world then all_world2pix."""
    y, x = np.indices(shape, dtype=np.float64)
    ra, dec = wcs_from.all_pix2world(x, y, 0)
    xo, yo = wcs_to.all_world2pix(ra, dec, 0)
    return np.dstack([xo, yo])


def tight_box(wcs_from, shape_from, wcs_to, shape_to, margin):
    """Exact answer: box of every input pixel whose centre lands in the output (+margin)."""
    y, x = np.indices(shape_from, dtype=np.float64)
    xo, yo = wcs_to.world_to_pixel_values(*wcs_from.pixel_to_world_values(x, y))
    ny, nx = shape_to
    with np.errstate(invalid="ignore"):
        lands = (
            (xo >= -0.5 - margin)
            & (xo <= nx - 0.5 + margin)
            & (yo >= -0.5 - margin)
            & (yo <= ny - 0.5 + margin)
        )
    if not lands.any():
        return None
    ys, xs = np.nonzero(lands)
    return BBox(int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max()))


@pytest.fixture(scope="module")
def frame():
    """A full SIP frame, a 30' output inside it and the brute-force pixmap."""
    wcs_in = spherex_like_wcs(10.088, 40.899, pa=24.0)
    out = SpatialGrid.from_center(10.3, 41.1, 30, 30, rotation=10.0)
    expected = brute_force_pixmap(wcs_in, out.wcs, FULL)
    return wcs_in, out, expected


# ------------------------------------------------------------------ calc_pixmap


def test_exact_matches_per_pixel_astropy_and_drizzle(frame):
    drizzle_utils = pytest.importorskip("drizzle.utils")
    wcs_in, out, expected = frame
    actual = calc_pixmap(wcs_in, out.wcs, FULL)
    assert actual.shape == (*FULL, 2)
    assert actual.dtype == np.float64
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)
    drizzle_pixmap = drizzle_utils.calc_pixmap(wcs_in, out.wcs, FULL)
    np.testing.assert_allclose(actual, drizzle_pixmap, rtol=0, atol=1e-6)
    # pixmap convention: output pixel (x, y) of input pixel centre (x, y)
    x, y = 1234, 567
    ex, ey = out.wcs.world_to_pixel_values(*wcs_in.pixel_to_world_values(x, y))
    np.testing.assert_allclose(actual[y, x], [ex, ey], atol=1e-9)


def test_fast_mode_within_001_pixel_on_full_sip_frame(frame):
    wcs_in, out, expected = frame
    actual, error = calc_pixmap(wcs_in, out.wcs, FULL, stepsize=16, return_error=True)
    deviation = np.hypot(*(actual - expected).transpose(2, 0, 1))
    assert deviation.max() < 0.01
    assert error < 0.01


def test_fast_mode_error_estimate_tracks_true_error():
    # a TAN frame mapped onto a grid tangent 1.5 deg away, at a coarse step,
    # so that interpolation error is measurable
    wcs_in = spherex_like_wcs(100.0, 60.0, pa=70.0, shape=(600, 600))
    out = SpatialGrid.from_center(101.5, 61.0, 120, 120, pixscale=2.0)
    expected = brute_force_pixmap(wcs_in, out.wcs, (600, 600))
    actual, error = calc_pixmap(wcs_in, out.wcs, (600, 600), stepsize=150, return_error=True)
    true_error = np.hypot(*(actual - expected).transpose(2, 0, 1)).max()
    assert true_error > 1e-6  # the test is meaningful
    assert 0.25 * true_error <= error <= 4 * true_error


def test_bbox_gives_the_sub_box_of_the_full_pixmap(frame):
    wcs_in, out, expected = frame
    box = BBox(100, 399, 1500, 1549)
    for stepsize in (None, 16):
        actual = calc_pixmap(wcs_in, out.wcs, FULL, bbox=box, stepsize=stepsize)
        assert actual.shape == (box.ymax - box.ymin + 1, box.xmax - box.xmin + 1, 2)
        np.testing.assert_allclose(actual, expected[box.slices], rtol=0, atol=1e-6)
    # plain tuples work and shape is optional with a bbox
    actual = calc_pixmap(wcs_in, out.wcs, bbox=(5, 5, 7, 9))
    np.testing.assert_allclose(actual, expected[7:10, 5:6], rtol=0, atol=1e-6)


def test_gwcs_gives_the_same_pixmap(frame):
    wcs_in, out, expected = frame
    g_in = gwcs_from_fits(wcs_in)
    g_out = gwcs_from_fits(out.wcs)
    box = BBox(0, 2039, 0, 2039)
    # exact on a band of rows, fast on the full frame
    rows = BBox(0, 2039, 900, 1019)
    actual = calc_pixmap(g_in, g_out, bbox=rows)
    np.testing.assert_allclose(actual, expected[rows.slices], rtol=0, atol=1e-6)
    actual = calc_pixmap(g_in, g_out, FULL, bbox=box, stepsize=16)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=0.01)
    # mixed: gwcs in, astropy out
    actual = calc_pixmap(g_in, out.wcs, bbox=rows)
    np.testing.assert_allclose(actual, expected[rows.slices], rtol=0, atol=1e-6)


def test_gwcs_output_bounding_box_is_ignored_by_default(frame):
    wcs_in, out, expected = frame
    g_out = gwcs_from_fits(out.wcs)
    ny, nx = out.shape
    g_out.bounding_box = ((-0.5, nx - 0.5), (-0.5, ny - 0.5))
    rows = BBox(0, 2039, 10, 12)  # far outside the output
    actual = calc_pixmap(wcs_in, g_out, bbox=rows)
    np.testing.assert_allclose(actual, expected[rows.slices], rtol=0, atol=1e-6)
    assert g_out.bounding_box is not None  # restored
    clipped = calc_pixmap(wcs_in, g_out, bbox=rows, disable_bbox="none")
    assert np.isnan(clipped).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stepsize": 1}, "'stepsize' must be None or an integer >= 2"),
        ({"stepsize": 4.5}, "'stepsize' must be None or an integer >= 2"),
        ({"bbox": (10, 5, 0, 1)}, "'bbox' must satisfy"),
        ({"bbox": (0, 2040, 0, 1)}, "'bbox' must lie inside"),
        ({"disable_bbox": "all"}, "'disable_bbox' must be one of"),
    ],
)
def test_calc_pixmap_rejects_bad_arguments(frame, kwargs, match):
    wcs_in, out, _ = frame
    with pytest.raises(ValueError, match=match):
        calc_pixmap(wcs_in, out.wcs, FULL, **kwargs)


def test_calc_pixmap_needs_a_shape():
    out = SpatialGrid.from_center(0.0, 0.0, 1, 1)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    with pytest.raises(ValueError, match="'shape' must be given"):
        calc_pixmap(w, out.wcs)


def test_estimate_pixel_scale_ratio():
    a = SpatialGrid.from_center(10.0, 10.0, 10, 10, pixscale=6.15)
    b = SpatialGrid.from_center(10.0, 10.0, 10, 10, pixscale=2.05, rotation=40.0)
    np.testing.assert_allclose(estimate_pixel_scale_ratio(a.wcs, b.wcs, shape=a.shape), 1 / 3, 1e-6)
    np.testing.assert_allclose(estimate_pixel_scale_ratio(b.wcs, a.wcs, shape=b.shape), 3.0, 1e-6)


# ------------------------------------------------------------------ footprint_bbox


def test_footprint_of_30_arcmin_output_is_tight(frame):
    wcs_in, out, _ = frame
    expected = tight_box(wcs_in, FULL, out.wcs, out.shape, margin=2)
    actual = footprint_bbox(wcs_in, FULL, out.wcs, out.shape, margin=2)
    assert actual == expected
    assert actual.size < 0.06 * FULL[0] * FULL[1]


def test_footprint_none_when_far_away_and_full_when_output_covers_input():
    wcs_in = spherex_like_wcs(200.0, -45.0, shape=(300, 400))
    far = SpatialGrid.from_center(20.0, 45.0, 30, 30)
    assert footprint_bbox(wcs_in, (300, 400), far.wcs, far.shape) is None
    near_miss = SpatialGrid.from_center(200.0, -45.0 + 0.5, 10, 10)  # just beyond the top
    assert tight_box(wcs_in, (300, 400), near_miss.wcs, near_miss.shape, 2) is None
    assert footprint_bbox(wcs_in, (300, 400), near_miss.wcs, near_miss.shape) is None
    huge = SpatialGrid.from_center(200.5, -45.0, 600, 600, pixscale=30.0)
    assert footprint_bbox(wcs_in, (300, 400), huge.wcs, huge.shape) == BBox(0, 399, 0, 299)


def test_footprint_with_gwcs_input():
    wcs_in = spherex_like_wcs(5.0, 0.0, pa=130.0, shape=(500, 500))
    out = SpatialGrid.from_center(5.1, 0.2, 12, 8, rotation=60.0)
    expected = tight_box(wcs_in, (500, 500), out.wcs, out.shape, margin=2)
    actual = footprint_bbox(gwcs_from_fits(wcs_in), (500, 500), out.wcs, out.shape)
    assert actual == expected


def test_footprint_rejects_bad_margin(frame):
    wcs_in, out, _ = frame
    with pytest.raises(ValueError, match="'margin' must be a finite number >= 0"):
        footprint_bbox(wcs_in, FULL, out.wcs, out.shape, margin=-1)


@st.composite
def pointings(draw):
    """Input/output pairs over the sky, biased towards RA wrap and the poles."""
    kind = draw(st.sampled_from(["anywhere", "ra_wrap", "pole"]))
    if kind == "ra_wrap":
        ra = draw(st.floats(-0.6, 0.6)) % 360.0
        dec = draw(st.floats(-80.0, 80.0))
    elif kind == "pole":
        ra = draw(st.floats(0.0, 360.0, exclude_max=True))
        dec = draw(st.sampled_from([-1.0, 1.0])) * draw(st.floats(85.0, 89.95))
    else:
        ra = draw(st.floats(0.0, 360.0, exclude_max=True))
        dec = draw(st.floats(-84.0, 84.0))
    pa = draw(st.floats(0.0, 360.0))
    shape_in = (draw(st.integers(40, 240)), draw(st.integers(40, 240)))
    # output centre: an input pixel position, possibly beyond the edges
    fx, fy = draw(st.floats(-0.8, 1.8)), draw(st.floats(-0.8, 1.8))
    out_scale = draw(st.floats(2.0, 20.0))
    out_shape = (draw(st.integers(8, 300)), draw(st.integers(8, 300)))
    rotation = draw(st.floats(-180.0, 180.0))
    margin = draw(st.sampled_from([0.0, 2.0, 5.5]))
    return ra, dec, pa, shape_in, fx, fy, out_scale, out_shape, rotation, margin


def _check_footprint(case):
    ra, dec, pa, shape_in, fx, fy, out_scale, out_shape, rotation, margin = case
    wcs_in = spherex_like_wcs(ra, dec, pa=pa, shape=shape_in)
    cra, cdec = wcs_in.pixel_to_world_values(fx * shape_in[1], fy * shape_in[0])
    width = out_shape[1] * out_scale / 60.0
    height = out_shape[0] * out_scale / 60.0
    out = SpatialGrid.from_center(float(cra), float(cdec), width, height, out_scale, rotation)
    expected = tight_box(wcs_in, shape_in, out.wcs, out.shape, margin)
    actual = footprint_bbox(wcs_in, shape_in, out.wcs, out.shape, margin=margin)
    if expected is None:
        assert actual is None
        return
    assert actual is not None
    # every landing pixel is inside the box ...
    assert actual.xmin <= expected.xmin
    assert actual.xmax >= expected.xmax
    assert actual.ymin <= expected.ymin
    assert actual.ymax >= expected.ymax
    # ... and the box is at most 5 % larger than the tight one
    assert actual.size <= 1.05 * expected.size


@settings(deadline=None, derandomize=True, max_examples=60)
@given(pointings())
def test_footprint_bbox_property(case):
    _check_footprint(case)


@pytest.mark.slow
@settings(deadline=None, derandomize=True, max_examples=1500)
@given(pointings())
def test_footprint_bbox_property_long(case):
    _check_footprint(case)


@pytest.mark.parametrize(("nx", "ny"), [(4, 4), (5, 7), (12, 11)])
def test_tensor_spline_equals_scipy_not_a_knot(nx, ny):
    # the fast pixmap's own bicubic spline is scipy's make_interp_spline(k=3) along x then y
    from scipy.interpolate import BSpline, make_interp_spline

    from drizzle3d.pixmap import _nodes, _TensorSpline

    rng = np.random.default_rng(nx * ny)
    xn = _nodes(10, 10 + 32 * (nx - 1) - 5, 32)
    yn = _nodes(3, 3 + 32 * (ny - 1) - 9, 32)
    gy, gx = np.meshgrid(yn, xn, indexing="ij")
    xo = 1.3 * gx + 0.2 * gy + 1e-4 * gx * gy + 3e-6 * gx**3 + rng.normal(0, 0.1, gx.shape)
    yo = -0.4 * gx + 0.9 * gy + 2e-4 * gy**2
    xs = np.linspace(xn[0], xn[-1], 97)
    ys = np.linspace(yn[0], yn[-1], 89)
    actual = _TensorSpline(xn, yn, xo, yo)(xs, ys)
    sx = make_interp_spline(xn, np.stack([xo, yo]), k=3, axis=2)
    sy = make_interp_spline(yn, sx.c, k=3, axis=2)
    bx = BSpline.design_matrix(xs, sx.t, 3).toarray()
    by = BSpline.design_matrix(ys, sy.t, 3).toarray()
    for c in range(2):
        np.testing.assert_allclose(actual[..., c], by @ sy.c[:, :, c] @ bx.T, rtol=0, atol=1e-9)
