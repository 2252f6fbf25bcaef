"""Find SPHEREx Level-2 images in the IRSA archive and fetch them safely.

Two steps, both at the network edge of drizzle3d:

- :func:`query_spherex` asks IRSA's TAP service (``spherex.artifact`` joined
  with ``spherex.plane``) for every image whose footprint *intersects* a field,
  not only the images that contain the field's centre. The server is asked with
  a conservative circle around the field; the answer is then filtered exactly,
  on the returned footprint polygons, on the client.
- :func:`fetch` brings those images to where the drizzle can read them: whole
  files (``"full"``), IRSA cutouts of just the field plus a margin
  (``"cutout"``), paths in a local copy of the archive tree (``"mirror"``), or
  ``s3://`` URLs in the public SPHEREx bucket (``"s3"``). Downloads are atomic
  (temporary file, integrity check, rename), skip files that are already
  complete and valid, retry connection errors and 5xx with backoff, never
  retry 4xx, and report failures per file.

All network code of the package lives here. The one custom exception is
:class:`ArchiveError`.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
from astropy.table import Table

__all__ = [
    "IRSA_TAP_URL",
    "S3_BUCKET",
    "ArchiveError",
    "FetchFailure",
    "FetchResult",
    "archive_relpath",
    "fetch",
    "mirror_path",
    "query_spherex",
    "s3_url",
    "verify_fits",
]

logger = logging.getLogger(__name__)

IRSA_TAP_URL = "https://irsa.ipac.caltech.edu/TAP"
"""IRSA's TAP service."""

S3_BUCKET = "nasa-irsa-spherex"
"""The public, anonymous AWS bucket holding the SPHEREx archive tree (us-east-1)."""

_ARCHIVE_PREFIX = ("ibe", "data", "spherex")
_L2_EXTNAMES = ("IMAGE", "FLAGS", "VARIANCE", "WCS-WAVE")
_FITS_BLOCK = 2880
_MODES = ("full", "cutout", "mirror", "s3")
_CHUNK = 1 << 20
_MAX_REGION_DEG = 60.0

_COLUMNS = (
    "obs_id",
    "detector",
    "mjd_start",
    "mjd_end",
    "mjd_mid",
    "wave_min",
    "wave_max",
    "release",
    "url",
    "footprint",
    "planeid",
)


class ArchiveError(Exception):
    """An archive request failed.

    Parameters
    ----------
    message : str
        What failed and why.
    url : str, optional
        The URL of the failing request.
    cause : BaseException, optional
        The underlying exception, if any.

    Attributes
    ----------
    url : str or None
        The URL of the failing request.
    cause : BaseException or None
        The underlying exception, if any.

    Examples
    --------
    Every refusal and failure of this module carries the URL it concerns:

    >>> try:
    ...     archive_relpath("ftp://example.org/ibe/data/spherex/qr2/a.fits")
    ... except ArchiveError as err:
    ...     print(err.url)
    ftp://example.org/ibe/data/spherex/qr2/a.fits
    >>> err = ArchiveError("HTTP 503", url="https://irsa.example/x.fits", cause=OSError("busy"))
    >>> str(err), err.cause
    ('HTTP 503', OSError('busy'))
    """

    def __init__(self, message: str, url: str | None = None, cause: BaseException | None = None):
        super().__init__(message)
        self.url = url
        self.cause = cause


# ---------------------------------------------------------------------------------------------
# Geometry: fields and footprints on a tangent plane
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Field:
    """A field on the sky: centre (deg), corner polygon (deg) and cutout size (deg)."""

    ra: float
    dec: float
    corners: np.ndarray  # (m, 2) ra, dec in deg, convex
    width: float  # deg, along RA at the centre
    height: float  # deg, along Dec

    @property
    def radius(self) -> float:
        """Largest angular distance (deg) from the centre to a corner."""
        return float(np.max(_angsep(self.ra, self.dec, self.corners[:, 0], self.corners[:, 1])))


def _angsep(ra1, dec1, ra2, dec2):
    """Angular separation in degrees (haversine, vectorised)."""
    ra1, dec1, ra2, dec2 = (np.radians(np.asarray(v, dtype=float)) for v in (ra1, dec1, ra2, dec2))
    s = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(s, 0.0, 1.0))))


def _gnomonic(ra, dec, ra0, dec0):
    """Project (deg) onto the tangent plane at (ra0, dec0): returns xi, eta (rad) and cos c."""
    ra, dec = np.radians(np.asarray(ra, dtype=float)), np.radians(np.asarray(dec, dtype=float))
    a0, d0 = math.radians(ra0), math.radians(dec0)
    cosc = np.sin(d0) * np.sin(dec) + np.cos(d0) * np.cos(dec) * np.cos(ra - a0)
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = np.cos(dec) * np.sin(ra - a0) / cosc
        eta = (np.cos(d0) * np.sin(dec) - np.sin(d0) * np.cos(dec) * np.cos(ra - a0)) / cosc
    return xi, eta, cosc


def _inverse_gnomonic(xi, eta, ra0, dec0):
    """Tangent-plane (rad) to (ra, dec) in deg."""
    xi, eta = np.asarray(xi, dtype=float), np.asarray(eta, dtype=float)
    a0, d0 = math.radians(ra0), math.radians(dec0)
    rho = np.hypot(xi, eta)
    c = np.arctan(rho)
    with np.errstate(divide="ignore", invalid="ignore"):
        sin_dec = np.cos(c) * np.sin(d0) + np.where(rho > 0, eta * np.sin(c) * np.cos(d0) / rho, 0)
    dec = np.arcsin(np.clip(sin_dec, -1, 1))
    ra = a0 + np.arctan2(
        xi * np.sin(c), rho * np.cos(d0) * np.cos(c) - eta * np.sin(d0) * np.sin(c)
    )
    return np.degrees(ra) % 360.0, np.degrees(dec)


def _as_deg(value, name: str) -> float:
    """A float in degrees from a number (deg) or an astropy angle Quantity."""
    unit = getattr(value, "unit", None)
    if unit is not None:
        try:
            return float(value.to_value("deg"))
        except Exception as err:
            raise ValueError(f"'{name}' must be an angle; got {value!r}.") from err
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"'{name}' must be a number (deg) or an angle Quantity; got {value!r}."
        ) from err


def _field_from_region(region) -> _Field:
    """Interpret ``region``: a spatial grid, or ``(center, size)``."""
    spatial = getattr(region, "spatial", region)
    if hasattr(spatial, "wcs") and hasattr(spatial, "shape"):
        ny, nx = spatial.shape
        px = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5])
        py = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5])
        cra, cdec = spatial.wcs.pixel_to_world_values(px, py)
        ra0, dec0 = spatial.wcs.pixel_to_world_values((nx - 1) / 2.0, (ny - 1) / 2.0)
        ra0, dec0 = float(ra0), float(dec0)
        corners = np.column_stack([np.asarray(cra, float) % 360.0, np.asarray(cdec, float)])
        xi, eta, _ = _gnomonic(corners[:, 0], corners[:, 1], ra0, dec0)
        width = float(np.degrees(np.ptp(xi)))
        height = float(np.degrees(np.ptp(eta)))
        field = _Field(ra0 % 360.0, dec0, corners, width, height)
    else:
        if not isinstance(region, Sequence) or isinstance(region, str) or len(region) != 2:
            raise TypeError(
                "'region' must be a SpatialGrid/OutputGrid or a (center, size) pair; "
                f"got {type(region).__name__}."
            )
        center, size = region
        if hasattr(center, "icrs"):
            ra0, dec0 = float(center.icrs.ra.deg), float(center.icrs.dec.deg)
        else:
            try:
                ra0, dec0 = (_as_deg(v, "region") for v in center)
            except TypeError as err:
                raise TypeError(
                    f"'region' center must be a SkyCoord or (ra, dec) in deg; got {center!r}."
                ) from err
        if getattr(size, "unit", None) is None and isinstance(size, Sequence):
            if len(size) != 2:
                raise ValueError(
                    f"'region' size must be one value or (width, height); got {size!r}."
                )
            width, height = (_as_deg(v, "region") for v in size)
        elif getattr(size, "unit", None) is not None and np.ndim(size) == 1:
            width, height = (_as_deg(v, "region") for v in size)
        else:
            width = height = _as_deg(size, "region")
        if not (-90.0 <= dec0 <= 90.0) or not np.isfinite(ra0):
            raise ValueError(f"'region' center must be a valid (ra, dec); got ({ra0}, {dec0}).")
        hx, hy = math.radians(width) / 2, math.radians(height) / 2
        xi = np.array([hx, -hx, -hx, hx])  # xi grows to the east (increasing RA)
        eta = np.array([-hy, -hy, hy, hy])
        cra, cdec = _inverse_gnomonic(xi, eta, ra0, dec0)
        field = _Field(ra0 % 360.0, dec0, np.column_stack([cra, cdec]), width, height)
    if not (0 < field.width <= _MAX_REGION_DEG and 0 < field.height <= _MAX_REGION_DEG):
        raise ValueError(
            f"'region' must be between 0 and {_MAX_REGION_DEG:g} deg on a side; "
            f"got {field.width:.6g} x {field.height:.6g} deg."
        )
    return field


def _convex_hull_sorted(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order each polygon's vertices by angle around its centroid (rows are polygons)."""
    ang = np.arctan2(y - y.mean(axis=1, keepdims=True), x - x.mean(axis=1, keepdims=True))
    order = np.argsort(ang, axis=1)
    return np.take_along_axis(x, order, axis=1), np.take_along_axis(y, order, axis=1)


def _edge_normals(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Edge normals of polygons (..., k) -> (..., k, 2)."""
    dx = np.roll(x, -1, axis=-1) - x
    dy = np.roll(y, -1, axis=-1) - y
    return np.stack([-dy, dx], axis=-1)


def _footprints_intersect(field: _Field, footprints: np.ndarray) -> np.ndarray:
    """Exact intersection test of convex footprints (n, k, 2) in deg with the field polygon.

    Both are projected onto the tangent plane at the field centre, where great-circle edges
    are straight lines, and tested with the separating-axis theorem. Footprints with a vertex
    more than 90 deg from the field centre cannot touch a field of at most 60 deg and are
    reported as not intersecting.
    """
    n = footprints.shape[0]
    if n == 0:
        return np.zeros(0, dtype=bool)
    fx, fy, fcos = _gnomonic(footprints[..., 0], footprints[..., 1], field.ra, field.dec)
    front = np.all(fcos > 1e-6, axis=1) & np.all(np.isfinite(footprints), axis=(1, 2))
    fx = np.where(front[:, None], fx, 0.0)
    fy = np.where(front[:, None], fy, 0.0)
    fx, fy = _convex_hull_sorted(fx, fy)
    rx, ry, _ = _gnomonic(field.corners[:, 0], field.corners[:, 1], field.ra, field.dec)
    rx, ry = _convex_hull_sorted(rx[None, :], ry[None, :])
    axes = np.concatenate(
        [_edge_normals(fx, fy), np.broadcast_to(_edge_normals(rx, ry), (n, rx.shape[1], 2))],
        axis=1,
    )  # (n, a, 2)
    proj_f = axes[:, :, None, 0] * fx[:, None, :] + axes[:, :, None, 1] * fy[:, None, :]
    proj_r = axes[:, :, None, 0] * rx[:, None, :] + axes[:, :, None, 1] * ry[:, None, :]
    eps = 1e-12
    separated = (proj_f.max(axis=2) < proj_r.min(axis=2) - eps) | (
        proj_r.max(axis=2) < proj_f.min(axis=2) - eps
    )
    return front & ~np.any(separated, axis=1)


# ---------------------------------------------------------------------------------------------
# Query
# ---------------------------------------------------------------------------------------------


class _TimeoutSession:
    """Delegate to a requests-like session, adding a default timeout to every request."""

    def __init__(self, session, timeout: float):
        self._session = session
        self._timeout = timeout

    def request(self, method, url, **kwargs):
        kwargs.setdefault("timeout", self._timeout)
        return self._session.request(method, url, **kwargs)

    def get(self, url, **kwargs):
        kwargs.setdefault("allow_redirects", True)
        return self.request("GET", url, **kwargs)

    def post(self, url, data=None, **kwargs):
        return self.request("POST", url, data=data, **kwargs)

    def delete(self, url, **kwargs):
        return self.request("DELETE", url, **kwargs)

    def head(self, url, **kwargs):
        kwargs.setdefault("allow_redirects", False)
        return self.request("HEAD", url, **kwargs)

    def __getattr__(self, name):
        if name == "update_from_capabilities":  # never let pyvo fetch capabilities implicitly
            raise AttributeError(name)
        return getattr(self._session, name)


def _new_session(pool: int = 10):
    import requests

    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=pool, pool_maxsize=pool)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = "drizzle3d-archive"
    return session


def _normalise_detectors(detectors) -> list[int] | None:
    if detectors is None:
        return None
    if isinstance(detectors, (int, np.integer, str)):
        detectors = [detectors]
    out = []
    for d in detectors:
        text = str(d).strip().upper().removeprefix("SPHEREX-").removeprefix("D")
        if not text.isdigit() or not 1 <= int(text) <= 6:
            raise ValueError(f"'detectors' must be detector numbers 1-6 (or 'D1'-'D6'); got {d!r}.")
        out.append(int(text))
    if not out:
        raise ValueError("'detectors' must name at least one detector; got an empty sequence.")
    return sorted(set(out))


def _normalise_mjd_range(mjd_range) -> tuple[float, float] | None:
    if mjd_range is None:
        return None
    try:
        lo, hi = mjd_range
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"'mjd_range' must be a (start, end) pair of MJD; got {mjd_range!r}."
        ) from err
    lo = -math.inf if lo is None else float(lo)
    hi = math.inf if hi is None else float(hi)
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise ValueError(f"'mjd_range' must be (start, end) with start <= end; got {mjd_range!r}.")
    return lo, hi


def _normalise_releases(releases) -> list[str] | None:
    if releases is None:
        return None
    if isinstance(releases, str):
        releases = [releases]
    out = [str(r).strip().lower() for r in releases]
    if not out or any(not r for r in out):
        raise ValueError(f"'releases' must be non-empty release names; got {releases!r}.")
    return out


def _build_adql(field: _Field, detectors, mjd_range) -> str:
    """The ADQL sent to IRSA: footprints intersecting the field's bounding circle."""
    # Pad the circle by 1 arcsec so that rounding can never drop a touching footprint.
    radius = field.radius + 1.0 / 3600.0
    where = [
        f"1 = INTERSECTS(CIRCLE('ICRS', {field.ra:.10f}, {field.dec:.10f}, {radius:.10f}), p.poly)"
    ]
    if detectors is not None:
        names = ", ".join(f"'SPHEREx-D{d}'" for d in detectors)
        where.append(f"p.energy_bandpassname IN ({names})")
    if mjd_range is not None:
        lo, hi = mjd_range
        if math.isfinite(lo):
            where.append(f"(p.time_bounds_lower + p.time_bounds_upper) / 2.0 >= {lo:.10f}")
        if math.isfinite(hi):
            where.append(f"(p.time_bounds_lower + p.time_bounds_upper) / 2.0 <= {hi:.10f}")
    return (
        "SELECT a.uri, p.planeid, p.obsid, p.obs_publisher_did, p.energy_bandpassname, "
        "p.energy_bounds_lower, p.energy_bounds_upper, p.time_bounds_lower, "
        "p.time_bounds_upper, p.poly "
        "FROM spherex.artifact a JOIN spherex.plane p ON a.planeid = p.planeid "
        "WHERE " + " AND ".join(where) + " ORDER BY p.time_bounds_lower"
    )


_POLY_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _parse_polygon(value) -> np.ndarray:
    """A footprint as (k, 2) deg from a DALI double array or an STC-S/ADQL polygon string."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        text = re.sub(r"(?i)^\s*polygon\s*(\(\s*)?('?icrs'?\s*,?\s*|j2000\s*|fk5\s*)?", "", value)
        nums = np.array([float(v) for v in _POLY_NUMBER.findall(text)], dtype=float)
    else:
        nums = np.ma.filled(np.ma.asarray(value, dtype=float).ravel(), np.nan)
    if nums.size < 6 or nums.size % 2:
        raise ValueError(f"'poly' must hold at least 3 (ra, dec) vertices; got {value!r}.")
    return nums.reshape(-1, 2)


def _release_from(uri: str, did: str) -> str:
    """The release label from the file path (``qr2``, ``qr3``, ...), ``_deep`` for deep data."""
    parts = [p for p in PurePosixPath(urlsplit(uri).path).parts if p not in ("/", "")]
    release = ""
    for i in range(len(parts) - 1):
        if parts[i].lower() == "spherex":
            release = parts[i + 1].lower()
            break
    collection = did.split("?", 1)[0].rsplit("/", 1)[-1].lower() if did else ""
    if not release and collection.startswith("spherex_"):
        release = collection.removeprefix("spherex_")
    is_deep = "deep" in collection or any("deep" in p.lower() for p in parts[:-1])
    if is_deep and "deep" not in release:
        release = f"{release}_deep"
    return release


def _obs_id_from(did: str, obsid: str) -> str:
    match = re.search(r"\?([^/]+)", did or "")
    return match.group(1) if match else str(obsid)


def _release_matches(release: str, wanted: list[str]) -> bool:
    return any(release == w or (w == "deep" and release.endswith("_deep")) for w in wanted)


def _empty_table() -> Table:
    return Table(
        [
            np.zeros(0, dtype="U1"),
            np.zeros(0, dtype=np.int16),
            *(np.zeros(0) for _ in range(5)),
            np.zeros(0, dtype="U1"),
            np.zeros(0, dtype="U1"),
            np.zeros((0, 4, 2)),
            np.zeros(0, dtype="U1"),
        ],
        names=_COLUMNS,
    )


def _results_table(votable_table: Table, data_url: str) -> Table:
    """Convert the TAP answer to one row per image with drizzle3d's column names."""
    n = len(votable_table)
    if n == 0:
        return _empty_table()

    def col(name):
        values = votable_table[name]
        return (
            [v.decode() if isinstance(v, bytes) else v for v in np.ma.filled(values, "")]
            if (values.dtype.kind in "USO")
            else np.ma.filled(np.ma.asarray(values, dtype=float), np.nan)
        )

    uris = [str(u) for u in col("uri")]
    dids = [str(d) for d in col("obs_publisher_did")]
    obsids = [str(o) for o in col("obsid")]
    bands = [str(b) for b in col("energy_bandpassname")]
    detector = np.array(
        [int(m.group(1)) if (m := re.search(r"D(\d)\s*$", b)) else -1 for b in bands],
        dtype=np.int16,
    )
    t0 = np.asarray(col("time_bounds_lower"), dtype=float)
    t1 = np.asarray(col("time_bounds_upper"), dtype=float)
    w0 = np.asarray(col("energy_bounds_lower"), dtype=float) * 1e6
    w1 = np.asarray(col("energy_bounds_upper"), dtype=float) * 1e6
    polys = [_parse_polygon(p) for p in votable_table["poly"]]
    nvert = {p.shape[0] for p in polys}
    if len(nvert) == 1:
        footprint = np.stack(polys)
    else:
        footprint = np.empty(n, dtype=object)
        footprint[:] = polys
    urls = [u if urlsplit(u).scheme else data_url.rstrip("/") + "/" + u.lstrip("/") for u in uris]
    table = Table(
        {
            "obs_id": [_obs_id_from(d, o) for d, o in zip(dids, obsids, strict=True)],
            "detector": detector,
            "mjd_start": t0,
            "mjd_end": t1,
            "mjd_mid": 0.5 * (t0 + t1),
            "wave_min": w0,
            "wave_max": w1,
            "release": [_release_from(u, d) for u, d in zip(uris, dids, strict=True)],
            "url": urls,
            "footprint": footprint,
            "planeid": [str(p) for p in col("planeid")],
        }
    )
    table["wave_min"].unit = table["wave_max"].unit = "um"
    table["mjd_start"].unit = table["mjd_end"].unit = table["mjd_mid"].unit = "d"
    table["footprint"].unit = "deg"
    return table


def _tap_error_text(err: BaseException) -> str:
    """The service's own message for a failed TAP request (QUERY_STATUS INFO), if any."""
    cause = getattr(err, "cause", None)
    response = getattr(cause, "response", None) or getattr(err, "response", None)
    text = getattr(response, "text", None) if response is not None else None
    if text:
        match = re.search(
            r"<INFO[^>]*name=\"QUERY_STATUS\"[^>]*value=\"ERROR\"[^>]*>(.*?)</INFO>", text, re.S
        ) or re.search(
            r"<INFO[^>]*value=\"ERROR\"[^>]*name=\"QUERY_STATUS\"[^>]*>(.*?)</INFO>", text, re.S
        )
        if match:
            return " ".join(match.group(1).split())
    return str(err).strip()


def _is_transient(err: BaseException) -> bool:
    """True for time-outs, dropped connections and 5xx answers (worth an async retry)."""
    import requests

    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        code = getattr(e, "code", None)
        if isinstance(code, int) and code >= 500:
            return True
        if isinstance(e, (requests.ConnectionError, requests.Timeout, TimeoutError)):
            return True
        response = getattr(e, "response", None)
        if response is not None and getattr(response, "status_code", 0) >= 500:
            return True
        cause = getattr(e, "cause", None)
        todo.extend([cause if isinstance(cause, BaseException) else None])
        todo.extend([e.__cause__, e.__context__])
    return False


def _run_tap(query: str, tap_url: str, session, sync_timeout: float, async_timeout: float):
    """Run a TAP query: sync first, an async UWS job if the sync request times out or 5xx."""
    import pyvo
    from pyvo.dal.exceptions import DALAccessError, DALQueryError, DALServiceError

    sync_session = _TimeoutSession(session, sync_timeout)
    service = pyvo.dal.TAPService(tap_url, session=sync_session)
    try:
        return service.run_sync(query).to_table()
    except DALQueryError as err:
        raise ArchiveError(
            f"IRSA TAP rejected the query: {_tap_error_text(err)}", url=tap_url, cause=err
        ) from err
    except DALAccessError as err:
        if not _is_transient(err):
            raise ArchiveError(
                f"IRSA TAP query failed: {_tap_error_text(err)}", url=tap_url, cause=err
            ) from err
        logger.info("synchronous TAP query failed (%s); retrying as an async job", err)

    poll_session = _TimeoutSession(session, min(sync_timeout, 60.0))
    service = pyvo.dal.TAPService(tap_url, session=poll_session)
    deadline = time.monotonic() + async_timeout
    job = None
    try:
        job = service.submit_job(query)
        job.run()
        interval = 0.05
        while True:
            phase = job.phase
            if phase in ("COMPLETED", "ERROR", "ABORTED"):
                break
            if time.monotonic() > deadline:
                with contextlib.suppress(DALServiceError):
                    job.abort()
                raise ArchiveError(
                    f"IRSA TAP async job did not finish within {async_timeout:g} s "
                    f"(phase {phase}).",
                    url=job.url,
                )
            time.sleep(interval)
            interval = min(interval * 1.5, 5.0)
        if phase != "COMPLETED":
            job.raise_if_error()
            raise ArchiveError(f"IRSA TAP async job ended in phase {phase}.", url=job.url)
        return job.fetch_result().to_table()
    except DALQueryError as err:
        raise ArchiveError(
            f"IRSA TAP rejected the query: {_tap_error_text(err)}", url=tap_url, cause=err
        ) from err
    except DALAccessError as err:
        raise ArchiveError(
            f"IRSA TAP async query failed: {_tap_error_text(err)}", url=tap_url, cause=err
        ) from err
    finally:
        if job is not None and job.url is not None:
            with contextlib.suppress(Exception):
                job.delete()


def query_spherex(
    region,
    *,
    detectors: Iterable[int | str] | int | str | None = None,
    mjd_range: tuple[float | None, float | None] | None = None,
    releases: Iterable[str] | str | None = None,
    max_images: int | None = None,
    tap_url: str = IRSA_TAP_URL,
    session: Any = None,
    data_url: str | None = None,
    sync_timeout: float = 120.0,
    async_timeout: float = 1800.0,
) -> Table:
    """Find every SPHEREx Level-2 image whose footprint intersects a field.

    Parameters
    ----------
    region : SpatialGrid, OutputGrid or tuple
        The field: the output grid (its pixel-corner polygon), or ``(center, size)`` where
        ``center`` is a `~astropy.coordinates.SkyCoord` or ``(ra, dec)`` in deg and ``size``
        is one side or ``(width, height)``, in deg or as angle Quantities; the field is then
        the box of that size on the tangent plane at the centre, with width along RA.
    detectors : int, str or sequence, optional
        Detectors to keep, as numbers 1-6 or ``"D1"``-``"D6"``. Default: all.
    mjd_range : (float or None, float or None), optional
        Keep images whose mid-exposure MJD lies in ``[start, end]``; ``None`` leaves a side
        open.
    releases : str or sequence of str, optional
        Release labels to keep, as in the ``release`` column (``"qr2"``, ``"qr3"``,
        ``"qr2_deep"``, ...); ``"deep"`` selects every deep-field release. Default: all.
    max_images : int, optional
        Keep only the first ``max_images`` images in time order; a warning says how many
        were dropped.
    tap_url : str, optional
        TAP service URL (IRSA by default; injectable for tests and mirrors).
    session : requests.Session, optional
        HTTP session to use.
    data_url : str, optional
        Base URL prepended to the archive's relative file URIs. Default: scheme and host of
        ``tap_url`` (``https://irsa.ipac.caltech.edu/`` for IRSA).
    sync_timeout : float, optional
        Seconds to wait for the synchronous query before falling back to an async job.
    async_timeout : float, optional
        Seconds to wait for the async job before giving up.

    Returns
    -------
    astropy.table.Table
        One row per image, sorted by start time, with columns ``obs_id``, ``detector``,
        ``mjd_start``, ``mjd_end``, ``mjd_mid`` (MJD), ``wave_min``, ``wave_max`` (um),
        ``release``, ``url`` (file URL), ``footprint`` (``(k, 2)`` polygon vertices,
        (ra, dec) deg) and ``planeid``. ``meta`` records the field (``field_center``,
        ``field_size`` and ``field_corners`` in deg) for cutouts.

    Raises
    ------
    ArchiveError
        If the service rejects the query (the service's message is included) or cannot be
        reached.
    ValueError
        If an argument has an invalid value.
    TypeError
        If ``region`` has an unsupported type.

    Notes
    -----
    The server is asked, with ADQL ``INTERSECTS(CIRCLE(...), p.poly)``, for the footprints
    that touch the circle circumscribing the field; the answer is then filtered exactly by
    intersecting each returned footprint polygon with the field polygon on the tangent plane
    at the field centre (straight lines there are great circles). Images that overlap the
    field without containing its centre are therefore found, and images whose footprint only
    touches the circle are not returned. Footprints are assumed convex (SPHEREx footprints
    are the four outer pixel corners).

    Examples
    --------
    A field is a centre and a size, or the output grid itself. Only the lines that ask
    the real IRSA service are skipped here.

    >>> from astropy.coordinates import SkyCoord
    >>> import astropy.units as u
    >>> from drizzle3d.grid import SpatialGrid
    >>> field = (SkyCoord(210.80, 54.35, unit="deg"), 10 * u.arcmin)
    >>> grid = SpatialGrid.from_center(210.80, 54.35, 10, 10)
    >>> images = query_spherex(field, detectors=[3, 4], releases="qr2")  # doctest: +SKIP
    >>> images = query_spherex(grid, mjd_range=(60800, None))  # doctest: +SKIP
    >>> images["obs_id", "detector", "mjd_mid", "url"]  # doctest: +SKIP

    Invalid arguments are refused before anything is sent:

    >>> query_spherex(field, max_images=0)
    Traceback (most recent call last):
    ...
    ValueError: 'max_images' must be at least 1; got 0.
    """
    field = _field_from_region(region)
    dets = _normalise_detectors(detectors)
    mjds = _normalise_mjd_range(mjd_range)
    rels = _normalise_releases(releases)
    if max_images is not None and (
        isinstance(max_images, bool) or not isinstance(max_images, (int, np.integer))
    ):
        raise TypeError(f"'max_images' must be an int or None; got {type(max_images).__name__}.")
    if max_images is not None and max_images < 1:
        raise ValueError(f"'max_images' must be at least 1; got {max_images}.")
    for name, value in (("sync_timeout", sync_timeout), ("async_timeout", async_timeout)):
        if not value > 0:
            raise ValueError(f"'{name}' must be positive seconds; got {value!r}.")
    if data_url is None:
        parts = urlsplit(tap_url)
        data_url = f"{parts.scheme}://{parts.netloc}/"
    own_session = session is None
    session = _new_session() if own_session else session
    query = _build_adql(field, dets, mjds)
    logger.debug("TAP query to %s: %s", tap_url, query)
    try:
        raw = _run_tap(query, tap_url, session, sync_timeout, async_timeout)
    finally:
        if own_session:
            session.close()
    table = _results_table(raw, data_url)
    n_server = len(table)
    if len(table):
        keep = _footprints_intersect(field, _footprints_array(table["footprint"]))
        if dets is not None:
            keep &= np.isin(np.asarray(table["detector"]), dets)
        if mjds is not None:
            mid = np.asarray(table["mjd_mid"])
            keep &= (mid >= mjds[0]) & (mid <= mjds[1])
        if rels is not None:
            keep &= np.array([_release_matches(r, rels) for r in table["release"]], dtype=bool)
        table = table[keep]
        order = np.lexsort(
            (
                np.asarray(table["detector"]),
                np.asarray(table["obs_id"]),
                np.asarray(table["mjd_start"]),
            )
        )
        table = table[order]
    logger.info("IRSA returned %d candidate images; %d intersect the field", n_server, len(table))
    if max_images is not None and len(table) > max_images:
        dropped = len(table) - max_images
        warnings.warn(
            f"max_images={max_images} kept the first {max_images} of {len(table)} images in time "
            f"order; {dropped} were dropped.",
            UserWarning,
            stacklevel=2,
        )
        table = table[:max_images]
    table.meta["field_center"] = [field.ra, field.dec]
    table.meta["field_size"] = [field.width, field.height]
    table.meta["field_corners"] = field.corners.tolist()
    return table


def _footprints_array(column) -> np.ndarray:
    """(n, k, 2) footprints; ragged polygons are padded by repeating their last vertex."""
    values = list(column)
    arrays = [np.asarray(v, dtype=float).reshape(-1, 2) for v in values]
    k = max(a.shape[0] for a in arrays)
    out = np.empty((len(arrays), k, 2))
    for i, a in enumerate(arrays):  # one iteration per image, not per pixel
        out[i, : a.shape[0]] = a
        out[i, a.shape[0] :] = a[-1]
    return out


# ---------------------------------------------------------------------------------------------
# Paths: archive tree, mirror, S3
# ---------------------------------------------------------------------------------------------


def archive_relpath(url: str) -> PurePosixPath:
    """The path of an archive file relative to the SPHEREx archive root.

    Parameters
    ----------
    url : str
        An IRSA file URL (``https://irsa.ipac.caltech.edu/ibe/data/spherex/...``, any host)
        or the relative URI of ``spherex.artifact`` (``ibe/data/spherex/...``). A query
        string (cutout parameters) is ignored.

    Returns
    -------
    pathlib.PurePosixPath
        The path under the archive root, e.g. ``qr2/level2/2025W19_2B/.../file.fits``.

    Raises
    ------
    ArchiveError
        If the URL has a scheme other than http(s), is not under ``/ibe/data/spherex/``, or
        contains ``..``, ``.``, empty, backslash or control-character path segments, also
        when percent-encoded.
    TypeError
        If ``url`` is not a str.

    Examples
    --------
    >>> str(archive_relpath("https://irsa.ipac.caltech.edu/ibe/data/spherex/qr2/level2/a.fits"))
    'qr2/level2/a.fits'
    >>> str(archive_relpath("ibe/data/spherex/qr2/level2/a.fits?center=1,2&size=0.1"))
    'qr2/level2/a.fits'
    >>> archive_relpath("https://irsa.ipac.caltech.edu/ibe/data/spherex/qr2/%2e%2e/etc")
    Traceback (most recent call last):
    ...
    drizzle3d.archive.ArchiveError: refused URL with unsafe path segments ['..']: ...
    """
    if not isinstance(url, str):
        raise TypeError(f"'url' must be a str; got {type(url).__name__}.")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", ""):
        raise ArchiveError(f"refused URL with scheme {parts.scheme!r}: {url!r}", url=url)
    if not parts.scheme and (parts.netloc or url.startswith("/")):
        raise ArchiveError(
            f"refused URL that is neither http(s) nor archive-relative: {url!r}", url=url
        )
    raw_segments = parts.path.split("/")
    if parts.scheme:
        raw_segments = raw_segments[1:]  # the path of an absolute URL starts with "/"
    segments = [unquote(s) for s in raw_segments]
    bad = [
        s
        for s in segments
        if s in ("", ".", "..") or "/" in s or "\\" in s or any(ord(c) < 32 for c in s) or ":" in s
    ]
    if bad:
        raise ArchiveError(f"refused URL with unsafe path segments {bad!r}: {url!r}", url=url)
    if tuple(segments[:3]) != _ARCHIVE_PREFIX or len(segments) < 4:
        raise ArchiveError(
            f"refused URL outside the SPHEREx archive tree (/ibe/data/spherex/...): {url!r}",
            url=url,
        )
    return PurePosixPath(*segments[3:])


def mirror_path(url: str, root: str | os.PathLike) -> Path:
    """Map an archive URL to its file under a local copy of the archive tree.

    Parameters
    ----------
    url : str
        Archive file URL (see :func:`archive_relpath`).
    root : str or os.PathLike
        Local directory that corresponds to ``https://irsa.ipac.caltech.edu/ibe/data/spherex/``.

    Returns
    -------
    pathlib.Path
        Absolute path under ``root`` (the file need not exist).

    Raises
    ------
    ArchiveError
        If the URL is refused by :func:`archive_relpath` or would resolve outside ``root``
        (for example through a symbolic link).

    Examples
    --------
    >>> mirror_path("https://irsa.ipac.caltech.edu/ibe/data/spherex/qr2/a.fits", "/m").as_posix()
    '/m/qr2/a.fits'
    """
    rel = archive_relpath(url)
    base = Path(root).resolve()
    target = (base / Path(*rel.parts)).resolve()
    if not target.is_relative_to(base):
        raise ArchiveError(f"refused URL that resolves outside the mirror {base}: {url!r}", url=url)
    return target


def s3_url(url: str) -> str:
    """Map an archive URL to the same file in the public SPHEREx S3 bucket.

    Parameters
    ----------
    url : str
        Archive file URL (see :func:`archive_relpath`).

    Returns
    -------
    str
        ``s3://nasa-irsa-spherex/<path under the archive root>``; open it anonymously, e.g.
        ``astropy.io.fits.open(u, fsspec_kwargs={"anon": True})``.

    Raises
    ------
    ArchiveError
        If the URL is refused by :func:`archive_relpath`.

    Examples
    --------
    >>> s3_url("https://irsa.ipac.caltech.edu/ibe/data/spherex/qr2/level2/a.fits")
    's3://nasa-irsa-spherex/qr2/level2/a.fits'
    """
    return f"s3://{S3_BUCKET}/{archive_relpath(url).as_posix()}"


# ---------------------------------------------------------------------------------------------
# FITS integrity
# ---------------------------------------------------------------------------------------------

_CARD_INT = re.compile(rb"^([A-Z0-9_-]{1,8})\s*=\s*([-+]?\d+)")


def verify_fits(path: str | os.PathLike, *, required_extnames: Sequence[str] = ()) -> str | None:
    """Check that a FITS file is structurally complete, without reading its data.

    Every HDU's header is parsed (``BITPIX``, ``NAXISn``, ``PCOUNT``, ``GCOUNT``) and the
    file must hold each HDU's padded data and end exactly after the last one.

    Parameters
    ----------
    path : str or os.PathLike
        File to check.
    required_extnames : sequence of str, optional
        ``EXTNAME`` values that must be present.

    Returns
    -------
    str or None
        ``None`` if the file is complete, else the reason it is not. Problems are
        reported, never raised.

    Examples
    --------
    >>> import tempfile
    >>> from astropy.io import fits
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = Path(tmp.name) / "x.fits"
    >>> fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(name="IMAGE")]).writeto(path)
    >>> verify_fits(path, required_extnames=["IMAGE"]) is None
    True
    >>> verify_fits(path, required_extnames=["IMAGE", "FLAGS"])
    "missing HDUs ['FLAGS']"
    >>> _ = path.write_bytes(path.read_bytes()[:-100])  # an interrupted download
    >>> verify_fits(path)
    'truncated header in HDU 1 at byte 2880'
    >>> verify_fits("missing.fits")
    'cannot open: missing.fits'
    >>> tmp.cleanup()
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        fh = path.open("rb")
    except OSError:
        return f"cannot open: {path}"
    extnames: set[str] = set()
    with fh:
        offset = 0
        index = 0
        while offset < size:
            cards: dict[bytes, int] = {}
            extname = None
            first = None
            ended = False
            while not ended:
                block = fh.read(_FITS_BLOCK)
                if len(block) < _FITS_BLOCK:
                    return f"truncated header in HDU {index} at byte {offset}"
                offset += _FITS_BLOCK
                if first is None:
                    first = block[:80]
                    if index == 0 and not first.startswith(b"SIMPLE  ="):
                        return "not a FITS file (no SIMPLE card)"
                    if index > 0 and not first.startswith(b"XTENSION="):
                        return f"HDU {index} does not start with XTENSION"
                for i in range(0, _FITS_BLOCK, 80):
                    card = block[i : i + 80]
                    if card.startswith(b"END") and card[3:].strip() == b"":
                        ended = True
                        break
                    if (m := _CARD_INT.match(card)) is not None:
                        cards[m.group(1)] = int(m.group(2))
                    elif card.startswith(b"EXTNAME ="):
                        extname = (
                            card[9:]
                            .split(b"/")[0]
                            .strip()
                            .strip(b"'")
                            .strip()
                            .decode("ascii", "replace")
                        )
            naxis = cards.get(b"NAXIS", 0)
            bitpix = cards.get(b"BITPIX")
            if bitpix is None:
                return f"HDU {index} has no BITPIX"
            if naxis > 0:
                dims = [cards.get(f"NAXIS{k}".encode(), 0) for k in range(1, naxis + 1)]
                nelem = math.prod(dims)
                if first.startswith(b"SIMPLE") and dims[0] == 0:  # random groups
                    nelem = math.prod(dims[1:])
                ndata = (
                    abs(bitpix) // 8 * cards.get(b"GCOUNT", 1) * (cards.get(b"PCOUNT", 0) + nelem)
                )
            else:
                ndata = 0
            padded = -(-ndata // _FITS_BLOCK) * _FITS_BLOCK
            if offset + padded > size:
                return (
                    f"truncated data in HDU {index}: needs {offset + padded} bytes, file has {size}"
                )
            offset += padded
            fh.seek(offset)
            if extname:
                extnames.add(extname.upper())
            index += 1
    if offset != size:
        return f"file size {size} is not a whole number of FITS blocks"
    missing = [e for e in required_extnames if e.upper() not in extnames]
    if missing:
        return f"missing HDUs {missing}"
    return None


def _required_for(path: Path) -> tuple[str, ...]:
    return _L2_EXTNAMES if path.name.startswith("level2_") else ()


# ---------------------------------------------------------------------------------------------
# Fetch
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchFailure:
    """One file that could not be fetched (an entry of :attr:`FetchResult.failures`).

    Parameters
    ----------
    index : int
        Row of the input table.
    url : str
        The URL (with cutout parameters, if any) that failed.
    error : ArchiveError
        Why; ``error.cause`` holds the underlying exception.

    Examples
    --------
    >>> url = "https://irsa.ipac.caltech.edu/ibe/data/spherex/qr2/a.fits"
    >>> failure = FetchFailure(3, url, ArchiveError("HTTP 404 Not Found", url=url))
    >>> failure.index, str(failure.error)
    (3, 'HTTP 404 Not Found')
    """

    index: int
    url: str
    error: ArchiveError


class FetchResult(list):
    """Local paths (or ``s3://`` URLs) in table order; ``None`` where a row failed.

    A :class:`list` returned by :func:`fetch`, with counters and the failures.

    Parameters
    ----------
    items : iterable, optional
        Initial entries (paths, URLs or ``None``).

    Attributes
    ----------
    failures : list of FetchFailure
        Rows that could not be fetched, with the reason.
    n_downloaded : int
        Files transferred in this call.
    n_skipped : int
        Files already present and verified, so not transferred.
    bytes_transferred : int
        Bytes received over HTTP in this call.

    Examples
    --------
    >>> result = FetchResult(["a.fits", None, "c.fits"])
    >>> len(result), result.paths
    (3, ['a.fits', 'c.fits'])
    >>> result.failures, result.n_downloaded, result.n_skipped, result.bytes_transferred
    ([], 0, 0, 0)
    """

    def __init__(self, items=()):
        super().__init__(items)
        self.failures: list[FetchFailure] = []
        self.n_downloaded = 0
        self.n_skipped = 0
        self.bytes_transferred = 0

    @property
    def paths(self) -> list:
        """The successful entries only, in table order.

        Examples
        --------
        >>> FetchResult([None, "b.fits"]).paths
        ['b.fits']
        """
        return [p for p in self if p is not None]


class _NoProgress:
    def __init__(self, *args, **kwargs):
        pass

    def update(self, n=1):
        pass

    def close(self):
        pass


class _Progress:
    """Thread-safe wrapper around a tqdm-like bar."""

    def __init__(self, factory, **kwargs):
        self._bar = factory(**kwargs)
        self._lock = threading.Lock()

    def update(self, n):
        with self._lock:
            self._bar.update(n)

    def close(self):
        with self._lock:
            self._bar.close()


def _cutout_spec(field: _Field, margin_deg: float) -> tuple[str, str]:
    """Cutout query string and a short tag that names it.

    The cutout box is aligned with the image axes, whose rotation is unknown here, so it is a
    square whose side is the field's diagonal plus twice the margin.
    """
    side = math.hypot(field.width, field.height) + 2.0 * margin_deg
    query = f"center={field.ra:.8f},{field.dec:.8f}&size={side:.8f}"
    tag = hashlib.sha1(query.encode()).hexdigest()[:10]
    return query, tag


class _HTTPStatusError(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(f"HTTP {status} {reason}".strip())
        self.status = status


def _download_once(session, url: str, target: Path, timeout, on_bytes) -> int:
    """One GET into a temporary file next to ``target``; verified, then renamed into place."""
    import requests

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    tmp_fits = None
    received = 0
    try:
        with os.fdopen(fd, "wb") as out, session.get(url, stream=True, timeout=timeout) as resp:
            if resp.status_code >= 400:
                raise _HTTPStatusError(resp.status_code, resp.reason or "")
            encoded = resp.headers.get("Content-Encoding", "identity").lower() not in (
                "identity",
                "",
            )
            expected = resp.headers.get("Content-Length")
            for chunk in resp.iter_content(_CHUNK):
                out.write(chunk)
                received += len(chunk)
                on_bytes(len(chunk))
            if expected is not None and not encoded and received != int(expected):
                raise requests.exceptions.ChunkedEncodingError(
                    f"received {received} of {expected} bytes"
                )
        with tmp.open("rb") as fh:
            magic = fh.read(2)
        if magic == b"\x1f\x8b":  # a gzipped body (IRSA cutouts are gzipped by default)
            fd2, tmp_fits_name = tempfile.mkstemp(
                dir=target.parent, prefix=f".{target.name}.", suffix=".part"
            )
            tmp_fits = Path(tmp_fits_name)
            try:
                with gzip.open(tmp, "rb") as src, os.fdopen(fd2, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
            except (OSError, EOFError) as err:
                raise requests.exceptions.ChunkedEncodingError(f"corrupt gzip body: {err}") from err
            tmp.unlink()
            tmp, tmp_fits = tmp_fits, None
        problem = verify_fits(tmp, required_extnames=_required_for(target))
        if problem is not None:
            raise requests.exceptions.ChunkedEncodingError(f"downloaded file is invalid: {problem}")
        os.replace(tmp, target)
        return received
    finally:
        for leftover in (tmp, tmp_fits):
            if leftover is not None and leftover.exists() and leftover != target:
                with contextlib.suppress(OSError):
                    leftover.unlink()


def _fetch_one(
    session, url, target, *, retries, backoff, timeout, on_bytes, overwrite
) -> int | None:
    """Fetch one file with retries; returns bytes received, or None if already complete."""
    import requests

    if target.exists() and not overwrite:
        problem = verify_fits(target, required_extnames=_required_for(target))
        if problem is None:
            logger.debug("already complete, skipped: %s", target)
            return None
        logger.info("re-fetching %s: existing file is invalid (%s)", target.name, problem)
    attempt = 0
    while True:
        try:
            n = _download_once(session, url, target, timeout, on_bytes)
            logger.info("fetched %s (%d bytes)", target.name, n)
            return n
        except _HTTPStatusError as err:
            if err.status < 500 or attempt >= retries:
                raise ArchiveError(f"{err} for {url}", url=url, cause=err) from err
            reason = err
        except requests.RequestException as err:
            if attempt >= retries:
                raise ArchiveError(
                    f"{type(err).__name__}: {err} for {url} (after {attempt + 1} attempts)",
                    url=url,
                    cause=err,
                ) from err
            reason = err
        except OSError as err:
            raise ArchiveError(f"cannot write {target}: {err}", url=url, cause=err) from err
        delay = backoff * (2**attempt)
        logger.info("retrying %s in %.2f s after: %s", url, delay, reason)
        time.sleep(delay)
        attempt += 1


def fetch(
    table: Table,
    dest: str | os.PathLike | None = None,
    *,
    mode: str = "full",
    workers: int = 4,
    mirror_root: str | os.PathLike | None = None,
    region=None,
    cutout_margin=1.0 / 60.0,
    overwrite: bool = False,
    session: Any = None,
    progress: Callable[..., Any] | None = None,
    retries: int = 4,
    backoff: float = 1.0,
    timeout: float | tuple[float, float] = (30.0, 300.0),
) -> FetchResult:
    """Fetch the images of a :func:`query_spherex` table.

    Parameters
    ----------
    table : astropy.table.Table
        Rows with a ``url`` column (as returned by :func:`query_spherex`).
    dest : str or os.PathLike, optional
        Download directory for ``"full"`` and ``"cutout"``; files are laid out like the
        archive tree (``dest/qr2/level2/...``), so ``dest`` can later serve as a mirror.
    mode : {"full", "cutout", "mirror", "s3"}, optional
        ``"full"`` downloads whole files; ``"cutout"`` asks IRSA's cutout service for the
        field plus ``cutout_margin`` (gzipped answers are decompressed; files are named
        ``<name>.cutout-<tag>.fits`` with a tag derived from the cutout parameters);
        ``"mirror"`` returns paths under ``mirror_root`` without any transfer; ``"s3"``
        returns ``s3://`` URLs in the public bucket (needs the ``s3`` extra).
    workers : int, optional
        Parallel downloads.
    mirror_root : str or os.PathLike, optional
        Local copy of the archive tree, for ``mode="mirror"``.
    region : optional
        The field for cutouts, as in :func:`query_spherex`. Default: the field recorded in
        ``table.meta`` by :func:`query_spherex`.
    cutout_margin : float or Quantity, optional
        Margin around the field for cutouts, in deg (default 1 arcmin).
    overwrite : bool, optional
        Download again even if a complete, valid file is present.
    session : requests.Session, optional
        HTTP session to use (shared by the worker threads).
    progress : callable, optional
        tqdm-like factory, called as ``progress(total=..., desc=..., unit=...)`` twice (one
        bar over files, one over bytes); the objects need ``update(n)`` and ``close()``.
        Default: no progress display.
    retries : int, optional
        Retries after a connection error, an incomplete body or a 5xx answer; 4xx answers
        are never retried.
    backoff : float, optional
        First retry delay in seconds, doubled on each retry.
    timeout : float or (float, float), optional
        ``requests`` (connect, read) time-outs in seconds.

    Returns
    -------
    FetchResult
        A list, in the table's order, of local `~pathlib.Path` objects (``s3://`` strings
        for ``"s3"``), with ``None`` where a row failed; ``.failures`` lists those rows with
        the reason, and ``.n_downloaded``, ``.n_skipped`` and ``.bytes_transferred`` count
        what this call did.

    Raises
    ------
    ArchiveError
        If the table is not empty and no file at all could be fetched.
    ValueError
        If an argument has an invalid value.
    ImportError
        For ``mode="s3"`` without ``fsspec`` and ``s3fs`` installed.

    Notes
    -----
    A download goes to a temporary file in the destination directory, is checked (length
    against ``Content-Length``, gzip decoding, complete FITS structure and, for Level-2
    files, the presence of the IMAGE, FLAGS, VARIANCE and WCS-WAVE HDUs) and only then
    renamed into place, so an interrupted run never leaves a file that looks complete. A file
    already at the destination is skipped only if it passes the same check; otherwise it is
    fetched again. Failures are logged as warnings, collected in ``.failures`` and do not stop
    the other downloads.

    Examples
    --------
    With ``mode="mirror"`` nothing is transferred: each URL maps to its file in a local
    copy of the archive tree, which must be present and complete.

    >>> import tempfile
    >>> from astropy.io import fits
    >>> tmp = tempfile.TemporaryDirectory()
    >>> url = "https://irsa.ipac.caltech.edu/ibe/data/spherex/qr2/level2/a.fits"
    >>> local = mirror_path(url, tmp.name)
    >>> local.parent.mkdir(parents=True)
    >>> fits.PrimaryHDU().writeto(local)
    >>> table = Table({"url": [url, url.replace("a.fits", "b.fits")]})
    >>> paths = fetch(table, mode="mirror", mirror_root=tmp.name)
    >>> [None if p is None else p.name for p in paths]
    ['a.fits', None]
    >>> paths.failures[0].index, paths.failures[0].url.endswith("b.fits")
    (1, True)
    >>> tmp.cleanup()

    Downloads of whole files or cutouts need the real IRSA service:

    >>> from tqdm import tqdm
    >>> images = query_spherex(((210.80, 54.35), 0.1))  # doctest: +SKIP
    >>> paths = fetch(images, "data/", mode="cutout", progress=tqdm)  # doctest: +SKIP
    >>> paths.paths, paths.failures  # doctest: +SKIP
    """
    if mode not in _MODES:
        raise ValueError(f"'mode' must be one of {_MODES}; got {mode!r}.")
    if "url" not in getattr(table, "colnames", ()):
        raise ValueError("'table' must have a 'url' column (from query_spherex).")
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"'workers' must be a positive int; got {workers!r}.")
    if not isinstance(retries, (int, np.integer)) or retries < 0:
        raise ValueError(f"'retries' must be a non-negative int; got {retries!r}.")
    if not backoff >= 0:
        raise ValueError(f"'backoff' must be non-negative seconds; got {backoff!r}.")
    urls = [str(u) for u in table["url"]]
    result = FetchResult([None] * len(urls))

    if mode == "s3":
        _require_s3()
        for i, url in enumerate(urls):
            try:
                result[i] = s3_url(url)
            except ArchiveError as err:
                result.failures.append(FetchFailure(i, url, err))
        return _finish(result, urls, mode)

    if mode == "mirror":
        if mirror_root is None:
            raise ValueError("'mirror_root' must be given for mode='mirror'; got None.")
        for i, url in enumerate(urls):
            try:
                path = mirror_path(url, mirror_root)
                problem = verify_fits(path, required_extnames=_required_for(path))
                if problem is not None:
                    raise ArchiveError(f"mirror file {path} is not usable: {problem}", url=url)
                result[i] = path
            except ArchiveError as err:
                result.failures.append(FetchFailure(i, url, err))
        return _finish(result, urls, mode)

    if dest is None:
        raise ValueError(f"'dest' must be a directory for mode={mode!r}; got None.")
    dest = Path(dest)
    jobs: list[tuple[int, str, Path]] = []
    if mode == "cutout":
        if region is None:
            if "field_center" not in table.meta:
                raise ValueError(
                    "'region' must be given for mode='cutout' when the table has no field in "
                    "its meta (tables from query_spherex do)."
                )
            field = _field_from_region(
                (tuple(table.meta["field_center"]), table.meta["field_size"])
            )
        else:
            field = _field_from_region(region)
        margin = _as_deg(cutout_margin, "cutout_margin")
        if not margin >= 0:
            raise ValueError(f"'cutout_margin' must be non-negative; got {cutout_margin!r}.")
        query, tag = _cutout_spec(field, margin)
    for i, url in enumerate(urls):
        try:
            rel = archive_relpath(url)
        except ArchiveError as err:
            result.failures.append(FetchFailure(i, url, err))
            continue
        target = dest.joinpath(*rel.parts)
        if mode == "cutout":
            base = urlsplit(url)._replace(query="", fragment="").geturl()
            url = f"{base}?{query}"
            target = target.with_name(f"{target.stem}.cutout-{tag}.fits")
        jobs.append((i, url, target))

    own_session = session is None
    session = _new_session(max(10, workers)) if own_session else session
    factory = progress if progress is not None else _NoProgress
    files_bar = _Progress(factory, total=len(jobs), desc="files", unit="file")
    bytes_bar = _Progress(factory, total=None, desc="bytes", unit="B", unit_scale=True)
    lock = threading.Lock()

    def on_bytes(n):
        bytes_bar.update(n)
        with lock:
            result.bytes_transferred += n

    def work(job):
        i, url, target = job
        try:
            n = _fetch_one(
                session,
                url,
                target,
                retries=int(retries),
                backoff=float(backoff),
                timeout=timeout,
                on_bytes=on_bytes,
                overwrite=overwrite,
            )
        except ArchiveError as err:
            with lock:
                result.failures.append(FetchFailure(i, url, err))
        else:
            with lock:
                result[i] = target
                if n is None:
                    result.n_skipped += 1
                else:
                    result.n_downloaded += 1
        files_bar.update(1)

    try:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                work(job)
        else:
            with ThreadPoolExecutor(max_workers=int(workers)) as pool:
                list(pool.map(work, jobs))
    finally:
        files_bar.close()
        bytes_bar.close()
        if own_session:
            session.close()
    return _finish(result, urls, mode)


def _finish(result: FetchResult, urls: list[str], mode: str) -> FetchResult:
    result.failures.sort(key=lambda f: f.index)
    for failure in result.failures:
        logger.warning("could not fetch row %d (%s): %s", failure.index, failure.url, failure.error)
    n_ok = sum(p is not None for p in result)
    logger.info(
        "fetch (%s): %d of %d available (%d transferred, %d already complete), %d failed",
        mode,
        n_ok,
        len(urls),
        result.n_downloaded,
        result.n_skipped,
        len(result.failures),
    )
    if urls and n_ok == 0:
        first = result.failures[0]
        raise ArchiveError(
            f"none of the {len(urls)} files could be fetched; first failure: {first.error}",
            url=first.url,
            cause=first.error,
        )
    return result


def _require_s3():
    try:
        import fsspec  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "mode='s3' needs the optional dependencies fsspec and s3fs; install them with "
            "`pip install drizzle3d[s3]`."
        ) from err
