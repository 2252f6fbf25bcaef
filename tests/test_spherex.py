"""Tests of drizzle3d.spherex against simulated Level-2 files whose truth is known."""

from __future__ import annotations

import io
import pickle
import shutil

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

import drizzle3d.spherex as spx
from drizzle3d.simulate import (
    FLAG_BITS,
    lvf_wavelength,
    make_cutout,
    simulate_field,
    write_spectral_wcs_calibration,
)
from drizzle3d.spherex import (
    DEFAULT_EXCLUDE_FLAGS,
    SpherexFileError,
    ZodiFitWarning,
    fit_zodi_scale,
    flag_bits,
    flag_names,
    read_spherex,
    spectral_wavemap,
)

SHAPE = (200, 180)


@pytest.fixture(scope="module", params=["qr2", "qr3"])
def field(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    return simulate_field(
        out, n_exposures=2, shape=SHAPE, release=request.param, cosmic_rays=1e-3, seed=11
    )


@pytest.fixture(scope="module")
def qr2_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("qr2one")
    f = simulate_field(out, n_exposures=1, shape=(96, 80), release="qr2", seed=3)
    return f.paths[0]


def _astropy_wavemap(path, shape, *, remove_sip=True):
    with fits.open(path) as hdul:
        w = WCS(hdul["IMAGE"].header, fobj=hdul, key="W")
    if remove_sip:
        w.sip = None
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    lam, bw = w.pixel_to_world_values(xx, yy)
    return np.stack([lam, bw], axis=-1)


# Must show 1 + 2: both releases read, round trip of arrays, WCSs and wavelengths.
def test_round_trip_arrays_and_metadata(field):
    expo = field.exposures[0]
    im = read_spherex(expo.path)
    with fits.open(expo.path) as hdul:
        expected = {n: np.asarray(hdul[n].data) for n in ("IMAGE", "VARIANCE", "FLAGS", "ZODI")}
        release_hdu = "EPSF" if "EPSF" in hdul else "PSF"
    np.testing.assert_array_equal(im.data, expected["IMAGE"])
    np.testing.assert_array_equal(im.var, expected["VARIANCE"])
    np.testing.assert_array_equal(im.flags, expected["FLAGS"])
    np.testing.assert_array_equal(im.zodi, expected["ZODI"])
    assert im.data.dtype == np.float32
    assert im.flags.dtype == np.int32
    assert im.meta.detector == 3
    assert im.meta.obsid == expo.obsid
    assert im.meta.mjd_beg == pytest.approx(expo.mjd_beg)
    assert im.meta.mjd_beg < im.meta.mjd_mid < im.meta.mjd_end
    assert im.meta["psf_fwhm"] == pytest.approx(6.0)
    assert im.meta.release == ("qr3" if release_hdu == "EPSF" else "qr2")
    assert im.meta.flags["SOURCE"] == 21
    assert im.bbox == (0, SHAPE[0], 0, SHAPE[1])
    # Injected truth: NaN only where MISSING_DATA was set, noisy data scatter like the variance.
    missing = (im.flags & (1 << FLAG_BITS["MISSING_DATA"])) != 0
    np.testing.assert_array_equal(~np.isfinite(im.data), missing)


def test_round_trip_celestial_wcs(field):
    expo = field.exposures[1]
    im = read_spherex(expo.path)
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.5, SHAPE[1] - 0.5, 500)
    y = rng.uniform(-0.5, SHAPE[0] - 0.5, 500)
    expected = np.array(expo.wcs.pixel_to_world_values(x, y))
    actual = np.array(im.wcs.pixel_to_world_values(x, y))
    assert np.max(np.abs(actual - expected)) < 1e-10
    assert im.wcs.sip is not None
    assert im.wcs.wcs.ctype[0] == "RA---TAN-SIP"


def test_wavemap_matches_truth_and_astropy_per_pixel(field):
    expo = field.exposures[0]
    im = read_spherex(expo.path)
    actual = im.wavemap()
    assert actual.shape == (*SHAPE, 2)
    assert actual.dtype == np.float64
    expected_truth = expo.wavemap
    expected_astropy = _astropy_wavemap(expo.path, SHAPE)
    err_truth = np.max(np.abs(actual - expected_truth))
    err_astropy = np.max(np.abs(actual - expected_astropy))
    assert err_truth < 1e-5, err_truth
    assert err_astropy < 1e-5, err_astropy
    # The reader's own spectral WCS (SIP removed) agrees too.
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]].astype(float)
    lam, bw = im.spectral_wcs.pixel_to_world_values(xx, yy)
    assert np.max(np.abs(np.stack([lam, bw], -1) - expected_truth)) < 1e-5
    assert im.spectral_wcs.sip is None


def test_sip_guard_matters(field):
    """astropy applies the celestial SIP to the W WCS unless removed; the reader removes it."""
    expo = field.exposures[0]
    wrong = _astropy_wavemap(expo.path, SHAPE, remove_sip=False)
    expected = expo.wavemap
    assert np.nanmax(np.abs(wrong[..., 0] - expected[..., 0])) > 1e-4  # the bug is real here
    im = read_spherex(expo.path)
    assert np.max(np.abs(im.wavemap() - expected)) < 1e-5


def test_wavelength_orientation(field):
    wm = read_spherex(field.paths[0]).wavemap()
    lam = wm[..., 0]
    assert np.all(np.diff(lam, axis=0) < 0)  # falls with y in every column
    row = lam[0]
    assert np.argmin(row) in range(SHAPE[1] // 2 - 2, SHAPE[1] // 2 + 2)  # curved iso-lambda
    lo, hi = lvf_wavelength(3, [SHAPE[1] / 2 + 0.5] * 2, [SHAPE[0], 1], shape=SHAPE)[0]
    assert lam.min() == pytest.approx(lo, abs=2e-3)
    assert lam.max() > hi


# Must show 3: bbox reads are slices of a full read, with shifted WCSs.
@pytest.mark.parametrize("bbox", [(0, 50, 0, 40), (37, 141, 55, 180), (199, 200, 0, 180)])
def test_bbox_equals_slice_of_full_read(field, bbox):
    path = field.paths[1]
    full = read_spherex(path)
    part = read_spherex(path, bbox=bbox)
    y0, y1, x0, x1 = bbox
    sl = (slice(y0, y1), slice(x0, x1))
    for name in ("data", "var", "flags", "zodi"):
        np.testing.assert_array_equal(getattr(part, name), getattr(full, name)[sl])
    assert part.bbox == bbox
    np.testing.assert_array_equal(part.wavemap(), full.wavemap()[sl])
    np.testing.assert_array_equal(spectral_wavemap(path, bbox=bbox), full.wavemap()[sl])
    yy, xx = np.mgrid[0 : y1 - y0, 0 : x1 - x0].astype(float)
    expected_sky = np.array(full.wcs.pixel_to_world_values(xx + x0, yy + y0))
    actual_sky = np.array(part.wcs.pixel_to_world_values(xx, yy))
    assert np.max(np.abs(actual_sky - expected_sky)) < 1e-10
    expected_w = np.array(full.spectral_wcs.pixel_to_world_values(xx + x0, yy + y0))
    actual_w = np.array(part.spectral_wcs.pixel_to_world_values(xx, yy))
    assert np.max(np.abs(actual_w - expected_w)) < 1e-10


@pytest.mark.parametrize("bbox", [(0, 0, 0, 10), (-1, 5, 0, 5), (0, 201, 0, 5), (0, 5, 3, 2)])
def test_bad_bbox_rejected(field, bbox):
    with pytest.raises(ValueError, match="'bbox' must be"):
        read_spherex(field.paths[0], bbox=bbox)


# Must show 1: cutouts (IRSA-style) read and give the full file's wavelengths.
def test_cutout_reads_with_same_wavelengths_and_sky(field, tmp_path):
    path = field.paths[0]
    full = read_spherex(path)
    ra, dec = full.wcs.pixel_to_world_values(120.3, 61.8)
    out = tmp_path / "cut.fits"
    ymin, ymax, xmin, xmax = make_cutout(path, out, (float(ra), float(dec)), 40, size_unit="px")
    assert (ymax - ymin, xmax - xmin) == (40, 40)
    cut = read_spherex(out)
    sl = (slice(ymin, ymax), slice(xmin, xmax))
    np.testing.assert_array_equal(cut.data, full.data[sl])
    np.testing.assert_array_equal(cut.flags, full.flags[sl])
    assert np.max(np.abs(cut.wavemap() - full.wavemap()[sl])) < 1e-12
    expected_w = _astropy_wavemap(path, SHAPE)[sl]
    assert np.max(np.abs(_astropy_wavemap(out, (40, 40)) - expected_w)) < 1e-5
    yy, xx = np.mgrid[0:40, 0:40].astype(float)
    expected_sky = np.array(full.wcs.pixel_to_world_values(xx + xmin, yy + ymin))
    assert np.max(np.abs(np.array(cut.wcs.pixel_to_world_values(xx, yy)) - expected_sky)) < 1e-10
    with fits.open(path) as a, fits.open(out) as b:
        assert [h.name for h in a] == [h.name for h in b]
        assert b["IMAGE"].header["CRPIX1W"] == 1 - xmin
        assert b["IMAGE"].header["CRPIX2A"] == 1 - ymin
        np.testing.assert_array_equal(a["WCS-WAVE"].data["VALUES"], b["WCS-WAVE"].data["VALUES"])
        psf = "EPSF" if "EPSF" in a else "PSF"
        assert a[psf].header == b[psf].header
    assert cut.meta.release == full.meta.release
    # A cutout of a cutout (bbox read of a cutout) still maps to the same parent wavelengths.
    sub = read_spherex(out, bbox=(5, 15, 10, 30))
    np.testing.assert_array_equal(
        sub.wavemap(), full.wavemap()[ymin + 5 : ymin + 15, xmin + 10 : xmin + 30]
    )


def test_gzipped_cutout_reads(field, tmp_path):
    out = tmp_path / "cut.fits.gz"
    full = read_spherex(field.paths[1])
    ymin, ymax, xmin, xmax = make_cutout(
        field.paths[1], out, (90, 100), (30, 20), center_unit="px", size_unit="px", gzip=True
    )
    assert out.read_bytes()[:2] == b"\x1f\x8b"
    cut = read_spherex(out)
    np.testing.assert_array_equal(cut.data, full.data[ymin:ymax, xmin:xmax])
    assert cut.data.shape == (20, 30)


def test_cutout_without_overlap_is_an_error(field, tmp_path):
    with pytest.raises(ValueError, match="overlapping"):
        make_cutout(
            field.paths[0], tmp_path / "x.fits", (500, 500), 10, center_unit="px", size_unit="px"
        )


# Spectral-WCS calibration file (CWAVE/CBAND).
def test_calibration_wavemap(field, tmp_path):
    cal = write_spectral_wcs_calibration(tmp_path / "cal.fits", 3, shape=SHAPE)
    im = read_spherex(field.paths[0], bbox=(10, 60, 20, 70), calibration=cal)
    yy, xx = np.mgrid[10:60, 20:70].astype(float)
    lam, bw = lvf_wavelength(3, xx + 1, yy + 1, shape=SHAPE)
    expected = np.stack([lam, bw], -1)
    actual = im.wavemap()
    assert np.max(np.abs(actual - expected)) < 1e-6  # float32 storage
    table = (
        im.wavemap(calibration=None)
        if im.calibration is None
        else spectral_wavemap(field.paths[0], bbox=(10, 60, 20, 70))
    )
    # The table approximates the calibration (compressed LVF: a few nm on a small frame).
    assert 0 < np.max(np.abs(table[..., 0] - expected[..., 0])) < 0.01
    with pytest.raises(SpherexFileError, match="detector"):
        spectral_wavemap(
            field.paths[0],
            calibration=write_spectral_wcs_calibration(tmp_path / "cal1.fits", 1, shape=SHAPE),
        )


# Flags.
def test_flag_bits_names_case_and_unknown():
    expected = (1 << 1) | (1 << 6) | (1 << 10)
    assert flag_bits(["OVERFLOW", "nonfunc", "MP_Hot"]) == expected
    assert flag_bits("SOURCE") == 1 << 21
    with pytest.raises(ValueError, match=r"known flag names.*TRANSIENT"):
        flag_bits(["HOT", "NOT_A_FLAG"])
    assert "SOURCE" not in DEFAULT_EXCLUDE_FLAGS
    assert flag_bits(DEFAULT_EXCLUDE_FLAGS) & (1 << 21) == 0


def test_flag_names_from_both_keyword_styles():
    qr2 = fits.Header()
    qr2["HIERARCH MP_HOT"] = 3  # deliberately unlike the table
    qr2["MP_COLD"] = 11
    qr3 = fits.Header()
    qr3["MSKN0004"] = "HOT"
    qr3["MSKN0030"] = "NEWFLAG"
    assert flag_names(qr2)["HOT"] == 3
    assert flag_names(qr3)["HOT"] == 4
    assert flag_bits(["newflag"], qr3) == 1 << 30
    assert flag_names(qr3)["SOURCE"] == 21  # fallback table
    assert "PHANTOM" not in flag_names(qr3)  # bit 4 renamed by the header


def test_flags_read_from_each_file(field):
    im = read_spherex(field.paths[0])
    expo = field.exposures[0]
    bad = im.exclude_mask()
    # Every injected bad pixel and flagged cosmic ray is excluded; the rest are not.
    expected = expo.bad_pixels | expo.cosmic_rays
    np.testing.assert_array_equal(bad, expected)


# Must show 4: fitted zodi amplitude.
def test_zodi_fit_recovers_known_scale(tmp_path):
    expected = 1.07
    f = simulate_field(
        tmp_path,
        n_exposures=1,
        shape=(256, 256),
        zodi_scale=expected,
        cosmic_rays=2e-3,
        cosmic_rays_flagged=False,
        flagged_fraction=0.01,
        seed=5,
    )
    im = read_spherex(f.paths[0], subtract_zodi=True, zodi="fit")
    actual = im.meta.zodi_scale
    assert abs(actual / expected - 1) < 0.01, actual
    assert im.meta.zodi_scale_err > 0
    raw = read_spherex(f.paths[0])
    np.testing.assert_allclose(
        im.data, raw.data - np.float32(actual) * raw.zodi, rtol=0, atol=1e-5, equal_nan=True
    )
    assert np.all(im.var[np.isfinite(im.var)] >= raw.var[np.isfinite(raw.var)])
    static = read_spherex(f.paths[0], subtract_zodi=True, zodi="static")
    assert static.meta.zodi_scale == 1.0
    np.testing.assert_array_equal(static.var, raw.var)
    # Background residual after the fit is ~0; after static subtraction it is 7 % of zodi.
    bkg = (raw.flags & flag_bits(["SOURCE", *DEFAULT_EXCLUDE_FLAGS])) == 0
    assert abs(np.nanmedian(im.data[bkg])) < 0.01 * np.median(raw.zodi)
    assert np.nanmedian(static.data[bkg]) > 0.05 * np.median(raw.zodi)


def test_zodi_fit_falls_back_with_warning():
    z = np.ones((50, 50))
    flags = np.full(z.shape, 1 << 21, dtype=np.int32)  # everything is SOURCE
    with pytest.warns(ZodiFitWarning, match="using scale 1.0"):
        s, err, n = fit_zodi_scale(1.3 * z, z * 1e-3, flags, z)
    assert (s, err, n) == (1.0, 0.0, 0)


def test_zodi_argument_checked(field):
    with pytest.raises(ValueError, match="'zodi' must be"):
        read_spherex(field.paths[0], subtract_zodi=True, zodi="dynamic")


# Must show 5: malformed files.
def _rewrite(src, dst, edit):
    with fits.open(src) as hdul:
        hdul = fits.HDUList([h.copy() for h in hdul])
    edit(hdul)
    hdul.writeto(dst)
    return dst


def test_not_fits(tmp_path):
    p = tmp_path / "notes.fits"
    p.write_text("this is not a FITS file\n" * 10)
    with pytest.raises(SpherexFileError, match=r"notes\.fits: not a FITS file"):
        read_spherex(p)


def test_truncated(qr2_file, tmp_path):
    p = tmp_path / "trunc.fits"
    data = qr2_file.read_bytes()
    p.write_bytes(data[: len(data) // 3])
    with pytest.raises(SpherexFileError, match=r"trunc\.fits: .*truncated"):
        read_spherex(p)


def test_missing_hdu(qr2_file, tmp_path):
    p = _rewrite(qr2_file, tmp_path / "nozodi.fits", lambda h: h.pop(h.index_of("VARIANCE")))
    with pytest.raises(SpherexFileError, match=r"nozodi\.fits: missing HDU.*VARIANCE"):
        read_spherex(p)


def test_psf_absence_is_not_an_error(qr2_file, tmp_path):
    p = _rewrite(qr2_file, tmp_path / "nopsf.fits", lambda h: h.pop(h.index_of("PSF")))
    im = read_spherex(p)
    assert im.data.shape == (96, 80)


def test_no_w_wcs(qr2_file, tmp_path):
    def edit(h):
        for k in [k for k in h["IMAGE"].header if k.endswith("W") and k[:5] in ("CTYPE", "CRPIX")]:
            del h["IMAGE"].header[k]

    p = _rewrite(qr2_file, tmp_path / "now.fits", edit)
    with pytest.raises(SpherexFileError, match=r"now\.fits: .*no spectral WCS \(key 'W'"):
        read_spherex(p)


def test_shape_mismatch(qr2_file, tmp_path):
    def edit(h):
        h["ZODI"].data = h["ZODI"].data[:-1]

    p = _rewrite(qr2_file, tmp_path / "shape.fits", edit)
    with pytest.raises(SpherexFileError, match=r"shape\.fits: shape mismatch.*ZODI"):
        read_spherex(p)


@pytest.mark.parametrize(
    ("hdu", "unit"), [("IMAGE", "Jy"), ("IMAGE", None), ("VARIANCE", "MJy/sr")]
)
def test_wrong_units(qr2_file, tmp_path, hdu, unit):
    def edit(h):
        if unit is None:
            del h[hdu].header["BUNIT"]
        else:
            h[hdu].header["BUNIT"] = unit

    p = _rewrite(qr2_file, tmp_path / "units.fits", edit)
    with pytest.raises(SpherexFileError, match=rf"units\.fits: {hdu} has (wrong units|no BUNIT)"):
        read_spherex(p)


def test_bad_wave_table(qr2_file, tmp_path):
    def edit(h):
        h.pop(h.index_of("WCS-WAVE"))

    p = _rewrite(qr2_file, tmp_path / "notab.fits", edit)
    with pytest.raises(SpherexFileError, match=r"notab\.fits: missing HDU"):
        read_spherex(p)


def test_missing_file(tmp_path):
    with pytest.raises(SpherexFileError, match="no such file"):
        read_spherex(tmp_path / "nope.fits")


def test_units_equivalent_spelling_accepted(qr2_file, tmp_path):
    p = _rewrite(qr2_file, tmp_path / "ok.fits", lambda h: h["IMAGE"].header.set("BUNIT", "MJy/sr"))
    assert read_spherex(p).meta.bunit == "MJy/sr"
    shutil.copy(qr2_file, tmp_path / "copy.fits")
    assert read_spherex(tmp_path / "copy.fits").meta.bunit == "MJy / sr"


# --------------------------------------------------------------------------------------------
# The fast reader (header scanner + memory map) against the astropy reference path
# --------------------------------------------------------------------------------------------


def _assert_same_read(actual, expected):
    """Both readers' tuples: identical arrays, metadata, tables and WCSs."""
    names = ("data", "var", "flags", "zodi")
    for name, a, e in zip(names, actual[:4], expected[:4], strict=True):
        assert a.dtype == e.dtype, name
        assert a.dtype.isnative, name
        np.testing.assert_array_equal(a, e, err_msg=name)
    a_wcs, e_wcs = actual[4], expected[4]
    assert a_wcs.wcs.compare(e_wcs.wcs)
    assert a_wcs.to_header_string(relax=True) == e_wcs.to_header_string(relax=True)
    assert a_wcs.pixel_shape == e_wcs.pixel_shape
    for m in ("a", "b", "ap", "bp"):
        np.testing.assert_array_equal(getattr(a_wcs.sip, m), getattr(e_wcs.sip, m))
    np.testing.assert_array_equal(a_wcs.sip.crpix, e_wcs.sip.crpix)
    a_spec = actual[5].build()
    e_spec = expected[5]
    assert a_spec.wcs.compare(e_spec.wcs)
    assert a_spec.sip is None
    assert actual[6] == expected[6]  # SpherexMeta, every field
    assert actual[7] == expected[7]  # bbox
    a_tab, e_tab = actual[8], expected[8]
    for attr in ("x", "y", "values"):
        np.testing.assert_array_equal(getattr(a_tab, attr), getattr(e_tab, attr))
    assert (a_tab.crpix, a_tab.crval, a_tab.cdelt) == (e_tab.crpix, e_tab.crval, e_tab.cdelt)


@pytest.mark.parametrize("bbox", [None, (37, 141, 55, 180), (0, 1, 179, 180)])
def test_fast_path_equals_astropy_path(field, bbox):
    path = str(field.paths[0])
    expected = spx._read_astropy(path, bbox)
    actual = spx._read_fast(path, bbox)
    _assert_same_read(actual, expected)
    # The spectral WCSs evaluate identically everywhere in the box.
    ny, nx = actual[0].shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    expected_w = np.array(expected[5].pixel_to_world_values(xx, yy))
    actual_w = np.array(actual[5].build().pixel_to_world_values(xx, yy))
    np.testing.assert_array_equal(actual_w, expected_w)


def test_read_spherex_takes_the_fast_path(field, monkeypatch):
    def refuse(*args):
        raise AssertionError("astropy path used")

    monkeypatch.setattr(spx, "_read_astropy", refuse)
    im = read_spherex(field.paths[1], bbox=(10, 60, 20, 90), subtract_zodi=True, zodi="fit")
    assert im.data.shape == (50, 70)
    assert 0.5 < im.meta.zodi_scale < 2.0


def test_fast_and_astropy_images_agree_through_public_api(field, monkeypatch):
    path = field.paths[1]
    actual = read_spherex(path, subtract_zodi=True, zodi="fit")
    monkeypatch.setattr(spx, "_read_fast", lambda *a: (_ for _ in ()).throw(spx._Fallback("x")))
    expected = read_spherex(path, subtract_zodi=True, zodi="fit")
    for name in ("data", "var", "flags", "zodi"):
        np.testing.assert_array_equal(getattr(actual, name), getattr(expected, name))
    assert actual.meta == expected.meta
    np.testing.assert_array_equal(actual.wavemap(), expected.wavemap())
    assert actual.spectral_wcs.wcs.compare(expected.spectral_wcs.wcs)


def test_lazy_spectral_wcs_pickles_and_is_built_once(field):
    im = read_spherex(field.paths[0], bbox=(5, 25, 5, 45))
    clone = pickle.loads(pickle.dumps(im))
    assert im.spectral_wcs is im.spectral_wcs
    assert clone.spectral_wcs.wcs.compare(im.spectral_wcs.wcs)
    np.testing.assert_array_equal(clone.data, im.data)


def test_card_values_match_astropy(field):
    """Every valued card of every header of a real-layout file parses as astropy parses it."""
    n = 0
    with open(field.paths[0], "rb") as fh:
        hdus = spx._scan(fh)
    for hdu in hdus:
        with open(field.paths[0], "rb") as fh:
            fh.seek(hdu.start)
            text = fh.read(hdu.data_start - hdu.start).decode("ascii")
        expected_header = fits.Header.fromstring(text)
        for key in hdu.cards:
            expected = expected_header[key]
            actual = hdu.cards[key]
            assert type(actual) is type(expected), key
            assert actual == expected, key
            n += 1
    assert n > 200


@pytest.mark.parametrize(
    "card",
    [
        "STR     = 'O''Brien  '         / quote inside",
        "STR2    = '  lead'",
        "EMPTY   = ''",
        "NUM     =              -1.5D-3 / fortran exponent",
        "NUM2    =                 .5E2",
        "NUM3    =                  +12",
        "NUM4    =                  1.0",
        "BOOL    =                    F",
        "CPLX    = (1.0, 2.0)",
        "UNDEF   =                      / no value",
        "HIERARCH MP_TRANSIENT = 0 / a bit",
        "HIERARCH ESO LONG KEY = 'x y' / spaces",
    ],
)
def test_single_card_values_match_astropy(card):
    card = card.ljust(80)
    expected = fits.Card.fromstring(card).value
    actual = spx._card_value(card)
    assert type(actual) is type(expected)
    assert actual == expected or (actual is expected)


def test_long_string_continue_card_matches_astropy():
    long = "x" * 100 + "yz"
    expected_header = fits.Header()
    expected_header["LONGSTR"] = long
    expected_header["AFTER"] = 3
    text = expected_header.tostring()
    raw = spx._read_header(io.BytesIO(text.encode("ascii")))
    assert len(raw["LONGSTR"]) > 80
    assert spx._Cards(raw)["LONGSTR"] == long
    assert spx._Cards(raw)["AFTER"] == 3


def test_fast_path_declines_scaled_images_and_astropy_reads_them(qr2_file, tmp_path):
    def edit(h):
        h["ZODI"].header["BZERO"] = 0.5  # astropy applies it; the fast path must not guess

    p = _rewrite(qr2_file, tmp_path / "scaled.fits", edit)
    with pytest.raises(spx._Fallback, match="scaled"):
        spx._read_fast(str(p), None)
    # What the public reader does is the astropy path's answer (today: a clear error, since
    # astropy will not memory-map a scaled image).
    with pytest.raises(SpherexFileError, match=r"scaled\.fits: cannot read HDU ZODI"):
        spx._read_astropy(str(p), None)
    with pytest.raises(SpherexFileError, match=r"scaled\.fits: cannot read HDU ZODI"):
        read_spherex(p)


def test_fast_path_celestial_wcs_with_cd_matrix(qr2_file, tmp_path):
    """A CD-matrix header goes through astropy's parser and still equals the reference path."""

    def edit(h):
        hdr = h["IMAGE"].header
        for i in (1, 2):
            for j in (1, 2):
                hdr[f"CD{i}_{j}"] = hdr.get(f"PC{i}_{j}", float(i == j)) * hdr.get(f"CDELT{i}", 1)
                hdr.remove(f"PC{i}_{j}", ignore_missing=True)
        hdr.remove("CDELT1")
        hdr.remove("CDELT2")

    p = _rewrite(qr2_file, tmp_path / "cd.fits", edit)
    _assert_same_read(spx._read_fast(str(p), None), spx._read_astropy(str(p), None))


@pytest.mark.parametrize("threads", [1, 2])
def test_shared_work_split_is_exact(field, monkeypatch, threads):
    """Splitting copies and wavemap rows over a helper thread changes no value."""
    path = str(field.paths[0])
    monkeypatch.setattr(spx, "_N_THREADS", 1)
    expected = read_spherex(path)
    expected_wm = expected.wavemap()
    monkeypatch.setattr(spx, "_N_THREADS", threads)
    monkeypatch.setattr(spx, "_PARALLEL_MIN_PIXELS", 16)
    actual = read_spherex(path)
    for name in ("data", "var", "flags", "zodi"):
        np.testing.assert_array_equal(getattr(actual, name), getattr(expected, name))
    np.testing.assert_array_equal(actual.wavemap(), expected_wm)


def test_shared_work_runs_every_task_and_propagates_errors():
    done = []
    spx._share_work([lambda i=i: done.append(i) for i in range(5)])
    assert sorted(done) == [0, 1, 2, 3, 4]

    def boom():
        raise RuntimeError("task failed")

    with pytest.raises(RuntimeError, match="task failed"):
        spx._share_work([lambda: None, boom])
    with pytest.raises(RuntimeError, match="task failed"):
        spx._share_work([boom, lambda: None])


def test_header_cache_never_serves_a_replaced_file(qr2_file, tmp_path):
    """Parsed headers are cached per file version: a file replaced in place reads anew."""
    path = tmp_path / "exposure.fits"
    shutil.copy(qr2_file, path)
    first = spx.read_spherex(path)
    with fits.open(qr2_file) as hdul:
        hdul["IMAGE"].header["OBSID"] = "2030W01_1A_0001_1"
        hdul["IMAGE"].data = hdul["IMAGE"].data + 1.0
        hdul.writeto(tmp_path / "replacement.fits")
    (tmp_path / "replacement.fits").replace(path)
    second = spx.read_spherex(path)
    assert second.meta["obsid"] == "2030W01_1A_0001_1"
    assert first.meta["obsid"] != second.meta["obsid"]
    np.testing.assert_array_equal(second.data, first.data + np.float32(1.0))
    again = spx.read_spherex(path)  # served from the cache: same answer
    assert again.meta["obsid"] == second.meta["obsid"]
    np.testing.assert_array_equal(again.data, second.data)


def test_each_read_gets_its_own_wcs(qr2_file):
    """WCSs come from a per-file cache: changing one must not change the next read's."""
    first = spx.read_spherex(qr2_file)
    expected = first.wcs.wcs.crval.copy()
    first.wcs.wcs.crval = [0.0, 0.0]
    box = spx.read_spherex(qr2_file, bbox=(10, 40, 5, 30))
    again = spx.read_spherex(qr2_file)
    header = spx.read_header_wcs(qr2_file)
    np.testing.assert_array_equal(again.wcs.wcs.crval, expected)
    np.testing.assert_array_equal(header.wcs.wcs.crval, expected)
    np.testing.assert_array_equal(box.wcs.wcs.crval, expected)
    ra, dec = box.wcs.pixel_to_world_values(0, 0)
    np.testing.assert_allclose(
        (ra, dec), again.wcs.pixel_to_world_values(5, 10), rtol=0, atol=1e-10
    )


def test_qr3_flags_decoded_from_the_heap_equal_astropy(tmp_path):
    """QR3 FLAGS (RICE_1, a tile per row) are decoded row by row from the file itself."""
    import mmap

    f = simulate_field(tmp_path, n_exposures=1, shape=(40, 36), release="qr3", seed=5,
                       flagged_fraction=0.2)  # fmt: skip
    path = f.paths[0]
    with fits.open(path) as hdul:
        expected = np.array(hdul["FLAGS"].data)
    assert np.count_nonzero(expected) > 100
    with open(path, "rb") as fh:
        hdus = spx._scan(fh)
        flags_hdu = next(h for h in hdus if h.name == "FLAGS")
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        box = (3, 31, 4, 30)
        actual = np.empty((28, 26), dtype=np.int32)
        assert spx._read_rice_rows(buf, flags_hdu, box, actual)  # the fast path was taken
        del buf
    np.testing.assert_array_equal(actual, expected[3:31, 4:30])
    np.testing.assert_array_equal(spx.read_spherex(path, bbox=box).flags, expected[3:31, 4:30])
