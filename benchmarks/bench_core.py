"""Core benchmark: Drizzle3D.add_image against STScI drizzle's Drizzle.add_image.

Same process, same 2040x2040 input and pixmap (6.15 arcsec pixels rotated 30 degrees onto a
2100x2100 output of the same scale). Prints input pixels per second and the ratios:

- drizzle (C) square, pixfrac 1
- drizzle3d square, one wavelength bin (every input band inside it)
- drizzle3d square, 34 wavelength bins over SPHEREx D3 (1.63-2.44 um), with a realistic
  wavemap (wavelength falling with y, bandwidth = wavelength / 41)
- the same with effective-wavelength tracking off (its cost, issue 10)
- two threads, each filling its own partial Drizzle3D of half the image rows (merged once at
  the end of a run; the merge is timed separately)

Every output is built and warmed with one image before timing (JIT compiled, accumulator pages
committed): the figures are the steady-state cost of one more add_image, as in a long run. The
single-thread cases are timed in interleaved rounds (each case once per round), so that drift in
the machine's speed hits all of them alike; ratios are printed from the best times and per round.

Run: ``python benchmarks/bench_core.py [--repeat N]``.
"""

import argparse
import threading
import time
import warnings
from functools import partial

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


def interleaved(calls, repeat):
    """Time every callable once per round for ``repeat`` rounds, the order rotated each
    round; returns ``{name: [seconds per round]}``."""
    names = list(calls)
    times = {name: [] for name in names}
    for r in range(repeat):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def spread(values):
    """``median [min - max]`` of a list of ratios."""
    v = np.asarray(values)
    return f"{np.median(v):.2f}x [{v.min():.2f}-{v.max():.2f}]"


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

    def new_cube(edges, track_wave=True, **kw):
        return Drizzle3D(
            out_shape=(edges.size - 1, n_out, n_out),
            wave_edges=edges,
            weighting="uniform",
            track_wave=track_wave,
            **kw,
        )

    def add(cube, rows=None):
        if rows is None:
            cube.add_image(data, var, None, pixmap, wavemap)
        else:
            cube.add_image(data, var, None, pixmap, wavemap, ymin=rows[0], ymax=rows[1])

    # Steady state: each output is built and warmed with one image first (JIT compiled, pages
    # of the accumulators committed), then add_image is timed into it, as a long run adds
    # image after image. Allocating a cube is a one-off cost, reported separately.
    drz = Drizzle(kernel="square", out_shape=(n_out, n_out))
    drz.add_image(data, exptime=1.0, pixmap=pixmap, pixfrac=1.0)
    alloc = {}

    def built(name, edges, track):
        t0 = time.perf_counter()
        cube = new_cube(edges, track)
        add(cube)
        alloc[name] = time.perf_counter() - t0
        return cube

    small = {"1": built("1", edges1, True), "1-nowave": built("1-nowave", edges1, False)}
    calls = {"C": lambda: drz.add_image(data, exptime=1.0, pixmap=pixmap, pixfrac=1.0)}
    calls.update({name: (lambda c=cube: add(c)) for name, cube in small.items()})
    # Interleaved rounds: every round times each case once (in an order rotated from round
    # to round), so a machine that slows down for a while slows every case alike; the
    # ratios are also given per round. One 34-bin cube at a time (each commits gigabytes):
    # with tracking among the one-bin cases, then without it against the one-bin case again.
    # (each partial holds its cube, freed with the dict when the rounds are done)
    rounds = interleaved({**calls, "34": partial(add, built("34", edges34, True))}, args.repeat)
    rounds_nowave = interleaved(
        {"1": calls["1"], "34-nowave": partial(add, built("34-nowave", edges34, False))},
        args.repeat,
    )
    del small, calls
    timed = {name: min(ts) for name, ts in rounds.items()}
    t_c = timed["C"]
    t_1, t_1_nowave, t_34 = (timed[k] for k in ("1", "1-nowave", "34"))
    t_34_nowave = min(rounds_nowave["34-nowave"])
    # tracking cost at 34 bins, each 34-bin time taken relative to the one-bin time of its rounds
    track_34 = (t_34 / t_1) / (t_34_nowave / min(rounds_nowave["1"]))

    half = n_in // 2
    parts = [new_cube(edges1), new_cube(edges1, begin_ctx_id=64)]
    for part in parts:  # warm
        add(part, rows=(0, 15))

    def threaded():
        def work(k, rows):
            add(parts[k], rows=rows)

        ts = [
            threading.Thread(target=work, args=(0, (0, half - 1))),
            threading.Thread(target=work, args=(1, (half, n_in - 1))),
        ]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    t_thr = best_of(threaded, args.repeat)
    t0 = time.perf_counter()
    parts[0].merge(parts[1])
    t_merge = time.perf_counter() - t0

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
        ("drizzle3d square, 1 bin, 2 threads (halves of the rows)", t_thr),
    ]
    for name, t in rows:
        print(f"{name:52s} {t:8.3f} {rate(t):8.2f}")
    print()
    per_round = {
        "C/1": [c / o for c, o in zip(rounds["C"], rounds["1"], strict=True)],
        "C/1-nowave": [c / o for c, o in zip(rounds["C"], rounds["1-nowave"], strict=True)],
        "34/1": [t / o for t, o in zip(rounds["34"], rounds["1"], strict=True)],
    }
    print(f"ratios of the best times; per round: median [min-max] over {args.repeat} rounds")
    print(
        f"speed ratio drizzle3d(1 bin) / drizzle     : {t_c / t_1:.2f}x  (target >= 1); "
        f"per round {spread(per_round['C/1'])}"
    )
    print(
        f"  the same without wavelength tracking     : {t_c / t_1_nowave:.2f}x; "
        f"per round {spread(per_round['C/1-nowave'])}"
    )
    print(
        f"cost ratio 34 bins / 1 bin                 : {t_34 / t_1:.2f}x  (target <= 1.5); "
        f"per round {spread(per_round['34/1'])}"
    )
    print(f"effective-wavelength tracking cost (34 bins): {100 * (track_34 - 1):+.1f}%")
    print(f"effective-wavelength tracking cost (1 bin)  : {100 * (t_1 / t_1_nowave - 1):+.1f}%")
    print(f"2-thread speed-up over 1 thread            : {t_1 / t_thr:.2f}x  (2 cores)")
    print(f"merging the two partials (once per run)    : {t_merge:.3f} s")
    print(
        "allocating + first image (one-off): "
        + ", ".join(f"{k} bins {v:.2f} s" for k, v in alloc.items())
    )


if __name__ == "__main__":
    main()
