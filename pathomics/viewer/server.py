"""The viewer's HTTP server: the page, its slide index, Deep Zoom tiles and overlay JSON, on 127.0.0.1 only.

Routes (GET only):
  /                                     the page (static/index.html)
  /static/PATH                          the page's files, shipped inside the package
  /api/slides                           the slides of OUT with size, MPP and risk
  /api/slides/ID/overlays               one slide's overlay data (level-0 pixels)
  /dzi/ID.dzi, /dzi/ID_files/L/C_R.jpeg Deep Zoom descriptor and tiles, read from the slide file
  /out/PATH                             a file of OUT (thumbnails, reports)
A URL never names a file outside OUT or the static folder: slides are looked up by id, and file routes
refuse absolute paths, ``..`` (also percent-encoded) and symlinks leading out (403). Requests whose
``Host`` is not this server's loopback address are refused too, so a web page cannot reach the server
through DNS rebinding.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import os
import re
import shutil
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pathomics.errors import ConfigError, InputError, PathomicsError, SlideReadError
from pathomics.layout import OutputLayout
from pathomics.slide import open_slide
from pathomics.viewer.catalog import SlideEntry, find_slide, find_slides, slide_file, slide_index, slide_overlays
from pathomics.viewer.deepzoom import DeepZoom

HOST = "127.0.0.1"
OPEN_SLIDES = 8  # slides kept open at once (file handles and decoded-tile caches)
STATIC_DIR = Path(__file__).with_name("static")
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
       "script-src 'self'; connect-src 'self'; frame-ancestors 'none'")
log = logging.getLogger(__name__)


class PathRefused(PathomicsError):
    """A URL path that would lead outside the folder it is served from."""


def resolve_inside(root: Path, relative: str) -> Path:
    """``root / relative`` as a real path inside ``root``; PathRefused if it leads out, FileNotFoundError if absent.

    ``relative`` is a percent-decoded URL path: absolute paths, ``..`` segments and symlinks whose target
    lies outside ``root`` are refused.
    """
    if relative.startswith(("/", "\\")) or "\0" in relative or ".." in re.split(r"[/\\]", relative):
        raise PathRefused(relative)
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, relative))
    if os.path.commonpath([real_root, real]) != real_root:
        raise PathRefused(relative)
    if not os.path.isfile(real):
        raise FileNotFoundError(relative)
    return Path(real)


class ViewerServer(ThreadingHTTPServer):
    """A threaded HTTP server over one output directory, bound to 127.0.0.1 (``port`` 0: a free port)."""

    daemon_threads = True

    def __init__(self, out: str | os.PathLike, port: int = 0, slides_dir: str | os.PathLike | None = None) -> None:
        if not 0 <= port <= 65535:
            raise ConfigError(f"port must be 0 (a free one) to 65535, got {port}")
        self.layout = OutputLayout(Path(out).resolve())
        if not self.layout.tiles.is_dir():
            raise InputError(f"{out}: no tiles/ folder, so not a pathomics output directory; "
                             "give the --out folder of `pathomics tile` or `pathomics run`")
        self.slides_dir = Path(slides_dir) if slides_dir is not None else None
        self._zooms: dict[str, DeepZoom] = {}  # open slides, least recently used first
        self._users: dict[DeepZoom, int] = {}  # requests reading each open slide
        self._closing: list[DeepZoom] = []  # slides to close once no request reads them
        self._lock = threading.Lock()
        try:
            super().__init__((HOST, port), ViewerHandler)
        except OSError as exc:
            raise PathomicsError(f"cannot listen on {HOST}:{port} ({exc.strerror or exc}); "
                                 "choose another --port, or leave it out for a free one") from exc

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    def slide(self, slide_id: str) -> SlideEntry:
        """The slide ``slide_id`` of OUT; KeyError when there is none."""
        return find_slide(self.layout, slide_id)

    @contextmanager
    def deep_zoom(self, slide_id: str) -> Iterator[DeepZoom]:
        """The Deep Zoom pyramid of ``slide_id``; the last ``OPEN_SLIDES`` used stay open, older ones are closed once idle."""
        with self._lock:
            zoom = self._zooms.pop(slide_id, None)
            if zoom is None:
                entry = self.slide(slide_id)
                zoom = DeepZoom(open_slide(slide_file(entry, self.slides_dir), mpp=entry.mpp))
            self._zooms[slide_id] = zoom  # most recently used last
            self._users[zoom] = self._users.get(zoom, 0) + 1
        try:
            yield zoom
        finally:
            with self._lock:
                self._users[zoom] -= 1
                while len(self._zooms) > OPEN_SLIDES:
                    self._closing.append(self._zooms.pop(next(iter(self._zooms))))
                self._close_idle()

    def _close_idle(self) -> None:
        """Close the slides that left the open set and that no request is reading (call under the lock)."""
        for zoom in [z for z in self._closing if self._users[z] == 0]:
            zoom.close()
            self._closing.remove(zoom)
            del self._users[zoom]

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the browser dropped a request it no longer needed (tiles of a view it left)
        super().handle_error(request, client_address)

    def server_close(self) -> None:
        super().server_close()
        with self._lock:
            self._closing += self._zooms.values()
            self._zooms.clear()
            self._close_idle()


class ViewerHandler(BaseHTTPRequestHandler):
    server: ViewerServer
    server_version = "pathomics-view"

    def do_GET(self) -> None:
        if self.headers.get("Host") not in (f"{HOST}:{self.server.port}", f"localhost:{self.server.port}"):
            return self._error(HTTPStatus.FORBIDDEN, "this server answers only to its loopback address")
        path = urlsplit(self.path).path
        try:
            self._route(path)
        except PathRefused:
            self._error(HTTPStatus.FORBIDDEN, "path outside the served folder")
        except (KeyError, FileNotFoundError, SlideReadError) as exc:
            self._error(HTTPStatus.NOT_FOUND, str(exc).strip("'\""))
        except PathomicsError as exc:
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc))

    def _route(self, path: str) -> None:
        if path in ("/", "/index.html"):
            return self._file(STATIC_DIR / "index.html")
        if path.startswith("/static/"):
            return self._file(resolve_inside(STATIC_DIR, unquote(path.removeprefix("/static/"))))
        if path.startswith("/out/"):
            return self._file(resolve_inside(self.server.layout.root, unquote(path.removeprefix("/out/"))))
        if path == "/api/slides":
            return self._json(slide_index(self.server.layout))
        if m := re.fullmatch(r"/api/slides/([^/]+)/overlays", path):
            return self._json(slide_overlays(self.server.layout, self.server.slide(unquote(m[1]))))
        if m := re.fullmatch(r"/dzi/([^/]+)\.dzi", path):
            with self.server.deep_zoom(unquote(m[1])) as zoom:
                return self._send(zoom.dzi().encode(), "application/xml")
        if m := re.fullmatch(r"/dzi/([^/]+)_files/(\d+)/(\d+)_(\d+)\.jpeg", path):
            with self.server.deep_zoom(unquote(m[1])) as zoom:
                tile = zoom.tile_jpeg(int(m[2]), int(m[3]), int(m[4]))
            return self._send(tile, "image/jpeg", cache=True)
        raise KeyError(f"no such page: {path}")

    def _file(self, path: Path) -> None:
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        with open(path, "rb") as fh:
            self._headers(HTTPStatus.OK, "text/javascript" if path.suffix == ".js" else kind, os.fstat(fh.fileno()).st_size)
            shutil.copyfileobj(fh, self.wfile)

    def _json(self, data: Any) -> None:
        self._send(json.dumps(data, allow_nan=False).encode(), "application/json")

    def _send(self, body: bytes, kind: str, cache: bool = False) -> None:
        self._headers(HTTPStatus.OK, kind, len(body), cache)
        self.wfile.write(body)

    def _error(self, status: HTTPStatus, message: str) -> None:
        body = f"{status.value} {status.phrase}: {message}\n".encode()
        self._headers(status, "text/plain; charset=utf-8", len(body))
        self.wfile.write(body)

    def _headers(self, status: HTTPStatus, kind: str, length: int, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", "private, max-age=3600" if cache else "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def serve(out: str | os.PathLike, port: int = 0, slides_dir: str | os.PathLike | None = None) -> None:
    """Serve the viewer for ``out`` on 127.0.0.1 until interrupted, printing its address."""
    with ViewerServer(out, port, slides_dir) as server:
        slides, problems = find_slides(server.layout)
        for problem in problems:
            log.warning("%s", problem)
        print(f"pathomics view: {len(slides)} slide(s) of {server.layout.root} at {server.url} (Ctrl-C to stop)", flush=True)
        server.serve_forever()
