"""Grow a cube as exposures arrive: save the accumulator state, resume later, add more.

Offline: twelve simulated D3 exposures arrive in three batches ("months"). After each batch
the cube's raw accumulators (``Drizzle3D.state``) are saved to an ``.npz`` file; the next
batch starts by loading them into a new ``Drizzle3D(..., state=...)``. At the end the grown
cube is compared with a single run over all twelve exposures: they are identical, because
the accumulators are plain float64 sums.

Run: ``python examples/grow_incrementally.py [--out DIR] [--batches N]``
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid
from drizzle3d.pixmap import calc_pixmap, footprint_bbox
from drizzle3d.resample import Drizzle3D
from drizzle3d.simulate import simulate_field
from drizzle3d.spherex import DEFAULT_EXCLUDE_FLAGS, flag_bits, read_spherex

CENTER = (150.0, 2.0)
SETTINGS = {"kernel": "square", "pixfrac": 1.0, "weighting": "uniform"}


def add_file(cube: Drizzle3D, path, grid: OutputGrid, ctx_id: int) -> bool:
    """Read one SPHEREx file, map the part that lands on the grid and add it."""
    image = read_spherex(path, subtract_zodi=True, zodi="fit")
    box = footprint_bbox(image.wcs, image.shape, grid.spatial.wcs, grid.spatial.shape)
    if box is None:
        return False
    pixmap = calc_pixmap(image.wcs, grid.spatial.wcs, bbox=box)
    wavemap = image.wavemap()[box.slices]
    cube.add_image(
        image.data, image.var, image.flags, pixmap, wavemap, ctx_id=ctx_id, **box.as_kwargs()
    )
    return True


def save_state(cube: Drizzle3D, path: Path) -> None:
    """Write the accumulators (arrays) and counters (JSON) to one .npz, atomically."""
    state = cube.state
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    scalars = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, __meta__=np.array(json.dumps(scalars, default=_jsonable)), **arrays)
    tmp.replace(path)


def load_state(path: Path) -> dict:
    with np.load(path) as f:
        state = {k: f[k] for k in f.files if k != "__meta__"}
        state.update(json.loads(str(f["__meta__"])))
    return state


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"'value' must be JSON-serialisable; got {type(value).__name__}.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="drizzle3d-grow", help="output directory")
    ap.add_argument("--n-exposures", type=int, default=12)
    ap.add_argument("--batches", type=int, default=3)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = OutputGrid(SpatialGrid.from_center(*CENTER, 6.0, 6.0), SpectralGrid.native(3))
    exclude = flag_bits(DEFAULT_EXCLUDE_FLAGS)
    state_path = out / "cube_state.npz"
    state_path.unlink(missing_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        field = simulate_field(
            tmp, n_exposures=args.n_exposures, shape=(96, 96), center=CENTER, seed=9
        )
        paths = list(field.paths)
        n = len(paths)
        for batch in np.array_split(np.arange(n), args.batches):
            state = load_state(state_path) if state_path.exists() else None
            cube = Drizzle3D(grid, exclude_flags=exclude, max_ctx_id=n - 1, state=state, **SETTINGS)
            for i in batch:
                add_file(cube, paths[i], grid, ctx_id=int(i))
            save_state(cube, state_path)
            covered = int((cube.out_count.values.sum(axis=0) > 0).sum())
            print(
                f"after exposures {batch[0]}-{batch[-1]}: {cube.n_images} images, "
                f"{covered} spaxels covered; state saved to {state_path}"
            )

        once = Drizzle3D(grid, exclude_flags=exclude, max_ctx_id=n - 1, **SETTINGS)
        for i, p in enumerate(paths):
            add_file(once, p, grid, ctx_id=i)

    grown = Drizzle3D(grid, exclude_flags=exclude, state=load_state(state_path), **SETTINGS)
    a, b = grown.out_sci.values, once.out_sci.values
    diff = np.nanmax(np.abs(a - b))
    same = np.array_equal(np.isnan(a), np.isnan(b))
    print(
        f"grown in {args.batches} batches vs one run over all {n}: max |difference| {diff:.3g},"
        f" same empty voxels: {same}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
