"""A backbone named by URL + sha256: downloaded over real HTTP, verified, cached."""

from __future__ import annotations

import http.server
import io
import tarfile
import threading
from pathlib import Path

import pytest

from bin_controller.errors import BundleError
from bin_controller.vision import fetch
from bin_controller.vision.classifier import Classifier
from tests.conftest import MOBILENET_MEMBER, MOBILENET_SHA
from tests.helpers import imagenet_bundle


class _Server:
    def __init__(self, files: dict[str, bytes], redirects: dict[str, str] | None = None) -> None:
        self.files = files
        self.redirects = redirects or {}
        self.hits: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits.append(self.path)
                if self.path in outer.redirects:
                    self.send_response(302)
                    self.send_header("Location", outer.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _tgz(member: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(f"mobilenet_v2_1.0_224_quant/{member}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        readme = b"not the model"
        info = tarfile.TarInfo("mobilenet_v2_1.0_224_quant/README")
        info.size = len(readme)
        tar.addfile(info, io.BytesIO(readme))
    return buf.getvalue()


@pytest.fixture
def server(mobilenet_file):
    s = _Server({"/models/mobilenet_v2_1.0_224_quant.tgz":
                 _tgz(MOBILENET_MEMBER, mobilenet_file.read_bytes()),
                 "/models/broken.tgz": _tgz(MOBILENET_MEMBER, b"not a model")})
    yield s
    s.close()


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("SMARTBIN_OFFLINE", raising=False)


@pytest.fixture(autouse=True)
def _local_http(monkeypatch):
    """The test server speaks plain http, which smartbin refuses unless told otherwise."""
    monkeypatch.setenv("SMARTBIN_ALLOW_HTTP", "1")


def _remote(url: str) -> fetch.RemoteFile:
    return fetch.RemoteFile(url, MOBILENET_SHA, MOBILENET_MEMBER)


def test_download_verify_and_cache(server, online):
    remote = _remote(server.url + "/models/mobilenet_v2_1.0_224_quant.tgz")
    data = fetch.resolve(remote)
    assert fetch.sha256_bytes(data) == MOBILENET_SHA
    cached = fetch.cache_dir() / MOBILENET_SHA[:16] / MOBILENET_MEMBER
    assert cached.read_bytes() == data
    server.close()  # the second load must come from the cache
    assert fetch.resolve(remote) == data
    assert len(server.hits) == 1


def test_bundle_downloads_its_backbone(server, online, tmp_path, mobilenet_file):
    url = server.url + "/models/mobilenet_v2_1.0_224_quant.tgz"
    bundle = imagenet_bundle(tmp_path / "b", mobilenet_file.parent / "imagenet_labels.txt",
                             url=url)
    c = Classifier(bundle)
    assert len(c.bundle.labels) == 1001 and server.hits


def test_checksum_mismatch_after_download(server, online):
    remote = _remote(server.url + "/models/broken.tgz")
    with pytest.raises(BundleError, match="expected 7aad0c74c5e3"):
        fetch.resolve(remote)
    assert not (fetch.cache_dir() / MOBILENET_SHA[:16] / MOBILENET_MEMBER).exists()


def test_offline_error_says_how_to_supply_the_file(online):
    remote = _remote("http://127.0.0.1:9/mobilenet_v2_1.0_224_quant.tgz")  # discard port
    with pytest.raises(BundleError) as err:
        fetch.resolve(remote)
    message = str(err.value)
    assert "cannot download" in message and MOBILENET_MEMBER in message
    assert "SMARTBIN_BACKBONE" in message and str(fetch.cache_dir()) in message


def test_offline_mode_never_connects():
    with pytest.raises(BundleError, match="SMARTBIN_OFFLINE=1"):
        fetch.resolve(_remote("http://127.0.0.1:9/x.tgz"))


def test_override_file_and_folder(mobilenet_file, monkeypatch):
    remote = _remote("http://127.0.0.1:9/x.tgz")
    assert fetch.sha256_bytes(fetch.resolve(remote, override=str(mobilenet_file))) == \
        MOBILENET_SHA
    monkeypatch.setenv("SMARTBIN_BACKBONE", str(mobilenet_file.parent))
    assert fetch.sha256_bytes(fetch.resolve(remote)) == MOBILENET_SHA


def test_override_with_wrong_file_is_named(tmp_path):
    wrong = tmp_path / MOBILENET_MEMBER
    wrong.write_bytes(b"something else")
    with pytest.raises(BundleError, match=f"{wrong}: sha256"):
        fetch.resolve(_remote("http://127.0.0.1:9/x.tgz"), override=str(tmp_path))


def test_damaged_cache_entry_is_replaced(server, online):
    cached = fetch.cache_dir() / MOBILENET_SHA[:16] / MOBILENET_MEMBER
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"half a file")
    data = fetch.resolve(_remote(server.url + "/models/mobilenet_v2_1.0_224_quant.tgz"))
    assert Path(cached).read_bytes() == data


# ------------------------------------------------------------------ what a manifest may name


def test_plain_http_needs_the_explicit_option(server, online, monkeypatch):
    monkeypatch.delenv("SMARTBIN_ALLOW_HTTP")
    with pytest.raises(BundleError, match=r"https:// URL, not http:// .*SMARTBIN_ALLOW_HTTP=1"):
        fetch.resolve(_remote(server.url + "/models/mobilenet_v2_1.0_224_quant.tgz"))
    assert server.hits == []


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x.tgz",
                                 "/srv/models/x.tgz", "data:,hello", "https:///x.tgz",
                                 "https://host/a b.tgz", "https://h\x00st/x.tgz"])
def test_other_schemes_and_malformed_urls_are_refused(online, url):
    with pytest.raises(BundleError, match="model url"):
        fetch.resolve(_remote(url))
    with pytest.raises(BundleError, match="model URL"):
        fetch.fetch_bytes(_remote(url))


def test_a_redirect_is_held_to_the_same_rules(online):
    # urllib alone would follow this to ftp; the redirect must be a URL a manifest may name.
    s = _Server({}, redirects={"/x.tgz": "ftp://127.0.0.1:9/x.tgz"})
    try:
        with pytest.raises(BundleError, match=r"redirected to ftp://127\.0\.0\.1:9/x\.tgz"):
            fetch.resolve(_remote(s.url + "/x.tgz"))
        assert s.hits == ["/x.tgz"]
    finally:
        s.close()


@pytest.mark.parametrize("member", ["../../escape.tflite", "sub/escape.tflite", "..", "",
                                    "/tmp/escape.tflite", "x\x00.tflite", "e" * 300])
def test_member_cannot_leave_the_cache_folder(online, tmp_path, member):
    data = b"model bytes"
    s = _Server({"/escape.tflite": data})
    remote = fetch.RemoteFile(s.url + "/escape.tflite", fetch.sha256_bytes(data),
                              member.replace("/tmp", str(tmp_path)))
    try:
        with pytest.raises(BundleError, match="model member"):
            fetch.resolve(remote)
        assert s.hits == []  # refused before anything was fetched or written
    finally:
        s.close()
    cache = fetch.cache_dir()
    for where in (cache.parent, cache.parent.parent, tmp_path):
        assert not (where / "escape.tflite").exists()


def test_a_non_hex_sha256_cannot_name_a_cache_folder(online):
    remote = fetch.RemoteFile("https://example.invalid/x.tgz", "../../" + "a" * 58,
                              MOBILENET_MEMBER)
    with pytest.raises(BundleError, match="64 hex digits"):
        fetch.resolve(remote)


def test_a_damaged_archive_is_one_line(server, online):
    server.files["/models/cut.tgz"] = server.files["/models/broken.tgz"][:40]
    with pytest.raises(BundleError, match=r"cut\.tgz is not a readable \.tgz archive"):
        fetch.resolve(_remote(server.url + "/models/cut.tgz"))
