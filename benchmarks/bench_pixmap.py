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
import sys
import time
from pathlib import Path

import numpy as np

from drizzle3d.grid import SpatialGrid
from drizzle3d.pixmap import calc_pixmap, footprint_bbox

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from spherex_wcs import spherex_like_wcs

SHAPE = (2040, 2040)


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
