"""The models folder (`model.dir`) as a history of versions: install, list, roll back.

Layout, for a bundle called `trashnet`:

    <models>/current.json                      which version of each bundle is current
    <models>/trashnet -> .versions/trashnet/V  what loaders find by name (a symlink)
    <models>/.versions/trashnet/<version>/     the last `keep` versions, whole bundles
    <models>/.lock                             one models operation at a time

`current.json` is the record; the symlink follows it. Every step that changes what is
visible is a rename (a version folder is copied under a temporary name, fsynced and then
renamed; `current.json` and the link are replaced the same way), so a process killed at
any point leaves either the old state or the new one, never a half-copied bundle under a
name a loader would use. A leftover temporary folder is removed by the next operation, and
a link that lags behind `current.json` (a kill between the two renames) is put right then.

Rolling back past the first installed version of a shipped bundle's name (a `demo`
taught on the bin) removes the link, so the shipped bundle is found again.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bin_controller.errors import BundleError, CommandError
from bin_controller.vision.bundle import MANIFEST, SHIPPED_MODELS, load_bundle

CURRENT = "current.json"
VERSIONS = ".versions"
LOCK = ".lock"
TMP_PREFIX = ".tmp-"
DEFAULT_KEEP = 3
# A version folder is named after the manifest's version; these characters stay as they are.
_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.+-_")
MAX_NAME = 100


@dataclass(frozen=True)
class Installed:
    name: str
    version: str  # the version folder, which is the manifest's version made file-safe
    path: Path
    previous: str | None
    removed: list[str]


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(Path(root) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def write_atomic(path: Path, data: bytes) -> None:
    """Replace a file whole: a reader sees the old bytes or the new, never a mix."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _version_dir(version: str) -> str:
    safe = "".join(c if c in _SAFE else "_" for c in version).lstrip(".") or "version"
    return safe[:MAX_NAME]


def _check_name(name: str) -> str:
    if (not name or len(name) > MAX_NAME or name.startswith(".") or ".." in name
            or any(c in name for c in "/\\\0") or not name.isprintable()):
        raise BundleError(f"{name[:60]!r} cannot be a bundle name in the models folder: one "
                          f"plain folder name of at most {MAX_NAME} characters")
    return name


class ModelsFolder:
    """The bundles a bin has been given, with their earlier versions."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()

    # ------------------------------------------------------------------ record

    def _read(self) -> dict[str, Any]:
        path = self.folder / CURRENT
        if not path.is_file():
            return {"format": 1, "bundles": {}}
        try:
            data: Any = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BundleError(f"{path}: cannot read the models record: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("bundles"), dict):
            raise BundleError(f"{path}: not a models record (expected "
                              '{"format": 1, "bundles": {...}})')
        return data

    def _write(self, record: dict[str, Any]) -> None:
        text = json.dumps(record, ensure_ascii=False, indent=2) + "\n"
        write_atomic(self.folder / CURRENT, text.encode("utf-8"))

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The record, under the folder's lock; stale temporaries cleared and links made
        to agree with the record before anything else happens."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / LOCK, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            record = self._read()
            self._tidy(record)
            yield record

    def _tidy(self, record: dict[str, Any]) -> None:
        for leftover in self.folder.glob(f"{TMP_PREFIX}*"):
            _remove(leftover)
        versions = self.folder / VERSIONS
        if versions.is_dir():
            for leftover in versions.glob(f"*/{TMP_PREFIX}*"):
                _remove(leftover)
        for name, entry in record["bundles"].items():
            self._link(name, entry.get("current"))

    def _link(self, name: str, version: str | None) -> None:
        """Point `<models>/<name>` at the version (or remove it: the shipped one then)."""
        link = self.folder / name
        if version is None:
            if link.is_symlink():
                link.unlink()
                _fsync_dir(self.folder)
            return
        target = Path(VERSIONS) / name / version
        if link.is_symlink() and Path(os.readlink(link)) == target:
            return
        tmp = self.folder / f"{TMP_PREFIX}link-{name}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, link)
        _fsync_dir(self.folder)

    # ------------------------------------------------------------------ operations

    def install(self, bundle_dir: str | Path, *, keep: int = DEFAULT_KEEP) -> Installed:
        """Copy a bundle in as the current version of its name; keep the newest `keep`."""
        if keep < 1:
            raise CommandError("keep must be 1 or more")
        bundle = load_bundle(Path(bundle_dir))  # a broken bundle never gets in
        name = _check_name(bundle.name)
        with self._locked() as record:
            entry = record["bundles"].setdefault(name, {"current": None, "versions": []})
            self._adopt(name, entry, record)
            home = self.folder / VERSIONS / name
            home.mkdir(parents=True, exist_ok=True)
            version = _version_dir(bundle.version)
            taken = set(entry["versions"]) | {p.name for p in home.iterdir()}
            unique, n = version, 1
            while unique in taken:
                n += 1
                unique = f"{version}.{n}"
            tmp = home / f"{TMP_PREFIX}{unique}.{os.getpid()}"
            shutil.copytree(bundle.path, tmp, symlinks=False)
            tmp.chmod(0o755)  # a teach's temporary folder is private; the service must read it
            _fsync_tree(tmp)
            os.replace(tmp, home / unique)
            _fsync_dir(home)
            previous = entry["current"]
            entry["versions"] = [v for v in entry["versions"] if v != unique] + [unique]
            entry["current"] = unique
            entry.setdefault("installed", {})[unique] = time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            removed = self._prune(entry, keep)
            self._write(record)
            self._link(name, unique)
            for old in removed:
                _remove(home / old)
        return Installed(name, unique, self.folder / name, previous, removed)

    def _adopt(self, name: str, entry: dict[str, Any], record: dict[str, Any]) -> None:
        """A bundle copied into the models folder by hand (the README's deploy step)
        becomes the first version of its name instead of being overwritten."""
        link = self.folder / name
        if link.is_symlink() or not (link / MANIFEST).is_file():
            return
        version = _version_dir(load_bundle(link).version)
        home = self.folder / VERSIONS / name
        home.mkdir(parents=True, exist_ok=True)
        while (home / version).exists():
            version += ".old"
        os.replace(link, home / version)
        entry["versions"].append(version)
        entry["current"] = version
        self._write(record)
        self._link(name, version)

    @staticmethod
    def _prune(entry: dict[str, Any], keep: int) -> list[str]:
        versions: list[str] = entry["versions"]
        removed = []
        while len(versions) > keep:
            oldest = next((v for v in versions if v != entry["current"]), None)
            if oldest is None:
                break
            versions.remove(oldest)
            entry.get("installed", {}).pop(oldest, None)
            removed.append(oldest)
        return removed

    def rollback(self, name: str) -> tuple[str | None, str | None]:
        """Make the version installed before the current one current again; returns
        (from, to), `to` None when the shipped bundle of that name takes over."""
        _check_name(name)
        with self._locked() as record:
            entry = record["bundles"].get(name)
            if not entry or entry.get("current") is None:
                raise CommandError(f"no taught or installed version of {name!r} is in use in "
                                   f"{self.folder}; nothing to roll back")
            versions: list[str] = entry["versions"]
            current: str = entry["current"]
            at = versions.index(current)
            if at > 0:
                target: str | None = versions[at - 1]
            elif (SHIPPED_MODELS / name / MANIFEST).is_file():
                target = None
            else:
                raise CommandError(f"{name} {current} is the oldest version kept in "
                                   f"{self.folder}; there is nothing earlier to go back to")
            entry["current"] = target
            self._write(record)
            self._link(name, target)
        return current, target

    def list(self) -> dict[str, Any]:
        """Every bundle of the folder: its current version and the ones kept."""
        with self._locked() as record:
            out: dict[str, Any] = {}
            for name, entry in sorted(record["bundles"].items()):
                out[name] = {"current": entry.get("current"),
                             "versions": list(entry.get("versions", [])),
                             "installed": dict(entry.get("installed", {})),
                             "shipped": (SHIPPED_MODELS / name / MANIFEST).is_file()}
            for d in sorted(self.folder.iterdir()):
                if d.name not in out and not d.name.startswith(".") \
                        and (d / MANIFEST).is_file():
                    out[d.name] = {"current": None, "versions": [], "installed": {},
                                   "unmanaged": True,
                                   "shipped": (SHIPPED_MODELS / d.name / MANIFEST).is_file()}
            return out


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
