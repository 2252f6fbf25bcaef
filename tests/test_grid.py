"""Tests for drizzle3d.grid: builders, derived quantities and exact round trips."""

from __future__ import annotations

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from drizzle3d.channels import DETECTORS, channel_table, detector_channels, detector_range
from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid

C_UM_HZ = 299_792_458.0e6


# ---------------------------------------------------------------- spectral


@pytest.mark.parametrize("detector", DETECTORS)
def test_native_gives_17_contiguous_increasing_bins_spanning_detector(detector):
    grid = SpectralGrid.native(detector)
    rows = detector_channels(detector)
    expected_lo, expected_hi = detector_range(detector)

    assert grid.nz == 17
    assert np.all(np.diff(grid.edges) > 0)
    assert grid.edges[0] == expected_lo
    assert grid.edges[-1] == expected_hi
    # each channel's nominal wavelength falls inside its own bin
    actual_bin = np.searchsorted(grid.edges, rows["wavelength"]) - 1
    np.testing.assert_array_equal(actual_bin, np.arange(17))
    # interior edges sit midway between one channel's wl_max and the next one's wl_min
    expected_inner = 0.5 * (rows["wl_max"][:-1] + rows["wl_min"][1:])
    np.testing.assert_allclose(grid.edges[1:-1], expected_inner, rtol=0, atol=1e-15)


def test_native_accepts_detector_names():
    assert SpectralGrid.native("D4") == SpectralGrid.native(4)


def test_oversampled_has_twice_the_bins_at_target_resolving_power():
    rows = detector_channels(3)
    target = 2 * float(np.mean(rows["r"]))
    grid = SpectralGrid.oversampled(3, 2)
    lo, hi = detector_range(3)

    assert 2 * 17 - 3 <= grid.nz <= 2 * 17 + 3
    np.testing.assert_allclose(grid.resolving_power, target, rtol=0.01)
    assert grid.edges[0] == lo
    assert grid.edges[-1] >= hi
    assert grid.edges[-2] < hi  # at most one bin of overhang


def test_constant_r_spans_all_detectors():
    grid = SpectralGrid.constant_r(0.75, 5.0, 80)
    table = channel_table()
    np.testing.assert_allclose(grid.resolving_power, 80.0, rtol=1e-9)
    assert grid.edges[0] == 0.75
    assert grid.edges[-1] >= 5.0
    # every channel centre of every detector falls inside the cube's range
    assert np.all((table["wavelength"] > grid.edges[0]) & (table["wavelength"] < grid.edges[-1]))
    # number of bins follows from log spacing: ln(5/0.75) / ln((2R+1)/(2R-1))
    expected_nz = int(np.ceil(np.log(5.0 / 0.75) / np.log(161 / 159)))
    assert grid.nz == expected_nz


def test_frequencies_widths_and_resolving_power():
    edges = np.array([1.0, 1.1, 1.3, 2.0])
    grid = SpectralGrid.from_edges(edges)
    expected_centers = np.array([1.05, 1.2, 1.65])
    expected_widths = np.array([0.1, 0.2, 0.7])
    np.testing.assert_allclose(grid.centers, expected_centers, rtol=1e-15)
    np.testing.assert_allclose(grid.widths, expected_widths, rtol=1e-12)
    np.testing.assert_allclose(grid.frequencies, C_UM_HZ / expected_centers, rtol=1e-15)
    expected_dnu = C_UM_HZ / edges[:-1] - C_UM_HZ / edges[1:]
    np.testing.assert_allclose(grid.frequency_widths, expected_dnu, rtol=1e-12)
    assert np.all(grid.frequency_widths > 0)
    np.testing.assert_allclose(grid.resolving_power, expected_centers / expected_widths, rtol=1e-12)


def test_edges_are_read_only_copies():
    edges = np.array([1.0, 2.0, 3.0])
    grid = SpectralGrid(edges)
    edges[0] = 0.5
    assert grid.edges[0] == 1.0
    with pytest.raises(ValueError, match="read-only"):
        grid.edges[0] = 0.1


@pytest.mark.parametrize(
    ("edges", "match"),
    [
        ([1.0], "at least 2"),
        ([1.0, 1.0, 2.0], "strictly increasing"),
        ([-1.0, 2.0], "positive"),
        ([1.0, np.nan], "finite"),
    ],
)
def test_bad_edges_rejected(edges, match):
    with pytest.raises(ValueError, match=match):
        SpectralGrid.from_edges(edges)


def test_bad_builder_arguments_rejected():
    with pytest.raises(ValueError, match="'detector' must be one of"):
        SpectralGrid.native(7)
    with pytest.raises(ValueError, match="'factor' must be a positive"):
        SpectralGrid.oversampled(1, 0)
    with pytest.raises(ValueError, match="'lam_min' and 'lam_max' must satisfy"):
        SpectralGrid.constant_r(2.0, 1.0, 40)
    with pytest.raises(ValueError, match="'R' must be"):
        SpectralGrid.constant_r(1.0, 2.0, 0.2)


# ---------------------------------------------------------------- spatial


def _angle_between(ra1, dec1, ra2, dec2):
    r1, d1, r2, d2 = np.radians([ra1, dec1, ra2, dec2])
    c = np.sin(d1) * np.sin(d2) + np.cos(d1) * np.cos(d2) * np.cos(r1 - r2)
    return np.degrees(np.arccos(np.clip(c, -1, 1)))


def test_from_center_geometry():
    grid = SpatialGrid.from_center(150.0, 2.0, 30, 20, pixscale=6.15, rotation=0.0)
    expected_shape = (int(np.ceil(20 * 60 / 6.15)), int(np.ceil(30 * 60 / 6.15)))
    assert grid.shape == expected_shape
    ny, nx = grid.shape
    ra, dec = grid.wcs.pixel_to_world_values((nx - 1) / 2, (ny - 1) / 2)
    assert _angle_between(ra, dec, 150.0, 2.0) * 3600 < 1e-6
    np.testing.assert_allclose(grid.pixel_scale, 6.15, rtol=1e-6)
    # north up, east left
    cx, cy = (nx - 1) / 2, (ny - 1) / 2
    r0, d0 = grid.wcs.pixel_to_world_values(cx, cy)
    r1, d1 = grid.wcs.pixel_to_world_values(cx, cy + 10)
    r2, _ = grid.wcs.pixel_to_world_values(cx + 10, cy)
    assert d1 > d0
    assert abs(r1 - r0) < 1e-9
    assert r2 < r0


@pytest.mark.parametrize("rotation", [30.0, -75.0, 180.0])
def test_from_center_rotation_is_position_angle_of_plus_y(rotation):
    grid = SpatialGrid.from_center(10.0, -20.0, 10, 10, rotation=rotation)
    ny, nx = grid.shape
    cx, cy = (nx - 1) / 2, (ny - 1) / 2
    ra0, dec0 = grid.wcs.pixel_to_world_values(cx, cy)
    ra1, dec1 = grid.wcs.pixel_to_world_values(cx, cy + 1.0)
    # position angle east of north
    d_ra = np.radians(ra1 - ra0)
    pa = np.degrees(
        np.arctan2(
            np.sin(d_ra) * np.cos(np.radians(dec1)),
            np.cos(np.radians(dec0)) * np.sin(np.radians(dec1))
            - np.sin(np.radians(dec0)) * np.cos(np.radians(dec1)) * np.cos(d_ra),
        )
    )
    expected = (rotation + 180) % 360 - 180
    actual = (pa + 180) % 360 - 180
    assert abs(((actual - expected) + 180) % 360 - 180) < 1e-6


def test_from_center_accepts_quantities():
    expected = SpatialGrid.from_center(10.0, 5.0, 12.0, 6.0, pixscale=3.0, rotation=15.0)
    actual = SpatialGrid.from_center(
        10.0 * u.deg, 5.0 * u.deg, 0.2 * u.deg, 360 * u.arcsec, 3.0 * u.arcsec, 15.0 * u.deg
    )
    assert actual == expected


def test_from_center_rejects_bad_values():
    with pytest.raises(ValueError, match="'width' must be positive"):
        SpatialGrid.from_center(0.0, 0.0, -1, 1)
    with pytest.raises(ValueError, match="'dec' must be within"):
        SpatialGrid.from_center(0.0, 95.0, 1, 1)
    with pytest.raises(ValueError, match="'width' must be an angle"):
        SpatialGrid.from_center(0.0, 0.0, 1 * u.kg, 1)


def test_from_wcs_copies_and_rejects_distortion():
    base = SpatialGrid.from_center(30.0, 40.0, 5, 5)
    w = base.wcs.deepcopy()
    grid = SpatialGrid.from_wcs(w, base.shape)
    w.wcs.crval = [0.0, 0.0]
    assert grid == base
    sip = WCS(naxis=2)
    sip.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    from astropy.wcs import Sip

    sip.sip = Sip(np.zeros((3, 3)), np.zeros((3, 3)), None, None, [1.0, 1.0])
    with pytest.raises(ValueError, match="free of distortions"):
        SpatialGrid.from_wcs(sip, (10, 10))
    with pytest.raises(TypeError, match="'wcs' must be a 2-D celestial"):
        SpatialGrid.from_wcs(WCS(naxis=3), (10, 10))


def _all_corners_inside(grid, wcs, shape):
    ny, nx = shape
    x = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5, (nx - 1) / 2])
    y = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5, (ny - 1) / 2])
    gx, gy = grid.wcs.world_to_pixel_values(*wcs.pixel_to_world_values(x, y))
    gny, gnx = grid.shape
    tol = 1e-6
    return bool(
        np.all(gx >= -0.5 - tol)
        and np.all(gx <= gnx - 0.5 + tol)
        and np.all(gy >= -0.5 - tol)
        and np.all(gy <= gny - 0.5 + tol)
    )


@pytest.mark.parametrize(("ra", "dec"), [(150.0, 2.0), (359.95, 10.0), (42.0, 88.5)])
def test_covering_contains_every_input_and_is_tight(ra, dec):
    images = [
        SpatialGrid.from_center(ra, dec, 20, 10, rotation=25.0),
        SpatialGrid.from_center((ra + 0.1) % 360, dec - 0.1, 10, 10, rotation=-40.0),
        SpatialGrid.from_center((ra - 0.05) % 360, dec + 0.15, 8, 12, rotation=90.0),
    ]
    wcs_list = [g.wcs for g in images]
    shapes = [g.shape for g in images]
    for rotation in (None, 0.0):
        grid = SpatialGrid.covering(wcs_list, shapes, rotation=rotation)
        assert np.isclose(grid.pixel_scale, 6.15, rtol=1e-6)
        for w, s in zip(wcs_list, shapes, strict=True):
            assert _all_corners_inside(grid, w, s)
        # tight: shrinking either axis by 2 pixels would lose some corner
        ny, nx = grid.shape
        for d_shape in ((ny - 2, nx), (ny, nx - 2)):
            w = grid.wcs.deepcopy()
            w.wcs.crpix = [
                w.wcs.crpix[0] - (nx - d_shape[1]) / 2,
                w.wcs.crpix[1] - (ny - d_shape[0]) / 2,
            ]
            smaller = SpatialGrid.from_wcs(w, d_shape)
            assert not all(
                _all_corners_inside(smaller, wi, si)
                for wi, si in zip(wcs_list, shapes, strict=True)
            )
    area_free = np.prod(SpatialGrid.covering(wcs_list, shapes).shape)
    area_north = np.prod(SpatialGrid.covering(wcs_list, shapes, rotation=0.0).shape)
    assert area_free <= area_north


def test_covering_single_rotated_image_recovers_it():
    image = SpatialGrid.from_center(200.0, -30.0, 15, 10, rotation=33.0)
    grid = SpatialGrid.covering([image.wcs], [image.shape])
    # the tangent point (mean of the outline) differs slightly from the image's,
    # so the reprojected outline may need one more pixel per axis
    expected, actual = sorted(image.shape), sorted(grid.shape)
    assert expected[0] <= actual[0] <= expected[0] + 1
    assert expected[1] <= actual[1] <= expected[1] + 1


def test_covering_pixscale_argument():
    image = SpatialGrid.from_center(200.0, -30.0, 15, 10)
    grid = SpatialGrid.covering([image.wcs], image.shape, pixscale=12.3, rotation=0)
    np.testing.assert_allclose(grid.pixel_scale, 12.3, rtol=1e-6)
    expected = (int(np.ceil(image.shape[0] / 2)), int(np.ceil(image.shape[1] / 2)))
    assert abs(grid.shape[0] - expected[0]) <= 1
    assert abs(grid.shape[1] - expected[1]) <= 1


def test_world_coords_shape_and_centre():
    grid = SpatialGrid.from_center(83.6331, 22.0145, 3.1, 3.1)  # 31 x 31: centre on a pixel
    assert grid.shape == (31, 31)
    ra, dec = grid.world_coords()
    assert ra.shape == grid.shape
    ny, nx = grid.shape
    assert _angle_between(ra[ny // 2, nx // 2], dec[ny // 2, nx // 2], 83.6331, 22.0145) < 1e-9


# ---------------------------------------------------------------- round trips


def _grids():
    spatial = [
        SpatialGrid.from_center(150.1234567, 2.2098765, 30, 30),
        SpatialGrid.from_center(359.99, -89.3, 7.3, 11.1, pixscale=3.3, rotation=123.456),
        SpatialGrid.from_center(0.0, 0.0, 1, 2, pixscale=1 / 3, rotation=-0.1),
    ]
    spectral = [
        SpectralGrid.native(1),
        SpectralGrid.oversampled(4, 3),
        SpectralGrid.constant_r(0.75, 5.0, 80),
        SpectralGrid.from_edges([1.0, 1.5, 2.0, 2.5]),
        SpectralGrid.from_edges(np.sort(np.random.default_rng(1).uniform(0.7, 5.0, 40))),
    ]
    return [OutputGrid(s, w) for s in spatial for w in spectral]


GRIDS = _grids()


@pytest.mark.parametrize("grid", GRIDS)
def test_dict_round_trip_is_exact(grid):
    data = grid.to_dict()
    actual = OutputGrid.from_dict(data)
    assert actual == grid
    np.testing.assert_array_equal(actual.wave_edges, grid.wave_edges)
    np.testing.assert_array_equal(actual.spatial.wcs.wcs.crval, grid.spatial.wcs.wcs.crval)
    np.testing.assert_array_equal(actual.spatial.wcs.wcs.cdelt, grid.spatial.wcs.wcs.cdelt)
    np.testing.assert_array_equal(actual.spatial.wcs.wcs.get_pc(), grid.spatial.wcs.wcs.get_pc())


@pytest.mark.parametrize("grid", GRIDS)
def test_yaml_round_trip_is_exact(grid, tmp_path):
    text = grid.to_yaml()
    assert OutputGrid.from_yaml(text) == grid
    path = tmp_path / "grid.yaml"
    grid.to_yaml(path)
    actual = OutputGrid.from_yaml(path)
    assert actual == grid
    np.testing.assert_array_equal(actual.wave_edges, grid.wave_edges)


@pytest.mark.parametrize("grid", GRIDS)
def test_fits_header_round_trip_is_exact(grid, tmp_path):
    header = grid.to_header()
    # through text and through a real file with a data array
    assert OutputGrid.from_header(fits.Header.fromstring(header.tostring())) == grid
    data = np.zeros(grid.shape, dtype=np.float32)
    path = tmp_path / "cube.fits"
    fits.PrimaryHDU(data, header=header).writeto(path)
    actual = OutputGrid.from_header(fits.getheader(path))
    assert actual == grid
    np.testing.assert_array_equal(actual.wave_edges, grid.wave_edges)
    w = WCS(fits.getheader(path))
    assert w.naxis == 3
    assert w.has_celestial
    assert w.has_spectral


def test_header_spectral_axis_is_readable_wcs():
    grid = OutputGrid(
        SpatialGrid.from_center(10.0, 10.0, 2, 2), SpectralGrid.constant_r(1.0, 2.0, 50)
    )
    w = WCS(grid.to_header())
    spec = w.sub([3])
    # WAVE-LOG: pixel centres at the geometric mean of the bin edges
    expected = np.sqrt(grid.wave_edges[:-1] * grid.wave_edges[1:])
    actual = spec.pixel_to_world_values(np.arange(grid.spectral.nz, dtype=float))
    np.testing.assert_allclose(
        actual, expected * 1e-6 if spec.wcs.cunit[0] == "m" else expected, rtol=1e-10
    )


def test_spectral_from_generic_linear_cube_header():
    header = fits.Header()
    header["NAXIS"] = 3
    header["NAXIS3"] = 4
    header["CTYPE3"] = "WAVE"
    header["CUNIT3"] = "um"
    header["CRPIX3"] = 1.0
    header["CRVAL3"] = 1.05
    header["CDELT3"] = 0.1
    actual = SpectralGrid.from_header(header)
    np.testing.assert_allclose(actual.edges, [1.0, 1.1, 1.2, 1.3, 1.4], rtol=1e-12)


def test_equality_distinguishes_grids():
    a = SpatialGrid.from_center(10.0, 10.0, 2, 2)
    b = SpatialGrid.from_center(10.0, 10.0, 2, 2, rotation=1e-9)
    assert a != b
    assert SpectralGrid.native(1) != SpectralGrid.native(2)
    assert OutputGrid(a, SpectralGrid.native(1)) != OutputGrid(b, SpectralGrid.native(1))
    assert (a == "a") is False


def test_output_grid_contract():
    grid = OutputGrid(SpatialGrid.from_center(10.0, 10.0, 2, 3), SpectralGrid.native(6))
    assert grid.shape == (17, *grid.spatial.shape)
    np.testing.assert_array_equal(grid.wave_edges, SpectralGrid.native(6).edges)
    assert "CTYPE1" in grid.spatial.header_string()
    with pytest.raises(TypeError, match="'spatial' must be a SpatialGrid"):
        OutputGrid("x", SpectralGrid.native(6))
