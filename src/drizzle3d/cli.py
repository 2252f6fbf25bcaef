"""The ``drizzle3d`` command line (click).

``drizzle3d demo`` simulates a small SPHEREx field, drizzles it, writes the cube
and quick-look PNGs and compares the recovered spectrum with the truth. Other
commands: ``run CONFIG.yaml``, ``query``, ``info CUBE``, ``plot CUBE``,
``config --example``. :func:`main` returns an exit code (0 on success, 1 on a
known error with a one-line message, 2 on a usage error).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import click

__all__ = ["cli", "main", "run_demo"]

logger = logging.getLogger(__name__)


def _tqdm(iterable, **kwargs):
    from tqdm import tqdm

    return tqdm(iterable, leave=False, disable=logging.getLogger().level > logging.INFO, **kwargs)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
def cli(verbose: int, quiet: bool) -> None:
    """Drizzle SPHEREx spectral images into (wavelength, y, x) cubes.

    Start with `drizzle3d demo`; run your own field with
    `drizzle3d config --example > run.yaml` and `drizzle3d run run.yaml`.
    """
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    if not quiet and verbose == 0:
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger().setLevel(level)
    if verbose == 1:
        logging.getLogger("drizzle3d").setLevel(logging.INFO)


def run_demo(out_dir, *, seed: int = 1, n_exposures: int = 12, progress=None) -> dict:
    """Simulate, drizzle, save and check the demo field; return a result dict.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Output directory (created); inputs go to ``out_dir/inputs``.
    seed : int, optional
        Simulation seed.
    n_exposures : int, optional
        Number of simulated exposures.
    progress : callable, optional
        tqdm-like wrapper.

    Returns
    -------
    dict
        ``cube`` (path), ``plots`` (dict of paths), ``spectrum`` (Dataset),
        ``truth`` (array, mJy), ``summary`` (the run's
        :class:`~drizzle3d.pipeline.RunSummary`), ``median_rel_err``,
        ``chi_rms``, ``n_bins`` (spectral points compared with the truth).

    Examples
    --------
    A single exposure keeps the example quick (``drizzle3d demo`` uses 12):

    >>> import tempfile
    >>> res = run_demo(tempfile.mkdtemp(), n_exposures=1)
    >>> res["cube"].name, sorted(res["plots"]), res["summary"].counts()["used"]
    ('demo_D3.fits', ['channels', 'coverage', 'spectrum', 'white_light'], 1)
    """
    import numpy as np

    from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid
    from drizzle3d.io import load_cube, save_cube
    from drizzle3d.pipeline import cube_dataset, drizzle_files, extract_spectrum
    from drizzle3d.plotting import quicklook
    from drizzle3d.simulate import Sky, simulate_field

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    center = (150.0, 2.0)
    field = simulate_field(
        out / "inputs", n_exposures=n_exposures, shape=(128, 128), center=center, seed=seed
    )
    grid = OutputGrid(SpatialGrid.from_center(*center, 9.0, 9.0), SpectralGrid.native(3))
    d = drizzle_files(field.paths, grid, progress=progress)
    cube_path = save_cube(cube_dataset(d, detector=3), out / "demo_D3.fits", overwrite=True)
    ds = load_cube(cube_path)
    star = field.sky.point_sources[0]
    radius = 3.0 * 6.15
    spec = extract_spectrum(ds, star.ra, star.dec, radius=radius)
    # the truth in the aperture: the star, plus the (known) nebula wing and background
    others = Sky(field.sky.background, (), field.sky.extended_sources)
    wcs_ra, wcs_dec = np.asarray(ds["ra"].values), np.asarray(ds["dec"].values)
    sep = np.hypot((wcs_ra - star.ra) * math.cos(math.radians(star.dec)), wcs_dec - star.dec)
    aper = sep * 3600.0 <= radius + 1e-9
    lam = np.asarray(spec["wave_eff"].values)
    omega = (6.15**2) * (math.pi / 180 / 3600) ** 2 * 1e9
    truth = np.full(lam.shape, np.nan)
    for k, lk in enumerate(lam):
        if np.isfinite(lk):
            rest = others.band_average(wcs_ra[aper], wcs_dec[aper], lk, 0.0).sum() * omega
            truth[k] = float(star.spectrum.band_average(lk, 0.0)) + rest
    flux = np.asarray(spec["flux"].values)
    err = np.asarray(spec["error"].values)
    ok = np.isfinite(flux) & np.isfinite(truth) & (err > 0)
    rel = (flux[ok] - truth[ok]) / truth[ok]
    chi = (flux[ok] - truth[ok]) / err[ok]
    plots = quicklook(ds, out, spectrum=spec, truth=(lam[ok], truth[ok]), stem="demo_D3")
    return {
        "cube": cube_path,
        "plots": plots,
        "spectrum": spec,
        "truth": truth,
        "summary": d.run_summary,
        "median_rel_err": float(np.median(np.abs(rel))) if ok.any() else math.nan,
        "chi_rms": float(np.sqrt(np.mean(chi**2))) if ok.any() else math.nan,
        "n_bins": int(ok.sum()),
    }


@cli.command()
@click.option(
    "--out", "out_dir", default="drizzle3d_demo", show_default=True, help="Output directory."
)
@click.option("--seed", default=1, show_default=True, help="Simulation seed.")
def demo(out_dir: str, seed: int) -> None:
    """Simulate a small SPHEREx field, drizzle it, and check the spectrum against the truth."""
    click.echo("simulating 12 SPHEREx D3 exposures of a field with 4 stars and a nebula ...")
    res = run_demo(out_dir, seed=seed, progress=_tqdm)
    click.echo(f"cube:  {res['cube']}")
    for name, p in res["plots"].items():
        click.echo(f"plot:  {p}  ({name})")
    click.echo(
        f"star spectrum vs truth over {res['n_bins']} bins: median |relative error| = "
        f"{100 * res['median_rel_err']:.1f} %, chi rms = {res['chi_rms']:.2f} "
        f"(errors {res['spectrum'].attrs['error_method'].split(' (')[0]})"
    )


@cli.command()
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
def run(config_file: str) -> None:
    """Run the pipeline described by CONFIG_FILE (YAML)."""
    from drizzle3d.config import Drizzle3DConfig
    from drizzle3d.pipeline import drizzle

    config = Drizzle3DConfig.from_yaml(Path(config_file))
    written = drizzle(config, progress=_tqdm)
    for p in written.values():
        click.echo(f"wrote {p}")


@cli.command()
@click.option("--ra", type=float, required=True, help="Field centre RA (deg).")
@click.option("--dec", type=float, required=True, help="Field centre Dec (deg).")
@click.option("--size", type=float, default=10.0, show_default=True, help="Field side (arcmin).")
@click.option("--detector", "-d", multiple=True, type=int, help="Detector(s) 1-6 (default all).")
@click.option("--max-images", type=int, default=None, help="Keep the first N images.")
@click.option(
    "--tap-url",
    default=None,
    metavar="URL",
    help="TAP service to query (default IRSA's, or $DRIZZLE3D_TAP_URL).",
)
def query(ra: float, dec: float, size: float, detector, max_images, tap_url) -> None:
    """List the SPHEREx images in the IRSA archive that overlap a field."""
    import os

    from drizzle3d.archive import IRSA_TAP_URL, query_spherex

    tap_url = tap_url or os.environ.get("DRIZZLE3D_TAP_URL") or IRSA_TAP_URL
    table = query_spherex(
        ((ra, dec), size / 60.0),
        detectors=list(detector) or None,
        max_images=max_images,
        tap_url=tap_url,
    )
    for row in table:
        click.echo(f"{row['obs_id']}  D{row['detector']}  {row['mjd_mid']:.5f}  {row['url']}")
    click.echo(f"{len(table)} image(s)")


@cli.command()
@click.argument("cube", type=click.Path(exists=True))
def info(cube: str) -> None:
    """Describe a cube: shape, grid, wavelength range, coverage and inputs."""
    import json

    import numpy as np

    from drizzle3d.io import load_cube

    ds = load_cube(cube)
    nz, ny, nx = ds["sci"].shape
    lam_lo = float(ds["wavelength_min"].values[0])
    lam_hi = float(ds["wavelength_max"].values[-1])
    covered = float(np.mean(np.asarray(ds["wht"].values) > 0)) if "wht" in ds else math.nan
    click.echo(f"cube:        {cube}")
    click.echo(f"shape:       {nz} x {ny} x {nx} (wavelength, y, x)")
    click.echo(f"wavelength:  {lam_lo:.4f} - {lam_hi:.4f} um in {nz} bins")
    if "ra" in ds.coords:
        click.echo(
            f"centre:      RA {float(ds['ra'].values[ny // 2, nx // 2]):.5f}, "
            f"Dec {float(ds['dec'].values[ny // 2, nx // 2]):.5f} deg"
        )
    click.echo(f"coverage:    {100 * covered:.1f} % of voxels have data")
    click.echo(
        f"drizzle:     kernel={ds.attrs.get('kernel')} pixfrac={ds.attrs.get('pixfrac')} "
        f"weighting={ds.attrs.get('pipeline_weighting', ds.attrs.get('weighting'))}"
    )
    click.echo(f"inputs:      {ds.attrs.get('n_images', '?')} image(s)")
    if "run_summary" in ds.attrs:
        summary = json.loads(ds.attrs["run_summary"])
        c = summary.get("counts", {})
        click.echo(
            f"run:         {c.get('used', '?')} used, {c.get('skipped', 0)} skipped, "
            f"{c.get('not_overlapping', 0)} not overlapping"
        )
        for s in summary.get("skipped", []):
            click.echo(f"  skipped {s['path']}: {s['reason']}")


@cli.command()
@click.argument("cube", type=click.Path(exists=True))
@click.option("--ra", type=float, default=None, help="RA (deg) of the spectrum.")
@click.option("--dec", type=float, default=None, help="Dec (deg) of the spectrum.")
@click.option("--radius", type=float, default=None, help="Aperture radius (arcsec).")
@click.option("--out", "out_dir", default=".", show_default=True, help="Directory for PNGs.")
def plot(cube: str, ra, dec, radius, out_dir: str) -> None:
    """Write quick-look PNGs of CUBE (and a spectrum at --ra/--dec)."""
    from drizzle3d.io import load_cube
    from drizzle3d.pipeline import extract_spectrum
    from drizzle3d.plotting import quicklook

    ds = load_cube(cube)
    spec = None
    if (ra is None) != (dec is None):
        raise click.UsageError("give both --ra and --dec, or neither.")
    if ra is not None:
        spec = extract_spectrum(ds, ra, dec, radius=radius)
    paths = quicklook(ds, out_dir, spectrum=spec, stem=Path(cube).name.split(".")[0])
    for p in paths.values():
        click.echo(f"wrote {p}")


@cli.command("config")
@click.option("--example", is_flag=True, help="Print a commented example configuration.")
@click.option("--check", type=click.Path(exists=True, dir_okay=False), help="Validate a config.")
def config_cmd(example: bool, check) -> None:
    """Print an example configuration or validate one."""
    from drizzle3d.config import EXAMPLE_YAML, Drizzle3DConfig

    if check:
        Drizzle3DConfig.from_yaml(Path(check))
        click.echo(f"{check}: valid")
    elif example:
        click.echo(EXAMPLE_YAML, nl=False)
    else:
        raise click.UsageError("give --example or --check FILE.")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code instead of exiting.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success, 1 on an error (one-line message on stderr), 2 on a usage error.

    Examples
    --------
    >>> main(["config", "--example"])  # doctest: +ELLIPSIS
    # drizzle3d run configuration. Every key is optional; ...
    scheduler: null ...
    0
    >>> main(["--help"])  # doctest: +ELLIPSIS
    Usage: drizzle3d [OPTIONS] COMMAND [ARGS]...
    ...
    0
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        cli.main(args=args, prog_name="drizzle3d", standalone_mode=False)
    except click.exceptions.Exit as err:
        return int(err.exit_code)
    except click.ClickException as err:
        err.show()
        return int(err.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except (ValueError, TypeError, OSError, KeyError) as err:
        click.echo(f"drizzle3d: error: {err}", err=True)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
