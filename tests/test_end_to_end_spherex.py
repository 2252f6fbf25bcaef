"""End to end: simulated SPHEREx exposures -> read_spherex -> Drizzle3D -> the true spectrum."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from astropy.wcs import WCS

from drizzle3d.channels import detector_range
from drizzle3d.pixmap import calc_pixmap
from drizzle3d.resample import Drizzle3D
from drizzle3d.simulate import Sky, simulate_field
from drizzle3d.spherex import DEFAULT_EXCLUDE_FLAGS, flag_bits, read_spherex

log = logging.getLogger(__name__)

ARCSEC2_TO_SR = (math.pi / 180 / 3600) ** 2
PIX = 6.15  # arcsec, output pixel = input pixel
N_OUT = 41
NZ = 10


def _out_wcs(center):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(center)
    w.wcs.crpix = [(N_OUT + 1) / 2, (N_OUT + 1) / 2]
    w.wcs.cdelt = [-PIX / 3600, PIX / 3600]
    w.wcs.set()
    return w


@pytest.fixture(scope="module")
def cube(tmp_path_factory):
    center = (150.0, 2.0)
    field = simulate_field(
        tmp_path_factory.mktemp("e2e"),
        n_exposures=12,
        shape=(128, 128),
        center=center,
        cosmic_rays=1e-3,
        flagged_fraction=0.005,
        seed=21,
    )
    lo, hi = detector_range(3)
    edges = np.geomspace(lo, hi, NZ + 1)
    out_wcs = _out_wcs(center)
    # Uniform weights: SPHEREx VARIANCE includes each source's own shot noise, so inverse-variance
    # weights favour the exposures where a star's flux fell low (biasing a bright star ~25 % low
    # here); drizzle's own IVM convention uses background noise only.
    d = Drizzle3D(
        out_shape=(NZ, N_OUT, N_OUT),
        wave_edges=edges,
        weighting="uniform",
        exclude_flags=flag_bits(DEFAULT_EXCLUDE_FLAGS),
    )
    for path in field.paths:
        im = read_spherex(path, subtract_zodi=True, zodi="fit")
        pixmap = calc_pixmap(im.wcs, out_wcs, shape=im.shape)
        d.add_image(im.data, im.var, im.flags, pixmap, im.wavemap())
    return field, d, out_wcs, edges


def test_point_source_spectrum_follows_truth(cube):
    field, d, out_wcs, edges = cube
    sci = np.asarray(d.out_sci)
    var = np.asarray(d.out_var)
    star = field.sky.point_sources[0]
    x0, y0 = (float(v) for v in out_wcs.world_to_pixel_values(star.ra, star.dec))
    yy, xx = np.indices((N_OUT, N_OUT))
    aper = np.hypot(xx - x0, yy - y0) <= 4.0
    ra, dec = out_wcs.pixel_to_world_values(xx[aper].astype(float), yy[aper].astype(float))
    omega = PIX**2 * ARCSEC2_TO_SR
    centers = 0.5 * (edges[:-1] + edges[1:])
    widths = np.diff(edges)
    expected = star.spectrum.band_average(centers, widths)  # mJy
    # Everything else in the aperture (nebula wing, background) is known truth: remove it.
    others = Sky(field.sky.background, (), field.sky.extended_sources)
    actual = np.full(NZ, np.nan)
    sigma = np.full(NZ, np.nan)
    for k in range(NZ):
        a = sci[k][aper]
        if not np.all(np.isfinite(a)):
            continue
        rest = others.band_average(ra, dec, centers[k], widths[k]).sum()
        actual[k] = (a.sum() - rest) * omega * 1e9
        sigma[k] = math.sqrt(var[k][aper].sum()) * omega * 1e9
    ok = np.isfinite(actual)
    rel = (actual[ok] - expected[ok]) / expected[ok]
    chi = (actual[ok] - expected[ok]) / sigma[ok]
    log.info("bins with data: %d/%d", ok.sum(), NZ)
    log.info("expected mJy: %s", np.round(expected[ok], 3))
    log.info("actual   mJy: %s", np.round(actual[ok], 3))
    log.info(
        "median |rel err| %.4f, max |rel err| %.4f", np.median(np.abs(rel)), np.max(np.abs(rel))
    )
    log.info("chi mean %.2f, chi rms %.2f", chi.mean(), np.sqrt(np.mean(chi**2)))
    print(
        f"\npoint source: {ok.sum()}/{NZ} bins; median |rel err| = {np.median(np.abs(rel)):.4f}; "
        f"max |rel err| = {np.max(np.abs(rel)):.4f}; chi mean = {chi.mean():.2f}, "
        f"chi rms = {np.sqrt(np.mean(chi**2)):.2f}"
    )
    # Dithers put the star on 10-90 % of the LVF: the two end bins may stay empty.
    assert ok.sum() >= NZ - 2
    # Per-bin noise is 5-10 % (the star's own shot noise); a 25 % bias would fail.
    assert np.median(np.abs(rel)) < 0.12
    assert np.sqrt(np.mean(chi**2)) < 3.0
    # The recovered spectrum has the true slope: it falls like lam**-0.5 (+ a 1.6 um bump).
    slope = np.polyfit(np.log(centers[ok]), np.log(actual[ok]), 1)[0]
    expected_slope = np.polyfit(np.log(centers[ok]), np.log(expected[ok]), 1)[0]
    assert slope == pytest.approx(expected_slope, abs=0.4)


def test_nebula_emission_line_recovered(cube):
    """The extended nebula's Pa-alpha (1.875 um) line shows in the cube at the true strength."""
    field, d, out_wcs, edges = cube
    sci = np.asarray(d.out_sci)
    neb = field.sky.extended_sources[0]
    x0, y0 = (round(float(v)) for v in out_wcs.world_to_pixel_values(neb.ra, neb.dec))
    box = sci[:, y0 - 1 : y0 + 2, x0 - 1 : x0 + 2]
    actual = np.nanmean(box, axis=(1, 2))
    yy, xx = np.mgrid[y0 - 1 : y0 + 2, x0 - 1 : x0 + 2]
    ra, dec = out_wcs.pixel_to_world_values(xx, yy)
    centers = 0.5 * (edges[:-1] + edges[1:])
    widths = np.diff(edges)
    expected = np.array(
        [field.sky.band_average(ra, dec, c, w).mean() for c, w in zip(centers, widths, strict=True)]
    )
    ok = np.isfinite(actual)
    rel = (actual[ok] - expected[ok]) / expected[ok]
    print(f"\nnebula: median |rel err| = {np.median(np.abs(rel)):.4f}")
    assert np.median(np.abs(rel)) < 0.2
    k_line = int(np.searchsorted(edges, 1.875) - 1)
    assert ok[k_line]
    # The line bin stands out of its neighbours in the cube as in the truth.
    assert actual[k_line] > 1.2 * np.nanmax(actual[[k_line - 1, k_line + 1]]) or (
        expected[k_line] < 1.2 * expected[[k_line - 1, k_line + 1]].max()
    )
    assert actual[k_line] == pytest.approx(expected[k_line], rel=0.25)
