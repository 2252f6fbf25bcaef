"""Tests of drizzle3d.simulate: the truth it writes is the truth it claims."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.io import fits

from drizzle3d.channels import detector_range
from drizzle3d.simulate import (
    ExtendedSource,
    Line,
    PointSource,
    Sky,
    Spectrum,
    _render_point_sources,
    lvf_table,
    simulate_field,
)
from drizzle3d.spherex import flag_bits, read_spherex

ARCSEC2_TO_SR = (math.pi / 180 / 3600) ** 2


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    return simulate_field(
        tmp_path_factory.mktemp("sim"),
        n_exposures=12,
        shape=(128, 128),
        cosmic_rays=2e-3,
        flagged_fraction=0.01,
        seed=7,
    )


def test_band_average_matches_numerical_integration():
    spec = Spectrum(
        1.3, index=-1.7, ref_wavelength=2.0, lines=(Line(2.1, 0.004, 5.0), Line(2.3, 0.02, -0.8))
    )
    lam = np.array([2.08, 2.1, 2.3, 2.5])
    bw = np.array([0.05, 0.01, 0.06, 0.0])
    actual = spec.band_average(lam, bw)
    for i in range(3):
        g = np.linspace(lam[i] - bw[i] / 2, lam[i] + bw[i] / 2, 200001)
        expected = np.trapezoid(spec.evaluate(g), g) / bw[i]
        assert actual[i] == pytest.approx(expected, rel=1e-8)
    assert actual[3] == pytest.approx(float(spec.evaluate(2.5)))
    log_spec = Spectrum(2.0, index=-1.0)  # the log branch
    g = np.linspace(1.0, 1.5, 100001)
    assert log_spec.band_average(1.25, 0.5) == pytest.approx(
        np.trapezoid(log_spec.evaluate(g), g) / 0.5, rel=1e-9
    )


def test_sky_evaluate_point_source_integrates_to_flux():
    src = PointSource(10.0, 0.0, Spectrum(2.0), fwhm=6.0)
    sky = Sky(point_sources=(src,))
    d = np.linspace(-40, 40, 801) / 3600.0  # deg
    ra, dec = np.meshgrid(10.0 + d, d)
    sb = sky.evaluate(ra, dec, 2.0)
    step_sr = (d[1] - d[0]) ** 2 * 3600**2 * ARCSEC2_TO_SR
    flux_mjy = sb.sum() * step_sr * 1e9
    assert flux_mjy == pytest.approx(2.0, rel=1e-4)


def test_rendered_point_source_conserves_flux(field):
    expo = field.exposures[0]
    star = Sky(point_sources=(field.sky.point_sources[0],))
    img = _render_point_sources(star, expo.wcs, (128, 128), expo.wavemap)
    y, x = np.unravel_index(np.argmax(img), img.shape)
    # Local pixel solid angle (SIP included) from sky offsets of neighbouring pixels.
    c = expo.wcs.pixel_to_world([x, x + 1, x], [y, y, y + 1])
    dx = c[0].spherical_offsets_to(c[1])
    dy = c[0].spherical_offsets_to(c[2])
    area = abs(dx[0].arcsec * dy[1].arcsec - dx[1].arcsec * dy[0].arcsec)
    assert area == pytest.approx(6.15**2, rel=0.05)
    pix_sr = area * ARCSEC2_TO_SR
    box = (slice(y - 8, y + 9), slice(x - 8, x + 9))
    wm = expo.wavemap[box]
    expected_map = star.point_sources[0].spectrum.band_average(wm[..., 0], wm[..., 1])
    # Flux (mJy) in each pixel divided by the pixel's own band-averaged flux density sums to 1.
    frac = img[box] * pix_sr * 1e9 / expected_map
    assert frac.sum() == pytest.approx(1.0, rel=2e-3)


def test_noise_matches_variance(field):
    chi = []
    for expo in field.exposures[:4]:
        im = read_spherex(expo.path)
        good = ~(expo.cosmic_rays | expo.bad_pixels)
        chi.append(((im.data - expo.model) / np.sqrt(im.var))[good])
    chi = np.concatenate(chi)
    assert abs(chi.mean()) < 0.01
    assert chi.std() == pytest.approx(1.0, abs=0.01)


def test_variance_includes_source_shot_noise(field):
    expo = field.exposures[0]
    im = read_spherex(expo.path)
    y, x = np.unravel_index(np.argmax(expo.sky_model), expo.sky_model.shape)
    faint = np.unravel_index(np.argmin(expo.sky_model), expo.sky_model.shape)
    assert im.var[y, x] > 1.5 * im.var[faint]
    expected = 0.015**2 + 2e-3 * expo.model[y, x]
    assert im.var[y, x] == pytest.approx(expected, rel=1e-5)


def test_reproducible_from_seed(tmp_path):
    a = simulate_field(tmp_path / "a", n_exposures=2, shape=(48, 40), cosmic_rays=0.01, seed=3)
    b = simulate_field(tmp_path / "b", n_exposures=2, shape=(48, 40), cosmic_rays=0.01, seed=3)
    c = simulate_field(tmp_path / "c", n_exposures=2, shape=(48, 40), cosmic_rays=0.01, seed=4)
    for pa, pb, pc in zip(a.paths, b.paths, c.paths, strict=True):
        da, db, dc = (fits.getdata(p, "IMAGE") for p in (pa, pb, pc))
        np.testing.assert_array_equal(da, db)
        assert not np.array_equal(np.nan_to_num(da), np.nan_to_num(dc))
    np.testing.assert_array_equal(a.exposures[1].cosmic_rays, b.exposures[1].cosmic_rays)


def test_dithers_sample_many_wavelengths_at_one_position(field):
    ra0, dec0 = field.sky.point_sources[0].ra, field.sky.point_sources[0].dec
    lams, rots = [], []
    for expo in field.exposures:
        x, y = expo.wcs.world_to_pixel_values(ra0, dec0)
        ix, iy = int(np.round(x)), int(np.round(y))
        assert 0 <= ix < 128
        assert 0 <= iy < 128
        lams.append(expo.wavemap[iy, ix, 0])
        rots.append(expo.rotation)
    lo, hi = detector_range(3)
    lams = np.sort(lams)
    assert lams[-1] - lams[0] > 0.6 * (hi - lo)
    assert np.min(np.diff(lams)) > 0.005  # twelve distinct wavelengths
    assert len(set(np.round(rots, 3))) == 12


def test_cosmic_rays_flagged_or_not(tmp_path):
    for flagged in (True, False):
        f = simulate_field(
            tmp_path / str(flagged),
            n_exposures=1,
            shape=(64, 64),
            cosmic_rays=0.01,
            cosmic_rays_flagged=flagged,
            flagged_fraction=0.0,
        )
        expo = f.exposures[0]
        im = read_spherex(expo.path)
        transient = (im.flags & flag_bits("TRANSIENT")) != 0
        assert expo.cosmic_rays.sum() > 10
        np.testing.assert_array_equal(transient, expo.cosmic_rays if flagged else False)
        assert np.all(
            im.data[expo.cosmic_rays]
            > expo.model[expo.cosmic_rays] + 5 * np.sqrt(im.var[expo.cosmic_rays])
        )


def test_flagged_fraction(field):
    frac = np.mean([e.bad_pixels.mean() for e in field.exposures])
    assert frac == pytest.approx(0.01, rel=0.1)


def test_source_flag_covers_sources(field):
    expo = field.exposures[0]
    im = read_spherex(expo.path)
    source = (im.flags & flag_bits("SOURCE")) != 0
    y, x = np.unravel_index(np.argmax(expo.sky_model), expo.sky_model.shape)
    assert source[y, x]
    assert 0.01 < source.mean() < 0.9


@pytest.mark.parametrize(
    ("det", "nx", "ny", "xs", "ys"),
    [
        (1, 9, 9, [1, 256, 511], [1, 256, 511]),
        (2, 11, 11, [1, 205, 409, 613, 817, 1021, 1224], [1, 205]),
        (
            3,
            9,
            14,
            [1, 256],
            [1, 36, 71, 105, 140, 141, 379, 617, 855, 1091, 1326, 1564, 1802, 2040],
        ),
        (4, 13, 20, [1, 171], [1, 151, 1800, 1801, 1841, 1881, 1921, 1960, 2000, 2040]),
        (5, 11, 11, [1, 205], [1, 205]),
        (6, 9, 9, [1, 256], [1, 256]),
    ],
)
def test_full_frame_tables_have_real_layout(det, nx, ny, xs, ys):
    x, y, values = lvf_table(det)
    assert (x.size, y.size) == (nx, ny)
    assert values.shape == (ny, nx, 2)
    assert set(xs) <= set(x.tolist())
    assert set(ys) <= set(y.tolist())
    assert x[-1] == 2040
    assert y[-1] == 2040
    lo, hi = detector_range(det)
    lam = values[..., 0]
    assert np.all(np.diff(lam, axis=0) < 0)
    mid = nx // 2
    assert lam[-1, mid] == pytest.approx(lo, rel=1e-6)
    assert lam[0, mid] == pytest.approx(hi, rel=1e-6)
    assert lam[0, 0] == pytest.approx(1.01 * hi, rel=1e-6)  # curved iso-lambda lines
    r = lam / values[..., 1]
    assert 25 < np.median(r) < 150


def test_extended_source_and_band_average_shapes():
    sky = Sky(extended_sources=(ExtendedSource(1.0, 1.0, Spectrum(1.0), fwhm=60.0),))
    out = sky.band_average(np.full((3, 4), 1.0), 1.0, 2.0, 0.05)
    assert out.shape == (3, 4)
    np.testing.assert_allclose(out, 1.0)


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="'release' must be"):
        simulate_field(tmp_path, n_exposures=1, shape=(32, 32), release="qr9")
    with pytest.raises(ValueError, match="'detector' must be"):
        simulate_field(tmp_path, n_exposures=1, shape=(32, 32), detectors=(7,))
    with pytest.raises(ValueError, match="'shape' must be"):
        simulate_field(tmp_path, n_exposures=1, shape=(8, 8))
    with pytest.raises(ValueError, match="'sigma' must be"):
        Line(1.0, 0.0, 1.0)


@pytest.mark.slow
def test_full_frame_exposure(tmp_path):
    f = simulate_field(tmp_path, n_exposures=1, shape=(2040, 2040), release="qr3", seed=2)
    im = read_spherex(f.paths[0])
    assert im.data.shape == (2040, 2040)
    np.testing.assert_allclose(im.wavemap(), f.exposures[0].wavemap, atol=1e-6)
