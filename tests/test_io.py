"""Cube files: FITS / netCDF / zarr round trips, the FITS WCS, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from astropy.io import fits
from astropy.wcs import WCS

from drizzle3d import Drizzle3D
from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid
from drizzle3d.io import guess_format, load_cube, save_cube
from drizzle3d.pipeline import cube_dataset


@pytest.fixture(scope="module")
def dataset(small_cube):
    return cube_dataset(small_cube, detector=3)


@pytest.mark.parametrize("name", ["cube.nc", "cube.zarr"])
def test_netcdf_zarr_round_trip_identical(dataset, tmp_path, name):
    path = save_cube(dataset, tmp_path / name)
    actual = load_cube(path)
    xr.testing.assert_identical(actual, dataset)


def test_fits_round_trip_double_identical(dataset, tmp_path):
    path = save_cube(dataset, tmp_path / "cube.fits", precision="double")
    actual = load_cube(path)
    xr.testing.assert_identical(actual, dataset)


@pytest.mark.parametrize("precision", ["single", "double"])
def test_fits_streamed_from_cube_equals_dataset_path(small_cube, dataset, tmp_path, precision):
    # a Drizzle3D is written output by output, straight from its accumulators
    from drizzle3d.pipeline import _run_attrs

    streamed = save_cube(small_cube, tmp_path / "a.fits", precision=precision,
                         attrs=_run_attrs(small_cube, 3))  # fmt: skip
    via_ds = save_cube(dataset, tmp_path / "b.fits", precision=precision)
    with fits.open(streamed) as a, fits.open(via_ds) as b:
        assert [h.name for h in a] == [h.name for h in b]
        for ha, hb in zip(a, b, strict=True):
            assert ha.header == hb.header
            if ha.data is None:
                assert hb.data is None
            elif isinstance(ha, fits.BinTableHDU):
                assert ha.data.tobytes() == hb.data.tobytes()
            else:
                np.testing.assert_array_equal(ha.data, hb.data)
    xr.testing.assert_identical(load_cube(streamed), load_cube(via_ds))


def test_fits_streamed_save_holds_one_output_at_a_time(small_cube, tmp_path, monkeypatch):
    # outputs are computed when the writer reaches them and released after writing
    import gc
    import weakref

    from drizzle3d import io

    alive = []
    real = io._append_hdu

    def spy(path, hdu):
        gc.collect()
        alive.append(sum(r() is not None for r in refs))
        real(path, hdu)

    refs = []

    def items():
        for name, arr in small_cube._output_items():
            refs.append(weakref.ref(arr.variable._data))
            yield name, arr

    monkeypatch.setattr(io, "_append_hdu", spy)
    io._write_fits_items(items(), small_cube._dataset_attrs(), tmp_path / "c.fits", "single")
    assert len(refs) >= 8
    assert max(alive) <= 1, alive


def test_fits_round_trip_single_is_float32_of_data(dataset, tmp_path):
    path = save_cube(dataset, tmp_path / "cube.fits")
    actual = load_cube(path)
    assert actual["sci"].dtype == np.float32
    expected = dataset["sci"].values.astype(np.float32)
    np.testing.assert_array_equal(actual["sci"].values, expected)
    np.testing.assert_array_equal(actual["var"].values, dataset["var"].values.astype(np.float32))
    np.testing.assert_array_equal(actual["wave"].values, dataset["wave"].values)
    np.testing.assert_array_equal(actual["and_mask"].values, dataset["and_mask"].values)
    xr.testing.assert_identical(actual.coords.to_dataset(), dataset.coords.to_dataset())
    xr.testing.assert_identical(xr.Dataset(attrs=actual.attrs), xr.Dataset(attrs=dataset.attrs))


def test_fits_layout(dataset, tmp_path):
    path = save_cube(dataset, tmp_path / "cube.fits")
    with fits.open(path) as hdul:
        names = [h.name for h in hdul]
        for ext in ("SCI", "VARIANCE", "AND_MASK", "OR_MASK", "COUNT", "WAVELENGTH", "WAVE_EFF"):
            assert ext in names
        assert hdul["AND_MASK"].data.dtype.kind == "u"
        assert hdul[0].header["NINPUTS"] == dataset.attrs["n_images"]
        table = hdul["WAVELENGTH"].data
        assert list(table.columns.names) == [
            "INDEX", "LAMBDA", "LAMBDA_MIN", "LAMBDA_MAX", "DLAMBDA", "NU", "DNU", "R_EFF",
        ]  # fmt: skip
        np.testing.assert_array_equal(table["LAMBDA"], dataset["wavelength"].values)


@pytest.mark.parametrize(
    "spectral",
    [SpectralGrid.oversampled(3, 2), SpectralGrid.from_edges(np.linspace(1.7, 2.3, 13))],
    ids=["constant_r", "linear"],
)
def test_fits_3d_wcs_maps_pixel_centres(tmp_path, spectral):
    grid = OutputGrid(SpatialGrid.from_center(210.8, 54.35, 5.0, 4.0, rotation=25.0), spectral)
    dataset = Drizzle3D(grid).to_dataset()
    path = save_cube(dataset, tmp_path / "cube.fits")
    with fits.open(path) as hdul:
        w = WCS(hdul["SCI"].header)
        assert WCS(hdul["VARIANCE"].header).naxis == 3
    assert w.naxis == 3
    ny, nx = dataset.sizes["y"], dataset.sizes["x"]
    nz = dataset.sizes["wavelength"]
    xs = np.array([0, nx - 1, nx // 2, 3])
    ys = np.array([0, ny - 1, ny // 3, 7])
    for k in (0, nz // 2, nz - 1):
        ra, dec, lam = w.pixel_to_world_values(xs, ys, np.full(xs.shape, k))
        np.testing.assert_allclose(ra, dataset["ra"].values[ys, xs], rtol=0, atol=1e-9)
        np.testing.assert_allclose(dec, dataset["dec"].values[ys, xs], rtol=0, atol=1e-9)
        lam_um = lam * 1e6  # astropy returns the FITS spectral axis in SI (m)
        lo, hi = spectral.edges[k], spectral.edges[k + 1]
        # linear axis: the arithmetic bin centre; WAVE-LOG: the geometric mean of the edges
        expected = 0.5 * (lo + hi) if spectral.edges.size == 13 else np.sqrt(lo * hi)
        np.testing.assert_allclose(lam_um, expected, rtol=1e-10)


def test_fits_opens_with_spectral_cube(dataset, tmp_path):
    spectral_cube = pytest.importorskip("spectral_cube")
    path = save_cube(dataset, tmp_path / "cube.fits")
    cube = spectral_cube.SpectralCube.read(path, hdu="SCI")
    assert cube.shape == dataset["sci"].shape


def test_existing_output_is_not_clobbered(dataset, tmp_path):
    path = tmp_path / "cube.nc"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="'path' must not exist unless overwrite=True"):
        save_cube(dataset, path)
    assert path.read_bytes() == b"precious"
    save_cube(dataset, path, overwrite=True)
    assert load_cube(path)["sci"].shape == dataset["sci"].shape


@pytest.mark.parametrize("name", ["cube.fits", "cube.nc", "cube.zarr"])
def test_interrupted_save_leaves_no_partial_file(dataset, tmp_path, monkeypatch, name):
    import drizzle3d.io as io_mod

    class Boom(RuntimeError):
        pass

    def explode(*args, **kwargs):
        raise Boom("simulated failure during write")

    if name.endswith(".fits"):
        monkeypatch.setattr(fits.HDUList, "writeto", explode)
    elif name.endswith(".nc"):
        monkeypatch.setattr(xr.Dataset, "to_netcdf", explode)
    else:
        monkeypatch.setattr(xr.Dataset, "to_zarr", explode)
    with pytest.raises(Boom):
        io_mod.save_cube(dataset, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_old_file(dataset, tmp_path, monkeypatch):
    path = save_cube(dataset, tmp_path / "cube.fits")
    before = path.read_bytes()

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fits.HDUList, "writeto", explode)
    with pytest.raises(KeyboardInterrupt):
        save_cube(dataset, path, overwrite=True)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["cube.fits"]


def test_bad_arguments(dataset, tmp_path):
    with pytest.raises(ValueError, match="'path' must end in one of"):
        guess_format(tmp_path / "cube.txt")
    with pytest.raises(ValueError, match="'format' must be one of"):
        save_cube(dataset, tmp_path / "cube.fits", format="hdf4")
    with pytest.raises(TypeError, match=r"'cube' must be a Drizzle3D or an xarray\.Dataset"):
        save_cube(np.zeros(3), tmp_path / "cube.fits")
    with pytest.raises(FileNotFoundError, match="'path' must be an existing cube"):
        load_cube(tmp_path / "nope.fits")
