"""Pipeline: bad inputs reported and skipped, unbiased default weighting, honest spectrum errors."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid
from drizzle3d.pipeline import (
    cube_dataset,
    drizzle_files,
    extract_spectrum,
    image_footprint,
    prepare_image,
)
from drizzle3d.resample import Drizzle3D
from drizzle3d.simulate import PointSource, Sky, Spectrum, simulate_field

log = logging.getLogger(__name__)
CENTER = (150.0, 2.0)


# ---------------------------------------------------------------- Must-show 6
def test_corrupt_and_far_files_are_reported_and_skipped(small_field, small_grid, tmp_path, caplog):
    good = [str(p) for p in small_field.paths]
    corrupt = tmp_path / "level2_corrupt.fits"
    with open(good[0], "rb") as fh:
        data = fh.read()
    corrupt.write_bytes(data[: len(data) // 3])  # truncated mid-file
    far_dir = tmp_path / "far"
    far = simulate_field(far_dir, n_exposures=1, shape=(64, 64), center=(200.0, -30.0), seed=3)
    paths = [good[0], str(corrupt), *good[1:4], str(far.paths[0]), *good[4:]]
    caplog.set_level(logging.WARNING, logger="drizzle3d")
    actual = drizzle_files(paths, small_grid)
    expected = drizzle_files(good, small_grid)
    s = actual.run_summary
    assert s.counts() == {
        "used": len(good),
        "skipped": 1,
        "not_overlapping": 1,
        "already_included": 0,
    }
    assert s.skipped[0]["path"] == str(corrupt)
    assert "truncated" in s.skipped[0]["reason"] or "missing HDU" in s.skipped[0]["reason"]
    assert s.not_overlapping == [str(far.paths[0])]
    assert any(str(corrupt) in r.getMessage() for r in caplog.records)
    # the run equals the run without the two files (context ids differ: compare the cubes)
    for name in ("out_sci", "out_var", "out_wht", "out_wave"):
        np.testing.assert_array_equal(getattr(actual, name).values, getattr(expected, name).values)
    # the summary travels with the saved cube
    ds = cube_dataset(actual, detector=3)
    assert str(corrupt) in ds.attrs["run_summary"]
    assert str(far.paths[0]) in ds.attrs["run_summary"]


def test_footprint_reads_a_box_only(small_field, small_grid):
    fp = image_footprint(small_field.paths[0], small_grid)
    assert fp.bbox is not None
    assert fp.bbox.size < 96 * 96
    prep = prepare_image(small_field.paths[0], small_grid)
    assert prep.data.shape == fp.bbox.shape


def test_bad_settings_are_rejected(small_field, small_grid):
    with pytest.raises(ValueError, match="'weighting' must be one of"):
        drizzle_files(small_field.paths, small_grid, weighting="optimal")
    with pytest.raises(ValueError, match="'zodi' must be one of"):
        drizzle_files(small_field.paths, small_grid, zodi="model")
    with pytest.raises(ValueError, match="'paths' must name at least one file"):
        drizzle_files([], small_grid)


# ---------------------------------------------------------------- Must-show 3
def _bright_sky():
    cosd = math.cos(math.radians(CENTER[1]))

    def at(dx, dy):
        return CENTER[0] + dx / 3600.0 / cosd, CENTER[1] + dy / 3600.0

    specs = [
        Spectrum(20.0, index=-0.5, ref_wavelength=2.0),
        Spectrum(8.0, index=-1.5, ref_wavelength=2.0),
        Spectrum(12.0, index=0.8, ref_wavelength=2.0),
        Spectrum(5.0, index=-2.0, ref_wavelength=2.0),
        Spectrum(30.0, index=0.0, ref_wavelength=2.0),
    ]
    offsets = [(0, 0), (-100, 70), (90, -80), (-70, -90), (80, 100)]
    stars = tuple(PointSource(*at(*o), s) for o, s in zip(offsets, specs, strict=True))
    return Sky(Spectrum(0.0), stars, ())


@pytest.fixture(scope="module")
def bright_fields(tmp_path_factory):
    sky = _bright_sky()
    common = {
        "sky": sky,
        "n_exposures": 16,
        "shape": (160, 160),
        "center": CENTER,
        "flagged_fraction": 0.002,
    }
    noiseless = simulate_field(
        tmp_path_factory.mktemp("bright0"), noise=False, zodi=False, seed=11, **common
    )
    noisy = simulate_field(tmp_path_factory.mktemp("bright1"), seed=12, **common)
    return sky, noiseless, noisy


def _source_stats(d, sky, grid):
    """Median flux ratio (vs truth at each point's effective wavelength) and position error."""
    ds = cube_dataset(d)
    ratios, offsets = [], []
    wl = np.nansum(np.nan_to_num(ds["sci"].values) * ds["wht"].values, axis=0)
    wcs = grid.spatial.wcs
    for star in sky.point_sources:
        sp = extract_spectrum(ds, star.ra, star.dec, radius=4 * 6.15, errors="naive")
        lam = sp["wave_eff"].values
        ok = np.isfinite(sp["flux"].values)
        truth = star.spectrum.evaluate(lam[ok])
        ratios.append(np.median(sp["flux"].values[ok] / truth))
        x0, y0 = (float(v) for v in wcs.world_to_pixel_values(star.ra, star.dec))
        iy, ix = round(y0), round(x0)
        yy, xx = np.mgrid[iy - 4 : iy + 5, ix - 4 : ix + 5]
        img = wl[iy - 4 : iy + 5, ix - 4 : ix + 5]
        cx, cy = (img * xx).sum() / img.sum(), (img * yy).sum() / img.sum()
        offsets.append(math.hypot(cx - x0, cy - y0))
    return np.array(ratios), np.array(offsets)


def test_default_weighting_is_unbiased_for_bright_sources(bright_fields):
    sky, noiseless, noisy = bright_fields
    grid = OutputGrid(SpatialGrid.from_center(*CENTER, 6.0, 6.0), SpectralGrid.native(3))
    results = {}
    for name, field, zodi in (("noiseless", noiseless, "none"), ("noisy", noisy, "fit")):
        for weighting in ("background", "ivm"):
            d = drizzle_files(field.paths, grid, weighting=weighting, zodi=zodi)
            results[name, weighting] = _source_stats(d, sky, grid)
    for key, (ratios, offsets) in results.items():
        log.info(
            "%s: flux ratios %s, position errors %s px", key, ratios.round(4), offsets.round(3)
        )
        print(
            f"\n{key}: median flux ratio {np.median(ratios):.4f} (per source {ratios.round(4)}), "
            f"max position error {offsets.max():.3f} px"
        )
    for name in ("noiseless", "noisy"):
        ratios, offsets = results[name, "background"]
        assert abs(np.median(ratios) - 1.0) < 0.01
    # positions: every source on the noiseless field; the median source on the noisy one (the
    # faintest source's white-light centroid is noise-limited at ~0.1 px)
    assert np.all(results["noiseless", "background"][1] < 0.05)
    assert np.median(results["noisy", "background"][1]) < 0.05
    # the test can fail: plain 1/VARIANCE weights bias the same bright sources low
    assert np.median(results["noisy", "ivm"][0]) < 0.97


# ---------------------------------------------------------------- Must-show 2
N_REALISATIONS = 400


@pytest.fixture(scope="module")
def one_star_field(tmp_path_factory):
    star = PointSource(*CENTER, Spectrum(6.0, index=-1.0, ref_wavelength=2.0))
    sky = Sky(Spectrum(0.0), (star,), ())
    field = simulate_field(
        tmp_path_factory.mktemp("one_star"),
        sky=sky,
        n_exposures=8,
        shape=(64, 64),
        center=CENTER,
        noise=False,
        zodi=False,
        flagged_fraction=0.0,
        seed=5,
    )
    return star, field


def test_extracted_spectrum_errors_match_scatter(one_star_field):
    star, field = one_star_field
    grid = OutputGrid(SpatialGrid.from_center(*CENTER, 3.0, 3.0), SpectralGrid.native(3))
    run = drizzle_files(field.paths, grid, zodi="none")
    ds = cube_dataset(run, detector=3)
    radius = 3 * 6.15
    expected = extract_spectrum(ds, star.ra, star.dec, radius=radius)  # exact errors
    naive = extract_spectrum(ds, star.ra, star.dec, radius=radius, errors="naive")
    assert expected.attrs["error_method"].startswith("exact")
    # the same operator (boxes, maps, weights) applied to independent noise realisations
    preps = [prepare_image(p, grid, zodi="none") for p in field.paths]
    settings = run.run_settings
    rng = np.random.default_rng(2024)
    fluxes = []
    for _ in range(N_REALISATIONS):
        d = Drizzle3D(
            grid, weighting="uniform", exclude_flags=settings["exclude_mask"], disable_ctx=True
        )
        for p in preps:
            noisy = p.data + rng.standard_normal(p.data.shape) * np.sqrt(p.var)
            d.add_image(noisy, p.var, p.flags, p.pixmap, p.wavemap, wht_scale=p.wht_scale)
        sp = extract_spectrum(d.to_dataset(), star.ra, star.dec, radius=radius, errors="naive")
        fluxes.append(sp["flux"].values)
    fluxes = np.array(fluxes)
    ok = np.all(np.isfinite(fluxes), axis=0) & np.isfinite(expected["error"].values)
    actual_scatter = fluxes[:, ok].std(axis=0, ddof=1)
    reported = expected["error"].values[ok]
    ratio = actual_scatter / reported
    naive_ratio = actual_scatter / naive["error"].values[ok]
    print(
        f"\n{ok.sum()} bins, {N_REALISATIONS} realisations: scatter / exact error "
        f"{ratio.round(3)}; scatter / naive error median {np.median(naive_ratio):.2f}"
    )
    assert ok.sum() >= 10
    assert np.all(np.abs(ratio - 1.0) < 0.10)
    # a naive sum of voxel variances would fail this test
    assert np.median(naive_ratio) > 1.2
    # mean flux is the truth (noise-free input), within the scatter of the mean
    mean_err = np.abs(fluxes[:, ok].mean(axis=0) - expected["flux"].values[ok])
    assert np.all(mean_err < 5 * actual_scatter / math.sqrt(N_REALISATIONS))


# ---------------------------------------------------------------- outliers section
def test_outlier_rejection_removes_unflagged_cosmic_rays(tmp_path):
    pytest.importorskip("drizzle3d.blot")
    common = {"n_exposures": 8, "shape": (96, 96), "center": CENTER, "seed": 4}
    clean = simulate_field(tmp_path / "clean", cosmic_rays=0.0, **common)
    hit = simulate_field(tmp_path / "hit", cosmic_rays=2e-3, cosmic_rays_flagged=False, **common)
    grid = OutputGrid(SpatialGrid.from_center(*CENTER, 6.0, 6.0), SpectralGrid.native(3))
    expected = drizzle_files(clean.paths, grid)
    plain = drizzle_files(hit.paths, grid)
    actual = drizzle_files(hit.paths, grid, outliers={"enabled": True, "grow": 1})
    sigma = np.sqrt(expected.out_var.values)

    def n_bad(d):
        return int(np.nansum(np.abs(d.out_sci.values - expected.out_sci.values) > 5 * sigma))

    print(f"\nvoxels > 5 sigma off the clean cube: plain {n_bad(plain)}, rejected {n_bad(actual)}")
    assert n_bad(plain) > 20
    assert n_bad(actual) < 0.2 * n_bad(plain)


def test_fits_cube_in_spectral_slabs_equals_whole_grid(small_field, tmp_path, monkeypatch):
    # a FITS-only cube whose accumulators exceed the budget is drizzled slab by slab: the
    # file is identical to a whole-grid run, run summary and missed-pixel counts included,
    # and an image is prepared only for the slabs its bands reach
    from astropy.io import fits

    from drizzle3d import pipeline
    from drizzle3d.config import Drizzle3DConfig

    good = [str(p) for p in small_field.paths]
    corrupt = tmp_path / "level2_corrupt.fits"
    with open(good[0], "rb") as fh:
        corrupt.write_bytes(fh.read()[:5000])
    far = simulate_field(tmp_path / "far", n_exposures=1, shape=(64, 64), center=(200.0, -30.0),
                         seed=3)  # fmt: skip
    files = [good[0], str(corrupt), *good[1:5], str(far.paths[0]), *good[5:]]
    prepared = []
    real_prepare = pipeline.prepare_image

    def spy(path, grid, **kw):
        out = real_prepare(path, grid, **kw)
        prepared.append((path, out is not None))
        return out

    monkeypatch.setattr(pipeline, "prepare_image", spy)

    def run(name, budget):
        monkeypatch.setattr(pipeline, "SLAB_STATE_BYTES", budget)
        config = Drizzle3DConfig.from_dict({
            "region": {"ra": CENTER[0], "dec": CENTER[1], "width": 6.0},
            "spectral": {"mode": "oversampled", "factor": 2},
            "inputs": {"files": files},
            "output": {"directory": str(tmp_path / name)},
        })  # fmt: skip
        prepared.clear()
        path = pipeline.drizzle(config)["D3.fits"]
        return path, pipeline._n_slabs(config.grid(3)), sum(ok for _, ok in prepared)

    whole, n1, _ = run("whole", 1 << 40)
    nz, ny, nx = Drizzle3DConfig.from_dict({
        "region": {"ra": CENTER[0], "dec": CENTER[1], "width": 6.0},
        "spectral": {"mode": "oversampled", "factor": 2},
    }).grid(3).shape  # fmt: skip
    slabbed, n5, used5 = run("slabs", nz * ny * nx * 56 // 5 + 1)
    assert (n1, n5) == (1, 5)
    assert len(good) < used5 < 5 * len(good)  # straddling images twice, none in every slab
    with fits.open(whole) as a, fits.open(slabbed) as b:
        assert [h.name for h in a] == [h.name for h in b]
        for ha, hb in zip(a, b, strict=True):
            assert ha.header == hb.header, ha.name
            if ha.data is not None:
                assert ha.data.tobytes() == hb.data.tobytes(), ha.name
        summary = json.loads(json.loads(b["ATTRS"].data["VALUE"][0])["run_summary"])
    assert summary["counts"]["used"] == len(good)
    assert summary["counts"]["skipped"] == 1
    assert summary["counts"]["not_overlapping"] == 1


def test_all_band_cube_combines_the_detectors(tmp_path):
    # all_band: one more cube from every selected detector's images, on a constant-R grid
    # over their whole range, next to the per-detector cubes
    from drizzle3d.channels import detector_range
    from drizzle3d.config import Drizzle3DConfig
    from drizzle3d.io import load_cube
    from drizzle3d.pipeline import drizzle

    field = simulate_field(tmp_path / "in", detectors=(2, 3), n_exposures=3, shape=(48, 48),
                           center=CENTER, seed=5)  # fmt: skip
    config = Drizzle3DConfig.from_dict({
        "region": {"ra": CENTER[0], "dec": CENTER[1], "width": 3.0},
        "detectors": [2, 3],
        "all_band": True,
        "spectral": {"resolving_power": 40.0},
        "inputs": {"files": [str(p) for p in field.paths]},
        "output": {"directory": str(tmp_path / "out")},
    })  # fmt: skip
    written = drizzle(config)
    assert set(written) == {"D2.fits", "D3.fits", "all.fits"}
    cube = load_cube(written["all.fits"])
    lo2, hi2 = detector_range(2)
    lo3, hi3 = detector_range(3)
    assert cube.wavelength_min.values[0] == pytest.approx(lo2)
    assert cube.wavelength_min.values[-1] < hi3 <= cube.wavelength_max.values[-1]
    r = cube.wavelength.values[1:] / cube.wavelength.values[:-1]
    np.testing.assert_allclose(r, r[0], rtol=1e-9)  # constant R
    used = json.loads(cube.attrs["run_summary"])["counts"]["used"]
    assert used == len(field.paths) == 6
    covered = np.isfinite(cube.sci.values).mean(axis=(1, 2))
    lam = cube.wavelength.values
    assert covered[(lam > lo2) & (lam < hi2)].min() > 0.1  # D2's images reach all its bins
    assert covered[(lam > lo3) & (lam < hi3)].min() > 0.1  # and D3's all of theirs
    assert cube.attrs["detector"] == "D2,D3"
