"""The YAML pipeline: write a run configuration, validate it, run it and open the cube.

Offline by default: a small simulated SPHEREx D3 field is written to a temporary directory
and the configuration points ``inputs.files`` at it. With ``--irsa`` the configuration asks
the IRSA archive for the real images of the field instead (``inputs.query``, cutouts
downloaded to ``--out/spherex_data``); that needs the network.

Run: ``python examples/yaml_pipeline.py [--out DIR] [--irsa] [--ra RA --dec DEC]``
"""

import argparse
import tempfile
from pathlib import Path

from drizzle3d.config import Drizzle3DConfig
from drizzle3d.io import load_cube
from drizzle3d.pipeline import drizzle
from drizzle3d.simulate import simulate_field


def make_config(out: Path, files=None, *, ra=150.0, dec=2.0, size=6.0) -> str:
    """Return a run configuration (YAML text) for the field; ``files=None`` queries IRSA."""
    inputs = (
        f'inputs:\n  glob: "{Path(files[0]).parent}/*.fits"\n'
        if files is not None
        else f"inputs:\n  query: {{releases: qr2, max_images: 40}}\n"
        f"download:\n  dest: {out / 'spherex_data'}\n  mode: cutout\n"
    )
    return (
        f"region: {{ra: {ra}, dec: {dec}, width: {size}}}\n"
        "detectors: [3]\n"
        "spectral: {mode: native}\n"
        "drizzle: {kernel: square, pixfrac: 1.0, weighting: background, zodi: fit}\n"
        f"{inputs}"
        f"output: {{directory: {out / 'cubes'}, prefix: field, formats: [fits, netcdf],"
        " overwrite: true}\n"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="drizzle3d-yaml", help="output directory")
    ap.add_argument("--irsa", action="store_true", help="query and download real IRSA images")
    ap.add_argument("--ra", type=float, default=150.0)
    ap.add_argument("--dec", type=float, default=2.0)
    ap.add_argument("--n-exposures", type=int, default=6)
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        files = None
        if not args.irsa:
            field = simulate_field(
                tmp,
                n_exposures=args.n_exposures,
                shape=(96, 96),
                center=(args.ra, args.dec),
                seed=3,
            )
            files = field.paths
        text = make_config(out, files, ra=args.ra, dec=args.dec)
        path = out / "run.yaml"
        path.write_text(text)
        print(f"configuration written to {path}:\n{text}")
        config = Drizzle3DConfig.from_yaml(path)  # validates every key and value
        written = drizzle(config)

    for key, p in sorted(written.items()):
        print(f"wrote {key}: {p}")
    fits_path = next(p for k, p in written.items() if str(p).endswith(".fits"))
    ds = load_cube(fits_path)
    sci = ds["sci"]
    covered = int((ds["count"].sum("wavelength") > 0).sum())
    print(
        f"cube {dict(sci.sizes)}, wavelength {float(ds.wavelength[0]):.3f}-"
        f"{float(ds.wavelength[-1]):.3f} um, {covered} spaxels covered"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
