"""A SPHEREx-like TAN-SIP celestial WCS, for tests and benchmarks."""

from __future__ import annotations

import numpy as np
from astropy.wcs import WCS, Sip

FULL = (2040, 2040)


def spherex_like_wcs(ra, dec, pa=0.0, shape=FULL, pixscale=6.15):
    """TAN-SIP WCS shaped like a SPHEREx L2 header (spherex-facts 2.1).

    CDELT = 1 with a rotated, x-flipped PC matrix (6.15 arcsec pixels), CRPIX at
    the frame centre (1020.5 for a full frame) and 3rd-order SIP with forward
    (A, B) and fitted inverse (AP, BP) terms; the distortion reaches ~12 pixels
    at the corners of a full frame.
    """
    ny, nx = shape
    crpix = ((nx + 1) / 2.0, (ny + 1) / 2.0)
    s = pixscale / 3600.0
    th = np.radians(pa)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = list(crpix)
    w.wcs.cdelt = [1.0, 1.0]
    w.wcs.pc = s * np.array([[-np.cos(th), np.sin(th)], [np.sin(th), np.cos(th)]])
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    a[0, 0], b[0, 0] = -0.36, 0.21
    a[2, 0], a[1, 1], a[0, 2] = 2.1e-6, -1.3e-6, 0.8e-6
    b[2, 0], b[1, 1], b[0, 2] = -0.7e-6, 1.6e-6, -1.9e-6
    a[3, 0], a[1, 2], a[2, 1] = -2.4e-9, -2.2e-9, 3e-10
    b[0, 3], b[2, 1], b[1, 2] = -2.3e-9, -2.5e-9, -4e-10
    terms = [(p, q) for p in range(4) for q in range(4) if p + q <= 3]
    gy, gx = np.mgrid[0:ny:32, 0:nx:32]
    uu = (gx + 1 - crpix[0]).ravel()
    vv = (gy + 1 - crpix[1]).ravel()
    big_u = uu + sum(a[p, q] * uu**p * vv**q for p, q in terms)
    big_v = vv + sum(b[p, q] * uu**p * vv**q for p, q in terms)
    design = np.stack([big_u**p * big_v**q for p, q in terms], -1)
    ap, bp = np.zeros((4, 4)), np.zeros((4, 4))
    for (p, q), ca, cb in zip(
        terms,
        np.linalg.lstsq(design, uu - big_u, rcond=None)[0],
        np.linalg.lstsq(design, vv - big_v, rcond=None)[0],
        strict=True,
    ):
        ap[p, q], bp[p, q] = ca, cb
    w.sip = Sip(a, b, ap, bp, w.wcs.crpix)
    w.wcs.set()
    w.pixel_shape = (nx, ny)
    return w
