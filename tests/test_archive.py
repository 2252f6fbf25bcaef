"""Tests for drizzle3d.archive against a local IRSA stand-in (no internet).

The stand-in (tests/irsa_standin.py) is a real HTTP server on 127.0.0.1 that pyvo and
requests talk to: TAP sync + UWS async, VOTables with IRSA's column names, and an IBE-like
file endpoint with gzipped cutouts and fault injection.
"""

from __future__ import annotations

import gzip
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

sys.path.insert(0, str(Path(__file__).parent))

from irsa_standin import IrsaStandin, level2_uri

from drizzle3d.archive import (
    ArchiveError,
    archive_relpath,
    fetch,
    mirror_path,
    query_spherex,
    s3_url,
    verify_fits,
)
from drizzle3d.grid import SpatialGrid

CENTER = (150.0, 2.0)
FIELD = (CENTER, 10.0 / 60.0)  # 10 arcmin box: half-side 0.0833 deg
SCALE = 6.15 / 3600.0


def tangent_to_sky(offsets):
    """(dx, dy) offsets in deg on the tangent plane at CENTER -> (ra, dec) deg (astropy TAN)."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = CENTER
    w.wcs.crpix = [0.0, 0.0]
    w.wcs.cdelt = [1.0, 1.0]
    offsets = np.asarray(offsets, dtype=float)
    ra, dec = w.wcs_pix2world(offsets[:, 0] - 1.0, offsets[:, 1] - 1.0, 0)
    return np.column_stack([ra, dec])


def square(cx, cy, half):
    return tangent_to_sky(
        [
            [cx - half, cy - half],
            [cx + half, cy - half],
            [cx + half, cy + half],
            [cx - half, cy + half],
        ]
    )


def diamond(cx, cy, half_diag):
    return tangent_to_sky(
        [[cx - half_diag, cy], [cx, cy - half_diag], [cx + half_diag, cy], [cx, cy + half_diag]]
    )


def write_l2(path: Path, *, center=CENTER, shape=(48, 64), seed=0, wave0=1.1) -> Path:
    """A small Level-2-layout MEF: celestial TAN WCS plus a linear 'W' spectral WCS on IMAGE."""
    ny, nx = shape
    rng = np.random.default_rng(seed)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = center
    w.wcs.crpix = [(nx + 1) / 2, (ny + 1) / 2]
    w.wcs.cdelt = [-SCALE, SCALE]
    header = w.to_header()
    header.update(
        {
            "WCSAXESW": 2,
            "CTYPE1W": "WAVE",
            "CUNIT1W": "um",
            "CRPIX1W": 1.0,
            "CRPIX2W": 1.0,
            "CRVAL1W": wave0,
            "PC1_1W": 0.0002,
            "PC1_2W": 0.004,
            "CTYPE2W": "BANDWID",
            "CUNIT2W": "um",
            "CRVAL2W": 0.02,
            "PC2_1W": 0.0,
            "PC2_2W": 0.00001,
            "BUNIT": "MJy / sr",
        }
    )
    image = rng.normal(1.0, 0.1, shape).astype(np.float32)
    hdus = fits.HDUList(
        [
            fits.PrimaryHDU(),
            fits.ImageHDU(image, header, name="IMAGE"),
            fits.ImageHDU(rng.integers(0, 4, shape).astype(np.int32), header, name="FLAGS"),
            fits.ImageHDU(np.full(shape, 0.01, np.float32), header, name="VARIANCE"),
            fits.ImageHDU(np.full(shape, 0.3, np.float32), header, name="ZODI"),
            fits.BinTableHDU.from_columns(
                [fits.Column(name="VALUES", format="4E", array=np.ones((1, 4)))], name="WCS-WAVE"
            ),
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    hdus.writeto(path)
    return path


@pytest.fixture
def standin():
    with IrsaStandin() as server:
        yield server


def add_files(standin, tmp_path, n, *, shape=(48, 64)):
    """Register n images (all on the field) with real files; return their source paths."""
    paths = []
    for i in range(n):
        obsid = f"2025W19_2B_{i:04d}_1"
        src = write_l2(tmp_path / "src" / f"f{i}.fits", seed=i, shape=shape)
        standin.add_image(
            obsid=obsid, detector=3, mjd_start=60800.0 + i, poly=square(0, 0, 0.3), path=src
        )
        paths.append(src)
    return paths


# ----------------------------------------------------------------------------------------
# Query (Must show 1, 2)
# ----------------------------------------------------------------------------------------


def test_query_finds_every_overlapping_footprint_even_without_the_centre(standin, caplog):
    # overlap the field, none contains its centre (field half-side 0.0833 deg)
    overlapping = {
        "2025W01_1A_0001_1": square(0.34, 0.0, 0.3),  # spans x in [0.04, 0.64]
        "2025W01_1A_0002_1": square(-0.34, 0.2, 0.3),  # x in [-0.64, -0.04]
        "2025W01_1A_0003_1": square(0.0, 0.36, 0.3),  # y in [0.06, 0.66]
        "2025W01_1A_0004_1": square(0.36, -0.36, 0.3),  # only the field's corner
        "2025W01_1A_0005_1": square(0.1, 0.1, 0.3),  # contains the centre too
    }
    missing = {
        "2025W01_1A_0006_1": square(0.40, 0.0, 0.3),  # 0.017 deg east of the field
        "2025W01_1A_0007_1": diamond(0.45, 0.0, 0.36),  # tip 0.0067 deg from the edge
        "2025W01_1A_0008_1": square(3.0, 3.0, 0.3),  # far away
    }
    for k, (obsid, poly) in enumerate({**overlapping, **missing}.items()):
        standin.add_image(obsid=obsid, detector=2, mjd_start=60700.0 + k, poly=poly)
    with caplog.at_level(logging.INFO, logger="drizzle3d.archive"):
        table = query_spherex(FIELD, tap_url=standin.tap_url)
    expected = sorted(overlapping)
    actual = sorted(table["obs_id"])
    assert actual == expected
    # the server answered conservatively (bounding circles): the client's exact filter mattered
    assert "IRSA returned 7 candidate images; 5 intersect the field" in caplog.text
    # table content: columns, units, URLs under the stand-in, sorted by time
    assert list(table["mjd_start"]) == sorted(table["mjd_start"])
    assert set(table["detector"]) == {2}
    np.testing.assert_allclose(table["wave_min"], 1.1, rtol=1e-12)
    assert str(table["wave_min"].unit) == "um"
    assert all(u.startswith(standin.url + "/ibe/data/spherex/qr2/level2/") for u in table["url"])
    assert set(table["release"]) == {"qr2"}
    assert table["footprint"].shape == (5, 4, 2)
    np.testing.assert_allclose(table["mjd_mid"], 0.5 * (table["mjd_start"] + table["mjd_end"]))


def test_query_with_spatial_grid_and_string_polygons_gives_same_answer():
    with IrsaStandin(poly_format="string") as server:
        server.add_image(
            obsid="2025W01_1A_0001_1", detector=1, mjd_start=1.0, poly=square(0.34, 0, 0.3)
        )
        server.add_image(
            obsid="2025W01_1A_0002_1", detector=1, mjd_start=2.0, poly=square(0.40, 0, 0.3)
        )
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = CENTER
        w.wcs.cdelt = [-SCALE, SCALE]
        w.wcs.crpix = [49.0, 49.0]  # 97 px of 6.15" = 9.94 arcmin, centred
        grid = SpatialGrid(w, (97, 97))
        table = query_spherex(grid, tap_url=server.tap_url)
    assert list(table["obs_id"]) == ["2025W01_1A_0001_1"]


@pytest.fixture
def mixed_standin(standin):
    rows = [  # obsid, detector, mjd_start, release
        ("2025W01_1A_0001_1", 1, 60001.0, "qr2"),
        ("2025W01_1A_0002_1", 3, 60002.0, "qr2"),
        ("2025W01_1A_0003_1", 3, 60003.0, "qr3"),
        ("2025W01_1A_0004_1", 6, 60004.0, "qr2_deep"),
        ("2025W01_1A_0005_1", 3, 60005.0, "qr2"),
    ]
    for obsid, det, mjd, rel in reversed(rows):  # registered out of time order on purpose
        standin.add_image(
            obsid=obsid, detector=det, mjd_start=mjd, release=rel, poly=square(0.3, 0.1, 0.3)
        )
    return standin


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, ["0001", "0002", "0003", "0004", "0005"]),
        ({"detectors": [3]}, ["0002", "0003", "0005"]),
        ({"detectors": ["D1", 6]}, ["0001", "0004"]),
        ({"mjd_range": (60002.0, 60004.0)}, ["0002", "0003"]),  # mid of 0004 is 60004.00075
        ({"mjd_range": (60002.0, 60004.001)}, ["0002", "0003", "0004"]),
        ({"mjd_range": (None, 60002.5)}, ["0001", "0002"]),
        ({"releases": "qr3"}, ["0003"]),
        ({"releases": ["qr2"]}, ["0001", "0002", "0005"]),
        ({"releases": "deep"}, ["0004"]),
        ({"detectors": 3, "releases": "qr2", "mjd_range": (60004.0, None)}, ["0005"]),
    ],
)
def test_query_filters(mixed_standin, kwargs, expected):
    table = query_spherex(FIELD, tap_url=mixed_standin.tap_url, **kwargs)
    actual = [o.split("_")[2] for o in table["obs_id"]]
    assert actual == expected


def test_query_release_comes_from_the_uri(mixed_standin):
    table = query_spherex(FIELD, tap_url=mixed_standin.tap_url)
    expected = ["qr2", "qr2", "qr3", "qr2_deep", "qr2"]
    assert list(table["release"]) == expected


def test_max_images_keeps_first_in_time_and_warns(mixed_standin):
    with pytest.warns(
        UserWarning, match=r"kept the first 2 of 5 images in time order; 3 were dropped"
    ):
        table = query_spherex(FIELD, tap_url=mixed_standin.tap_url, max_images=2)
    expected = ["2025W01_1A_0001_1", "2025W01_1A_0002_1"]
    assert list(table["obs_id"]) == expected


def test_empty_result_is_an_empty_table_with_the_columns(mixed_standin):
    table = query_spherex(((10.0, -30.0), 0.1), tap_url=mixed_standin.tap_url)
    assert len(table) == 0
    assert {"obs_id", "detector", "mjd_mid", "url", "footprint", "release"} <= set(table.colnames)


@pytest.mark.parametrize("status", [400, 200])
def test_tap_error_message_surfaces(status):
    with IrsaStandin(error_status=status) as server:
        server.tap_error = "Column 'p.poly' is not indexed: query too expensive"
        with pytest.raises(
            ArchiveError, match=r"IRSA TAP rejected the query: Column 'p\.poly' is not indexed"
        ) as info:
            query_spherex(FIELD, tap_url=server.tap_url)
    assert info.value.url == server.tap_url
    assert info.value.cause is not None
    # a query error is never retried as an async job
    assert not any(r.path.startswith("/TAP/async") for r in server.log)


def test_sync_failure_falls_back_to_async_job(mixed_standin):
    expected = list(query_spherex(FIELD, tap_url=mixed_standin.tap_url)["obs_id"])
    mixed_standin.sync_status = 503
    actual = list(query_spherex(FIELD, tap_url=mixed_standin.tap_url)["obs_id"])
    assert actual == expected
    paths = [(r.method, r.path) for r in mixed_standin.log]
    assert ("POST", "/TAP/async") in paths
    assert ("GET", "/TAP/async/job1/results/result") in paths
    assert ("DELETE", "/TAP/async/job1") in paths  # the job is cleaned up


def test_slow_sync_query_times_out_and_falls_back_to_async(mixed_standin):
    expected = list(query_spherex(FIELD, tap_url=mixed_standin.tap_url)["obs_id"])
    mixed_standin.sync_delay = 1.0
    actual = list(query_spherex(FIELD, tap_url=mixed_standin.tap_url, sync_timeout=0.2)["obs_id"])
    assert actual == expected
    assert ("POST", "/TAP/async") in [(r.method, r.path) for r in mixed_standin.log]


def test_async_timeout_raises(mixed_standin):
    mixed_standin.sync_status = 503
    mixed_standin.job_polls = 10**6  # never finishes
    with pytest.raises(ArchiveError, match=r"async job did not finish within 0\.3 s"):
        query_spherex(FIELD, tap_url=mixed_standin.tap_url, async_timeout=0.3)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"detectors": [7]}, ValueError, r"'detectors' must be detector numbers 1-6"),
        (
            {"mjd_range": (5.0, 1.0)},
            ValueError,
            r"'mjd_range' must be \(start, end\) with start <= end",
        ),
        ({"max_images": 0}, ValueError, r"'max_images' must be at least 1; got 0"),
        ({"releases": [""]}, ValueError, r"'releases' must be non-empty"),
    ],
)
def test_query_argument_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        query_spherex(FIELD, tap_url="http://127.0.0.1:9/TAP", **kwargs)


def test_region_errors():
    with pytest.raises(TypeError, match="'region' must be a SpatialGrid/OutputGrid or a"):
        query_spherex("M101", tap_url="http://127.0.0.1:9/TAP")
    with pytest.raises(ValueError, match="'region' must be between 0 and 60 deg on a side"):
        query_spherex((CENTER, 0.0), tap_url="http://127.0.0.1:9/TAP")


# ----------------------------------------------------------------------------------------
# Paths: archive tree, mirror, s3
# ----------------------------------------------------------------------------------------

URL = "https://irsa.ipac.caltech.edu/" + level2_uri("2025W19_2B_0073_2", 3)


def test_archive_paths_map_like_the_archive_tree(tmp_path):
    rel = (
        "qr2/level2/2025W19_2B/l2b-v20-2025-247/3/"
        "level2_2025W19_2B_0073_2D3_spx_l2b-v20-2025-247.fits"
    )
    assert archive_relpath(URL).as_posix() == rel
    assert archive_relpath(URL + "?center=1,2&size=0.1").as_posix() == rel
    assert archive_relpath(level2_uri("2025W19_2B_0073_2", 3)).as_posix() == rel
    assert mirror_path(URL, tmp_path) == tmp_path.resolve() / rel
    assert s3_url(URL) == "s3://nasa-irsa-spherex/" + rel


@pytest.mark.parametrize(
    "url",
    [
        "https://irsa.ipac.caltech.edu/ibe/data/spherex/qr2/../../../../etc/passwd",
        "https://irsa.ipac.caltech.edu/ibe/data/spherex/qr2/%2e%2e/%2E%2E/secret.fits",
        "https://irsa.ipac.caltech.edu/ibe/data/spherex/qr2/..%2f..%2fsecret.fits",
        "https://irsa.ipac.caltech.edu/ibe/data/spherex/qr2//abs.fits",
        "https://irsa.ipac.caltech.edu/ibe/data/spherex/qr2/a\\..\\b.fits",
        "https://irsa.ipac.caltech.edu/other/data/x.fits",
        "file:///etc/passwd",
        "ftp://irsa.ipac.caltech.edu/ibe/data/spherex/qr2/a.fits",
        "/ibe/data/spherex/qr2/a.fits",
        "//evil.example/ibe/data/spherex/qr2/a.fits",
    ],
)
def test_unsafe_urls_are_refused(url, tmp_path):
    with pytest.raises(ArchiveError, match="refused URL"):
        mirror_path(url, tmp_path)


def test_mirror_refuses_symlink_escape(tmp_path):
    root = tmp_path / "mirror"
    (root / "qr2").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "qr2" / "link").symlink_to(outside)
    with pytest.raises(ArchiveError, match="resolves outside the mirror"):
        mirror_path("https://irsa.ipac.caltech.edu/ibe/data/spherex/qr2/link/x.fits", root)


def test_s3_mode_without_fsspec_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name in ("fsspec", "s3fs"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    from astropy.table import Table

    with pytest.raises(ImportError, match=r"pip install drizzle3d\[s3\]"):
        fetch(Table({"url": [URL]}), mode="s3")


# ----------------------------------------------------------------------------------------
# Fetch (Must show 3, 4, 5)
# ----------------------------------------------------------------------------------------


def test_fetch_full_gives_complete_copies_in_archive_layout(standin, tmp_path):
    sources = add_files(standin, tmp_path, 3)
    table = query_spherex(FIELD, tap_url=standin.tap_url)
    result = fetch(table, tmp_path / "dl", workers=2, backoff=0.01)
    assert result.failures == []
    assert result.n_downloaded == 3
    for path, src, url in zip(result, sources, table["url"], strict=True):
        assert path == tmp_path / "dl" / archive_relpath(url)
        assert path.read_bytes() == src.read_bytes()
        with fits.open(path) as hdul:
            np.testing.assert_array_equal(hdul["IMAGE"].data, fits.getdata(src, "IMAGE"))
    assert result.bytes_transferred == sum(s.stat().st_size for s in sources)


def _overlap_check(full_path, cut_path):
    """Cutout pixels equal the full file's pixels at the offset implied by CRPIX, incl. W WCS."""
    with fits.open(full_path) as full, fits.open(cut_path) as cut:
        assert [h.name for h in cut] == [h.name for h in full]  # every HDU kept
        dx = full["IMAGE"].header["CRPIX1"] - cut["IMAGE"].header["CRPIX1"]
        dy = full["IMAGE"].header["CRPIX2"] - cut["IMAGE"].header["CRPIX2"]
        assert dx == int(dx)
        assert dy == int(dy)
        dx, dy = int(dx), int(dy)
        cny, cnx = cut["IMAGE"].data.shape
        for name in ("IMAGE", "FLAGS", "VARIANCE", "ZODI"):
            expected = full[name].data[dy : dy + cny, dx : dx + cnx]
            np.testing.assert_array_equal(cut[name].data, expected)
        yy, xx = np.mgrid[0:cny, 0:cnx]
        wfull = WCS(full["IMAGE"].header, key="W")
        wcut = WCS(cut["IMAGE"].header, key="W")
        expected_wave = wfull.pixel_to_world_values(xx + dx, yy + dy)
        actual_wave = wcut.pixel_to_world_values(xx, yy)
        np.testing.assert_allclose(actual_wave, expected_wave, rtol=1e-12, atol=0)
        expected_sky = WCS(full["IMAGE"].header).pixel_to_world_values(xx + dx, yy + dy)
        actual_sky = WCS(cut["IMAGE"].header).pixel_to_world_values(xx, yy)
        np.testing.assert_allclose(actual_sky, expected_sky, rtol=0, atol=1e-10)
        return cny, cnx


def test_fetch_cutout_is_gzipped_on_the_wire_and_agrees_with_full(standin, tmp_path):
    add_files(standin, tmp_path, 2, shape=(160, 200))
    table = query_spherex(((CENTER[0], CENTER[1]), 2.0 / 60.0), tap_url=standin.tap_url)
    full = fetch(table, tmp_path / "full", backoff=0.01)
    cut = fetch(table, tmp_path / "cut", mode="cutout", cutout_margin=0.5 / 60.0, backoff=0.01)
    assert cut.failures == []
    gets = standin.file_requests()
    cut_gets = [r for r in gets if "center=" in r.query]
    assert len(cut_gets) == 2
    assert all("size=" in r.query for r in cut_gets)
    for f, c in zip(full, cut, strict=True):
        assert c.name.endswith(".fits")
        assert ".cutout-" in c.name
        assert c.read_bytes()[:6] == b"SIMPLE"  # decompressed on arrival
        cny, cnx = _overlap_check(f, c)
        # side = field diagonal (2.83') + 2 x 0.5' margin = 3.83' = 37.4 px -> 37 or 38 px
        assert 36 <= cny <= 39
        assert 36 <= cnx <= 39
    assert cut.bytes_transferred < full.bytes_transferred / 5


def test_fetch_mirror_returns_paths_in_the_mirror_without_transfer(standin, tmp_path):
    add_files(standin, tmp_path, 2)
    table = query_spherex(FIELD, tap_url=standin.tap_url)
    mirror = fetch(table, tmp_path / "mirror_src", backoff=0.01)  # a full fetch is a mirror tree
    n_gets = len(standin.file_requests())
    result = fetch(table, mode="mirror", mirror_root=tmp_path / "mirror_src")
    assert list(result) == [p.resolve() for p in mirror]
    assert len(standin.file_requests()) == n_gets
    for p in result:
        with fits.open(p) as hdul:
            assert hdul["IMAGE"].data.shape == (48, 64)


def test_fetch_mirror_refuses_traversal_and_reports_it(standin, tmp_path):
    add_files(standin, tmp_path, 1)
    table = query_spherex(FIELD, tap_url=standin.tap_url)
    root = tmp_path / "mirror"
    fetch(table, root, backoff=0.01)
    secret = tmp_path / "secret.fits"
    write_l2(secret)
    table.add_row(table[0])
    table["url"][1] = standin.url + "/ibe/data/spherex/../../secret.fits"
    result = fetch(table, mode="mirror", mirror_root=root)
    assert result[0] is not None
    assert result[1] is None
    assert [f.index for f in result.failures] == [1]
    assert "refused URL" in str(result.failures[0].error)


def test_fetch_s3_paths_mapping_logic():
    # the path mapping of "s3" mode without network (fetch itself needs the s3 extra)
    expected = "s3://nasa-irsa-spherex/qr3/level2/2026W30_1A/l2b-v1-2026-250/5/a.fits"
    actual = s3_url(
        "https://irsa.ipac.caltech.edu/ibe/data/spherex/qr3/level2/2026W30_1A/l2b-v1-2026-250/5/a.fits"
    )
    assert actual == expected


def _no_partials(root: Path):
    return [p for p in root.rglob("*") if p.name.endswith(".part")]


def test_fault_500_then_success_is_retried(standin, tmp_path):
    sources = add_files(standin, tmp_path, 1)
    table = query_spherex(FIELD, tap_url=standin.tap_url)
    path = "/" + archive_relpath(table["url"][0]).as_posix()
    standin.faults["/ibe/data/spherex/" + path.lstrip("/")] = ["500", "503"]
    result = fetch(table, tmp_path / "dl", backoff=0.01)
    statuses = [r.status for r in standin.file_requests()]
    assert statuses == [500, 503, 200]
    assert result[0].read_bytes() == sources[0].read_bytes()


def test_fault_dropped_connection_is_retried_and_leaves_no_partial(standin, tmp_path):
    sources = add_files(standin, tmp_path, 1)
    table = query_spherex(FIELD, tap_url=standin.tap_url)
    key = "/ibe/data/spherex/" + archive_relpath(table["url"][0]).as_posix()
    standin.faults[key] = ["drop", "drop"]
    result = fetch(table, tmp_path / "dl", backoff=0.01)
    assert len(standin.file_requests()) == 3
    assert result[0].read_bytes() == sources[0].read_bytes()
    assert _no_partials(tmp_path / "dl") == []
    # and when every attempt drops: nothing at the destination, not even a partial file
    standin.faults[key] = ["drop"] * 3
    with pytest.raises(ArchiveError, match="none of the 1 files could be fetched"):
        fetch(table, tmp_path / "dl2", retries=2, backoff=0.01)
    assert not any(p.is_file() for p in (tmp_path / "dl2").rglob("*"))


def test_fault_404_is_reported_not_retried(standin, tmp_path):
    add_files(standin, tmp_path, 3)
    table = query_spherex(FIELD, tap_url=standin.tap_url)
    key = "/ibe/data/spherex/" + archive_relpath(table["url"][1]).as_posix()
    standin.faults[key] = ["404"]
    result = fetch(table, tmp_path / "dl", backoff=0.01, workers=3)
    assert result[1] is None
    assert result[0] is not None
    assert result[2] is not None
    assert [f.index for f in result.failures] == [1]
    assert "HTTP 404" in str(result.failures[0].error)
    assert len([r for r in standin.file_requests() if r.path == key]) == 1


def test_truncated_file_from_an_earlier_run_is_detected_and_refetched(standin, tmp_path):
    sources = add_files(standin, tmp_path, 2)
    table = query_spherex(FIELD, tap_url=standin.tap_url)
    first = fetch(table, tmp_path / "dl", backoff=0.01)
    # simulate an interrupted in-place write: cut mid-data, and one cut at an HDU boundary
    data = first[0].read_bytes()
    first[0].write_bytes(data[: len(data) // 2 + 123])
    with fits.open(sources[1]) as hdul:
        n_keep = sum(len(h.header.tostring()) + h._data_size for h in hdul[:3])
    boundary = -(-n_keep // 2880) * 2880
    first[1].write_bytes(first[1].read_bytes()[:boundary])
    assert verify_fits(first[0]) is not None
    n_before = len(standin.file_requests())
    second = fetch(table, tmp_path / "dl", backoff=0.01)
    assert second.n_downloaded == 2
    assert second.n_skipped == 0
    assert len(standin.file_requests()) == n_before + 2
    for p, s in zip(second, sources, strict=True):
        assert p.read_bytes() == s.read_bytes()


def test_rerun_of_a_completed_fetch_transfers_nothing(standin, tmp_path):
    add_files(standin, tmp_path, 4)
    table = query_spherex(FIELD, tap_url=standin.tap_url)
    first = fetch(table, tmp_path / "dl", workers=4, backoff=0.01)
    n_gets = len(standin.file_requests())
    again = fetch(table, tmp_path / "dl", workers=4, backoff=0.01)
    assert list(again) == list(first)
    assert len(standin.file_requests()) == n_gets
    assert (again.n_skipped, again.n_downloaded, again.bytes_transferred) == (4, 0, 0)
    forced = fetch(table, tmp_path / "dl", overwrite=True, backoff=0.01)
    assert forced.n_downloaded == 4


def test_progress_bars_count_files_and_bytes(standin, tmp_path):
    add_files(standin, tmp_path, 3)
    table = query_spherex(FIELD, tap_url=standin.tap_url)
    bars = []

    class Bar:
        def __init__(self, **kwargs):
            self.kwargs, self.n, self.closed = kwargs, 0, False
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def close(self):
            self.closed = True

    result = fetch(table, tmp_path / "dl", progress=Bar, workers=2, backoff=0.01)
    files, nbytes = bars
    assert (files.kwargs["total"], files.n, files.closed) == (3, 3, True)
    assert nbytes.kwargs["unit"] == "B"
    assert nbytes.n == result.bytes_transferred > 0


def test_verify_fits_detects_truncation_and_missing_hdus(tmp_path):
    path = write_l2(tmp_path / "level2_x.fits")
    assert verify_fits(path, required_extnames=("IMAGE", "WCS-WAVE")) is None
    data = path.read_bytes()
    for cut in (100, 2880, len(data) // 2, len(data) - 2880, len(data) - 1):
        bad = tmp_path / f"cut{cut}.fits"
        bad.write_bytes(data[:cut])
        assert verify_fits(bad, required_extnames=("IMAGE", "ZODI", "WCS-WAVE")) is not None, cut
    assert "missing HDUs" in verify_fits(path, required_extnames=("PSF",))
    gz = tmp_path / "x.fits.gz"
    gz.write_bytes(gzip.compress(data))
    assert "not a FITS file" in verify_fits(gz)


def test_fetch_argument_errors(tmp_path):
    from astropy.table import Table

    table = Table({"url": [URL]})
    with pytest.raises(ValueError, match="'mode' must be one of"):
        fetch(table, tmp_path, mode="ftp")
    with pytest.raises(ValueError, match="'workers' must be a positive int; got 0"):
        fetch(table, tmp_path, workers=0)
    with pytest.raises(ValueError, match="'mirror_root' must be given for mode='mirror'"):
        fetch(table, mode="mirror")
    with pytest.raises(ValueError, match="'region' must be given for mode='cutout'"):
        fetch(table, tmp_path, mode="cutout")


# ----------------------------------------------------------------------------------------
# Simulated Level-2 files (drizzle3d.simulate) read back with drizzle3d.spherex
# ----------------------------------------------------------------------------------------


def _simulated_standin(server, tmp_path, release, n=3):
    import io

    from drizzle3d.simulate import make_cutout, simulate_field

    def cutout(path, center, size):
        buf = io.BytesIO()
        try:
            make_cutout(path, buf, center, size)
        except ValueError:
            return None  # IRSA answers HTTP 400 when the cutout misses the image
        return buf.getvalue()

    server.cutout = cutout
    sim = simulate_field(
        tmp_path / "sim",
        detectors=(3,),
        n_exposures=n,
        shape=(128, 128),
        center=CENTER,
        release=release,
        noise=False,
        seed=3,
    )
    for truth in sim.exposures:
        ny, nx = 128, 128
        corners = truth.wcs.pixel_to_world_values(
            np.array([-0.5, nx - 0.5, nx - 0.5, -0.5]), np.array([-0.5, -0.5, ny - 0.5, ny - 0.5])
        )
        server.add_image(
            obsid=truth.obsid,
            detector=truth.detector,
            mjd_start=truth.mjd_beg,
            poly=np.column_stack(corners),
            release=release,
            path=truth.path,
        )
    return sim


@pytest.mark.parametrize("release", ["qr2", "qr3"])
def test_simulated_full_cutout_and_mirror_open_in_the_reader_and_agree(standin, tmp_path, release):
    from drizzle3d.spherex import read_spherex

    sim = _simulated_standin(standin, tmp_path, release)
    table = query_spherex((CENTER, 3.0 / 60.0), tap_url=standin.tap_url)
    assert len(table) == len(sim.exposures)
    full = fetch(table, tmp_path / "full", backoff=0.01)
    cut = fetch(table, tmp_path / "cut", mode="cutout", backoff=0.01)
    mirror = fetch(table, mode="mirror", mirror_root=tmp_path / "full")
    cut_gets = [r for r in standin.file_requests() if "center=" in r.query]
    assert len(cut_gets) == len(table)
    assert cut.bytes_transferred < full.bytes_transferred
    truths = {t.obsid: t for t in sim.exposures}
    for obs_id, f, c, m in zip(table["obs_id"], full, cut, mirror, strict=True):
        truth = truths[obs_id]
        img_full = read_spherex(f)
        img_cut = read_spherex(c)
        img_mirror = read_spherex(m)
        np.testing.assert_array_equal(img_mirror.data, img_full.data)
        # the full file is the simulated truth, wavelengths included
        np.testing.assert_allclose(img_full.wavemap(), truth.wavemap, rtol=1e-6, atol=0)
        # where the cutout sits in the full frame
        fx0, fy0 = img_full.wave_table.parent_origin
        cx0, cy0 = img_cut.wave_table.parent_origin
        dx, dy = round(cx0 - fx0), round(cy0 - fy0)
        ny, nx = img_cut.shape
        assert 0 < ny < 128
        assert 0 < nx < 128
        # celestial WCS agrees with that offset
        expected_sky = img_full.wcs.pixel_to_world_values(dx + np.arange(nx), dy + np.zeros(nx))
        actual_sky = img_cut.wcs.pixel_to_world_values(np.arange(nx), np.zeros(nx))
        np.testing.assert_allclose(actual_sky, expected_sky, rtol=0, atol=1e-9)
        # pixels and wavelengths agree on the overlap
        box = (slice(dy, dy + ny), slice(dx, dx + nx))
        np.testing.assert_array_equal(img_cut.data, img_full.data[box])
        np.testing.assert_array_equal(img_cut.var, img_full.var[box])
        np.testing.assert_array_equal(img_cut.flags, img_full.flags[box])
        np.testing.assert_allclose(img_cut.wavemap(), img_full.wavemap()[box], rtol=1e-12, atol=0)


def test_cli_query_lists_the_overlapping_images(standin, capsys):
    # `drizzle3d query` against the local stand-in: one line per image, then the count
    from drizzle3d.cli import main

    standin.add_image(obsid="2025W01_1A_0001_1", detector=3, mjd_start=60001.0,
                      poly=square(0.05, 0.0, 0.3))  # fmt: skip
    standin.add_image(obsid="2025W01_1A_0002_1", detector=1, mjd_start=60002.0,
                      poly=square(0.0, 0.05, 0.3))  # fmt: skip
    standin.add_image(
        obsid="2025W01_1A_0003_1", detector=3, mjd_start=60003.0, poly=square(5.0, 5.0, 0.3)
    )  # fmt: skip  (far away)
    ra, dec = (str(v) for v in CENTER)
    args = ["query", "--ra", ra, "--dec", dec, "--size", "10", "--tap-url", standin.tap_url]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "2 image(s)"
    assert [ln.split()[:2] for ln in lines[:-1]] == [
        ["2025W01_1A_0001_1", "D3"],
        ["2025W01_1A_0002_1", "D1"],
    ]
    assert main([*args, "-d", "3"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "1 image(s)"
    # an unreachable service: a one-line error and a non-zero exit
    assert main(["query", "--ra", ra, "--dec", dec, "--tap-url", "http://127.0.0.1:9/TAP"]) != 0
    assert "drizzle3d: error:" in capsys.readouterr().err
