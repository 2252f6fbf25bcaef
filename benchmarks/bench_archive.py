"""Benchmark: archive fetches against the local IRSA stand-in (no internet).

1. Parallel downloads: total time to fetch N files (default 32) with ``workers=1`` and
   ``workers=8`` when every request costs an artificial latency (default 0.2 s, standing in
   for IRSA's time to first byte).
2. Transfer volume for a 10 arcmin field: a full 2040x2040 Level-2 file (``simulate``) versus
   the gzipped IRSA-style cutout (``make_cutout``) of the field plus the default 1 arcmin
   margin, counted as bytes received over HTTP.

Prints numbers; asserts nothing about time.

Usage::

    python benchmarks/bench_archive.py [--files 32] [--latency 0.2] [--shape 256]
                                       [--release qr2|qr3] [--field-arcmin 10]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from irsa_standin import IrsaStandin, level2_uri

from drizzle3d.archive import fetch, query_spherex
from drizzle3d.simulate import make_cutout, simulate_field

CENTER = (150.0, 2.0)


def _cutout(path, center, size):
    buf = io.BytesIO()
    try:
        make_cutout(path, buf, center, size)
    except ValueError:
        return None
    return buf.getvalue()


def _footprint(truth, shape):
    ny, nx = shape
    ra, dec = truth.wcs.pixel_to_world_values(
        np.array([-0.5, nx - 0.5, nx - 0.5, -0.5]), np.array([-0.5, -0.5, ny - 0.5, ny - 0.5])
    )
    return np.column_stack([ra, dec])


def bench_workers(tmp: Path, n_files: int, latency: float, side: int, release: str) -> None:
    sim = simulate_field(
        tmp / "sim_small", n_exposures=1, shape=(side, side), center=CENTER, release=release
    )
    truth = sim.exposures[0]
    with IrsaStandin(latency=latency) as server:
        for i in range(n_files):
            obsid = f"2025W19_2B_{i:04d}_1"
            server.add_image(
                obsid=obsid,
                detector=truth.detector,
                mjd_start=60800.0 + i,
                poly=_footprint(truth, (side, side)),
                release=release,
                path=truth.path,
                uri=level2_uri(obsid, truth.detector, release),
            )
        table = query_spherex((CENTER, 5.0 / 60.0), tap_url=server.tap_url)
        assert len(table) == n_files
        print(
            f"[workers] {n_files} files of {truth.path.stat().st_size / 1e6:.2f} MB "
            f"({side}x{side}, {release}), {latency * 1e3:.0f} ms latency per request"
        )
        times = {}
        for workers in (1, 8):
            t0 = time.perf_counter()
            result = fetch(table, tmp / f"dl_w{workers}", workers=workers)
            times[workers] = time.perf_counter() - t0
            print(
                f"  workers={workers}: {times[workers]:7.2f} s  "
                f"({result.n_downloaded} files, {result.bytes_transferred / 1e6:.1f} MB, "
                f"{len(result.failures)} failures)"
            )
        print(f"  speed-up workers=8 vs 1: {times[1] / times[8]:.2f}x")
        t0 = time.perf_counter()
        again = fetch(table, tmp / "dl_w8", workers=8)
        print(
            f"  re-run of the completed fetch: {time.perf_counter() - t0:.2f} s, "
            f"{again.bytes_transferred} bytes transferred, {again.n_skipped} verified and skipped"
        )


def bench_volume(tmp: Path, field_arcmin: float, release: str) -> None:
    t0 = time.perf_counter()
    sim = simulate_field(
        tmp / "sim_full", n_exposures=1, shape=(2040, 2040), center=CENTER, release=release
    )
    truth = sim.exposures[0]
    print(f"[volume] simulated one 2040x2040 {release} file in {time.perf_counter() - t0:.1f} s")
    with IrsaStandin(cutout=_cutout) as server:
        server.add_image(
            obsid=truth.obsid,
            detector=truth.detector,
            mjd_start=truth.mjd_beg,
            poly=_footprint(truth, (2040, 2040)),
            release=release,
            path=truth.path,
        )
        table = query_spherex((CENTER, field_arcmin / 60.0), tap_url=server.tap_url)
        t0 = time.perf_counter()
        full = fetch(table, tmp / "full")
        t_full = time.perf_counter() - t0
        t0 = time.perf_counter()
        cut = fetch(table, tmp / "cut", mode="cutout")
        t_cut = time.perf_counter() - t0
    cut_file = cut[0].stat().st_size
    print(
        f"  field {field_arcmin:g} arcmin, cutout side = diagonal + 2 x 1 arcmin margin = "
        f"{np.hypot(field_arcmin, field_arcmin) + 2:.1f} arcmin"
    )
    print(f"  full  : {full.bytes_transferred / 1e6:8.2f} MB over HTTP ({t_full:.2f} s locally)")
    print(
        f"  cutout: {cut.bytes_transferred / 1e6:8.2f} MB over HTTP (gzipped; "
        f"{cut_file / 1e6:.2f} MB on disk) ({t_cut:.2f} s locally)"
    )
    print(f"  full / cutout transfer volume: {full.bytes_transferred / cut.bytes_transferred:.1f}x")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=32)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--shape", type=int, default=256, help="frame side for the workers test")
    ap.add_argument("--release", default="qr2", choices=["qr2", "qr3"])
    ap.add_argument("--field-arcmin", type=float, default=10.0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        bench_workers(Path(tmp), args.files, args.latency, args.shape, args.release)
        bench_volume(Path(tmp), args.field_arcmin, args.release)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
