"""CLI: the demo end to end in a subprocess, and the small commands through main()."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from drizzle3d.cli import main
from drizzle3d.config import EXAMPLE_YAML, Drizzle3DConfig
from drizzle3d.io import load_cube
from drizzle3d.pipeline import extract_spectrum
from drizzle3d.simulate import Sky

CENTER = (150.0, 2.0)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run(
        [sys.executable, "-m", "drizzle3d.cli", "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return out, proc


def test_demo_writes_a_cube_whose_star_spectrum_matches_truth(demo_run):
    out, proc = demo_run
    assert proc.returncode == 0, proc.stderr
    assert "demo_D3.fits" in proc.stdout
    for name in ("white_light", "coverage", "channels", "spectrum"):
        assert (out / f"demo_D3_{name}.png").stat().st_size > 1000
    ds = load_cube(out / "demo_D3.fits")
    assert ds["sci"].shape[0] == 17
    star_spec = Sky.default(center=CENTER).point_sources[0].spectrum
    sky = Sky.default(center=CENTER)
    others = Sky(sky.background, (), sky.extended_sources)
    radius = 3 * 6.15
    sp = extract_spectrum(ds, *CENTER, radius=radius)
    ra, dec = ds["ra"].values, ds["dec"].values
    sep = np.hypot((ra - CENTER[0]) * math.cos(math.radians(CENTER[1])), dec - CENTER[1]) * 3600
    aper = sep <= radius
    omega = 6.15**2 * (math.pi / 180 / 3600) ** 2 * 1e9
    lam = sp["wave_eff"].values
    ok = np.isfinite(sp["flux"].values)
    expected = np.array(
        [
            star_spec.evaluate(lk) + others.evaluate(ra[aper], dec[aper], lk).sum() * omega
            for lk in lam[ok]
        ]
    )
    actual = sp["flux"].values[ok]
    rel = (actual - expected) / expected
    chi = (actual - expected) / sp["error"].values[ok]
    print(
        f"\ndemo: {ok.sum()} bins, median |rel err| {np.median(np.abs(rel)):.4f}, "
        f"chi rms {np.sqrt(np.mean(chi**2)):.2f}, errors: {sp.attrs['error_method']}"
    )
    assert ok.sum() >= 12
    assert np.median(np.abs(rel)) < 0.08
    assert np.sqrt(np.mean(chi**2)) < 2.5
    summary = json.loads(ds.attrs["run_summary"])
    assert summary["counts"]["used"] == 12


def test_info_and_plot_commands(demo_run, tmp_path, capsys):
    out, _ = demo_run
    assert main(["info", str(out / "demo_D3.fits")]) == 0
    text = capsys.readouterr().out
    assert "17 x" in text
    assert "12 used, 0 skipped" in text
    args = ["plot", str(out / "demo_D3.fits"), "--ra", "150.0", "--dec", "2.0"]
    assert main([*args, "--radius", "18", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "demo_D3_spectrum.png").exists()


def test_config_example_is_valid(tmp_path, capsys):
    assert main(["config", "--example"]) == 0
    text = capsys.readouterr().out
    assert text == EXAMPLE_YAML
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert Drizzle3DConfig.from_yaml(path) == Drizzle3DConfig()
    assert main(["config", "--check", str(path)]) == 0


def test_errors_give_one_line_and_nonzero_exit(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("drizzle:\n  kernel: cubic\n")
    assert main(["run", str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "'drizzle.kernel' must be one of" in err[0]
    assert main(["info", str(tmp_path / "missing.fits")]) == 2
    assert main(["frobnicate"]) == 2


def test_run_command_writes_cubes(small_field, tmp_path):
    cfg = Drizzle3DConfig.from_dict(
        {
            "region": {"ra": CENTER[0], "dec": CENTER[1], "width": 4.0},
            "inputs": {"files": [str(p) for p in small_field.paths]},
            "output": {"directory": str(tmp_path / "out"), "formats": ["fits", "netcdf"]},
        }
    )
    path = tmp_path / "run.yaml"
    cfg.to_yaml(path)
    assert main(["-q", "run", str(path)]) == 0
    fits_cube = load_cube(tmp_path / "out" / "cube_D3.fits")
    nc_cube = load_cube(tmp_path / "out" / "cube_D3.nc")
    np.testing.assert_array_equal(fits_cube["sci"].values, nc_cube["sci"].values.astype(np.float32))
    assert main(["-q", "run", str(path)]) == 1  # existing outputs are not clobbered
