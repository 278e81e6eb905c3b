"""Safe decoding (core.images) and fetching (services.fetch): every corpus case through
load_image, limits, sources, threads."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from agman_milvus.core import images
from agman_milvus.core.config import Settings
from agman_milvus.core.images import (
    CorruptImageError,
    DecompressionBombError,
    EmptyImageError,
    ExtremeAspectRatioError,
    ForbiddenSourceError,
    ImageError,
    ImageFetchError,
    ImageNotFoundError,
    ImageTooLargeError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedSourceError,
    decode_image_bytes,
    probe_image_bytes,
    to_rgb,
)
from agman_milvus.services.fetch import load_image, read_image_bytes
from tests.support import require_shared
from tests.support.bad_images import (
    CASE_NAMES,
    CORPUS_LIMITS,
    Case,
    CorpusServers,
    corpus_servers,
    make_corpus,
)

pytestmark = pytest.mark.timeout(60)

ERROR_CLASS = {
    "empty": EmptyImageError,
    "truncated": TruncatedImageError,
    "not_an_image": NotAnImageError,
    "corrupt": CorruptImageError,
    "too_large_bytes": ImageTooLargeError,
    "too_many_pixels": DecompressionBombError,
    "extreme_aspect_ratio": ExtremeAspectRatioError,
    "forbidden_path": ForbiddenSourceError,
    "not_found": ImageNotFoundError,
    "not_a_file": ImageNotFoundError,
    "unreachable": ImageFetchError,
    "timeout": ImageFetchError,
    "http_status": ImageFetchError,
    "unsupported_scheme": UnsupportedSourceError,
}
SERVER_CASES = {"url_timeout", "url_404", "url_ok", "url_1x200000", "url_too_large_streamed"}


@dataclass
class Corpus:
    root: Path
    servers: CorpusServers
    cases: dict[str, Case]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    root = tmp_path_factory.mktemp("corpus")
    (root / "www").mkdir()
    with corpus_servers(root / "www") as servers:
        cases = make_corpus(root, servers=servers)
        yield Corpus(root, servers, {case.name: case for case in cases})


def _encode(im: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------


def test_corpus_is_complete(corpus: Corpus, tmp_path: Path) -> None:
    assert len(CASE_NAMES) >= 24
    assert set(corpus.cases) == set(CASE_NAMES)
    offline = {case.name for case in make_corpus(tmp_path)}
    assert offline == set(CASE_NAMES) - SERVER_CASES
    assert {c.expect for c in corpus.cases.values()} - {"ok"} <= set(ERROR_CLASS)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_corpus_case(corpus: Corpus, name: str) -> None:
    case = corpus.cases[name]
    if case.ok:
        im = load_image(case.source, **CORPUS_LIMITS)
        assert im.mode == "RGB"
        assert np.asarray(im).shape == (im.height, im.width, 3)  # fully decoded
        if case.check is not None:
            case.check(im)
        return
    with pytest.raises(ImageError) as info:
        load_image(case.source, **CORPUS_LIMITS)
    err = info.value
    assert err.reason == case.expect, f"{name}: {err.reason} ({err})"
    assert isinstance(err, ERROR_CLASS[case.expect]) and isinstance(err, ValueError)
    message = str(err)
    assert message and "\n" not in message and "Traceback" not in message
    assert len(message) < 400


def test_errors_are_picklable_and_marked_transient(corpus: Corpus) -> None:
    outcomes = {}
    for name in ("url_404", "unreachable_url", "jpeg_corrupt_middle", "zero_bytes"):
        with pytest.raises(ImageError) as info:
            load_image(corpus.cases[name].source, **CORPUS_LIMITS)
        outcomes[name] = info.value
    assert outcomes["url_404"].status_code == 404
    assert not outcomes["url_404"].transient
    assert outcomes["unreachable_url"].transient
    assert not outcomes["jpeg_corrupt_middle"].transient
    for err in outcomes.values():
        copy = pickle.loads(pickle.dumps(err))
        assert type(copy) is type(err)
        assert (copy.reason, str(copy), copy.transient) == (err.reason, str(err), err.transient)
    assert pickle.loads(pickle.dumps(outcomes["url_404"])).status_code == 404


def test_concurrent_decoding_matches_sequential(corpus: Corpus) -> None:
    local = [c for c in corpus.cases.values() if not isinstance(c.source, str)
             or c.source.startswith("file:")]

    def outcome(case: Case) -> str:
        try:
            return hashlib.sha256(load_image(case.source, **CORPUS_LIMITS).tobytes()).hexdigest()
        except ImageError as err:
            return err.reason

    expected = [outcome(c) for c in local]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(3):
            assert list(pool.map(outcome, local)) == expected


# --------------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------------


def test_max_bytes_on_every_kind_of_source(corpus: Corpus, tmp_path: Path) -> None:
    data = _encode(Image.new("RGB", (16, 16), (1, 2, 3)))
    path = tmp_path / "small.png"
    path.write_bytes(data)
    assert load_image(data, max_bytes=len(data)).size == (16, 16)  # exactly at the limit
    for source in (data, bytearray(data), memoryview(data), path, str(path), path.as_uri()):
        with pytest.raises(ImageTooLargeError) as info:
            load_image(source, max_bytes=len(data) - 1)
        assert info.value.reason == "too_large_bytes"
        assert f"{len(data) - 1:,}" in str(info.value)
    served = corpus.cases["url_ok"].source
    with pytest.raises(ImageTooLargeError):  # rejected from Content-Length
        load_image(served, max_bytes=100)


def test_max_pixels_boundary() -> None:
    data = _encode(Image.new("RGB", (20, 10), (9, 9, 9)))
    assert load_image(data, max_pixels=200).size == (20, 10)
    with pytest.raises(DecompressionBombError) as info:
        load_image(data, max_pixels=199)
    assert "20x10" in str(info.value)


def test_bomb_rejected_fast_with_little_memory(corpus: Corpus) -> None:
    bomb = corpus.cases["png_bomb_30000"].source
    assert Path(bomb).stat().st_size < 2048
    script = (
        "import resource, sys, time\n"
        "from agman_milvus.core.images import load_image, DecompressionBombError\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "t = time.perf_counter()\n"
        "for limit in (40_000_000, 10**12):\n"
        "    try:\n"
        "        load_image(sys.argv[1], max_pixels=limit)\n"
        "    except DecompressionBombError:\n"
        "        pass\n"
        "    else:\n"
        "        raise SystemExit('not rejected')\n"
        "elapsed = time.perf_counter() - t\n"
        "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "print(elapsed, grown)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(bomb)], capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    elapsed, grown_kib = float(out[0]), int(out[1])
    assert elapsed < 5.0  # decoding it would take far longer; generous for a loaded machine
    assert grown_kib < 20 * 1024  # a decoded 30000x30000 RGB image would be 2.7 GB


def test_pil_globals_untouched(corpus: Corpus) -> None:
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    for name in ("png_bomb_30000", "truncated_jpeg", "truncated_png", "cmyk_jpeg"):
        try:
            load_image(corpus.cases[name].source, **CORPUS_LIMITS)
        except ImageError:
            pass
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


def test_total_download_deadline_against_a_slow_drip_server() -> None:
    """A server sending one byte every 0.2 s never trips a per-read timeout; the total must."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def drip() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n\r\n")
            while not stop.is_set():
                try:
                    conn.sendall(b"\x00")
                except OSError:
                    return
                time.sleep(0.2)

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    try:
        start = time.monotonic()
        with pytest.raises(ImageFetchError) as info:
            load_image(f"http://127.0.0.1:{listener.getsockname()[1]}/slow.png", timeout=1.0)
        assert info.value.reason == "timeout" and info.value.transient
        assert time.monotonic() - start < 3.0
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=5)


def test_limits_from_settings_and_overrides(tmp_path: Path) -> None:
    data = _encode(Image.new("RGB", (10, 10)))
    settings = Settings(data_dir=tmp_path, max_image_bytes=len(data) - 1, max_image_pixels=10_000)
    with pytest.raises(ImageTooLargeError):
        load_image(data, settings=settings)
    assert load_image(data, settings=settings, max_bytes=len(data)).size == (10, 10)
    with pytest.raises(DecompressionBombError):
        load_image(data, settings=settings, max_bytes=10**6, max_pixels=99)


def test_default_limits_read_once_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    images.default_limits.cache_clear()
    monkeypatch.setenv("AGMAN_MAX_IMAGE_BYTES", "50")
    try:
        assert images.default_limits().max_bytes == 50
        monkeypatch.setenv("AGMAN_MAX_IMAGE_BYTES", "60")
        assert images.default_limits().max_bytes == 50  # cached, not reread per call
        with pytest.raises(ImageTooLargeError):
            load_image(_encode(Image.new("RGB", (10, 10))))
    finally:
        images.default_limits.cache_clear()


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def test_read_image_bytes_returns_the_original_bytes(corpus: Corpus, tmp_path: Path) -> None:
    data = (corpus.root / "www" / "scene.jpg").read_bytes()
    path = tmp_path / "copy.jpg"
    path.write_bytes(data)
    for source in (path, str(path), path.as_uri(), corpus.cases["url_ok"].source, data):
        assert read_image_bytes(source, **CORPUS_LIMITS_NO_PIXELS) == data
    png = read_image_bytes(Image.new("RGBA", (4, 4), (0, 0, 0, 0)))
    assert decode_image_bytes(png).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(EmptyImageError):
        read_image_bytes(b"")


CORPUS_LIMITS_NO_PIXELS = {k: v for k, v in CORPUS_LIMITS.items() if k != "max_pixels"}


def test_decode_image_bytes_names_the_source_in_errors() -> None:
    with pytest.raises(NotAnImageError) as info:
        decode_image_bytes(b"hello world, not an image", source="upload #7")
    assert "upload #7" in str(info.value) and "plain text" in str(info.value)
    im = decode_image_bytes(_encode(Image.new("L", (3, 2), 77)))
    assert (im.mode, im.size, im.getpixel((0, 0))) == ("RGB", (3, 2), (77, 77, 77))


def test_pil_image_input_is_converted_not_mutated() -> None:
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 0))
    out = load_image(rgba)
    assert rgba.mode == "RGBA" and out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    rgb = Image.new("RGB", (4, 4), (5, 6, 7))
    out = load_image(rgb)
    assert out is not rgb and out.tobytes() == rgb.tobytes()
    with pytest.raises(DecompressionBombError):
        load_image(Image.new("L", (100, 100)), max_pixels=9_999)


def test_lazily_opened_pil_image_with_exif_orientation(corpus: Corpus) -> None:
    with Image.open(corpus.cases["exif_rotated_jpeg"].source) as lazy:
        assert lazy.size == (40, 20)
        corpus.cases["exif_rotated_jpeg"].check(load_image(lazy))


def test_unsupported_sources() -> None:
    with pytest.raises(UnsupportedSourceError) as info:
        load_image(12345)  # type: ignore[arg-type]
    assert info.value.reason == "unsupported_type"
    with pytest.raises(UnsupportedSourceError) as info:
        load_image("blob://" + "a" * 64)
    assert "BlobStore.open_uri" in str(info.value)
    with pytest.raises(UnsupportedSourceError) as info:
        load_image("file://other-host/x.jpg")
    assert info.value.reason == "invalid_uri"


def test_core_decoding_never_downloads() -> None:
    with pytest.raises(UnsupportedSourceError, match="services.fetch"):
        images.load_image("http://127.0.0.1:9/x.jpg")


def test_allowed_roots_follow_symlinks(tmp_path: Path) -> None:
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    data = _encode(Image.new("RGB", (4, 4), (9, 9, 9)))
    (inside / "ok.png").write_bytes(data)
    (outside / "secret.png").write_bytes(data)
    (inside / "link.png").symlink_to(outside / "secret.png")
    settings = Settings(data_dir=tmp_path, allowed_roots=[inside])
    assert load_image(inside / "ok.png", settings=settings).size == (4, 4)
    assert load_image((inside / "ok.png").as_uri(), settings=settings).size == (4, 4)
    for refused in (outside / "secret.png", inside / "link.png", inside / ".." / "outside" / "secret.png",
                    (inside / "link.png").as_uri()):
        with pytest.raises(ForbiddenSourceError) as info:
            load_image(refused, settings=settings)
        assert info.value.reason == "forbidden_path" and "outside the allowed roots" in str(info.value)
    with pytest.raises(ForbiddenSourceError):  # no root at all: nothing local is read
        read_image_bytes(inside / "ok.png", settings=Settings(data_dir=tmp_path, allowed_roots=[]))


def test_policy_is_checked_before_anything_is_opened(tmp_path: Path) -> None:
    """A FIFO inside the roots is refused from its stat (opening it would block a reader that
    forgot O_NONBLOCK); /dev, /proc and /sys are refused whatever the roots say."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    settings = Settings(data_dir=tmp_path, allowed_roots=[tmp_path, "/"])
    with pytest.raises(ImageNotFoundError) as info:
        load_image(fifo, settings=settings)
    assert info.value.reason == "not_a_file"
    for path in ("/dev/zero", "/proc/self/environ", "/sys/kernel/mm/transparent_hugepage/enabled"):
        with pytest.raises(ForbiddenSourceError):
            read_image_bytes(path, settings=settings)


def test_aspect_ratio_limit_from_settings(tmp_path: Path) -> None:
    data = _encode(Image.new("RGB", (50, 10)))
    with pytest.raises(ExtremeAspectRatioError, match="5.0:1"):
        load_image(data, settings=Settings(data_dir=tmp_path, max_aspect_ratio=4))
    assert load_image(data, settings=Settings(data_dir=tmp_path, max_aspect_ratio=5)).size == (50, 10)
    with pytest.raises(ExtremeAspectRatioError):  # an already opened PIL image too
        load_image(Image.new("RGB", (1, 500)))


def test_probe_reads_the_header_only() -> None:
    assert probe_image_bytes(_encode(Image.new("RGB", (30, 20)))) == ("PNG", 30, 20)
    whole = _encode(Image.effect_noise((64, 64), 40).convert("RGB"), "PNG")
    cut = whole[: len(whole) // 2]  # pixel data cut short: found by decoding only
    assert probe_image_bytes(cut)[1:] == (64, 64)
    with pytest.raises(TruncatedImageError):
        decode_image_bytes(cut)
    for bad, reason in ((b"root:x:0:0:root:/root:/bin/bash\n", "not_an_image"),
                        (_encode(Image.new("L", (1, 60_000))), "extreme_aspect_ratio"), (b"", "empty")):
        with pytest.raises(ImageError) as info:
            probe_image_bytes(bad)
        assert info.value.reason == reason


_MEMORY_PROBE = """
import io, resource, sys, time
from PIL import Image
from agman_milvus.core.images import ImageError, decode_image_bytes
from agman_milvus.core.model.transforms import Preprocess, resize_center_crop
lines = [io.BytesIO() for _ in range(2)]
Image.new("L", (1, 60_000), 128).save(lines[0], "PNG")
Image.new("L", (200_000, 1), 128).save(lines[1], "PNG")
preprocess = Preprocess()
preprocess(Image.new("RGB", (300, 200)))  # warm up numpy/torch before measuring
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
for buf in lines:
    try:
        preprocess(decode_image_bytes(buf.getvalue()))
        sys.exit("decoded a 1-pixel line")
    except ImageError as exc:
        assert exc.reason == "extreme_aspect_ratio", exc.reason
for size in ((1, 200_000), (200_000, 1), (3, 100_000)):  # the transform alone stays bounded too
    assert resize_center_crop(Image.new("RGB", size), 224).size == (224, 224)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base, time.perf_counter() - start)
"""


def test_one_pixel_lines_fail_fast_in_bounded_memory() -> None:
    """A 1x60000 PNG once took 7.4 GB and 27 s, a 1x200000 one was OOM-killed: both are now
    refused from the header, and the transform bounds its own memory (fresh process, so
    ru_maxrss measures this work)."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    grown_kib, seconds = out.stdout.split()
    assert int(grown_kib) < 64 * 1024, f"peak memory grew by {int(grown_kib) // 1024} MiB"
    assert float(seconds) < 10


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageNotFoundError) as info:
        load_image(fifo)
    assert info.value.reason == "not_a_file"


def test_credentials_are_not_echoed(corpus: Corpus) -> None:
    port = corpus.servers.base_url.rsplit(":", 1)[1]
    with pytest.raises(ImageFetchError) as info:
        load_image(f"http://user:s3cret@127.0.0.1:{port}/missing.jpg")
    assert "s3cret" not in str(info.value) and info.value.reason == "http_status"


def test_html_error_page_served_as_image(corpus: Corpus) -> None:
    (corpus.root / "www" / "blocked.jpg").write_bytes(b"<html><body>Access denied</body></html>")
    with pytest.raises(NotAnImageError) as info:
        load_image(f"{corpus.servers.base_url}/blocked.jpg")
    assert "HTML" in str(info.value)


# --------------------------------------------------------------------------------------------
# Modes and the JPEG structure check
# --------------------------------------------------------------------------------------------


def test_damaged_headers_are_not_called_non_images() -> None:
    png = _encode(Image.new("RGB", (8, 8)))
    with pytest.raises(TruncatedImageError):
        load_image(png[:30])
    broken = bytearray(png)
    broken[12:16] = b"XXXX"  # the IHDR chunk type
    with pytest.raises(CorruptImageError) as info:
        load_image(bytes(broken))
    assert "starts like a PNG" in str(info.value)
    with pytest.raises(NotAnImageError):
        load_image(b"BMW catalogue 2024, spring collection")


def test_16bit_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    for mode, raw in (("I;16", values.astype("<u2")), ("I;16B", values.astype(">u2"))):
        im = Image.frombytes(mode, (4, 1), raw.tobytes())
        assert np.asarray(to_rgb(im))[0].tolist() == [[0] * 3, [1] * 3, [128] * 3, [255] * 3]


def test_rgb_with_transparency_key_is_composited() -> None:
    im = Image.new("RGB", (2, 1), (10, 20, 30))
    im.putpixel((1, 0), (1, 2, 3))
    loaded = load_image(_encode(im, "PNG", transparency=(1, 2, 3)))
    assert loaded.getpixel((0, 0)) == (10, 20, 30) and loaded.getpixel((1, 0)) == (255, 255, 255)


def test_jpeg_with_out_of_sequence_restart_marker_is_corrupt() -> None:
    data = bytearray(_encode(Image.new("RGB", (64, 64), (10, 200, 30)), "JPEG",
                             restart_marker_blocks=2))
    first = data.find(b"\xff\xd1")
    assert first > 0
    data[first + 1] = 0xD5  # RST1 -> RST5
    with pytest.raises(CorruptImageError) as info:
        load_image(bytes(data))
    assert "restart marker" in str(info.value)


@pytest.mark.realdata
def test_real_catalogue_images_decode_without_false_alarms() -> None:
    folder = require_shared("data", "fashion-products", "images")
    files = sorted(folder.glob("*.jpg"))[::25]
    assert len(files) > 100
    for path in files:
        im = load_image(path)
        assert im.mode == "RGB" and im.size == (224, 224)


@pytest.mark.parametrize("mode, fmt", [("1", "PBM"), ("L", "PGM"), ("RGB", "PPM"), ("I;16", "PGM")])
def test_netpbm_images_are_accepted(mode: str, fmt: str) -> None:
    """PBM/PGM/PPM (common in image benchmarks), binary and 16-bit, decode to RGB."""
    source = Image.new("RGB", (24, 16), (200, 40, 40)).convert("L" if mode == "I;16" else mode)
    if mode == "I;16":
        source = Image.fromarray(np.full((16, 24), 40000, np.uint16))
    buf = io.BytesIO()
    source.save(buf, "PPM")
    assert buf.getvalue()[:2] in (b"P4", b"P5", b"P6")
    im = load_image(buf.getvalue())
    assert im.mode == "RGB" and im.size == (24, 16)
    if mode == "I;16":
        assert im.getpixel((0, 0)) == (156, 156, 156)  # 40000 / 65535 * 255, scaled not clipped
