"""Tests of the core engine, Drizzle3D (issue 2), derived from truth and from STScI drizzle."""

import threading
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drizzle3d import Drizzle3D, decode_context
from drizzle3d.resample import CTX_PLANE_BITS


def affine_pixmap(shape, angle=30.0, scale=1.3, shift=(60.3, 10.7)):
    """Output (x, y) of each input pixel centre under rotation + scale + shift."""
    y, x = np.indices(shape, dtype=float)
    th = np.deg2rad(angle)
    xo = scale * (np.cos(th) * x - np.sin(th) * y) + shift[0]
    yo = scale * (np.sin(th) * x + np.cos(th) * y) + shift[1]
    return np.dstack([xo, yo])


def pixel_corners(pixmap):
    """``(cx, cy)``, shape (ny + 1, nx + 1): output positions of the input pixel corners
    (pixfrac 1) as the square kernel places them: the bilinear mean of the 4 surrounding
    centres, extrapolated at the border."""
    gx = np.pad(pixmap[..., 0], 1, mode="reflect", reflect_type="odd")
    gy = np.pad(pixmap[..., 1], 1, mode="reflect", reflect_type="odd")
    cx = 0.25 * (gx[:-1, :-1] + gx[1:, :-1] + gx[:-1, 1:] + gx[1:, 1:])
    cy = 0.25 * (gy[:-1, :-1] + gy[1:, :-1] + gy[:-1, 1:] + gy[1:, 1:])
    return cx, cy


def const_wavemap(shape, lam=2.0, bw=0.05):
    return np.dstack([np.full(shape, lam), np.full(shape, bw)])


def lvf_wavemap(shape, lam_hi=2.4, lam_lo=1.7, r=41.0):
    """A SPHEREx-like linear-variable-filter wavemap: wavelength falling with y."""
    ny, nx = shape
    y, x = np.indices(shape, dtype=float)
    lam = lam_hi - (lam_hi - lam_lo) * (y + 0.5) / ny + 0.01 * ((x - nx / 2) / nx) ** 2
    return np.dstack([lam, lam / r])


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(20261122)


# --------------------------------------------------------------------- 1. oracle
drizzle_resample = pytest.importorskip("drizzle.resample")


@pytest.mark.parametrize(
    ("kernel", "pixfrac"),
    [
        ("square", 1.0),
        ("square", 0.6),
        ("turbo", 1.0),
        ("turbo", 0.7),
        ("point", 1.0),
        ("gaussian", 1.0),
        ("lanczos2", 1.0),
        ("lanczos3", 1.0),
    ],
)
def test_single_bin_equals_stsci_drizzle(kernel, pixfrac, rng):
    shape = (60, 70)
    scale = 1.3
    data = rng.normal(10.0, 2.0, shape).astype(np.float32)
    wmap = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    pixmap = affine_pixmap(shape, angle=30.0, scale=scale)
    wavemap = lvf_wavemap(shape)  # every band inside the single bin [1, 3]
    out_shape = (130, 150)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = drizzle_resample.Drizzle(kernel=kernel, out_shape=out_shape)
        ref.add_image(
            data,
            exptime=1.0,
            pixmap=pixmap,
            weight_map=wmap,
            pixfrac=pixfrac,
            pixel_scale_ratio=1.0 / scale,
        )
        d = Drizzle3D(
            out_shape=(1, *out_shape),
            wave_edges=[1.0, 3.0],
            kernel=kernel,
            pixfrac=pixfrac,
            weighting="uniform",
        )
        d.add_image(data, np.ones(shape), None, pixmap, wavemap, weight_map=wmap)

    expected = ref.out_img
    actual = d.out_sci.values[0]
    covered = ref.out_wht > 0
    assert covered.sum() > 4000
    # float32 precision of drizzle's running mean (relative to the image scale)
    np.testing.assert_allclose(actual[covered], expected[covered], rtol=1e-5, atol=2e-5 * 10.0)
    if kernel in ("lanczos2", "lanczos3"):
        # negative lobes: compare only where drizzle's float32 weights are well away from zero
        assert np.all(np.isfinite(actual[covered]))
    else:
        assert np.array_equal(np.isfinite(actual), covered | (d.out_wht.values[0] != 0))
    # out_wht = drizzle's out_wht times the drop area in output pixels
    drop_area = scale**2 if kernel in ("point", "lanczos2", "lanczos3") else (pixfrac * scale) ** 2
    ratio = d.out_wht.values[0][covered] / ref.out_wht[covered]
    big = ref.out_wht[covered] > 1e-3
    np.testing.assert_allclose(ratio[big], drop_area, rtol=2e-5)


def _drizzle_pair(kernel, data, pixmap, out_shape, scale=1.0):
    """``(drizzle's Drizzle, Drizzle3D)`` after adding the same image (one wavelength bin)."""
    shape = data.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = drizzle_resample.Drizzle(kernel=kernel, out_shape=out_shape)
        ref.add_image(data, exptime=1.0, pixmap=pixmap, pixel_scale_ratio=1.0 / scale)
        d = Drizzle3D(
            out_shape=(1, *out_shape), wave_edges=[1.0, 3.0], kernel=kernel, weighting="uniform"
        )
        d.add_image(
            data, np.ones(shape), None, pixmap, lvf_wavemap(shape), pixel_scale_ratio=1.0 / scale
        )
    return ref, d


def test_drops_across_the_output_edge_are_clipped_where_drizzle_skips_them():
    """drizzle 3 skips input pixels whose centre maps outside its output (its polygon scanner):
    an edge output pixel then lacks their weight. drizzle3d clips every drop exactly, so the
    edge pixel gets the overlapping part; everywhere else the two agree."""
    shape = (10, 10)
    y, x = np.indices(shape, dtype=float)
    data = (x + 1).astype(np.float32)
    # column 0 of the input is centred at x = -0.7: it overlaps output column 0 by 0.3
    ref, d = _drizzle_pair("square", data, np.dstack([x - 0.7, y + 2.0]), (14, 14))
    rows = slice(2, 12)
    # drizzle 3.0 skips the straddling drop: its edge pixel is input column 1 alone (weight
    # 0.7, value 2); whatever a version of drizzle keeps there, it keeps no more than this
    assert np.all(ref.out_wht[rows, 0] <= 1.0 + 1e-6)
    wht = d.out_wht.values[0]
    np.testing.assert_allclose(wht[rows, 0], 1.0, rtol=1e-12)  # 0.3 + 0.7: exact overlap
    np.testing.assert_allclose(d.out_sci.values[0][rows, 0], 0.3 * 1 + 0.7 * 2, rtol=1e-12)
    # the weight that lands is the part of the image inside the output: x in [-0.5, 8.8]
    assert wht.sum() == pytest.approx(10 * 9.3, rel=1e-12)
    # away from the edge column: identical
    np.testing.assert_allclose(d.out_sci.values[0][rows, 1:10], ref.out_img[rows, 1:10], rtol=1e-6)


@pytest.mark.parametrize("kernel", ["square", "turbo", "point", "gaussian"])
def test_image_partly_outside_agrees_with_drizzle_away_from_the_edge(kernel, rng):
    """Rotated, scaled, shifted so that a corner of the image hangs off the output: equal to
    drizzle to float32 precision on every output pixel that no straddling drop reaches."""
    shape = (50, 60)
    scale = 1.3
    data = rng.normal(10.0, 2.0, shape).astype(np.float32)
    pixmap = affine_pixmap(shape, angle=30.0, scale=scale, shift=(30.0, -12.0))
    out_shape = (90, 80)
    ref, d = _drizzle_pair(kernel, data, pixmap, out_shape, scale)
    # output pixels within reach (drop radius + kernel support) of an input pixel centred
    # outside the output or less than that reach inside it
    reach = 3.0 * scale
    xo, yo = pixmap[..., 0], pixmap[..., 1]
    ny, nx = out_shape
    near = (xo < reach - 0.5) | (yo < reach - 0.5) | (xo > nx - 0.5 - reach)
    near |= yo > ny - 0.5 - reach
    edge = np.zeros(out_shape, dtype=bool)
    r = int(np.ceil(reach))
    centres = np.rint(np.stack([yo[near], xo[near]], axis=-1)).astype(int)
    for jj, ii in centres:
        edge[max(jj - r, 0) : max(jj + r + 1, 0), max(ii - r, 0) : max(ii + r + 1, 0)] = True
    compare = (ref.out_wht > 0) & ~edge
    assert compare.sum() > 1500  # most of the covered output
    assert (ref.out_wht > 0)[edge].sum() > 100  # and the image really crosses the edge
    np.testing.assert_allclose(
        d.out_sci.values[0][compare], ref.out_img[compare], rtol=1e-5, atol=2e-4
    )


def test_distorted_map_weights_by_area_where_drizzle_normalises_each_drop(rng):
    """With a non-affine map the drops differ in area: drizzle normalises each to weight w
    (weight w * overlap / drop area), drizzle3d weights by the overlap itself (w * overlap), so
    the means differ slightly; with each drop's weight divided by its area they agree."""
    shape = (30, 30)
    y, x = np.indices(shape, dtype=float)
    pixmap = np.dstack([20 + 1.2 * x + 0.004 * x * y, 20 + 1.2 * y + 0.003 * x**2])
    data = rng.normal(10.0, 2.0, shape).astype(np.float32)
    ref, d = _drizzle_pair("square", data, pixmap, (80, 80))
    covered = ref.out_wht > 0
    diff = np.abs(d.out_sci.values[0][covered] - ref.out_img[covered])
    assert diff.max() > 1e-4  # a real, small difference of definition
    # the drop areas, from the corner quads of the pixmap
    cx, cy = pixel_corners(pixmap)
    area = 0.5 * np.abs(
        (cx[:-1, :-1] - cx[1:, 1:]) * (cy[:-1, 1:] - cy[1:, :-1])
        - (cx[:-1, 1:] - cx[1:, :-1]) * (cy[:-1, :-1] - cy[1:, 1:])
    )
    d2 = Drizzle3D(out_shape=(1, 80, 80), wave_edges=[1.0, 3.0], weighting="uniform")
    d2.add_image(data, np.ones(shape), None, pixmap, lvf_wavemap(shape), weight_map=1.0 / area)
    np.testing.assert_allclose(d2.out_sci.values[0][covered], ref.out_img[covered], rtol=1e-5)


# --------------------------------------------------------- 2. conservation (square)
@pytest.mark.parametrize("pixfrac", [1.0, 0.5, 0.8])
@pytest.mark.parametrize("angle", [0.0, 17.0, 30.0, 90.0])
def test_weight_conservation_square(pixfrac, angle, rng):
    shape = (40, 50)
    scale = 1.7
    pixmap = affine_pixmap(shape, angle=angle, scale=scale, shift=(80.2, 45.6))
    weights = rng.uniform(0.1, 3.0, shape)
    d = Drizzle3D(
        out_shape=(1, 200, 200), wave_edges=[1.0, 3.0], pixfrac=pixfrac, weighting="uniform"
    )
    nmiss, nskip = d.add_image(
        np.full(shape, 7.5), np.ones(shape), None, pixmap, lvf_wavemap(shape), weight_map=weights
    )
    assert (nmiss, nskip) == (0, 0)
    expected = weights.sum() * (pixfrac * scale) ** 2  # shrunk pixel area in output pixels
    actual = d.out_wht.values.sum()
    assert actual == pytest.approx(expected, rel=1e-9)
    sci = d.out_sci.values
    has = d.out_wht.values > 0
    np.testing.assert_allclose(sci[has], 7.5, rtol=1e-12)
    assert np.all(np.isnan(sci[~has]))


def test_weight_conservation_distorted_map(rng):
    """A non-affine pixmap: sum of weights = sum of the exact corner-quad areas."""
    shape = (30, 30)
    y, x = np.indices(shape, dtype=float)
    xo = 20 + x + 0.004 * x * y + 0.002 * y**2
    yo = 20 + y + 0.003 * x**2
    pixmap = np.dstack([xo, yo])
    d = Drizzle3D(out_shape=(1, 90, 90), wave_edges=[1.0, 3.0], weighting="uniform")
    d.add_image(np.ones(shape), np.ones(shape), None, pixmap, lvf_wavemap(shape))
    # the quads of the corner grid tile the image's outline exactly
    cx, cy = pixel_corners(pixmap)
    # area of the outline polygon (shoelace over the border of the corner grid)
    px = np.concatenate([cx[0, :], cx[1:, -1], cx[-1, -2::-1], cx[-2:0:-1, 0]])
    py = np.concatenate([cy[0, :], cy[1:, -1], cy[-1, -2::-1], cy[-2:0:-1, 0]])
    expected = 0.5 * abs(np.dot(px, np.roll(py, -1)) - np.dot(py, np.roll(px, -1)))
    assert d.out_wht.values.sum() == pytest.approx(expected, rel=1e-9)


# ------------------------------------------------------------ 3. spectral exactness
def single_pixel_image(lam, bw):
    shape = (2, 2)
    y, x = np.indices(shape, dtype=float)
    pixmap = np.dstack([x + 10, y + 10])
    wavemap = np.dstack([np.full(shape, np.nan), np.full(shape, np.nan)])
    wavemap[0, 0] = (lam, bw)  # only this pixel maps anywhere
    return np.ones(shape), np.ones(shape), pixmap, wavemap


@pytest.mark.parametrize("wave_pixfrac", [1.0, 0.5, 0.3])
def test_band_spanning_bins_is_split_exactly(wave_pixfrac):
    edges = np.linspace(1.0, 2.0, 11)  # bins of 0.1 um
    lam, bw = 1.425, 0.25  # band [1.3, 1.55]: 2.5 bins
    data, var, pixmap, wavemap = single_pixel_image(lam, bw)
    d = Drizzle3D(
        out_shape=(10, 20, 20), wave_edges=edges, wave_pixfrac=wave_pixfrac, weighting="uniform"
    )
    nmiss, _ = d.add_image(data, var, None, pixmap, wavemap)
    assert nmiss == 3
    per_bin = d.out_wht.values.sum(axis=(1, 2))
    lo, hi = lam - bw * wave_pixfrac / 2, lam + bw * wave_pixfrac / 2
    overlap = np.clip(np.minimum(hi, edges[1:]) - np.maximum(lo, edges[:-1]), 0, None)
    expected = overlap / (hi - lo)  # pixel area 1, weight 1
    np.testing.assert_allclose(per_bin, expected, rtol=1e-12, atol=1e-15)
    assert per_bin.sum() == pytest.approx(1.0, rel=1e-12)
    # effective wavelength (issue 10), default "band": where the pixel's value was measured
    touched = overlap > 0
    wave = d.out_wave.values[:, 10, 10]
    np.testing.assert_allclose(wave[touched], lam, rtol=1e-12)
    assert np.all(np.isnan(wave[~touched]))
    spread = d.out_wave_spread.values[:, 10, 10]
    np.testing.assert_allclose(spread[touched], (hi - lo) / np.sqrt(12.0), rtol=1e-6)
    # "overlap": the analytic centroid of the band's overlap with each bin it touches
    o = Drizzle3D(
        out_shape=(10, 20, 20),
        wave_edges=edges,
        wave_pixfrac=wave_pixfrac,
        weighting="uniform",
        effective_wavelength="overlap",
    )
    o.add_image(data, var, None, pixmap, wavemap)
    ol = np.maximum(lo, edges[:-1])
    oh = np.minimum(hi, edges[1:])
    wave = o.out_wave.values[:, 10, 10]
    np.testing.assert_allclose(wave[touched], 0.5 * (ol + oh)[touched], rtol=1e-12)
    spread = o.out_wave_spread.values[:, 10, 10]
    np.testing.assert_allclose(spread[touched], (oh - ol)[touched] / np.sqrt(12.0), rtol=1e-6)
    np.testing.assert_array_equal(o.out_wht.values, d.out_wht.values)


def test_band_outside_grid_misses():
    data, var, pixmap, wavemap = single_pixel_image(5.0, 0.1)
    d = Drizzle3D(out_shape=(3, 20, 20), wave_edges=[1.0, 1.1, 1.2, 1.3])
    nmiss, nskip = d.add_image(data, var, None, pixmap, wavemap)
    assert (nmiss, nskip) == (4, 2)
    assert d.out_wht.values.sum() == 0
    assert np.all(np.isnan(d.out_sci.values))


# ------------------------------------------------------------------ 4. variance
def test_variance_matches_scatter(rng):
    """Pure-noise images of known variance: (sci - truth) / sqrt(var) has unit scatter."""
    shape = (48, 48)
    truth = 3.0
    d = Drizzle3D(out_shape=(3, 70, 70), wave_edges=[1.6, 1.9, 2.15, 2.5], weighting="ivm")
    for k in range(10):
        var = rng.uniform(0.5, 4.0, shape)
        data = truth + rng.normal(0.0, np.sqrt(var))
        pixmap = affine_pixmap(
            shape, angle=rng.uniform(0, 360), scale=rng.uniform(0.9, 1.2), shift=(35, 35)
        )
        # recentre the rotated image on the output
        pixmap -= pixmap.reshape(-1, 2).mean(axis=0) - 34.5
        d.add_image(data, var, None, pixmap, lvf_wavemap(shape, r=30.0 + k))
    sci = d.out_sci.values
    var_out = d.out_var.values
    good = d.out_count.values >= 3
    assert good.sum() > 8000
    chi = (sci[good] - truth) / np.sqrt(var_out[good])
    assert 0.97 <= np.std(chi) <= 1.03
    assert abs(np.mean(chi)) < 0.05


# ------------------------------------------------------------- 5. merge, resume
def random_images(rng, n, shape=(24, 26)):
    images = []
    for _ in range(n):
        var = rng.uniform(0.5, 2.0, shape)
        data = rng.normal(5.0, 1.0, shape)
        flags = rng.choice([0, 1, 4, 1 << 31], size=shape, p=[0.85, 0.05, 0.05, 0.05])
        flags = flags.astype(np.uint32).view(np.int32) if rng.random() < 0.5 else flags
        pixmap = affine_pixmap(
            shape,
            angle=rng.uniform(0, 360),
            scale=rng.uniform(0.8, 1.3),
            shift=(rng.uniform(15, 25), rng.uniform(15, 25)),
        )
        wavemap = lvf_wavemap(shape, lam_hi=rng.uniform(2.2, 2.4), r=rng.uniform(35, 45))
        images.append((data, var, flags, pixmap, wavemap))
    return images


SETTINGS = {
    "out_shape": (4, 45, 45),
    "wave_edges": [1.7, 1.85, 2.0, 2.2, 2.4],
    "exclude_flags": [2],
}


def assert_states_equal(a, b, rtol=1e-12):
    sa, sb = a.state, b.state
    for name in ("sum_wf", "sum_w", "sum_w2v", "sum_wl", "sum_wl2"):
        np.testing.assert_allclose(sa[name], sb[name], rtol=rtol, atol=1e-300)
    for name in ("count", "and_mask", "or_mask", "ctx"):
        np.testing.assert_array_equal(sa[name], sb[name])
    assert sa["n_images"] == sb["n_images"]
    assert sa["total_exptime"] == pytest.approx(sb["total_exptime"])
    np.testing.assert_allclose(
        a.out_sci.values, b.out_sci.values, rtol=rtol, equal_nan=True, atol=1e-300
    )


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(split=st.lists(st.booleans(), min_size=6, max_size=6))
def test_any_split_merged_equals_serial(split):
    images = random_images(np.random.default_rng(7), 6)
    serial = Drizzle3D(**SETTINGS)
    for img in images:
        serial.add_image(*img)
    a = Drizzle3D(**SETTINGS)
    b = Drizzle3D(**SETTINGS)
    for k, (img, in_a) in enumerate(zip(images, split, strict=True)):
        (a if in_a else b).add_image(*img, ctx_id=k)
    merged = a.merge(b)
    assert_states_equal(merged, serial)


def test_resume_from_state_equals_uninterrupted(rng):
    images = random_images(rng, 5)
    full = Drizzle3D(**SETTINGS)
    for img in images:
        full.add_image(*img)
    first = Drizzle3D(**SETTINGS)
    for img in images[:2]:
        first.add_image(*img)
    resumed = Drizzle3D(**SETTINGS, state=first.state)
    assert resumed.ctx_id == 2
    for img in images[2:]:
        resumed.add_image(*img)
    assert_states_equal(resumed, full, rtol=0)


def test_state_from_other_settings_is_refused(rng):
    d = Drizzle3D(**SETTINGS)
    d.add_image(*random_images(rng, 1)[0])
    with pytest.raises(ValueError, match="pixfrac"):
        Drizzle3D(**SETTINGS, pixfrac=0.5, state=d.state)


def test_merge_refuses_mismatches(rng):
    a = Drizzle3D(**SETTINGS)
    a.add_image(*random_images(rng, 1)[0])
    b = Drizzle3D(**SETTINGS)
    b.add_image(*random_images(rng, 1)[0])
    with pytest.raises(ValueError, match="context ids"):
        a.merge(b)
    with pytest.raises(ValueError, match="kernel"):
        a.merge(Drizzle3D(**SETTINGS, kernel="turbo"))
    with pytest.raises(ValueError, match="out_shape"):
        a.merge(Drizzle3D(out_shape=(4, 45, 44), wave_edges=SETTINGS["wave_edges"]))
    with pytest.raises(TypeError, match="Drizzle3D"):
        a.merge("cube")


def test_threads_fill_partials_that_merge_to_serial(rng):
    images = random_images(rng, 8)
    serial = Drizzle3D(**SETTINGS)
    for img in images:
        serial.add_image(*img)
    parts = [Drizzle3D(**SETTINGS), Drizzle3D(**SETTINGS)]

    def work(k):
        for i in range(k, 8, 2):
            parts[k].add_image(*images[i], ctx_id=i)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert_states_equal(parts[0].merge(parts[1]), serial)


# --------------------------------------------------------- 6. bad inputs, atomicity
GOOD_SHAPE = (6, 7)


def good_args():
    data = np.ones(GOOD_SHAPE)
    var = np.ones(GOOD_SHAPE)
    flags = np.zeros(GOOD_SHAPE, dtype=np.int32)
    pixmap = affine_pixmap(GOOD_SHAPE, angle=10, scale=1.0, shift=(5, 5))
    wavemap = const_wavemap(GOOD_SHAPE)
    return {"data": data, "var": var, "flags": flags, "pixmap": pixmap, "wavemap": wavemap}


def _with(**changes):
    args = good_args()
    kw = {}
    for key, value in changes.items():
        if key in args:
            args[key] = value(args[key]) if callable(value) else value
        else:
            kw[key] = value
    return args, kw


def _set(arr, index, value):
    arr = arr.copy()
    arr[index] = value
    return arr


BAD_ADD_IMAGE = [
    ("data None", _with(data=None), TypeError, "'data' must be a 2-D array"),
    ("data 3-D", _with(data=np.ones((2, 6, 7))), ValueError, "'data' must be 2-D"),
    ("data complex", _with(data=np.ones(GOOD_SHAPE, complex)), TypeError, "'data' must be a real"),
    ("data strings", _with(data=np.full(GOOD_SHAPE, "a")), TypeError, "'data' must be a real"),
    ("var shape", _with(var=np.ones((6, 6))), ValueError, "'var' must have the shape"),
    ("flags float", _with(flags=np.zeros(GOOD_SHAPE)), TypeError, "'flags' must be an integer"),
    ("flags 64-bit", _with(flags=np.full(GOOD_SHAPE, 1 << 40)), ValueError, "32-bit"),
    ("pixmap shape", _with(pixmap=np.zeros((6, 7, 3))), ValueError, "'pixmap' must have shape"),
    ("pixmap size", _with(pixmap=np.zeros((5, 7, 2))), ValueError, "'pixmap' must have shape"),
    ("wavemap size", _with(wavemap=np.zeros((6, 8, 2))), ValueError, "'wavemap' must have shape"),
    (
        "negative bandwidth",
        _with(wavemap=lambda w: _set(w, (2, 3, 1), -0.01)),
        ValueError,
        "bandwidths",
    ),
    (
        "zero wavelength",
        _with(wavemap=lambda w: _set(w, (2, 3, 0), 0.0)),
        ValueError,
        "wavelengths",
    ),
    (
        "weight_map negative",
        _with(weight_map=-np.ones(GOOD_SHAPE)),
        ValueError,
        "'weight_map' must be finite and >= 0",
    ),
    (
        "weight_map nan",
        _with(weight_map=np.full(GOOD_SHAPE, np.nan)),
        ValueError,
        "'weight_map' must be finite",
    ),
    ("wht_scale negative", _with(wht_scale=-1.0), ValueError, "'wht_scale' must be >= 0"),
    ("wht_scale str", _with(wht_scale="1"), TypeError, "'wht_scale' must be a real number"),
    ("exptime zero", _with(exptime=0.0), ValueError, "'exptime' must be > 0"),
    ("exptime inf", _with(exptime=np.inf), ValueError, "'exptime' must be finite"),
    ("xmin out of range", _with(xmin=7), ValueError, r"'xmin' must be in \[0, 6\]"),
    ("xmin > xmax", _with(xmin=4, xmax=2), ValueError, "must be non-empty"),
    ("ymax float", _with(ymax=2.5), TypeError, "'ymax' must be an integer"),
    ("box too thin", _with(ymin=2, ymax=2), ValueError, "at least 2x2"),
    ("pixel_scale_ratio 0", _with(pixel_scale_ratio=0.0), ValueError, "'pixel_scale_ratio'"),
    ("ctx_id negative", _with(ctx_id=-1), ValueError, "'ctx_id' must be a non-negative"),
    ("ctx_id reused", _with(ctx_id=0), ValueError, "'ctx_id' 0 was already used"),
]


@pytest.mark.parametrize(
    ("case", "call", "exc", "match"), BAD_ADD_IMAGE, ids=[c[0] for c in BAD_ADD_IMAGE]
)
def test_bad_add_image_raises_and_leaves_state_unchanged(case, call, exc, match):
    d = Drizzle3D(out_shape=(2, 20, 20), wave_edges=[1.9, 2.0, 2.1], exclude_flags=1)
    d.add_image(**good_args())  # some state to protect
    before = d.state
    args, kw = call
    with pytest.raises(exc, match=match):
        d.add_image(**args, **kw)
    after = d.state
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, np.ndarray):
            assert value.tobytes() == after[key].tobytes(), key
        else:
            assert value == after[key], key


BAD_INIT = [
    ({}, ValueError, "Give 'grid', or both"),
    ({"out_shape": (2, 3, 4)}, ValueError, "Give 'grid', or both"),
    ({"out_shape": (2, 3), "wave_edges": [1, 2, 3]}, ValueError, r"\(nz, ny, nx\)"),
    ({"out_shape": (2, 3, 4), "wave_edges": [1, 2]}, ValueError, "nz \\+ 1 = 3"),
    ({"out_shape": (2, 3, 4), "wave_edges": [1, 3, 2]}, ValueError, "strictly increasing"),
    ({"out_shape": (1, 3, 4), "wave_edges": [1, np.nan]}, ValueError, "finite"),
    ({"kernel": "tophat"}, ValueError, "'kernel' must be one of"),
    ({"effective_wavelength": "mean"}, ValueError, "'effective_wavelength' must be"),
    ({"pixfrac": 0.0}, ValueError, r"'pixfrac' must be in \(0, 1\]"),
    ({"pixfrac": 1.5}, ValueError, r"'pixfrac' must be in \(0, 1\]"),
    ({"wave_pixfrac": -0.1}, ValueError, "'wave_pixfrac'"),
    ({"weighting": "ivar"}, ValueError, "'weighting' must be one of"),
    ({"ivar_max": 0.0}, ValueError, "'ivar_max' must be > 0"),
    ({"min_overlap": 1.0}, ValueError, "'min_overlap' must be in"),
    ({"exclude_flags": [40]}, ValueError, "bit numbers must be integers in 0..31"),
    ({"exclude_flags": 2.5}, TypeError, "'exclude_flags' must be an int bitmask"),
    ({"fillval": "INDEF"}, TypeError, "'fillval' must be a real number"),
    ({"begin_ctx_id": -1}, ValueError, "'begin_ctx_id' must be >= 0"),
    ({"max_ctx_id": 3, "begin_ctx_id": 5}, ValueError, "'max_ctx_id' must be >="),
    ({"grid": "grid", "out_shape": None, "wave_edges": None}, TypeError, "'grid' must be an"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), BAD_INIT)
def test_bad_init_raises(kwargs, exc, match):
    base = {"out_shape": (2, 10, 10), "wave_edges": [1.0, 1.5, 2.0]}
    if "out_shape" in kwargs or "wave_edges" in kwargs or not kwargs:
        base = {}
    base.update(kwargs)
    base = {k: v for k, v in base.items() if v is not None}
    with pytest.raises(exc, match=match):
        Drizzle3D(**base)


# ------------------------------------------------------------ weights and masks
def test_flags_excluded_but_recorded_in_masks():
    shape = (4, 4)
    y, x = np.indices(shape, dtype=float)
    pixmap = np.dstack([x + 3, y + 3])  # identity-like: pixel (j, i) -> output (j+3, i+3)
    flags = np.zeros(shape, dtype=np.int32)
    flags[1, 1] = 0b100  # excluded bit 2
    flags[2, 2] = 0b001  # kept bit 0
    data = np.arange(16.0).reshape(shape)
    data[3, 3] = np.nan  # non-finite: no weight, but it landed
    d = Drizzle3D(out_shape=(1, 10, 10), wave_edges=[1.0, 3.0], exclude_flags=[2])
    d.add_image(data, np.ones(shape), flags, pixmap, const_wavemap(shape))
    assert np.isnan(d.out_sci.values[0, 4, 4])  # only the excluded pixel landed there
    assert d.out_count.values[0, 4, 4] == 0
    assert d.out_mask.values[0, 4, 4] == 0b100
    assert d.out_or_mask.values[0, 4, 4] == 0b100
    assert d.out_sci.values[0, 5, 5] == pytest.approx(10.0)
    assert d.out_mask.values[0, 5, 5] == 0b001
    assert np.isnan(d.out_sci.values[0, 6, 6])
    assert d.out_count.values[0, 3, 3] == 1
    assert d.out_mask.values[0, 0, 0] == 0  # nothing landed


def test_and_or_masks_over_two_images():
    shape = (3, 3)
    y, x = np.indices(shape, dtype=float)
    pixmap = np.dstack([x + 1, y + 1])
    d = Drizzle3D(out_shape=(1, 6, 6), wave_edges=[1.0, 3.0])
    d.add_image(
        np.ones(shape), np.ones(shape), np.full(shape, 0b0110), pixmap, const_wavemap(shape)
    )
    d.add_image(
        np.ones(shape), np.ones(shape), np.full(shape, 0b0011), pixmap, const_wavemap(shape)
    )
    assert d.out_mask.values[0, 2, 2] == 0b0010
    assert d.out_or_mask.values[0, 2, 2] == 0b0111
    assert d.out_count.values[0, 2, 2] == 2


@pytest.mark.parametrize(
    ("weighting", "expected"),
    [("ivm", (1 * 1 + 3 * 0.25) / 1.25), ("uniform", 2.0), ("exptime", (1 * 1 + 3 * 3) / 4)],
)
def test_weightings(weighting, expected):
    shape = (3, 3)
    y, x = np.indices(shape, dtype=float)
    pixmap = np.dstack([x + 1, y + 1])
    d = Drizzle3D(out_shape=(1, 6, 6), wave_edges=[1.0, 3.0], weighting=weighting)
    d.add_image(np.ones(shape), np.ones(shape), None, pixmap, const_wavemap(shape), exptime=1.0)
    d.add_image(
        np.full(shape, 3.0), np.full(shape, 4.0), None, pixmap, const_wavemap(shape), exptime=3.0
    )
    assert d.out_sci.values[0, 2, 2] == pytest.approx(expected, rel=1e-12)
    assert d.total_exptime == 4.0
    assert d.n_images == 2


def test_ivar_max_caps_weights():
    shape = (3, 3)
    y, x = np.indices(shape, dtype=float)
    pixmap = np.dstack([x + 1, y + 1])
    d = Drizzle3D(out_shape=(1, 6, 6), wave_edges=[1.0, 3.0], ivar_max=2.0)
    d.add_image(np.ones(shape), np.full(shape, 1e-6), None, pixmap, const_wavemap(shape))
    d.add_image(np.full(shape, 3.0), np.full(shape, 0.5), None, pixmap, const_wavemap(shape))
    assert d.out_sci.values[0, 2, 2] == pytest.approx(2.0)  # both capped at 2: plain mean


def test_fillval_applies_on_access_only():
    d = Drizzle3D(out_shape=(1, 5, 5), wave_edges=[1.0, 2.0], fillval=-99.0)
    assert np.all(d.out_sci.values == -99.0)
    assert np.all(np.isnan(d.out_var.values))
    assert d.fillval == -99.0


# ------------------------------------------------------------------ context
def test_context_bits_for_40_images():
    shape = (3, 3)
    y, x = np.indices(shape, dtype=float)
    pixmap = np.dstack([x + 1, y + 1])
    d = Drizzle3D(out_shape=(1, 6, 6), wave_edges=[1.0, 3.0])
    for _ in range(40):
        d.add_image(np.ones(shape), np.ones(shape), None, pixmap, const_wavemap(shape))
    ctx = d.out_ctx
    assert ctx.shape == (2, 6, 6)
    ids = decode_context(ctx, [2, 0], [2, 0])
    np.testing.assert_array_equal(ids[0], np.arange(40))
    assert ids[1].size == 0
    assert CTX_PLANE_BITS == 32


def test_disable_ctx_and_max_ctx_id():
    d = Drizzle3D(out_shape=(1, 4, 4), wave_edges=[1.0, 2.0], max_ctx_id=70)
    assert d.out_ctx.shape == (3, 4, 4)
    d2 = Drizzle3D(out_shape=(1, 4, 4), wave_edges=[1.0, 2.0], disable_ctx=True)
    assert "ctx" not in d2.to_dataset()


# ----------------------------------------------------------------- transpose
@pytest.mark.parametrize("kernel", ["square", "turbo", "point", "gaussian", "bilinear"])
def test_transpose_is_the_adjoint(kernel, rng):
    """<D F, X> = <F, D^T X> for the weight-sum operator of one image."""
    shape = (20, 22)
    data = rng.normal(size=shape)
    var = rng.uniform(0.5, 2.0, shape)
    pixmap = affine_pixmap(shape, angle=23.0, scale=1.1, shift=(20, 3))
    wavemap = lvf_wavemap(shape)
    edges = [1.6, 1.8, 2.0, 2.2, 2.5]
    d = Drizzle3D(out_shape=(4, 40, 40), wave_edges=edges, kernel=kernel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d.add_image(data, var, None, pixmap, wavemap)
    cube = rng.normal(size=(4, 40, 40))
    sum_wf = d.state["sum_wf"]
    c = d.transpose(cube, var, None, pixmap, wavemap)
    assert c.shape == shape
    assert np.sum(sum_wf * cube) == pytest.approx(np.sum(data * c), rel=1e-10)
    assert d.n_images == 1  # transpose changes nothing


def test_transpose_gives_exact_aperture_variance(rng):
    shape = (16, 16)
    images = []
    for k in range(3):
        var = rng.uniform(0.5, 2.0, shape)
        pixmap = affine_pixmap(shape, angle=40.0 * k, scale=1.2, shift=(12, 3))
        images.append((var, pixmap, lvf_wavemap(shape)))
    edges = [1.6, 2.0, 2.5]
    d = Drizzle3D(out_shape=(2, 30, 30), wave_edges=edges)
    for var, pm, wm in images:
        d.add_image(np.zeros(shape), var, None, pm, wm)
    wht = d.out_wht.values
    aperture = np.zeros((2, 30, 30))
    aperture[:, 12:16, 12:16] = 1.0
    x = np.where(wht > 0, aperture / np.where(wht > 0, wht, 1), 0.0)
    predicted = sum(np.sum(d.transpose(x, var, None, pm, wm) ** 2 * var) for var, pm, wm in images)
    # Monte Carlo: aperture sums of out_sci over noise realisations
    sums = []
    for _ in range(400):
        e = Drizzle3D(out_shape=(2, 30, 30), wave_edges=edges)
        for var, pm, wm in images:
            e.add_image(rng.normal(0, np.sqrt(var)), var, None, pm, wm)
        sums.append(np.nansum(e.out_sci.values * aperture))
    measured = np.var(sums)
    naive = np.nansum(d.out_var.values * aperture)
    assert measured == pytest.approx(predicted, rel=0.15)
    assert predicted > 1.3 * naive  # the correlations matter


# --------------------------------------------------------------- xarray outputs
def test_outputs_are_labelled_cubes():
    edges = np.array([1.0, 1.2, 1.5])
    d = Drizzle3D(out_shape=(2, 5, 6), wave_edges=edges)
    sci = d.out_sci
    assert sci.dims == ("wavelength", "y", "x")
    np.testing.assert_allclose(sci.wavelength.values, [1.1, 1.35])
    np.testing.assert_allclose(sci.wavelength_min.values, edges[:-1])
    np.testing.assert_allclose(sci.wavelength_max.values, edges[1:])
    assert sci.wavelength.attrs["units"] == "um"
    assert sci.attrs["units"] == "MJy/sr"
    assert sci.sel(wavelength=1.3, method="nearest").shape == (5, 6)
    ds = d.to_dataset()
    assert set(ds.data_vars) >= {"sci", "var", "wht", "count", "and_mask", "or_mask", "wave"}
    assert ds.attrs["kernel"] == "square"


def test_non_conserving_kernels_warn():
    shape = (3, 3)
    y, x = np.indices(shape, dtype=float)
    d = Drizzle3D(out_shape=(1, 6, 6), wave_edges=[1.0, 3.0], kernel="gaussian")
    with pytest.warns(UserWarning, match="does not conserve"):
        d.add_image(np.ones(shape), np.ones(shape), None, np.dstack([x, y]), const_wavemap(shape))


def test_box_pixmap_equals_full_pixmap(rng):
    shape = (20, 20)
    data = rng.normal(size=shape)
    var = np.ones(shape)
    pixmap = affine_pixmap(shape, angle=12, scale=1.0, shift=(5, 5))
    wavemap = lvf_wavemap(shape)
    kw = {"xmin": 3, "xmax": 14, "ymin": 5, "ymax": 17}
    a = Drizzle3D(out_shape=(2, 40, 40), wave_edges=[1.6, 2.0, 2.5])
    a.add_image(data, var, None, pixmap, wavemap, **kw)
    b = Drizzle3D(out_shape=(2, 40, 40), wave_edges=[1.6, 2.0, 2.5])
    box = (slice(5, 18), slice(3, 15))
    b.add_image(data, var, None, pixmap[box], wavemap[box], **kw)
    np.testing.assert_array_equal(a.state["sum_wf"], b.state["sum_wf"])
    # the box's pixels only
    c = Drizzle3D(out_shape=(2, 40, 40), wave_edges=[1.6, 2.0, 2.5])
    c.add_image(data[box], var[box], None, pixmap[box], wavemap[box])
    np.testing.assert_array_equal(a.state["sum_wf"], c.state["sum_wf"])


def test_large_drops_conserve_weight(rng):
    """Output pixels 20x finer than the input: drops larger than the kernel's scratch box."""
    shape = (4, 5)
    scale = 20.0
    pixmap = affine_pixmap(shape, angle=25.0, scale=scale, shift=(70.0, 20.0))
    weights = rng.uniform(0.5, 2.0, shape)
    d = Drizzle3D(out_shape=(1, 200, 200), wave_edges=[1.0, 3.0], weighting="uniform")
    nmiss, _ = d.add_image(
        np.full(shape, 2.5), np.ones(shape), None, pixmap, lvf_wavemap(shape), weight_map=weights
    )
    assert nmiss == 0
    assert d.out_wht.values.sum() == pytest.approx(weights.sum() * scale**2, rel=1e-9)
    has = d.out_wht.values > 0
    np.testing.assert_allclose(d.out_sci.values[has], 2.5, rtol=1e-12)


@pytest.mark.parametrize("pixfrac", [1.0, 0.7])
def test_every_voxel_weight_is_the_exact_overlap_whatever_the_drop_size(pixfrac):
    """Drops from 0.3 to ~20 output pixels wide along each row, so one tile row mixes drops
    whose areas come from the vectorised box pass with drops too large for it (per-pixel
    path): every voxel's weight equals the sum of its exact overlaps, computed here drop by
    drop with the kernels' cell-by-cell Green integral."""
    from drizzle3d import _kernels

    shape = (9, 70)
    y, x = np.indices(shape, dtype=float)
    xo = 5.2 + 0.3 * x + 0.15 * x**2 - 0.4 * y  # growing and sheared along the row
    yo = 5.7 + y * (0.5 + 0.05 * x) + 0.1 * x
    pixmap = np.dstack([xo, yo])
    weights = np.random.default_rng(8).uniform(0.5, 2.0, shape)
    out_shape = (1, int(yo.max()) + 12, int(xo.max()) + 12)
    d = Drizzle3D(out_shape=out_shape, wave_edges=[1.0, 3.0], weighting="uniform", pixfrac=pixfrac)
    nmiss, _ = d.add_image(
        np.ones(shape), np.ones(shape), None, pixmap, const_wavemap(shape), weight_map=weights
    )
    assert nmiss == 0
    # the kernel's drop: corners where the pixmap, interpolated bilinearly between pixel
    # centres (extrapolated at the border), puts (i +- pixfrac/2, j +- pixfrac/2)
    expected = np.zeros(out_shape[1:])
    sizes = []
    h = 0.5 * pixfrac
    for j in range(shape[0]):
        for i in range(shape[1]):
            corners = [(i - h, j - h), (i + h, j - h), (i + h, j + h), (i - h, j + h)]
            qx, qy = np.array([_interp_pixmap(pixmap, px, py) for px, py in corners]).T
            i0, i1 = int(np.floor(qx.min() + 0.5)), int(np.floor(qx.max() + 0.5))
            j0, j1 = int(np.floor(qy.min() + 0.5)), int(np.floor(qy.max() + 0.5))
            sizes.append(max(i1 - i0, j1 - j0) + 1)
            for jj in range(j0, j1 + 1):
                for ii in range(i0, i1 + 1):
                    expected[jj, ii] += weights[j, i] * _kernels.quad_pixel_overlap(qx, qy, ii, jj)
    # both paths are used: drops within the box pass, and larger ones
    assert min(sizes) <= 2
    assert max(sizes) > _kernels._BOX_MAX
    np.testing.assert_allclose(d.out_wht.values[0], expected, rtol=1e-10, atol=1e-12)
    has = d.out_wht.values > 0
    np.testing.assert_allclose(d.out_sci.values[has], 1.0, rtol=1e-12)


def _interp_pixmap(pixmap, px, py):
    """Output (x, y) of input position (px, py): bilinear between the 4 nearest pixel
    centres, extrapolated from the border cell outside the image."""
    ny, nx = pixmap.shape[:2]
    c = min(max(int(np.floor(px)), 0), nx - 2)
    r = min(max(int(np.floor(py)), 0), ny - 2)
    tx, ty = px - c, py - r
    g = pixmap[r : r + 2, c : c + 2]
    return (
        g[0, 0] * (1 - tx) * (1 - ty)
        + g[0, 1] * tx * (1 - ty)
        + g[1, 0] * (1 - tx) * ty
        + g[1, 1] * tx * ty
    )


@pytest.mark.parametrize("kernel", ["square", "turbo"])
def test_kernels_refuse_accumulators_they_cannot_address_flat(kernel):
    """The kernels write through flat views of the accumulators: a strided array would be
    copied by the flattening and every deposit lost, so it is refused."""
    from drizzle3d import _kernels

    shape = (6, 6)
    img = np.ones(shape)
    acc = np.zeros((1, 20, 40, _kernels.N_FIELDS))[:, :, ::2]  # every other column
    with pytest.raises(ValueError, match="C-contiguous"):
        _kernels.drizzle_image(
            _kernels.KERNEL_IDS[kernel], img, img, img, np.zeros(shape, np.int64),
            affine_pixmap(shape, shift=(5.0, 5.0), scale=1.0), const_wavemap(shape),
            np.array([1.0, 3.0]), 1.0, 3.0, -np.inf, True, 1.0, 1.0, 1.0, 0.0, True, False,
            np.zeros(1), acc, acc.view(np.int64), np.zeros((1, 20, 20), np.int32), 0,
            np.int32(1), True,
        )  # fmt: skip
    assert not acc.any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weighting", ["ivm", "exptime", "uniform"])
def test_pixel_weights_follow_their_definition_bit_for_bit(dtype, weighting):
    # the compiled one-pass preparation against the weights' numpy definition: finite value
    # and variance >= 0 (> 0 for ivm), min(1/var, ivar_max) | exptime | 1, excluded flags 0,
    # times the weight map, times wht_scale
    from drizzle3d import _kernels

    rng = np.random.default_rng(3)
    d = rng.normal(size=(40, 50)).astype(dtype)
    v = rng.uniform(-0.2, 3.0, size=(40, 50)).astype(dtype)
    d[0, :5] = np.nan
    v[1, :5] = np.inf
    v[2, :5] = 0.0
    v[3, :3] = np.finfo(dtype).smallest_subnormal  # 1/var overflows to inf
    f = rng.integers(0, 8, size=(40, 50)).astype(np.int64)
    wm = rng.uniform(0.0, 2.0, size=(40, 50)).astype(np.float32)
    for use_map in (False, True):
        for ivar_max in (np.inf, 2.5):
            for exclude in (0, 5):
                d64, v64 = d.astype(np.float64), v.astype(np.float64)
                with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
                    good = np.isfinite(d64) & np.isfinite(v64) & (v64 >= 0)
                    if weighting == "ivm":
                        good &= v64 > 0
                        expected = np.minimum(np.where(good, 1.0 / np.where(good, v64, 1.0), 0.0),
                                              ivar_max)  # fmt: skip
                    else:
                        expected = np.where(good, 3.7 if weighting == "exptime" else 1.0, 0.0)
                expected[(f & exclude) != 0] = 0.0
                if use_map:
                    expected = expected * wm
                expected = expected * 0.9
                out = [np.empty(d.shape) for _ in range(3)]
                _kernels.pixel_weights(
                    d, v, f, exclude, wm if use_map else np.zeros((1, 1), np.float32), use_map,
                    _kernels.WEIGHTING_IDS[weighting], ivar_max, 3.7, 0.9, *out,
                )  # fmt: skip
                np.testing.assert_array_equal(out[2].view(np.int64), expected.view(np.int64))
                np.testing.assert_array_equal(out[0], d64)
                np.testing.assert_array_equal(out[1], v64)
