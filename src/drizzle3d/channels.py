"""The SPHEREx spectral-channel table shipped with the package.

Six detectors (D1..D6) times 17 sub-channels, 102 channels in all, from the
SPHEREx SpectralBandDef 202601 calibration (SSDC product
``spx_cal-sch-v1-2026-106``, ``SPECTRAL_CHANNELS`` table).
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

import numpy as np

__all__ = ["DETECTORS", "channel_table", "detector_channels", "detector_range"]

#: Detector numbers of SPHEREx's six arrays.
DETECTORS = (1, 2, 3, 4, 5, 6)

_DTYPE = np.dtype(
    [
        ("detector", "i4"),
        ("subchan", "i4"),
        ("wavelength", "f8"),
        ("wl_min", "f8"),
        ("wl_max", "f8"),
        ("r", "f8"),
        ("r_std", "f8"),
        ("bandwidth", "f8"),
    ]
)


@lru_cache(maxsize=1)
def _load() -> np.ndarray:
    text = files("drizzle3d").joinpath("data/spherex_spectral_channels.csv").read_text()
    rows = [
        tuple(line.split(","))
        for line in text.splitlines()
        if line and not line.startswith("#") and not line.startswith("detector")
    ]
    table = np.array(rows, dtype=_DTYPE)
    table.setflags(write=False)
    return table


def channel_table() -> np.ndarray:
    """Return the 102-row channel table as a read-only numpy structured array.

    Returns
    -------
    numpy.ndarray
        Structured array with fields ``detector``, ``subchan`` (1..17),
        ``wavelength``, ``wl_min``, ``wl_max``, ``bandwidth`` (all um), ``r``
        (resolving power) and ``r_std``; six detectors of 17 channels each.

    Examples
    --------
    >>> from drizzle3d.channels import channel_table
    >>> t = channel_table()
    >>> len(t), float(t["wavelength"][0])
    (102, 0.753)
    """
    return _load()


def _check_detector(detector) -> int:
    if isinstance(detector, str) and detector.upper().startswith("D"):
        detector = detector[1:]
    try:
        det = int(detector)
    except (TypeError, ValueError):
        det = None
    if det not in DETECTORS:
        raise ValueError(f"'detector' must be one of 1..6 (or 'D1'..'D6'); got {detector!r}.")
    return det


def detector_channels(detector) -> np.ndarray:
    """Return the 17 rows of one detector, in wavelength order.

    Parameters
    ----------
    detector : int or str
        Detector number ``1..6`` or name ``'D1'..'D6'``.

    Returns
    -------
    numpy.ndarray
        The detector's 17 rows of :func:`channel_table`, by increasing wavelength.

    Raises
    ------
    ValueError
        If ``detector`` is not one of the six detectors.

    Examples
    --------
    >>> from drizzle3d.channels import detector_channels
    >>> rows = detector_channels("D3")
    >>> len(rows), bool((rows["wavelength"] > 1.6).all() and (rows["wavelength"] < 2.42).all())
    (17, True)
    """
    det = _check_detector(detector)
    t = _load()
    rows = t[t["detector"] == det]
    return rows[np.argsort(rows["wavelength"])]


def detector_range(detector) -> tuple[float, float]:
    """Return the wavelength range spanned by a detector's 17 channels.

    Parameters
    ----------
    detector : int or str
        Detector number ``1..6`` or name ``'D1'..'D6'``.

    Returns
    -------
    tuple of float
        ``(wl_min, wl_max)`` in um: the lowest channel's lower edge and the
        highest channel's upper edge.

    Raises
    ------
    ValueError
        If ``detector`` is not one of the six detectors.

    Examples
    --------
    >>> from drizzle3d.channels import detector_range
    >>> lo, hi = detector_range(3)
    >>> bool(1.6 < lo < 1.65 and 2.4 < hi < 2.45)
    True
    """
    rows = detector_channels(detector)
    return float(rows["wl_min"].min()), float(rows["wl_max"].max())
