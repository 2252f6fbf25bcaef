"""Drizzle on a dask.distributed cluster: one partial cube per chunk of files, then merge.

The pipeline's map step, :func:`drizzle3d.pipeline.drizzle_partial`, drizzles a list of
``(context id, path)`` pairs into a partial cube; partial cubes of disjoint inputs
``merge`` exactly into the serial result. This script submits one partial per chunk to a
dask cluster, merges them as they finish, and checks the answer against a serial run.

Offline by default: a small simulated field and an in-process ``LocalCluster``. Pass
``--scheduler tcp://host:8786`` to use a running cluster (the input files must then be
readable by the workers, e.g. on a shared file system: use ``--inputs DIR``).

Run: ``python examples/dask_cluster.py [--workers N] [--chunks N] [--scheduler ADDR]``
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np

from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid
from drizzle3d.pipeline import drizzle_files, drizzle_partial
from drizzle3d.simulate import simulate_field
from drizzle3d.spherex import DEFAULT_EXCLUDE_FLAGS, flag_bits

CENTER = (150.0, 2.0)


def run_settings() -> dict:
    """The settings dict ``drizzle_partial`` takes (the defaults of ``drizzle_files``)."""
    return {
        "kernel": "square",
        "pixfrac": 1.0,
        "wave_pixfrac": 1.0,
        "weighting": "background",
        "ivar_max": float("inf"),
        "min_overlap": 0.0,
        "exclude_mask": flag_bits(DEFAULT_EXCLUDE_FLAGS),
        "zodi": "fit",
        "fast_pixmap": True,
        "outliers": {},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scheduler", help="address of a running dask scheduler")
    ap.add_argument("--workers", type=int, default=2, help="local workers (no --scheduler)")
    ap.add_argument("--chunks", type=int, default=4, help="partial cubes (tasks)")
    ap.add_argument("--inputs", help="directory of SPHEREx files (default: simulate a field)")
    ap.add_argument("--n-exposures", type=int, default=8)
    args = ap.parse_args(argv)
    from dask.distributed import Client, LocalCluster, as_completed

    grid = OutputGrid(SpatialGrid.from_center(*CENTER, 6.0, 6.0), SpectralGrid.native(3))
    with tempfile.TemporaryDirectory() as tmp:
        if args.inputs:
            paths = sorted(str(p) for p in Path(args.inputs).glob("*.fits"))
        else:
            field = simulate_field(
                tmp, n_exposures=args.n_exposures, shape=(96, 96), center=CENTER, seed=4
            )
            paths = list(field.paths)
        items = list(enumerate(paths))  # the context id of each input is its index
        chunks = [c.tolist() for c in np.array_split(np.arange(len(items)), args.chunks) if c.size]
        settings = run_settings()

        if args.scheduler:
            cluster, client = None, Client(args.scheduler)
        else:
            cluster = LocalCluster(
                n_workers=args.workers,
                threads_per_worker=1,
                processes=False,
                dashboard_address=None,
            )
            client = Client(cluster)
        try:
            futures = [
                client.submit(
                    drizzle_partial,
                    [items[i] for i in chunk],
                    grid,
                    settings,
                    len(items),
                    pure=False,
                )
                for chunk in chunks
            ]
            total = summary = None
            for future in as_completed(futures):
                partial, part_summary = future.result()
                total = partial if total is None else total.merge(partial)
                summary = part_summary if summary is None else summary.merge(part_summary)
                print(f"merged a partial cube of {partial.n_images} images")
        finally:
            client.close()
            if cluster is not None:
                cluster.close()

        serial = drizzle_files(paths, grid)

    a, b = total.out_sci.values, serial.out_sci.values
    print(f"{len(chunks)} partial cubes, {total.n_images} images: {summary.text()}")
    w_total, w_serial = total.out_wht.values, serial.out_wht.values
    # float sums in another order differ at rounding level; where a voxel's weight is itself
    # rounding-level (~1e-12: a sliver of an overlap) its value is a ratio of rounding errors
    # and may be empty (NaN) in one cube and not the other. Compare the voxels with real weight.
    real = np.minimum(w_total, w_serial) > 1e-6 * np.median(w_serial[w_serial > 0])
    slivers = int((np.isfinite(a) | np.isfinite(b)).sum() - real.sum())
    print(
        f"distributed vs serial: max |difference| {np.max(np.abs(a - b)[real]):.3g} over "
        f"{real.sum()} voxels with weight; {slivers} sliver voxels (weight ~1e-12) excluded"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
