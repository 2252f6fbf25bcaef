"""Benchmark: footprint + box pixmap versus spxquery-style full-frame mapping.

Run:  python benchmarks/bench_pixmap.py [--repeat N]

Setup: a SPHEREx-like 2040x2040 TAN-SIP frame (6.15 arcsec pixels, 3rd-order SIP
with ~12 pixel corner distortion, PA 24 deg) and a 30x30 arcmin TAN output grid
(rotated 10 deg) lying inside it.

Prints median wall times (after one warm-up call, so numba compilation is not
timed) and the ratios:

1. spxquery-style: astropy ``all_pix2world`` then ``all_world2pix`` on all
   4.2 M pixels, versus ``footprint_bbox`` + ``calc_pixmap`` of the box
   (exact, and fast with stepsize 16). Target >= 30x.
2. full-frame ``calc_pixmap`` fast mode (stepsize 16) versus exact mode, with
   the measured maximum error of the fast map. Target >= 20x at < 0.01 pixel.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from astropy.wcs import WCS, Sip

from drizzle3d.grid import SpatialGrid
from drizzle3d.pixmap import calc_pixmap, footprint_bbox

SHAPE = (2040, 2040)


def spherex_like_wcs(ra, dec, pa=0.0, shape=SHAPE, pixscale=6.15):
    """TAN-SIP WCS shaped like a SPHEREx L2 header (same as tests/test_pixmap.py)."""
    ny, nx = shape
    crpix = ((nx + 1) / 2.0, (ny + 1) / 2.0)
    s = pixscale / 3600.0
    th = np.radians(pa)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = list(crpix)
    w.wcs.cdelt = [1.0, 1.0]
    w.wcs.pc = s * np.array([[-np.cos(th), np.sin(th)], [np.sin(th), np.cos(th)]])
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    a[0, 0], b[0, 0] = -0.36, 0.21
    a[2, 0], a[1, 1], a[0, 2] = 2.1e-6, -1.3e-6, 0.8e-6
    b[2, 0], b[1, 1], b[0, 2] = -0.7e-6, 1.6e-6, -1.9e-6
    a[3, 0], a[1, 2], a[2, 1] = -2.4e-9, -2.2e-9, 3e-10
    b[0, 3], b[2, 1], b[1, 2] = -2.3e-9, -2.5e-9, -4e-10
    terms = [(p, q) for p in range(4) for q in range(4) if p + q <= 3]
    gy, gx = np.mgrid[0:ny:32, 0:nx:32]
    uu = (gx + 1 - crpix[0]).ravel()
    vv = (gy + 1 - crpix[1]).ravel()
    big_u = uu + sum(a[p, q] * uu**p * vv**q for p, q in terms)
    big_v = vv + sum(b[p, q] * uu**p * vv**q for p, q in terms)
    design = np.stack([big_u**p * big_v**q for p, q in terms], -1)
    ap, bp = np.zeros((4, 4)), np.zeros((4, 4))
    for (p, q), ca, cb in zip(
        terms,
        np.linalg.lstsq(design, uu - big_u, rcond=None)[0],
        np.linalg.lstsq(design, vv - big_v, rcond=None)[0],
        strict=True,
    ):
        ap[p, q], bp[p, q] = ca, cb
    w.sip = Sip(a, b, ap, bp, w.wcs.crpix)
    w.wcs.set()
    w.pixel_shape = (nx, ny)
    return w


def spxquery_style(wcs_in, wcs_out):
    y, x = np.indices(SHAPE, dtype=np.float64)
    ra, dec = wcs_in.all_pix2world(x, y, 0)
    xo, yo = wcs_out.all_world2pix(ra, dec, 0)
    return np.dstack([xo, yo])


def timed(fn, repeat):
    fn()  # warm-up (numba compile / caches)
    times = []
    result = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)

    wcs_in = spherex_like_wcs(10.088, 40.899, pa=24.0)
    out = SpatialGrid.from_center(10.3, 41.1, 30, 30, rotation=10.0)
    print(
        f"input {SHAPE[1]}x{SHAPE[0]} TAN-SIP; output {out.shape[1]}x{out.shape[0]} "
        f"(30x30 arcmin at 6.15 arcsec); repeat={args.repeat}, median times"
    )

    t_spx, full_ref = timed(lambda: spxquery_style(wcs_in, out.wcs), args.repeat)
    t_box_exact, (box, pm_exact) = timed(
        lambda: (lambda b: (b, calc_pixmap(wcs_in, out.wcs, bbox=b)))(
            footprint_bbox(wcs_in, SHAPE, out.wcs, out.shape)
        ),
        args.repeat,
    )
    t_box_fast, (_, pm_fast) = timed(
        lambda: (lambda b: (b, calc_pixmap(wcs_in, out.wcs, bbox=b, stepsize=16)))(
            footprint_bbox(wcs_in, SHAPE, out.wcs, out.shape)
        ),
        args.repeat,
    )
    t_fp, _ = timed(lambda: footprint_bbox(wcs_in, SHAPE, out.wcs, out.shape), args.repeat)
    err_box_exact = np.abs(pm_exact - full_ref[box.slices]).max()
    err_box_fast = np.hypot(*(pm_fast - full_ref[box.slices]).transpose(2, 0, 1)).max()
    print(
        f"box {tuple(box)}: {box.size} pixels = {100 * box.size / full_ref[..., 0].size:.1f}% "
        "of the frame"
    )
    print(f"spxquery-style all pixels          : {t_spx * 1e3:9.1f} ms")
    print(f"footprint_bbox alone               : {t_fp * 1e3:9.1f} ms")
    print(
        f"footprint + exact box pixmap       : {t_box_exact * 1e3:9.1f} ms  "
        f"ratio {t_spx / t_box_exact:6.1f}x  max |diff| {err_box_exact:.2e} pix"
    )
    print(
        f"footprint + fast box pixmap (s=16) : {t_box_fast * 1e3:9.1f} ms  "
        f"ratio {t_spx / t_box_fast:6.1f}x  max error {err_box_fast:.2e} pix  (target >= 30x)"
    )

    t_exact, pm_full = timed(lambda: calc_pixmap(wcs_in, out.wcs, SHAPE), args.repeat)
    t_fast, (pm_full_fast, est) = timed(
        lambda: calc_pixmap(wcs_in, out.wcs, SHAPE, stepsize=16, return_error=True), args.repeat
    )
    err_full = np.hypot(*(pm_full_fast - pm_full).transpose(2, 0, 1)).max()
    print(f"full frame exact calc_pixmap       : {t_exact * 1e3:9.1f} ms")
    print(
        f"full frame fast calc_pixmap (s=16) : {t_fast * 1e3:9.1f} ms  "
        f"ratio {t_exact / t_fast:6.1f}x  max error {err_full:.2e} pix (estimate {est:.2e})"
        "  (target >= 20x at < 0.01 pix)"
    )


if __name__ == "__main__":
    main()
