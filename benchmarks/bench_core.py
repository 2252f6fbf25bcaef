"""Core benchmark: Drizzle3D.add_image against STScI drizzle's Drizzle.add_image.

Same process, same 2040x2040 input and pixmap (6.15 arcsec pixels rotated 30 degrees onto a
2100x2100 output of the same scale). Prints input pixels per second and the ratios:

- drizzle (C) square, pixfrac 1
- drizzle3d square, one wavelength bin (every input band inside it)
- drizzle3d square, 34 wavelength bins over SPHEREx D3 (1.63-2.44 um), with a realistic
  wavemap (wavelength falling with y, bandwidth = wavelength / 41)
- the same with effective-wavelength tracking off (its cost, issue 10)
- two threads, each filling its own partial Drizzle3D of half the image rows, then merged

Run: ``python benchmarks/bench_core.py [--repeat N]``.
"""

import argparse
import threading
import time
import warnings

import numpy as np

from drizzle3d import Drizzle3D

warnings.simplefilter("ignore")


def make_inputs(n_in=2040, n_out=2100, angle=30.0, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.normal(100.0, 5.0, (n_in, n_in)).astype(np.float32)
    var = np.full((n_in, n_in), 25.0, dtype=np.float32)
    y, x = np.indices((n_in, n_in), dtype=np.float64)
    th = np.deg2rad(angle)
    xc = yc = (n_in - 1) / 2
    xo = np.cos(th) * (x - xc) - np.sin(th) * (y - yc) + (n_out - 1) / 2
    yo = np.sin(th) * (x - xc) + np.cos(th) * (y - yc) + (n_out - 1) / 2
    pixmap = np.dstack([xo, yo])
    lam = 2.44 - (2.44 - 1.63) * (y + 0.5) / n_in + 0.005 * ((x - xc) / xc) ** 2
    wavemap = np.dstack([lam, lam / 41.0])
    return data, var, pixmap, wavemap


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--n-in", type=int, default=2040)
    ap.add_argument("--n-out", type=int, default=2100)
    args = ap.parse_args()
    n_in, n_out = args.n_in, args.n_out
    data, var, pixmap, wavemap = make_inputs(n_in, n_out)
    npix = data.size
    edges34 = np.geomspace(1.63, 2.44, 35)
    edges1 = np.array([1.0, 3.0])

    from drizzle.resample import Drizzle

    def run_drizzle():
        d = Drizzle(kernel="square", out_shape=(n_out, n_out))
        d.add_image(data, exptime=1.0, pixmap=pixmap, pixfrac=1.0)

    def d3d(edges, track_wave=True, rows=None, **kw):
        d = Drizzle3D(
            out_shape=(edges.size - 1, n_out, n_out),
            wave_edges=edges,
            weighting="uniform",
            track_wave=track_wave,
            **kw,
        )
        if rows is None:
            d.add_image(data, var, None, pixmap, wavemap)
        else:
            d.add_image(data, var, None, pixmap, wavemap, ymin=rows[0], ymax=rows[1])
        return d

    # warm up the JIT (compiled once, then cached on disk)
    small = (slice(0, 64), slice(0, 64))
    Drizzle3D(out_shape=(1, 64, 64), wave_edges=edges1).add_image(
        data[small], var[small], None, pixmap[small], wavemap[small]
    )

    t_c = best_of(run_drizzle, args.repeat)
    t_1 = best_of(lambda: d3d(edges1), args.repeat)
    t_34 = best_of(lambda: d3d(edges34), args.repeat)
    t_34_nowave = best_of(lambda: d3d(edges34, track_wave=False), args.repeat)
    t_1_nowave = best_of(lambda: d3d(edges1, track_wave=False), args.repeat)

    half = n_in // 2

    def threaded():
        parts = [None, None]

        def work(k, rows, begin):
            parts[k] = d3d(edges1, rows=rows, begin_ctx_id=begin)

        ts = [
            threading.Thread(target=work, args=(0, (0, half - 1), 0)),
            threading.Thread(target=work, args=(1, (half, n_in - 1), 1)),
        ]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        parts[0].merge(parts[1])

    t_thr = best_of(threaded, args.repeat)

    def rate(t):
        return npix / t / 1e6

    print(f"input {n_in}x{n_in} -> output {n_out}x{n_out}, rotated 30 deg, best of {args.repeat}")
    print(f"{'case':52s} {'seconds':>8s} {'Mpix/s':>8s}")
    rows = [
        ("drizzle 3 (C) square pixfrac=1", t_c),
        ("drizzle3d square, 1 bin", t_1),
        ("drizzle3d square, 1 bin, track_wave=False", t_1_nowave),
        ("drizzle3d square, 34 bins", t_34),
        ("drizzle3d square, 34 bins, track_wave=False", t_34_nowave),
        ("drizzle3d square, 1 bin, 2 threads + merge", t_thr),
    ]
    for name, t in rows:
        print(f"{name:52s} {t:8.3f} {rate(t):8.2f}")
    print()
    print(f"speed ratio drizzle3d(1 bin) / drizzle     : {t_c / t_1:.2f}x  (target >= 1)")
    print(f"cost ratio 34 bins / 1 bin                 : {t_34 / t_1:.2f}x  (target <= 1.5)")
    print(f"effective-wavelength tracking cost (34 bins): {100 * (t_34 / t_34_nowave - 1):+.1f}%")
    print(f"effective-wavelength tracking cost (1 bin)  : {100 * (t_1 / t_1_nowave - 1):+.1f}%")
    print(f"2-thread speed-up over 1 thread            : {t_1 / t_thr:.2f}x  (2 cores)")


if __name__ == "__main__":
    main()
