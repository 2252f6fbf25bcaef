"""Benchmark: reading a full 2040x2040 SPHEREx Level-2 file and building its wavemap.

Compares ``read_spherex`` + ``SpherexImage.wavemap()`` with astropy's per-pixel
``pixel_to_world_values`` on the ``W`` (-TAB) WCS of the same frame, and a 300x300
``bbox`` read with a full read. Also prints the astropy reference reader on the same
calls, the reader with its helper thread disabled, and the one-off cost of building the
spectral WCS (done by astropy on first access of ``SpherexImage.spectral_wcs``, which
the wavemap does not need). Prints numbers; asserts nothing about time.

Usage::

    python benchmarks/bench_spherex.py [--release qr2|qr3] [--repeat 5] [--detector 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

import drizzle3d.spherex as spx
from drizzle3d.simulate import simulate_field
from drizzle3d.spherex import read_spherex


def _evict(path):
    """Drop this one file's pages from the OS cache (a cold read), where the OS allows it."""
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _best(fn, repeat, cold_path=None):
    times = []
    out = None
    for _ in range(repeat):
        if cold_path is not None:
            _evict(cold_path)
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times)), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--release", default="qr2", choices=["qr2", "qr3"])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--detector", type=int, default=3)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        f = simulate_field(
            Path(tmp),
            detectors=(args.detector,),
            n_exposures=1,
            shape=(2040, 2040),
            release=args.release,
            seed=1,
        )
        path = f.paths[0]
        print(
            f"simulated one 2040x2040 D{args.detector} {args.release} file in "
            f"{time.perf_counter() - t0:.1f} s ({path.stat().st_size / 1e6:.1f} MB)"
        )

        def ours():
            im = read_spherex(path)
            return im, im.wavemap()

        def ours_bbox():
            im = read_spherex(path, bbox=(870, 1170, 870, 1170))
            return im, im.wavemap()

        def read_only():
            return read_spherex(path)

        def astropy_w():
            with fits.open(path) as hdul:
                w = WCS(hdul["IMAGE"].header, fobj=hdul, key="W")
            w.sip = None
            yy, xx = np.mgrid[0:2040, 0:2040].astype(float)
            lam, bw = w.pixel_to_world_values(xx, yy)
            return np.stack([lam, bw], axis=-1)

        def astropy_w_highlevel():
            with fits.open(path) as hdul:
                w = WCS(hdul["IMAGE"].header, fobj=hdul, key="W")
            w.sip = None
            yy, xx = np.mgrid[0:2040, 0:2040].astype(float)
            return w.pixel_to_world(xx, yy)

        def spectral_wcs_first_access():
            return read_spherex(path, bbox=(870, 1170, 870, 1170)).spectral_wcs

        def reference_reader(fn):
            # The astropy path alone (what read_spherex falls back to for unusual files).
            fast = spx._read_fast
            spx._read_fast = lambda *a: (_ for _ in ()).throw(spx._Fallback("benchmark"))
            try:
                return _best(fn, args.repeat)[0]
            finally:
                spx._read_fast = fast

        def single_thread(fn):
            n = spx._N_THREADS
            spx._N_THREADS = 1
            try:
                return _best(fn, args.repeat)[0]
            finally:
                spx._N_THREADS = n

        ours()  # warm the page cache
        t_full, t_full_med, (_im, wm) = _best(ours, args.repeat)
        t_read, _, _ = _best(read_only, args.repeat)
        t_box, t_box_med, _ = _best(ours_bbox, args.repeat)
        t_full_1 = single_thread(ours)
        t_spec, _, _ = _best(spectral_wcs_first_access, args.repeat)
        t_ref_full = reference_reader(ours)
        t_ref_box = reference_reader(ours_bbox)
        n_ast = max(1, min(3, args.repeat))
        t_ast, _, wm_ast = _best(astropy_w, n_ast)
        t_ast_hl, _, _ = _best(astropy_w_highlevel, n_ast)
        err = float(np.max(np.abs(wm - wm_ast)))
        c_full, _, _ = _best(ours, args.repeat, cold_path=path)
        c_box, _, _ = _best(ours_bbox, args.repeat, cold_path=path)

        print(f"warm page cache (best of {args.repeat}; astropy per-pixel best of {n_ast}):")
        print(
            f"  read_spherex + wavemap, full frame   : {t_full * 1e3:8.1f} ms "
            f"(median {t_full_med * 1e3:.1f}; read alone {t_read * 1e3:.1f} ms)"
        )
        print(
            f"  astropy W pixel_to_world_values      : {t_ast * 1e3:8.1f} ms (open+WCS+4.16 Mpix)"
        )
        print(f"  astropy W pixel_to_world (high level): {t_ast_hl * 1e3:8.1f} ms")
        print(
            f"  speed-up vs pixel_to_world           : {t_ast_hl / t_full:6.1f}x  (target >= 20x)"
        )
        print(f"  speed-up vs pixel_to_world_values    : {t_ast / t_full:6.1f}x")
        print(
            f"  read_spherex + wavemap, 300x300 bbox : {t_box * 1e3:8.1f} ms "
            f"(median {t_box_med * 1e3:.1f} ms)"
        )
        print(f"  speed-up full / bbox                 : {t_full / t_box:6.1f}x  (target >= 10x)")
        print(
            f"  full frame, helper thread disabled   : {t_full_1 * 1e3:8.1f} ms "
            f"({t_ast_hl / t_full_1:.1f}x vs pixel_to_world; full/bbox {t_full_1 / t_box:.1f}x)"
        )
        print(
            f"  bbox read + first .spectral_wcs      : {t_spec * 1e3:8.1f} ms "
            f"(astropy builds the -TAB WCS on first access)"
        )
        print(
            f"  astropy reference reader (fallback)  : full {t_ref_full * 1e3:.1f} ms, "
            f"bbox {t_ref_box * 1e3:.1f} ms"
        )
        print("cold (file evicted from the page cache before each run):")
        print(f"  read_spherex + wavemap, full frame   : {c_full * 1e3:8.1f} ms")
        print(f"  read_spherex + wavemap, 300x300 bbox : {c_box * 1e3:8.1f} ms")
        print(f"  speed-up full / bbox                 : {c_full / c_box:6.1f}x")
        print(f"max |wavemap - astropy| = {err:.3g} um (target <= 1e-5)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
