"""Generate the documentation figures from the real drizzle3d code (simulated data only).

Every figure is made by running :class:`drizzle3d.Drizzle3D` (or the pipeline) on
simulated inputs whose truth is known, so the pictures show what the installed
code does. The docs build calls :func:`make_all`; run ``python docs/figures.py DIR``
to write the PNGs by hand. Matplotlib uses the Agg backend; nothing touches the
network.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from drizzle3d.channels import detector_channels
from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid
from drizzle3d.resample import Drizzle3D
from drizzle3d.simulate import Line, Spectrum

DPI = 90


def _save(fig, path: Path) -> Path:
    """Save ``fig`` to ``path`` through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _affine_pixmap(shape, *, scale=1.0, angle_deg=0.0, offset=(0.0, 0.0), center=(0.0, 0.0)):
    """Pixmap of an input grid rotated by ``angle_deg`` and scaled by ``scale`` onto the output."""
    y, x = np.indices(shape, dtype=float)
    x = x - center[0]
    y = y - center[1]
    t = np.deg2rad(angle_deg)
    xo = scale * (np.cos(t) * x - np.sin(t) * y) + offset[0]
    yo = scale * (np.sin(t) * x + np.cos(t) * y) + offset[1]
    return np.dstack([xo, yo])


def _one_bin(ny, nx):
    return {"out_shape": (1, ny, nx), "wave_edges": [1.0, 3.0]}


def _flat_wavemap(shape, lam=2.0, bw=0.05):
    return np.dstack([np.full(shape, lam), np.full(shape, bw)])


# ----------------------------------------------------------------------------- algorithm figures
def fig_spatial_overlap(out: Path) -> Path:
    """One input pixel (rotated 30 deg, 1.7x the output pixel) and its exact overlap areas."""
    scale, angle, centre = 1.7, 30.0, (3.2, 2.9)
    pixmap = _affine_pixmap((3, 3), scale=scale, angle_deg=angle, offset=centre, center=(1, 1))
    weight = np.zeros((3, 3))
    weight[1, 1] = 1.0  # only the central input pixel carries weight
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for ax, pixfrac in zip(axes, (1.0, 0.6), strict=True):
        d = Drizzle3D(**_one_bin(6, 7), weighting="uniform", pixfrac=pixfrac, disable_ctx=True)
        d.add_image(
            np.ones((3, 3)),
            np.ones((3, 3)),
            None,
            pixmap,
            _flat_wavemap((3, 3)),
            weight_map=weight,
        )
        area = d.out_wht.values[0]
        ax.imshow(
            area, origin="lower", cmap="Blues", vmin=0, vmax=1.0, extent=(-0.5, 6.5, -0.5, 5.5)
        )
        for k in range(8):
            ax.axvline(k - 0.5, color="0.6", lw=0.6)
        for k in range(7):
            ax.axhline(k - 0.5, color="0.6", lw=0.6)
        half = 0.5 * pixfrac
        corners = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
        t = np.deg2rad(angle)
        rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
        poly = scale * corners @ rot.T + np.array(centre)
        ax.fill(poly[:, 0], poly[:, 1], fill=False, ec="C3", lw=2)
        for (j, i), a in np.ndenumerate(area):
            if a > 1e-4:
                ax.text(i, j, f"{a:.3f}", ha="center", va="center", fontsize=8)
        ax.set_xlim(-0.5, 6.5)
        ax.set_ylim(-0.5, 5.5)
        ax.set_aspect("equal")
        ax.set_title(
            f"pixfrac={pixfrac}: sum of areas {area.sum():.4f}\n"
            f"(drop area {(scale * pixfrac) ** 2:.4f} output pixels)",
            fontsize=10,
        )
        ax.set_xlabel("output x (pixels)")
    axes[0].set_ylabel("output y (pixels)")
    return _save(fig, out / "spatial_overlap.png")


def fig_spectral_overlap(out: Path) -> Path:
    """One pixel's band (a top-hat) overlapping wavelength bins, for two ``wave_pixfrac``."""
    edges = np.linspace(1.90, 2.10, 9)
    lam, bw = 2.013, 0.06
    pixmap = _affine_pixmap((3, 3), offset=(0.0, 0.0), center=(1, 1))
    weight = np.zeros((3, 3))
    weight[1, 1] = 1.0
    fig, ax = plt.subplots(figsize=(8, 3.4))
    for wpf, color in ((1.0, "C0"), (0.5, "C1")):
        d = Drizzle3D(
            out_shape=(8, 1, 1),
            wave_edges=edges,
            weighting="uniform",
            wave_pixfrac=wpf,
            disable_ctx=True,
        )
        d.add_image(
            np.ones((3, 3)),
            np.ones((3, 3)),
            None,
            pixmap,
            _flat_wavemap((3, 3), lam, bw),
            weight_map=weight,
        )
        frac = d.out_wht.values[:, 0, 0]
        ax.stairs(
            frac,
            edges,
            color=color,
            lw=2,
            label=f"wave_pixfrac={wpf}: fractions sum to {frac.sum():.4f}",
        )
        half = 0.5 * bw * wpf
        ax.axvspan(lam - half, lam + half, color=color, alpha=0.12)
    for e in edges:
        ax.axvline(e, color="0.7", lw=0.6)
    ax.axvline(lam, color="k", ls=":", lw=1)
    ax.set_xlabel("wavelength (um)")
    ax.set_ylabel("fraction of the band in the bin")
    ax.set_title(f"a pixel at {lam} um with bandwidth {bw} um over 0.025 um bins", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, out / "spectral_overlap.png")


# ----------------------------------------------------------------------------- spatial choices
def _star_exposures(n_dither=6, shape=(16, 16), fwhm=1.2, seed=3):
    """Dithered undersampled images of one star (Gaussian PSF, FWHM in input pixels)."""
    rng = np.random.default_rng(seed)
    sigma = fwhm / 2.3548
    sub = (np.arange(5) + 0.5) / 5 - 0.5
    exposures = []
    for k in range(n_dither):
        dx, dy = rng.uniform(-0.5, 0.5, 2)
        angle = 0.0 if k < n_dither // 2 else 7.0
        # star at input (7.3 + dx, 7.6 + dy); input pixels are 2 output pixels wide
        yy, xx = np.indices(shape, dtype=float)
        img = np.zeros(shape)
        for sy in sub:
            for sx in sub:
                r2 = (xx + sx - 7.3 - dx) ** 2 + (yy + sy - 7.6 - dy) ** 2
                img += np.exp(-0.5 * r2 / sigma**2)
        img /= sub.size**2
        pixmap = _affine_pixmap(
            shape,
            scale=2.0,
            angle_deg=angle,
            offset=(16.0 - 2 * dx, 16.0 - 2 * dy),
            center=(7.3, 7.6),
        )
        exposures.append((img, pixmap))
    return exposures


def _drizzle_star(exposures, **kw):
    d = Drizzle3D(**_one_bin(32, 32), weighting="uniform", disable_ctx=True, **kw)
    for img, pixmap in exposures:
        d.add_image(img, np.full(img.shape, 1e-4), None, pixmap, _flat_wavemap(img.shape))
    return d


def fig_kernels(out: Path) -> Path:
    """The same six dithered star images drizzled with each spatial kernel."""
    import warnings

    exposures = _star_exposures()
    kernels = ["square", "turbo", "point", "gaussian", "lanczos3", "bilinear"]
    fig, axes = plt.subplots(2, len(kernels), figsize=(2.3 * len(kernels), 4.9))
    for col, kernel in enumerate(kernels):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # gaussian/lanczos warn that they do not conserve
            d = _drizzle_star(exposures, kernel=kernel, pixfrac=0.8)
        sci = d.out_sci.values[0, 6:26, 6:26]
        wht = d.out_wht.values[0, 6:26, 6:26]
        axes[0, col].imshow(sci, origin="lower", cmap="magma", vmin=0, vmax=1.0)
        axes[0, col].set_title(kernel, fontsize=10)
        axes[1, col].imshow(wht, origin="lower", cmap="gray", vmin=0)
        axes[1, col].set_title(f"weight: min {wht.min():.2f}, max {wht.max():.2f}", fontsize=8)
        for ax in axes[:, col]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("out_sci")
    axes[1, 0].set_ylabel("out_wht")
    fig.suptitle(
        "6 dithered exposures of a star, output pixels half the input (pixfrac 0.8)", fontsize=10
    )
    return _save(fig, out / "kernels.png")


def fig_pixfrac(out: Path) -> Path:
    """pixfrac trades resolution against holes: square kernel, 3 and 8 dithers."""
    fig, axes = plt.subplots(2, 4, figsize=(9.5, 5.0))
    for row, n in enumerate((3, 8)):
        exposures = _star_exposures(n_dither=n, seed=11)
        for col, pixfrac in enumerate((1.0, 0.7, 0.4, 0.1)):
            d = _drizzle_star(exposures, kernel="square", pixfrac=pixfrac)
            sci = d.out_sci.values[0]
            holes = int(np.isnan(sci[8:24, 8:24]).sum())
            ax = axes[row, col]
            cmap = plt.get_cmap("magma").copy()
            cmap.set_bad("tab:cyan")
            ax.imshow(sci, origin="lower", cmap=cmap, vmin=0, vmax=1.0)
            ax.set_title(
                f"{n} dithers, pixfrac {pixfrac}\nempty pixels (centre): {holes}", fontsize=9
            )
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("square kernel; empty output pixels in cyan", fontsize=10)
    return _save(fig, out / "pixfrac.png")


# ----------------------------------------------------------------------------- spectral choices
def _lvf_samples(spectrum: Spectrum, n=500, lo=1.63, hi=2.41, R=41.0, seed=5, clustered=False):
    """Input pixels of one sky position seen at many LVF wavelengths: (lam, bw, value)."""
    rng = np.random.default_rng(seed)
    if clustered:
        # few exposures: each samples the sky at a handful of nearby wavelengths
        centres = rng.uniform(lo, hi, 14)
        lam = np.concatenate([c + rng.normal(0, 0.004, n // 14) for c in centres])
    else:
        lam = rng.uniform(lo, hi, n)
    lam = np.clip(lam, lo + 0.03, hi - 0.03)
    bw = lam / R
    return lam, bw, spectrum.band_average(lam, bw)


def _drizzle_spectrum(lam, bw, value, edges, wave_pixfrac=1.0):
    """Drizzle samples that all land on one output pixel (point kernel) into ``edges``."""
    n = lam.size
    pixmap = np.zeros((1, n, 2))
    d = Drizzle3D(
        out_shape=(len(edges) - 1, 1, 1),
        wave_edges=edges,
        kernel="point",
        weighting="uniform",
        wave_pixfrac=wave_pixfrac,
        disable_ctx=True,
    )
    d.add_image(
        value[None, :], np.full((1, n), 1e-4), None, pixmap, np.dstack([lam[None, :], bw[None, :]])
    )
    return d


def _spectrum_with_line():
    return Spectrum(
        1.0,
        index=-1.5,
        ref_wavelength=2.0,
        lines=(Line(1.8751, 0.002, 6.0), Line(2.1661, 0.002, 2.0)),
    )


def fig_spectral_grids(out: Path) -> Path:
    """Native, oversampled and constant-R grids on a D3 spectrum with Pa-alpha and Br-gamma."""
    spec = _spectrum_with_line()
    lam, bw, value = _lvf_samples(spec, n=1200)
    grids = {
        "native (17 bins)": SpectralGrid.native(3),
        "oversampled x2": SpectralGrid.oversampled(3, 2.0),
        "constant_r R=120": SpectralGrid.constant_r(1.63, 2.41, 120.0),
    }
    fig, axes = plt.subplots(
        2, 1, figsize=(8.5, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]}
    )
    x = np.linspace(1.63, 2.41, 3000)
    axes[0].plot(x, spec.evaluate(x), color="0.6", lw=0.8, label="truth")
    axes[0].plot(
        x,
        spec.band_average(x, x / 41.0),
        color="k",
        lw=1,
        label="truth seen through one SPHEREx band (R=41)",
    )
    for k, (name, g) in enumerate(grids.items()):
        d = _drizzle_spectrum(lam, bw, value, g.edges)
        axes[0].stairs(d.out_sci.values[:, 0, 0], g.edges, lw=1.5, color=f"C{k}", label=name)
        axes[1].vlines(g.edges, k - 0.4, k + 0.4, color=f"C{k}", lw=0.8)
    d = _drizzle_spectrum(lam, bw, value, SpectralGrid.oversampled(3, 2.0).edges, 0.5)
    axes[0].stairs(
        d.out_sci.values[:, 0, 0],
        SpectralGrid.oversampled(3, 2.0).edges,
        lw=1.2,
        color="C3",
        ls="--",
        label="oversampled x2, wave_pixfrac 0.5",
    )
    ch = detector_channels(3)
    axes[1].vlines(np.r_[ch["wl_min"], ch["wl_max"][-1]], 2.6, 3.4, color="0.3", lw=0.8)
    axes[1].set_yticks([0, 1, 2, 3], [*grids.keys(), "D3 channels"], fontsize=8)
    axes[1].set_xlabel("wavelength (um)")
    axes[0].set_ylabel("surface brightness")
    axes[0].legend(fontsize=7, ncol=2)
    axes[0].set_ylim(0.6, 3.3)
    return _save(fig, out / "spectral_grids.png")


def fig_effective_wavelength(out: Path) -> Path:
    """A curved spectrum sampled unevenly in wavelength: plot points at the effective wavelength."""
    spec = Spectrum(1.0, index=-6.0, ref_wavelength=2.0, lines=(Line(2.0, 0.03, -0.35),))
    lam, bw, value = _lvf_samples(spec, n=14 * 12, clustered=True, seed=2)
    g = SpectralGrid.native(3)
    d = _drizzle_spectrum(lam, bw, value, g.edges)
    sci = d.out_sci.values[:, 0, 0]
    eff = d.out_wave.values[:, 0, 0]
    ok = np.isfinite(sci)
    centre = g.centers
    x = np.linspace(1.63, 2.41, 2000)
    truth_smoothed = spec.band_average(x, x / 41.0)
    fig, axes = plt.subplots(
        2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]}
    )
    axes[0].plot(x, truth_smoothed, color="k", lw=1, label="truth (seen through an R=41 band)")
    axes[0].plot(
        centre[ok], sci[ok], "s", mfc="none", color="C3", label="drizzled value at the bin centre"
    )
    axes[0].plot(
        eff[ok],
        sci[ok],
        "o",
        color="C0",
        label="drizzled value at the effective wavelength (out_wave)",
    )
    axes[0].plot(lam, value, ".", ms=2, color="0.6", label="input pixels")
    axes[0].set_ylabel("surface brightness")
    axes[0].legend(fontsize=8)

    def rel(where):
        truth = spec.band_average(where, where / 41.0)
        return 100 * (sci[ok] / truth - 1)

    r_c, r_e = rel(centre[ok]), rel(eff[ok])
    axes[1].axhline(0, color="k", lw=0.6)
    axes[1].plot(
        centre[ok],
        r_c,
        "s",
        mfc="none",
        color="C3",
        label=f"at bin centre: rms {np.sqrt(np.mean(r_c**2)):.1f}%",
    )
    axes[1].plot(
        eff[ok],
        r_e,
        "o",
        color="C0",
        label=f"at effective wavelength: rms {np.sqrt(np.mean(r_e**2)):.1f}%",
    )
    axes[1].set_ylabel("drizzled / truth - 1 (%)")
    axes[1].set_xlabel("wavelength (um)")
    axes[1].legend(fontsize=8)
    return _save(fig, out / "effective_wavelength.png")


# ----------------------------------------------------------------------------- a simulated field
def fig_simulated_field(out: Path) -> Path:
    """Drizzle a small simulated D3 field: white light, coverage and a star spectrum."""
    from drizzle3d.pipeline import drizzle_files
    from drizzle3d.simulate import Sky, simulate_field

    center = (150.0, 2.0)
    sky = Sky.default(center)
    with tempfile.TemporaryDirectory() as tmp:
        field = simulate_field(tmp, sky, n_exposures=8, shape=(96, 96), center=center, seed=7)
        grid = OutputGrid(SpatialGrid.from_center(*center, 6.0, 6.0), SpectralGrid.native(3))
        d = drizzle_files(field.paths, grid)
    sci = d.out_sci
    wht = d.out_wht.values
    white = np.nansum(sci.values * wht, axis=0) / np.where(wht.sum(0) > 0, wht.sum(0), np.nan)
    star = sky.point_sources[0]
    x, y = grid.spatial.wcs.world_to_pixel_values(star.ra, star.dec)
    ix, iy, r = round(float(x)), round(float(y)), 3
    box = (slice(None), slice(iy - r, iy + r + 1), slice(ix - r, ix + r + 1))
    # aperture mean, its (naive) error, and the flux-weighted effective wavelength
    flux = sci.values[box].mean(axis=(1, 2))
    err = np.sqrt(d.out_var.values[box].sum(axis=(1, 2))) / (2 * r + 1) ** 2
    w = d.out_wht.values[box]
    with np.errstate(invalid="ignore", divide="ignore"):  # bins the field does not reach
        lam = (np.nan_to_num(d.out_wave.values[box]) * w).sum(axis=(1, 2)) / w.sum(axis=(1, 2))
    # truth: the sky averaged over the same aperture (8 x 8 samples per output pixel)
    off = (np.arange(8) + 0.5) / 8 - 0.5
    fy, fx = np.meshgrid(
        np.arange(iy - r, iy + r + 1)[:, None] + off,
        np.arange(ix - r, ix + r + 1)[:, None] + off,
        indexing="ij",
    )
    ra, dec = grid.spatial.wcs.pixel_to_world_values(fx.ravel(), fy.ravel())
    fine = np.linspace(1.64, 2.40, 300)
    truth = [float(np.mean(sky.evaluate(ra, dec, np.full(ra.shape, v)))) for v in fine]
    fig, axes = plt.subplots(
        1, 3, figsize=(14, 4.2), layout="constrained", gridspec_kw={"width_ratios": [1, 1, 1.5]}
    )
    im = axes[0].imshow(white, origin="lower", cmap="magma")
    axes[0].plot(
        [ix - r - 0.5, ix + r + 0.5, ix + r + 0.5, ix - r - 0.5, ix - r - 0.5],
        [iy - r - 0.5, iy - r - 0.5, iy + r + 0.5, iy + r + 0.5, iy - r - 0.5],
        color="C0",
    )
    fig.colorbar(im, ax=axes[0], shrink=0.8, label="MJy/sr")
    axes[0].set_title("white light (weight-averaged)", fontsize=9)
    im = axes[1].imshow(d.out_count.values.sum(0), origin="lower", cmap="viridis")
    fig.colorbar(im, ax=axes[1], shrink=0.8, label="contributing input pixels")
    axes[1].set_title("coverage (out_count summed over wavelength)", fontsize=9)
    axes[2].plot(
        fine, truth, color="0.4", lw=1, label="truth averaged over the aperture (not band-smoothed)"
    )
    axes[2].errorbar(
        lam,
        flux,
        yerr=err,
        fmt="o",
        ms=4,
        color="C0",
        label="drizzled aperture mean at out_wave (naive 1-sigma)",
    )
    axes[2].set_xlabel("wavelength (um)")
    axes[2].set_ylabel("MJy/sr")
    axes[2].legend(fontsize=8)
    axes[2].set_title("brightest star: 7 x 7 pixel aperture, 8 simulated exposures", fontsize=9)
    return _save(fig, out / "simulated_field.png")


FIGURES = {
    "spatial_overlap.png": fig_spatial_overlap,
    "spectral_overlap.png": fig_spectral_overlap,
    "kernels.png": fig_kernels,
    "pixfrac.png": fig_pixfrac,
    "spectral_grids.png": fig_spectral_grids,
    "effective_wavelength.png": fig_effective_wavelength,
    "simulated_field.png": fig_simulated_field,
}


def make_all(out: str | os.PathLike) -> list[Path]:
    """Write every figure into ``out`` and return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [make(out) for make in FIGURES.values()]


if __name__ == "__main__":
    for p in make_all(sys.argv[1] if len(sys.argv) > 1 else "_generated"):
        sys.stdout.write(f"{p}\n")
