"""Model files named by URL + sha256: found locally, in the cache, or downloaded and verified."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from http.client import HTTPMessage
from pathlib import Path
from typing import IO

from bin_controller.errors import BundleError

ENV_CACHE = "SMARTBIN_CACHE_DIR"
ENV_BACKBONE = "SMARTBIN_BACKBONE"
ENV_OFFLINE = "SMARTBIN_OFFLINE"
# Plain http is for the test suite's local server only; everything real is https.
ENV_ALLOW_HTTP = "SMARTBIN_ALLOW_HTTP"
DOWNLOAD_TIMEOUT_S = 60
# Longest file name most file systems take (ext4, btrfs, xfs: 255 bytes).
NAME_MAX_BYTES = 255
# Largest download (and archive member) accepted: MobileNetV2 is 3.4 MB and the biggest
# backbone a Raspberry Pi runs in time is well under this; it only stops a runaway server.
MAX_DOWNLOAD_BYTES = 512 << 20


@dataclass(frozen=True)
class RemoteFile:
    url: str
    sha256: str
    member: str  # file name inside a .tgz archive, or the file name of a plain download


def url_problem(url: str) -> str | None:
    """Why a model URL is refused, or None: https only (and http behind $SMARTBIN_ALLOW_HTTP=1),
    so a manifest cannot read local files (file://) or talk to other services."""
    if not url.isascii() or not url.isprintable() or " " in url:
        return "must be plain ASCII with no spaces or control characters (percent-encode them)"
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    allowed = ("https", "http") if os.environ.get(ENV_ALLOW_HTTP) == "1" else ("https",)
    if parts.scheme not in allowed:
        given = f"{parts.scheme}://" if parts.scheme else "a path"
        return f"must be an https:// URL, not {given}" + (
            f" (plain http needs {ENV_ALLOW_HTTP}=1)" if parts.scheme == "http" else "")
    try:
        parts.port  # noqa: B018  (raises on a malformed port)
    except ValueError:
        return "has a malformed port"
    if not parts.hostname:
        return "must name a host"
    return None


def member_problem(member: str) -> str | None:
    """Why a member name is refused, or None. It is joined to the cache and override folders,
    so it must be one plain file name: no folders, no `..`, nothing absolute."""
    if member in ("", ".", "..") or "/" in member or "\\" in member or "\0" in member:
        return "must be a plain file name (no folders, '..' or NUL), as found in the archive"
    return name_problem(member)


def name_problem(name: str) -> str | None:
    """Why a file name cannot be used on disk, or None (checked before the OS says it less
    clearly: ENAMETOOLONG, or ValueError for NUL and unpaired surrogates)."""
    if "\0" in name:
        return "contains a NUL character"
    try:
        size = len(os.fsencode(name))
    except UnicodeEncodeError:
        return "is not valid text (unpaired surrogate)"
    if size > NAME_MAX_BYTES:
        return f"is {size} bytes long; file names are limited to {NAME_MAX_BYTES} bytes"
    return None


def _check(remote: RemoteFile) -> None:
    """The manifest parser checks these too; this guards RemoteFiles made in code."""
    for field, problem in (("url", url_problem(remote.url)),
                           ("member", member_problem(remote.member))):
        if problem:
            raise BundleError(f"model {field} {getattr(remote, field)!r} {problem}")
    if len(remote.sha256) != 64 or not all(c in "0123456789abcdef" for c in remote.sha256):
        raise BundleError(f"model sha256 {remote.sha256!r} must be 64 hex digits")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_dir() -> Path:
    """SMARTBIN_CACHE_DIR, else systemd's CacheDirectory, else the XDG cache folder."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    if os.environ.get("CACHE_DIRECTORY"):
        return Path(os.environ["CACHE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "smartbin"


def _candidates(remote: RemoteFile, overrides: list[str]) -> list[Path]:
    paths = []
    for entry in overrides:
        p = Path(entry).expanduser()
        paths.append(p / remote.member if p.is_dir() else p)
    return paths


def resolve(remote: RemoteFile, *, override: str | None = None) -> bytes:
    """Bytes of the remote file, verified against its sha256.

    Looks at the override (option, then $SMARTBIN_BACKBONE: a file or a folder holding
    `member`), then the cache, then downloads into the cache.
    """
    _check(remote)
    overrides = [o for o in (override, os.environ.get(ENV_BACKBONE)) if o]
    for entry in overrides:
        problem = "contains a NUL character" if "\0" in entry else None
        if problem:
            raise BundleError(f"{entry!r}: backbone path {problem}")
    try:
        return _resolve(remote, overrides)
    except (OSError, RuntimeError) as exc:  # RuntimeError: expanduser of an unknown ~user
        raise BundleError(f"cannot read {remote.member}: {exc}") from exc


def _resolve(remote: RemoteFile, overrides: list[str]) -> bytes:
    for path in _candidates(remote, overrides):
        if path.is_file():
            data = path.read_bytes()
            if sha256_bytes(data) != remote.sha256:
                raise BundleError(
                    f"{path}: sha256 {sha256_bytes(data)[:12]}… does not match the expected "
                    f"{remote.sha256[:12]}… for {remote.member}; supply the original file"
                )
            return data
    cached = cache_dir() / remote.sha256[:16] / remote.member
    if cached.is_file():
        data = cached.read_bytes()
        if sha256_bytes(data) == remote.sha256:
            return data
        cached.unlink()  # a damaged cache entry is fetched again
    return download(remote, cached)


def download(remote: RemoteFile, target: Path) -> bytes:
    how = (
        f"put {remote.member} in {target.parent} or point ${ENV_BACKBONE} (or --backbone) "
        f"at it; it comes from {remote.url}"
    )
    if os.environ.get(ENV_OFFLINE) == "1":
        raise BundleError(f"{remote.member} is not cached and {ENV_OFFLINE}=1: {how}")
    data = fetch_bytes(remote, how)
    if sha256_bytes(data) != remote.sha256:
        raise BundleError(
            f"downloaded {remote.member} has sha256 {sha256_bytes(data)[:12]}…, expected "
            f"{remote.sha256[:12]}…; the file at {remote.url} changed or was damaged"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename so a power cut never leaves a half file that looks cached.
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, target)
    except OSError:
        pass  # a read-only cache still lets this run proceed with the verified bytes
    return data


class _SameRulesRedirect(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL the manifest itself could have named."""

    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
        headers: HTTPMessage, newurl: str,
    ) -> urllib.request.Request | None:
        problem = url_problem(newurl)
        if problem:
            raise urllib.error.URLError(f"redirected to {newurl}, which {problem}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_bytes(remote: RemoteFile, how: str = "") -> bytes:
    """The member file at remote.url, unverified (the caller checks or records its sha256)."""
    for field, problem in (("URL", url_problem(remote.url)),
                           ("member", member_problem(remote.member))):
        if problem:
            raise BundleError(f"{remote.url}: model {field} {problem}")
    opener = urllib.request.build_opener(_SameRulesRedirect)
    try:
        with opener.open(remote.url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            payload = resp.read(MAX_DOWNLOAD_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BundleError(f"cannot download {remote.url} ({reason})"
                          + (f": {how}" if how else "")) from exc
    if len(payload) > MAX_DOWNLOAD_BYTES:
        raise BundleError(f"{remote.url} is larger than {MAX_DOWNLOAD_BYTES >> 20} MB; "
                          "no model the bin can run is that big")
    return _extract(payload, remote)


def _extract(payload: bytes, remote: RemoteFile) -> bytes:
    if not remote.url.endswith((".tgz", ".tar.gz")):
        return payload
    try:
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as tar:
            for info in tar.getmembers():
                if info.isfile() and Path(info.name).name == remote.member:
                    if info.size > MAX_DOWNLOAD_BYTES:
                        raise BundleError(f"{remote.url}: {remote.member} in the archive is "
                                          f"larger than {MAX_DOWNLOAD_BYTES >> 20} MB")
                    f = tar.extractfile(info)
                    if f is not None:
                        return f.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise BundleError(f"{remote.url} is not a readable .tgz archive: {exc}") from exc
    raise BundleError(f"{remote.url} does not contain {remote.member}")
