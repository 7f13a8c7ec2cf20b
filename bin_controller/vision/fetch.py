"""Model files named by URL + sha256: found locally, in the cache, or downloaded and verified."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bin_controller.errors import BundleError

ENV_CACHE = "SMARTBIN_CACHE_DIR"
ENV_BACKBONE = "SMARTBIN_BACKBONE"
ENV_OFFLINE = "SMARTBIN_OFFLINE"
DOWNLOAD_TIMEOUT_S = 60


@dataclass(frozen=True)
class RemoteFile:
    url: str
    sha256: str
    member: str  # file name inside a .tgz archive, or the file name of a plain download


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
    overrides = [o for o in (override, os.environ.get(ENV_BACKBONE)) if o]
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


def fetch_bytes(remote: RemoteFile, how: str = "") -> bytes:
    """The member file at remote.url, unverified (the caller checks or records its sha256)."""
    try:
        with urllib.request.urlopen(remote.url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            payload = resp.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BundleError(f"cannot download {remote.url} ({reason})"
                          + (f": {how}" if how else "")) from exc
    return _extract(payload, remote)


def _extract(payload: bytes, remote: RemoteFile) -> bytes:
    if not remote.url.endswith((".tgz", ".tar.gz")):
        return payload
    try:
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as tar:
            for info in tar.getmembers():
                if info.isfile() and Path(info.name).name == remote.member:
                    f = tar.extractfile(info)
                    if f is not None:
                        return f.read()
    except tarfile.TarError as exc:
        raise BundleError(f"{remote.url} is not a readable .tgz archive: {exc}") from exc
    raise BundleError(f"{remote.url} does not contain {remote.member}")
