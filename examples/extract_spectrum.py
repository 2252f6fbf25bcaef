"""Extract and plot the spectrum of a star with exact errors, and check it against the truth.

Offline by default: a small simulated D3 field is drizzled by the pipeline, saved, loaded
back, and the brightest star's spectrum is extracted in a circular aperture with
:func:`drizzle3d.pipeline.extract_spectrum`. Its errors are exact (covariances of the drizzled
voxels included, through ``Drizzle3D.transpose``); the script also prints the naive errors
(the sum of voxel variances) to show how much they understate the scatter. With
``--cube PATH --ra RA --dec DEC`` it extracts from an existing cube instead, for example one
made from real IRSA data by ``examples/yaml_pipeline.py --irsa``.

Run: ``python examples/extract_spectrum.py [--out DIR] [--cube PATH --ra RA --dec DEC]``
"""

import argparse
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np

from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid
from drizzle3d.io import load_cube, save_cube
from drizzle3d.pipeline import cube_dataset, drizzle_files, extract_spectrum
from drizzle3d.simulate import Sky, simulate_field

PIXEL_ARCSEC = 6.15


def aperture_truth(ds, sky, star, radius, wavelengths):
    """Flux density (mJy) of the true sky in the aperture: the star plus everything else."""
    rest = Sky(sky.background, (), sky.extended_sources)
    ra, dec = np.asarray(ds["ra"].values), np.asarray(ds["dec"].values)
    sep = np.hypot((ra - star.ra) * math.cos(math.radians(star.dec)), dec - star.dec) * 3600
    inside = sep <= radius + 1e-9
    sr_per_spaxel = (PIXEL_ARCSEC * math.pi / 180 / 3600) ** 2
    truth = np.full(len(wavelengths), np.nan)
    for k, lam in enumerate(wavelengths):
        if np.isfinite(lam):
            extended = rest.band_average(ra[inside], dec[inside], lam, 0.0).sum()
            truth[k] = float(star.spectrum.band_average(lam, 0.0)) + extended * sr_per_spaxel * 1e9
    return truth


def plot(spec, truth, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    lam = spec["wave_eff"].values
    ax.errorbar(
        lam,
        spec["flux"].values,
        yerr=spec["error"].values,
        fmt="o",
        ms=4,
        label=f"extracted ({spec.attrs.get('error_method')} errors)",
    )
    if truth is not None:
        ax.plot(lam, truth, "k_", ms=14, label="truth")
    ax.set_xlabel("effective wavelength (um)")
    ax.set_ylabel(spec.attrs.get("units", ""))
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="drizzle3d-spectrum", help="output directory")
    ap.add_argument("--cube", help="extract from this cube instead of a simulated one")
    ap.add_argument("--ra", type=float, help="RA (deg) of the source (with --cube)")
    ap.add_argument("--dec", type=float, help="Dec (deg) of the source (with --cube)")
    ap.add_argument("--radius", type=float, default=3 * PIXEL_ARCSEC, help="aperture (arcsec)")
    ap.add_argument("--n-exposures", type=int, default=8)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    inputs = None
    if args.cube:
        if args.ra is None or args.dec is None:
            ap.error("--cube needs --ra and --dec")
        ds = load_cube(args.cube)
        spec = extract_spectrum(ds, args.ra, args.dec, radius=args.radius)
        truth = None
    else:
        center = (150.0, 2.0)
        inputs = Path(tempfile.mkdtemp(prefix="drizzle3d-inputs-"))
        # the inputs must stay readable: the exact errors re-read the pixels that reach the
        # aperture, using the list of inputs recorded in the cube
        field = simulate_field(
            inputs, n_exposures=args.n_exposures, shape=(96, 96), center=center, seed=5
        )
        grid = OutputGrid(SpatialGrid.from_center(*center, 6.0, 6.0), SpectralGrid.native(3))
        d = drizzle_files(field.paths, grid)
        path = save_cube(cube_dataset(d, detector=3), out / "cube_D3.fits", overwrite=True)
        ds = load_cube(path)
        star = field.sky.point_sources[0]
        spec = extract_spectrum(ds, star.ra, star.dec, radius=args.radius)
        naive = extract_spectrum(ds, star.ra, star.dec, radius=args.radius, errors="naive")
        truth = aperture_truth(ds, field.sky, star, args.radius, spec["wave_eff"].values)

    flux, err = spec["flux"].values, spec["error"].values
    print(
        f"spectrum in a {args.radius:.1f} arcsec aperture ({spec.attrs.get('units')}), "
        f"errors: {spec.attrs.get('error_method')}"
    )
    for k in range(flux.size):
        if not np.isfinite(flux[k]):
            continue
        line = f"  {spec['wave_eff'].values[k]:.4f} um  {flux[k]:9.4f} +- {err[k]:.4f}"
        if truth is not None:
            line += f"   truth {truth[k]:9.4f}   naive error {naive['error'].values[k]:.4f}"
        print(line)
    if truth is not None:
        ok = np.isfinite(flux) & np.isfinite(truth) & (err > 0)
        chi = (flux[ok] - truth[ok]) / err[ok]
        rel = np.abs(flux[ok] / truth[ok] - 1)
        ratio = np.median(err[ok] / naive["error"].values[ok])
        print(
            f"median |relative error| {np.median(rel):.3f}, chi rms {np.sqrt(np.mean(chi**2)):.2f}"
            f" over {ok.sum()} bins; exact / naive error (median) {ratio:.2f}"
        )
    plot(spec, truth, out / "spectrum.png")
    if inputs is not None:
        shutil.rmtree(inputs, ignore_errors=True)
    print(f"plot written to {out / 'spectrum.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
