"""Quick-look plots: the white-light image is the weighted mean; every PNG is written."""

from __future__ import annotations

import numpy as np
import xarray as xr

from drizzle3d import Drizzle3D
from drizzle3d.plotting import quicklook, white_light


def test_white_light_is_weighted_mean_over_wavelength():
    d = Drizzle3D(out_shape=(3, 2, 2), wave_edges=[1.0, 2.0, 3.0, 4.0])
    ds = d.to_dataset()
    sci = np.array([1.0, 2.0, 4.0])[:, None, None] * np.ones((3, 2, 2))
    wht = np.array([1.0, 3.0, 0.0])[:, None, None] * np.ones((3, 2, 2))
    ds["sci"] = (("wavelength", "y", "x"), sci)
    ds["wht"] = (("wavelength", "y", "x"), wht)
    expected = np.full((2, 2), (1.0 * 1 + 2.0 * 3) / 4.0)
    np.testing.assert_allclose(white_light(ds).values, expected, rtol=1e-15)


def test_quicklook_writes_pngs(small_cube, tmp_path):
    from drizzle3d.pipeline import cube_dataset, extract_spectrum

    ds = cube_dataset(small_cube)
    spec = extract_spectrum(ds, 150.0, 2.0, radius=12.0, errors="naive")
    paths = quicklook(ds, tmp_path, spectrum=spec, stem="t")
    assert set(paths) == {"white_light", "coverage", "channels", "spectrum"}
    for p in paths.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert isinstance(spec, xr.Dataset)
