"""A local stand-in for IRSA, for tests and benchmarks (never touches the internet).

It binds 127.0.0.1 on an ephemeral port and serves, over real HTTP:

- a TAP service at ``/TAP``: ``/TAP/sync`` and the UWS async endpoints
  (``POST /TAP/async`` -> 303 to the job, ``POST .../phase`` with ``PHASE=RUN``,
  job-status XML, ``.../results/result``, ``DELETE``). Queries must join
  ``spherex.artifact a`` with ``spherex.plane p`` on ``planeid``; the WHERE terms it
  understands are the ones IRSA users send (``INTERSECTS``/``CONTAINS`` of a
  ``CIRCLE`` with ``p.poly``, ``p.energy_bandpassname IN (...)`` and mid-time bounds);
  anything else is answered with a TAP error VOTable, as a real service would.
  The spatial predicate is evaluated conservatively (bounding circle of each
  footprint), so a client must filter exactly on the returned polygons.
- files under ``/ibe/data/spherex/...`` with IBE's cutout parameters
  (``?center=ra,dec&size=deg[&gzip=false]``; gzipped by default; HTTP 400 if the
  cutout misses the image).

Fault injection: ``faults[url_path] = ["500", "drop", "404", "ok", ...]`` is consumed one
entry per GET of that path; ``latency`` delays every response; ``tap_error`` makes every TAP
query fail with that message; ``sync_status`` makes ``/TAP/sync`` answer with that HTTP
status (e.g. 503, to force the async fallback); ``sync_delay`` makes it answer late (to
exercise the client's sync time-out). ``log`` records every request.
"""

from __future__ import annotations

import gzip
import io
import itertools
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

import numpy as np

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


@dataclass
class StandinImage:
    """One archive image: a row of spherex.plane joined with spherex.artifact."""

    planeid: str
    obsid: str
    detector: int
    mjd_start: float
    mjd_end: float
    wave_min_um: float
    wave_max_um: float
    poly: np.ndarray  # (k, 2) ra, dec deg
    uri: str  # relative: ibe/data/spherex/...
    release: str = "qr2"

    @property
    def did(self) -> str:
        collection = "spherex_" + self.release
        return f"ivo://irsa.ipac/{collection}?{self.obsid}/D{self.detector}"


@dataclass
class Request:
    method: str
    path: str
    query: str
    status: int
    bytes_sent: int


@dataclass
class _Job:
    query: str
    phase: str = "PENDING"
    polls: int = 0
    result: bytes | None = None
    error: str | None = None
    params: dict = field(default_factory=dict)


def _unit(ra, dec):
    ra, dec = np.radians(ra), np.radians(dec)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def _sep(ra1, dec1, ra2, dec2):
    d = np.clip(np.sum(_unit(ra1, dec1) * _unit(ra2, dec2), axis=-1), -1, 1)
    return np.degrees(np.arccos(d))


def level2_uri(obsid: str, detector: int, release: str = "qr2", version: str = "20-2025-247"):
    """The IBE path of a Level-2 file, following the real layout (spherex-facts 5.2)."""
    period = "_".join(obsid.split("_")[:2])
    return (
        f"ibe/data/spherex/{release}/level2/{period}/l2b-v{version}/{detector}/"
        f"level2_{obsid}D{detector}_spx_l2b-v{version}.fits"
    )


def cutout_hdulist_bytes(path: Path, center, size_deg: float) -> bytes | None:
    """Emulate an IBE cutout of a multi-extension FITS file.

    All HDUs are kept; every 2-D image HDU with a celestial WCS is trimmed to the pixel box
    that covers the square of side ``size_deg`` (clipped at the edges), and its ``CRPIX1/2``
    and, where present, ``CRPIX1W/2W`` are shifted accordingly. Returns ``None`` when the box
    misses the image.
    """
    from astropy.io import fits
    from astropy.wcs import WCS

    with fits.open(path) as hdul:
        image = hdul["IMAGE"]
        wcs = WCS(image.header, hdul)
        ny, nx = image.data.shape
        ra0, dec0 = center
        x0, y0 = wcs.all_world2pix(ra0, dec0, 0)
        scale = np.mean(np.abs(np.linalg.eigvals(wcs.pixel_scale_matrix)))
        half = 0.5 * size_deg / scale
        xa, xb = math.floor(x0 - half + 0.5), math.floor(x0 + half + 0.5) + 1
        ya, yb = math.floor(y0 - half + 0.5), math.floor(y0 + half + 0.5) + 1
        xa, ya, xb, yb = max(xa, 0), max(ya, 0), min(xb, nx), min(yb, ny)
        if xa >= xb or ya >= yb:
            return None
        out = fits.HDUList()
        for hdu in hdul:
            if (
                isinstance(hdu, (fits.ImageHDU, fits.CompImageHDU))
                and hdu.data is not None
                and hdu.data.shape == (ny, nx)
            ):
                header = hdu.header.copy()
                for key, shift in (
                    ("CRPIX1", xa),
                    ("CRPIX2", ya),
                    ("CRPIX1W", xa),
                    ("CRPIX2W", ya),
                ):
                    if key in header:
                        header[key] = header[key] - shift
                out.append(fits.ImageHDU(hdu.data[ya:yb, xa:xb].copy(), header))
            else:
                out.append(hdu.copy())
        buf = io.BytesIO()
        out.writeto(buf)
        return buf.getvalue()


class IrsaStandin:
    """The stand-in server. Use as a context manager, or call ``start``/``stop``."""

    def __init__(
        self,
        *,
        latency: float = 0.0,
        poly_format: str = "array",
        error_status: int = 400,
        cutout: Callable[[Path, tuple[float, float], float], bytes | None] | None = None,
        job_polls: int = 2,
    ):
        self.images: list[StandinImage] = []
        self.files: dict[str, Path] = {}
        self.faults: dict[str, list[str]] = {}
        self.log: list[Request] = []
        self.latency = latency
        self.poly_format = poly_format
        self.error_status = error_status
        self.tap_error: str | None = None
        self.sync_status: int | None = None
        self.sync_delay = 0.0
        self.cutout = cutout or cutout_hdulist_bytes
        self.job_polls = job_polls
        self.jobs: dict[str, _Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> IrsaStandin:
        standin = self

        class Handler(_Handler):
            server_state = standin

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        host, port = self._server.server_address[:2]
        self._url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> IrsaStandin:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return self._url

    @property
    def tap_url(self) -> str:
        return self.url + "/TAP"

    # -- content ---------------------------------------------------------------------------
    def add_image(
        self,
        *,
        obsid: str,
        detector: int,
        mjd_start: float,
        poly,
        mjd_end: float | None = None,
        wave_range: tuple[float, float] = (1.1, 1.62),
        release: str = "qr2",
        path: Path | None = None,
        uri: str | None = None,
    ) -> StandinImage:
        """Register an image (and optionally the file that serves it); returns the record."""
        uri = uri or level2_uri(obsid, detector, release)
        image = StandinImage(
            planeid=str(1000 + len(self.images)),
            obsid=obsid,
            detector=int(detector),
            mjd_start=float(mjd_start),
            mjd_end=float(mjd_start + 0.0015 if mjd_end is None else mjd_end),
            wave_min_um=float(wave_range[0]),
            wave_max_um=float(wave_range[1]),
            poly=np.asarray(poly, dtype=float).reshape(-1, 2),
            uri=uri,
            release=release,
        )
        self.images.append(image)
        if path is not None:
            self.files["/" + uri] = Path(path)
        return image

    def file_requests(self, path_prefix: str = "/ibe/") -> list[Request]:
        """Logged GETs of archive files."""
        return [r for r in self.log if r.method == "GET" and r.path.startswith(path_prefix)]

    # -- TAP evaluation --------------------------------------------------------------------
    def run_query(self, query: str) -> bytes:
        """Evaluate the ADQL subset; raise ValueError with a TAP-style message if unsupported."""
        if self.tap_error:
            raise ValueError(self.tap_error)
        q = " ".join(query.split())
        m = re.match(r"(?i)SELECT (.+?) FROM (.+?)(?: WHERE (.+?))?(?: ORDER BY (.+))?$", q)
        if not m:
            raise ValueError(f"Syntax error in ADQL: {query!r}")
        select, from_, where, order = m.groups()
        if not re.fullmatch(
            r"(?i)spherex\.artifact (?:AS )?a JOIN spherex\.plane (?:AS )?p ON "
            r"(?:a\.planeid = p\.planeid|p\.planeid = a\.planeid)",
            from_.strip(),
        ):
            raise ValueError(f"Table or join not supported by the stand-in: {from_!r}")
        columns = []
        for item in select.split(","):
            cm = re.fullmatch(r"\s*([ap])\.(\w+)(?:\s+AS\s+(\w+))?\s*", item, re.I)
            if not cm:
                raise ValueError(f"Unsupported select item: {item.strip()!r}")
            columns.append((cm.group(1).lower(), cm.group(2).lower(), cm.group(3) or cm.group(2)))
        rows = list(self.images)
        if where:
            for term in _split_and(where):
                rows = [r for r in rows if _eval_term(term, r)]
        if order:
            om = re.fullmatch(r"(?i)p\.time_bounds_lower(?: (ASC|DESC))?", order.strip())
            if not om:
                raise ValueError(f"Unsupported ORDER BY: {order!r}")
            rows.sort(key=lambda r: r.mjd_start, reverse=(om.group(1) or "").upper() == "DESC")
        return self._votable(columns, rows)

    def _votable(self, columns, rows) -> bytes:
        kinds = {
            "uri": ("char", None, lambda r: r.uri),
            "planeid": ("char", None, lambda r: r.planeid),
            "obsid": ("char", None, lambda r: r.obsid),
            "obs_publisher_did": ("char", None, lambda r: r.did),
            "energy_bandpassname": ("char", None, lambda r: f"SPHEREx-D{r.detector}"),
            "energy_bounds_lower": ("double", "m", lambda r: r.wave_min_um * 1e-6),
            "energy_bounds_upper": ("double", "m", lambda r: r.wave_max_um * 1e-6),
            "time_bounds_lower": ("double", "d", lambda r: r.mjd_start),
            "time_bounds_upper": ("double", "d", lambda r: r.mjd_end),
            "poly": ("poly", "deg", lambda r: r.poly),
        }
        fields = []
        getters = []
        for _, name, alias in columns:
            if name not in kinds:
                raise ValueError(f'Column "{name}" does not exist in the joined tables')
            dtype, unit, get = kinds[name]
            unit_attr = f' unit="{unit}"' if unit else ""
            if dtype == "char":
                fields.append(f'<FIELD name="{alias}" datatype="char" arraysize="*"/>')
                getters.append(lambda r, g=get: escape(str(g(r))))
            elif dtype == "double":
                fields.append(f'<FIELD name="{alias}" datatype="double"{unit_attr}/>')
                getters.append(lambda r, g=get: repr(float(g(r))))
            elif self.poly_format == "array":
                fields.append(
                    f'<FIELD name="{alias}" datatype="double" arraysize="*" xtype="polygon"'
                    f"{unit_attr}/>"
                )
                getters.append(lambda r, g=get: " ".join(repr(float(v)) for v in g(r).ravel()))
            else:
                fields.append(f'<FIELD name="{alias}" datatype="char" arraysize="*"/>')
                getters.append(
                    lambda r, g=get: (
                        "POLYGON ICRS " + " ".join(repr(float(v)) for v in g(r).ravel())
                    )
                )
        trs = "".join(
            "<TR>" + "".join(f"<TD>{g(r)}</TD>" for g in getters) + "</TR>\n" for r in rows
        )
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<VOTABLE version="1.4" xmlns="http://www.ivoa.net/xml/VOTable/v1.3">\n'
            '<RESOURCE type="results">\n<INFO name="QUERY_STATUS" value="OK"/>\n'
            "<TABLE>\n"
            + "\n".join(fields)
            + "\n<DATA><TABLEDATA>\n"
            + trs
            + "</TABLEDATA></DATA>\n"
            "</TABLE>\n</RESOURCE>\n</VOTABLE>\n"
        ).encode()

    @staticmethod
    def error_votable(message: str) -> bytes:
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<VOTABLE version="1.4" xmlns="http://www.ivoa.net/xml/VOTable/v1.3">\n'
            '<RESOURCE type="results">\n'
            f'<INFO name="QUERY_STATUS" value="ERROR">{escape(message)}</INFO>\n'
            "</RESOURCE>\n</VOTABLE>\n"
        ).encode()


def _split_and(where: str) -> list[str]:
    """Split a WHERE clause on top-level AND."""
    terms, depth, start, i = [], 0, 0, 0
    upper = where.upper()
    while i < len(where):
        c = where[i]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "'":
            i = where.index("'", i + 1)
        elif depth == 0 and upper.startswith(" AND ", i):
            terms.append(where[start:i].strip())
            start = i + 5
            i += 4
        i += 1
    terms.append(where[start:].strip())
    return terms


def _eval_term(term: str, r: StandinImage) -> bool:
    circle = rf"CIRCLE\(\s*'ICRS'\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\)"
    spatial = [
        rf"(?i)^(?:1\s*=\s*)?(INTERSECTS|CONTAINS)\(\s*{circle}\s*,\s*p\.poly\s*\)(?:\s*=\s*1)?$",
        rf"(?i)^(?:1\s*=\s*)?(INTERSECTS)\(\s*p\.poly\s*,\s*{circle}\s*\)(?:\s*=\s*1)?$",
    ]
    for pattern in spatial:
        m = re.match(pattern, term)
        if m:
            op, ra, dec, rad = m.group(1).upper(), *map(float, m.groups()[1:])
            if op == "CONTAINS":
                raise ValueError("CONTAINS(CIRCLE, p.poly) is not supported by the stand-in")
            # Conservative: does the footprint's bounding circle meet the query circle?
            centre = _unit(r.poly[:, 0], r.poly[:, 1]).mean(axis=0)
            cra = math.degrees(math.atan2(centre[1], centre[0])) % 360
            cdec = math.degrees(math.asin(centre[2] / np.linalg.norm(centre)))
            bound = float(np.max(_sep(cra, cdec, r.poly[:, 0], r.poly[:, 1])))
            return float(_sep(ra, dec, cra, cdec)) <= rad + bound
    m = re.match(r"(?i)^p\.energy_bandpassname\s+IN\s*\((.*)\)$", term)
    if m:
        names = re.findall(r"'([^']*)'", m.group(1))
        return f"SPHEREx-D{r.detector}" in names
    m = re.match(
        rf"(?i)^\(\s*p\.time_bounds_lower\s*\+\s*p\.time_bounds_upper\s*\)\s*/\s*2(?:\.0*)?\s*"
        rf"(>=|<=|>|<)\s*({_NUM})$",
        term,
    )
    if m:
        mid = 0.5 * (r.mjd_start + r.mjd_end)
        op, value = m.group(1), float(m.group(2))
        return {">=": mid >= value, "<=": mid <= value, ">": mid > value, "<": mid < value}[op]
    raise ValueError(f"Unsupported ADQL condition: {term}")


_UWS = """<?xml version="1.0" encoding="UTF-8"?>
<uws:job xmlns:uws="http://www.ivoa.net/xml/UWS/v1.0" xmlns:xlink="http://www.w3.org/1999/xlink"
 xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" version="1.1">
  <uws:jobId>{job_id}</uws:jobId>
  <uws:ownerId xsi:nil="true"/>
  <uws:phase>{phase}</uws:phase>
  <uws:quote xsi:nil="true"/>
  <uws:creationTime>2026-01-01T00:00:00Z</uws:creationTime>
  <uws:startTime xsi:nil="true"/>
  <uws:endTime xsi:nil="true"/>
  <uws:executionDuration>600</uws:executionDuration>
  <uws:destruction xsi:nil="true"/>
  <uws:parameters>
    <uws:parameter id="lang">ADQL</uws:parameter>
    <uws:parameter id="query">{query}</uws:parameter>
    <uws:parameter id="request">doQuery</uws:parameter>
  </uws:parameters>
  <uws:results>{results}</uws:results>{error}
</uws:job>
"""


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # clients closing keep-alive connections, or a dropped body by design
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_state: IrsaStandin

    def log_message(self, format, *args):  # silence the default stderr logging
        pass

    # -- plumbing --------------------------------------------------------------------------
    def _form(self) -> dict[str, str]:
        parts = urlsplit(self.path)
        params = {k.upper(): v[-1] for k, v in parse_qs(parts.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            body = self.rfile.read(length).decode()
            ctype = self.headers.get("Content-Type", "")
            if "multipart/form-data" in ctype:
                boundary = ctype.split("boundary=")[1]
                for part in body.split("--" + boundary):
                    pm = re.search(r'name="([^"]+)"\r\n\r\n(.*)\r\n$', part, re.S)
                    if pm:
                        params[pm.group(1).upper()] = pm.group(2)
            else:
                params.update({k.upper(): v[-1] for k, v in parse_qs(body).items()})
        return params

    def _send(self, status, body=b"", ctype="text/plain", headers=None):
        # log first, so a client that has its answer always finds the request in the log
        self._record(status, len(body) if self.command != "HEAD" else 0)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _record(self, status, nbytes):
        parts = urlsplit(self.path)
        with self.server_state._lock:
            self.server_state.log.append(
                Request(self.command, parts.path, parts.query, status, nbytes)
            )

    def _base(self) -> str:
        return self.server_state.url

    # -- dispatch --------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    def _dispatch(self):
        state = self.server_state
        if state.latency:
            time.sleep(state.latency)
        path = urlsplit(self.path).path
        if path == "/TAP/sync":
            return self._tap_sync()
        if path == "/TAP/async" and self.command == "POST":
            return self._tap_async_create()
        m = re.fullmatch(r"/TAP/async/(\w+)(/phase|/results/result)?", path)
        if m:
            return self._tap_job(m.group(1), m.group(2))
        if path.startswith("/ibe/data/spherex/") and self.command in ("GET", "HEAD"):
            return self._file(path)
        self._send(404, b"not found")

    # -- TAP -------------------------------------------------------------------------------
    def _tap_sync(self):
        state = self.server_state
        form = self._form()
        if state.sync_status is not None:
            return self._send(state.sync_status, b"service temporarily unavailable")
        if state.sync_delay:
            time.sleep(state.sync_delay)  # a slow synchronous query
        try:
            body = state.run_query(form.get("QUERY", ""))
        except ValueError as err:
            return self._send(state.error_status, state.error_votable(str(err)), "text/xml")
        self._send(200, body, "text/xml")

    def _tap_async_create(self):
        state = self.server_state
        form = self._form()
        job_id = f"job{next(state._ids)}"
        with state._lock:
            state.jobs[job_id] = _Job(form.get("QUERY", ""))
        self._send(303, b"", headers={"Location": f"{self._base()}/TAP/async/{job_id}"})

    def _tap_job(self, job_id, sub):
        state = self.server_state
        job = state.jobs.get(job_id)
        if job is None:
            return self._send(404, b"no such job")
        form = self._form() if self.command == "POST" else {}
        if self.command == "DELETE" or form.get("ACTION") == "DELETE":
            with state._lock:
                state.jobs.pop(job_id, None)
            return self._send(303, b"", headers={"Location": f"{self._base()}/TAP/async"})
        if sub == "/phase":
            if self.command == "POST":
                phase = form.get("PHASE", "").upper()
                if phase == "RUN" and job.phase == "PENDING":
                    job.phase = "EXECUTING"
                elif phase == "ABORT":
                    job.phase = "ABORTED"
                return self._send(
                    303, b"", headers={"Location": f"{self._base()}/TAP/async/{job_id}"}
                )
            return self._send(200, job.phase.encode())
        if sub == "/results/result":
            if job.phase != "COMPLETED":
                return self._send(404, b"no result yet")
            return self._send(200, job.result, "text/xml")
        # job status document; the job finishes after a few polls
        if job.phase == "EXECUTING":
            job.polls += 1
            if job.polls >= state.job_polls:
                try:
                    job.result = state.run_query(job.query)
                    job.phase = "COMPLETED"
                except ValueError as err:
                    job.error = str(err)
                    job.phase = "ERROR"
        results = (
            f'<uws:result id="result" xlink:href="{self._base()}/TAP/async/{job_id}'
            '/results/result"/>'
            if job.phase == "COMPLETED"
            else ""
        )
        error = (
            f'\n  <uws:errorSummary type="fatal" hasDetail="false"><uws:message>'
            f"{escape(job.error)}</uws:message></uws:errorSummary>"
            if job.error
            else ""
        )
        body = _UWS.format(
            job_id=job_id, phase=job.phase, query=escape(job.query), results=results, error=error
        )
        self._send(200, body.encode(), "text/xml")

    # -- files -----------------------------------------------------------------------------
    def _file(self, path):
        state = self.server_state
        fault = None
        if self.command == "GET":
            with state._lock:
                queue = state.faults.get(path)
                if queue:
                    fault = queue.pop(0)
        if fault == "500":
            return self._send(500, b"internal server error")
        if fault == "503":
            return self._send(503, b"service unavailable")
        if fault == "404" or path not in state.files:
            return self._send(404, b"not found")
        params = {k.lower(): v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
        ctype = "application/fits"
        if "center" in params or "size" in params:
            try:
                ra, dec = (float(v.rstrip("d")) for v in params["center"].split(","))
                size = float(params["size"].split(",")[0])
            except (KeyError, ValueError):
                return self._send(400, b"bad cutout parameters")
            body = state.cutout(state.files[path], (ra, dec), size)
            if body is None:
                return self._send(400, b"cutout does not overlap the image")
            if params.get("gzip", "true").lower() != "false":
                body = gzip.compress(body, compresslevel=6, mtime=0)
                ctype = "application/x-gzip"
        else:
            body = state.files[path].read_bytes()
        if fault == "drop":
            # promise the full length, send half, then close the connection
            half = len(body) // 2
            self._record(200, half)
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:half])
            self.wfile.flush()
            self.close_connection = True
            return None
        return self._send(200, body, ctype)
