"""A corpus of bad and awkward image inputs, generated with Pillow into a temp directory.

Use the whole corpus, local HTTP servers included::

    with bad_image_corpus(tmp_path) as cases:
        for case in cases:
            ...  # load_image(case.source, **CORPUS_LIMITS) -> ok, or ImageError(reason=case.expect)

or ``make_corpus(tmp_path)`` for the cases that need no server (the "unreachable" URL case
needs none: it points at a closed port). Every case assumes the limits in
:data:`CORPUS_LIMITS` (a worker reads the same values from :data:`CORPUS_ENV`). ``ok`` cases
carry a ``check`` that asserts on the decoded RGB image (colours, size, orientation).

The servers bind 127.0.0.1 on free ports and stop when their context manager exits.
"""

from __future__ import annotations

import http.server
import io
import selectors
import socket
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "CASE_NAMES",
    "CORPUS_ENV",
    "CORPUS_LIMITS",
    "Case",
    "CorpusServers",
    "bad_image_corpus",
    "closed_port_url",
    "corpus_servers",
    "make_corpus",
    "serve_files",
    "silent_server",
]

#: Limits every case is written for (keyword arguments of ``load_image``).
CORPUS_LIMITS: dict[str, float] = {"max_bytes": 2 * 1024 * 1024, "max_pixels": 40_000_000,
                                   "timeout": 1.0}
#: The same limits as ``AGMAN_*`` environment variables (for a worker process).
CORPUS_ENV: dict[str, str] = {
    "AGMAN_MAX_IMAGE_BYTES": str(CORPUS_LIMITS["max_bytes"]),
    "AGMAN_MAX_IMAGE_PIXELS": str(CORPUS_LIMITS["max_pixels"]),
    "AGMAN_FETCH_TIMEOUT": str(CORPUS_LIMITS["timeout"]),
}

Check = Callable[[Image.Image], None]
Source = str | Path | bytes


@dataclass(frozen=True)
class Case:
    """One input: where it is, and what ``load_image`` must do with it."""

    name: str
    source: Source
    expect: str  # "ok" or the expected ImageError.reason
    check: Check | None = field(default=None, compare=False, repr=False)
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.expect == "ok"


@dataclass(frozen=True)
class CorpusServers:
    """Base URL of a file server (``/stream/<name>`` omits Content-Length) and a URL whose
    server accepts connections but never answers."""

    base_url: str
    hang_url: str


# --------------------------------------------------------------------------------------------
# Local servers
# --------------------------------------------------------------------------------------------


class _FileHandler(http.server.SimpleHTTPRequestHandler):
    """Static files; ``/stream/<name>`` sends the body without a Content-Length header."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet tests
        pass

    def do_GET(self) -> None:  # noqa: N802
        if not self.path.startswith("/stream/"):
            super().do_GET()
            return
        target = Path(self.directory) / self.path[len("/stream/"):].lstrip("/")
        if not target.is_file():
            self.send_error(404)
            return
        self.protocol_version = "HTTP/1.0"
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        with target.open("rb") as fh:
            while chunk := fh.read(64 * 1024):
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return
        self.close_connection = True


@contextmanager
def serve_files(root: Path) -> Iterator[str]:
    """Serve ``root`` over HTTP on 127.0.0.1; yields the base URL (no trailing slash)."""

    def handler(*args, **kwargs):
        return _FileHandler(*args, directory=str(root), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="corpus-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextmanager
def silent_server() -> Iterator[str]:
    """A TCP server on 127.0.0.1 that accepts connections and never sends a byte."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    stop = threading.Event()
    held: list[socket.socket] = []

    def run() -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(listener, selectors.EVENT_READ)
            while not stop.is_set():
                for _key, _ in sel.select(timeout=0.05):
                    try:
                        conn, _addr = listener.accept()
                    except BlockingIOError:
                        continue
                    held.append(conn)

    thread = threading.Thread(target=run, name="corpus-silent", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/never-answers.jpg"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        listener.close()


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 whose port was free a moment ago (nothing listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/x.jpg"


@contextmanager
def corpus_servers(root: Path) -> Iterator[CorpusServers]:
    """Both local servers at once: files from ``root`` and the silent one."""
    with serve_files(root) as base_url, silent_server() as hang_url:
        yield CorpusServers(base_url=base_url, hang_url=hang_url)


@contextmanager
def bad_image_corpus(tmp_dir: Path) -> Iterator[list[Case]]:
    """Generate the corpus in ``tmp_dir`` and run its servers; yields every case."""
    tmp_dir = Path(tmp_dir)
    files = tmp_dir / "www"
    files.mkdir(parents=True, exist_ok=True)
    with corpus_servers(files) as servers:
        yield make_corpus(tmp_dir, servers=servers)


# --------------------------------------------------------------------------------------------
# Image makers and checks
# --------------------------------------------------------------------------------------------

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _scene(width: int = 64, height: int = 64) -> Image.Image:
    """A structured picture: diagonal gradient with a red box and a blue disc."""
    yy, xx = np.mgrid[0:height, 0:width]
    g = ((xx + yy) * 255 // max(1, width + height - 2)).astype(np.uint8)
    im = Image.fromarray(np.stack([g, 255 - g, g // 2], axis=-1), "RGB")
    draw = ImageDraw.Draw(im)
    draw.rectangle((width // 8, height // 8, width // 2, height // 2), fill=RED)
    draw.ellipse((width // 2, height // 2, width - 4, height - 4), fill=BLUE)
    return im


def _noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR declares width x height (RGB) with a token IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b""))


def _close(actual: tuple[int, ...], expected: tuple[int, ...], tol: int) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def _expect(size: tuple[int, int] | None = None, tol: int = 24,
            **points: tuple[tuple[int, int], tuple[int, int, int]]) -> Check:
    """A check: image size and colours at named points ``name=((x, y), (r, g, b))``."""

    def check(im: Image.Image) -> None:
        assert im.mode == "RGB", f"mode {im.mode}, expected RGB"
        if size is not None:
            assert im.size == size, f"size {im.size}, expected {size}"
        for label, (xy, rgb) in points.items():
            got = im.getpixel(xy)
            assert _close(got, rgb, tol), f"{label}: pixel {xy} is {got}, expected ~{rgb}"

    return check


def _check_16bit(im: Image.Image) -> None:
    """Horizontal 16-bit ramp 0..65535 must become 0..255, not clipped to white."""
    row = np.asarray(im)[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255, f"ends {row[0]}, {row[-1]}"
    assert abs(int(row[len(row) // 2]) - 128) <= 2, f"middle {row[len(row) // 2]} (clipped?)"
    assert np.all(np.diff(row) >= 0), "ramp not monotonic"


def _check_grey(im: Image.Image) -> None:
    arr = np.asarray(im).astype(int)
    assert im.mode == "RGB"
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])
    assert arr.max() - arr.min() > 100, "grey ramp lost its contrast"


# --------------------------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    dir: Path  # where files are written
    www: Path  # served over HTTP (when servers run)
    servers: CorpusServers | None

    def file(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        return path


Builder = Callable[[_Ctx], "Source | None"]
_BUILDERS: dict[str, tuple[str, Builder, Check | None, str]] = {}


def _case(name: str, expect: str, check: Check | None = None, note: str = ""):
    def register(fn: Builder) -> Builder:
        assert name not in _BUILDERS, name
        _BUILDERS[name] = (expect, fn, check, note)
        return fn

    return register


_SCENE_CHECK = _expect(size=(64, 64), red=((16, 16), RED), blue=((48, 48), BLUE))


@_case("truncated_jpeg", "truncated", note="first 60% of a JPEG")
def _(c: _Ctx) -> Source:
    data = _encode(_noise(64, 64, 1), "JPEG", quality=90)
    return c.file("truncated.jpg", data[: len(data) * 6 // 10])


@_case("truncated_png", "truncated", note="PNG cut inside its IDAT chunk")
def _(c: _Ctx) -> Source:
    data = _encode(_noise(64, 64, 2), "PNG")
    return c.file("truncated.png", data[: len(data) * 6 // 10])


@_case("zero_bytes", "empty")
def _(c: _Ctx) -> Source:
    return c.file("empty.jpg", b"")


@_case("text_renamed_jpg", "not_an_image")
def _(c: _Ctx) -> Source:
    return c.file("notes.jpg", b"Shopping list:\n- shirt\n- shoes\n" * 20)


@_case("html_page_bytes", "not_an_image", note="what a CDN returns instead of an image")
def _(c: _Ctx) -> Source:
    return (b"<!DOCTYPE html>\n<html><head><title>Access denied</title></head>"
            b"<body><h1>403</h1></body></html>\n")


@_case("svg_bytes", "not_an_image")
def _(c: _Ctx) -> Source:
    return (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" '
            b'height="10"><rect width="10" height="10" fill="red"/></svg>')


@_case("pdf_file", "not_an_image")
def _(c: _Ctx) -> Source:
    return c.file("catalogue.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n")


@_case("random_garbage", "not_an_image")
def _(c: _Ctx) -> Source:
    return np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()


@_case("one_pixel", "ok", _expect(size=(1, 1), px=((0, 0), (12, 34, 56)), tol=0))
def _(c: _Ctx) -> Source:
    return c.file("one.png", _encode(Image.new("RGB", (1, 1), (12, 34, 56)), "PNG"))


@_case("png_bomb_30000", "too_many_pixels", note="IHDR declares 30000x30000; file is tiny")
def _(c: _Ctx) -> Source:
    return c.file("bomb.png", _png_header_only(30_000, 30_000))


@_case("png_over_pixel_limit", "too_many_pixels",
       note="7000x7000 = 49M pixels: over CORPUS_LIMITS, under PIL's own global limit")
def _(c: _Ctx) -> Source:
    return c.file("big_header.png", _png_header_only(7_000, 7_000))


@_case("huge_file", "too_large_bytes", note="a valid PNG larger than max_bytes")
def _(c: _Ctx) -> Source:
    return c.file("huge.png", _encode(_noise(1100, 1000, 3), "PNG", compress_level=0))


@_case("cmyk_jpeg", "ok", _expect(size=(32, 32), red=((16, 16), RED), tol=40))
def _(c: _Ctx) -> Source:
    return c.file("cmyk.jpg", _encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"))


@_case("png_16bit_grey", "ok", _check_16bit)
def _(c: _Ctx) -> Source:
    ramp = np.tile(np.linspace(0, 65535, 257).round().astype(np.uint16), (16, 1))
    return c.file("grey16.png", _encode(Image.fromarray(ramp), "PNG"))


@_case("tiff_int32", "ok", _check_grey, note="mode I (32-bit) with 16-bit values")
def _(c: _Ctx) -> Source:
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.int32), (8, 1))
    return c.file("int32.tiff", _encode(Image.fromarray(ramp), "TIFF"))


@_case("tiff_float", "ok", _check_grey, note="mode F with values in 0..1")
def _(c: _Ctx) -> Source:
    ramp = np.tile(np.linspace(0, 1, 64).astype(np.float32), (8, 1))
    return c.file("float.tiff", _encode(Image.fromarray(ramp), "TIFF"))


def _frames() -> list[Image.Image]:
    return [Image.new("RGB", (16, 16), colour) for colour in (RED, GREEN, BLUE)]


_FIRST_FRAME = _expect(size=(16, 16), first=((8, 8), RED), tol=8)


@_case("animated_gif", "ok", _FIRST_FRAME)
def _(c: _Ctx) -> Source:
    f = _frames()
    return c.file("anim.gif", _encode(f[0], "GIF", save_all=True, append_images=f[1:], duration=50))


@_case("animated_webp", "ok", _FIRST_FRAME)
def _(c: _Ctx) -> Source:
    f = _frames()
    return c.file("anim.webp", _encode(f[0], "WEBP", save_all=True, append_images=f[1:],
                                       lossless=True, duration=50))


@_case("animated_png", "ok", _FIRST_FRAME, note="APNG")
def _(c: _Ctx) -> Source:
    f = _frames()
    return c.file("anim.png", _encode(f[0], "PNG", save_all=True, append_images=f[1:], duration=50))


@_case("exif_rotated_jpeg", "ok",
       _expect(size=(20, 40), top=((10, 3), RED), bottom=((10, 36), BLUE)),
       note="stored 40x20 (red left, blue right) with Orientation=6: shown 20x40, red on top")
def _(c: _Ctx) -> Source:
    im = Image.new("RGB", (40, 20), RED)
    im.paste(BLUE, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return c.file("rotated.jpg", _encode(im, "JPEG", quality=95, exif=exif.tobytes()))


@_case("palette_png_transparent", "ok",
       _expect(size=(8, 8), clear=((0, 0), WHITE), red=((7, 7), RED), tol=0))
def _(c: _Ctx) -> Source:
    im = Image.new("P", (8, 8), 0)
    im.putpalette([0, 0, 0, 255, 0, 0])
    im.paste(1, (4, 4, 8, 8))
    return c.file("palette.png", _encode(im, "PNG", transparency=0))


@_case("la_png", "ok", _expect(size=(8, 8), clear=((0, 0), WHITE), grey=((7, 7), (60, 60, 60)),
                               tol=1))
def _(c: _Ctx) -> Source:
    im = Image.new("LA", (8, 8), (0, 0))
    im.paste((60, 255), (4, 0, 8, 8))
    return c.file("la.png", _encode(im, "PNG"))


@_case("rgba_png", "ok", _expect(size=(8, 8), clear=((0, 0), WHITE), blue=((7, 7), BLUE),
                                 half=((7, 0), (128, 128, 255)), tol=2))
def _(c: _Ctx) -> Source:
    im = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    im.paste((0, 0, 255, 255), (4, 4, 8, 8))
    im.paste((0, 0, 255, 128), (4, 0, 8, 4))
    return c.file("rgba.png", _encode(im, "PNG"))


@_case("grayscale_jpeg", "ok", _check_grey)
def _(c: _Ctx) -> Source:
    return c.file("grey.jpg", _encode(_scene().convert("L"), "JPEG", quality=95))


@_case("bilevel_png", "ok", _expect(size=(8, 8), black=((0, 0), (0, 0, 0)),
                                    white=((7, 7), WHITE), tol=0))
def _(c: _Ctx) -> Source:
    im = Image.new("1", (8, 8), 0)
    im.paste(1, (4, 4, 8, 8))
    return c.file("bilevel.png", _encode(im, "PNG"))


@_case("webp", "ok", _SCENE_CHECK)
def _(c: _Ctx) -> Source:
    return c.file("scene.webp", _encode(_scene(), "WEBP", quality=90))


@_case("bmp", "ok", _SCENE_CHECK)
def _(c: _Ctx) -> Source:
    return c.file("scene.bmp", _encode(_scene(), "BMP"))


@_case("tiff", "ok", _SCENE_CHECK)
def _(c: _Ctx) -> Source:
    return c.file("scene.tiff", _encode(_scene(), "TIFF", compression="tiff_deflate"))


@_case("progressive_jpeg_restarts", "ok", _SCENE_CHECK,
       note="progressive scans and restart markers: the structure check must accept them")
def _(c: _Ctx) -> Source:
    return c.file("progressive.jpg", _encode(_scene(), "JPEG", quality=92, progressive=True,
                                             restart_marker_blocks=3))


@_case("jpeg_trailing_bytes", "ok", _SCENE_CHECK, note="junk after EOI, as some cameras write")
def _(c: _Ctx) -> Source:
    return _encode(_scene(), "JPEG", quality=92) + b"\x00TRAILER" * 16


@_case("jpeg_corrupt_middle", "corrupt",
       note="2 KiB in the middle of the compressed data overwritten with random bytes (a lost "
            "disk block); here libjpeg itself fails")
def _(c: _Ctx) -> Source:
    data = bytearray(_encode(_noise(160, 160, 4), "JPEG", quality=90))
    middle = len(data) // 2
    data[middle:middle + 2048] = np.random.default_rng(5).integers(
        0, 256, 2048, dtype=np.uint8).tobytes()
    return c.file("corrupt_middle.jpg", bytes(data))


@_case("jpeg_stray_marker", "corrupt",
       note="a restart marker in the middle of a JPEG that declares none: libjpeg only warns "
            "and PIL returns the picture with its lower half grey")
def _(c: _Ctx) -> Source:
    data = bytearray(_encode(_noise(160, 160, 4), "JPEG", quality=90))
    middle = len(data) // 2
    data[middle:middle + 2] = b"\xff\xd3"
    return c.file("stray_marker.jpg", bytes(data))


@_case("nonexistent_path", "not_found")
def _(c: _Ctx) -> Source:
    return c.dir / "no-such-dir" / "missing.jpg"


@_case("directory_path", "not_a_file")
def _(c: _Ctx) -> Source:
    path = c.dir / "a_directory.jpg"
    path.mkdir(exist_ok=True)
    return path


@_case("png_1x60000", "extreme_aspect_ratio",
       note="a few hundred bytes; resizing its short side to 224 once took 7.4 GB")
def _(c: _Ctx) -> Source:
    return c.file("line_60000.png", _encode(Image.new("L", (1, 60_000), 128), "PNG"))


@_case("png_1x200000", "extreme_aspect_ratio", note="once OOM-killed a worker, twice")
def _(c: _Ctx) -> Source:
    return c.file("line_200000.png", _encode(Image.new("L", (200_000, 1), 128), "PNG"))


@_case("png_aspect_19", "ok", _expect(size=(380, 20), red=((190, 10), RED), tol=8),
       note="a long banner just inside the default 20:1 limit")
def _(c: _Ctx) -> Source:
    return c.file("banner.png", _encode(Image.new("RGB", (380, 20), RED), "PNG"))


@_case("proc_self_environ", "forbidden_path", note="process state, never read")
def _(c: _Ctx) -> Source:
    return "/proc/self/environ"


@_case("symlink_to_proc", "forbidden_path", note="resolved before the check")
def _(c: _Ctx) -> Source:
    link = c.dir / "innocent.jpg"
    if not link.is_symlink():
        link.symlink_to("/proc/self/environ")
    return link


@_case("dev_zero_uri", "forbidden_path", note="a device, refused before it is opened")
def _(c: _Ctx) -> Source:
    return "file:///dev/zero"


@_case("symlink_to_etc_passwd", "not_an_image",
       note="allowed by the default policy (no allowed_roots), read, refused, never stored")
def _(c: _Ctx) -> Source:
    link = c.dir / "passwd.jpg"
    if not link.is_symlink():
        link.symlink_to("/etc/passwd")
    return link


@_case("file_uri", "ok", _SCENE_CHECK)
def _(c: _Ctx) -> Source:
    return c.file("file uri scene.png", _encode(_scene(), "PNG")).resolve().as_uri()


@_case("unsupported_scheme_ftp", "unsupported_scheme")
def _(c: _Ctx) -> Source:
    return "ftp://127.0.0.1/images/shirt.jpg"


@_case("unreachable_url", "unreachable", note="closed port on 127.0.0.1")
def _(c: _Ctx) -> Source:
    return closed_port_url()


@_case("url_timeout", "timeout", note="server accepts and never answers")
def _(c: _Ctx) -> Source | None:
    return c.servers.hang_url if c.servers else None


@_case("url_404", "http_status")
def _(c: _Ctx) -> Source | None:
    return f"{c.servers.base_url}/missing.jpg" if c.servers else None


@_case("url_ok", "ok", _SCENE_CHECK)
def _(c: _Ctx) -> Source | None:
    if c.servers is None:
        return None
    (c.www / "scene.jpg").write_bytes(_encode(_scene(), "JPEG", quality=92))
    return f"{c.servers.base_url}/scene.jpg"


@_case("url_1x200000", "extreme_aspect_ratio", note="fetched and refused by the worker itself")
def _(c: _Ctx) -> Source | None:
    if c.servers is None:
        return None
    (c.www / "line.png").write_bytes(_encode(Image.new("L", (1, 200_000), 128), "PNG"))
    return f"{c.servers.base_url}/line.png"


@_case("url_too_large_streamed", "too_large_bytes",
       note="no Content-Length: the download must stop past max_bytes")
def _(c: _Ctx) -> Source | None:
    if c.servers is None:
        return None
    (c.www / "huge.png").write_bytes(_encode(_noise(1100, 1000, 6), "PNG", compress_level=0))
    return f"{c.servers.base_url}/stream/huge.png"


CASE_NAMES: tuple[str, ...] = tuple(_BUILDERS)
"""Every case name (network cases included), known without building anything."""


def make_corpus(tmp_dir: Path, servers: CorpusServers | None = None) -> list[Case]:
    """Write the corpus files under ``tmp_dir`` and describe every case.

    Cases that need a local server (``url_timeout``, ``url_404``, ``url_ok``,
    ``url_1x200000``, ``url_too_large_streamed``) are included only when ``servers`` is given; files they
    serve are written to ``tmp_dir / "www"``, which the file server must serve.
    """
    tmp_dir = Path(tmp_dir)
    files = tmp_dir / "files"
    www = tmp_dir / "www"
    files.mkdir(parents=True, exist_ok=True)
    www.mkdir(parents=True, exist_ok=True)
    ctx = _Ctx(dir=files, www=www, servers=servers)
    cases = []
    for name, (expect, build, check, note) in _BUILDERS.items():
        source = build(ctx)
        if source is not None:
            cases.append(Case(name=name, source=source, expect=expect, check=check, note=note))
    return cases
