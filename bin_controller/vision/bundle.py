"""Model bundles: a folder with manifest.json, labels with their bins, and TFLite stages.

A bundle may chain a frozen backbone (read at a pooled-feature tensor) with a small head,
which is how the study's chosen model is deployed without retraining the backbone.
"""

from __future__ import annotations

import importlib.resources
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bin_controller.bins import BINS
from bin_controller.errors import BundleError, SmartbinError
from bin_controller.vision import tflite_format
from bin_controller.vision.fetch import (
    RemoteFile,
    member_problem,
    name_problem,
    resolve,
    sha256_bytes,
    url_problem,
)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SHIPPED_PACKAGE = "smartbin_models"  # the repository's model/ folder, as installed
# Limits on a manifest, far above any real one (the shipped ones are under 20 KB, 4 levels
# deep) so that a hostile file fails with one line instead of exhausting memory or stack.
MAX_MANIFEST_BYTES = 1 << 20
MAX_MANIFEST_DEPTH = 32
MAX_INT_DIGITS = 18  # every integer in a manifest fits in 64 bits
MAX_INPUT_SIDE = 4096  # pixels, for input.size
_INT_LIMIT = 10**MAX_INT_DIGITS


def _shipped_models() -> Path:
    """The folder holding the bundles shipped with smartbin."""
    try:
        root = importlib.resources.files(SHIPPED_PACKAGE)
    except ModuleNotFoundError:
        root = None
    # Bundles are read as plain files, so only a package on disk will do (not a zip).
    if isinstance(root, Path) and root.is_dir():
        return root
    # A checkout run with only PYTHONPATH set has no smartbin_models to import.
    return Path(__file__).resolve().parents[2] / "model"


SHIPPED_MODELS = _shipped_models()
# The name training.build_demo and the tests know the shipped folder by.
REPO_MODELS = SHIPPED_MODELS
BIN_MAPS = SHIPPED_MODELS / "bin_maps"


@dataclass(frozen=True)
class Label:
    name: str
    name_en: str
    bin: str
    volume_l: float | None = None  # typical volume of such an item (fill estimates)


@dataclass(frozen=True)
class InputSpec:
    width: int
    height: int
    # Real value the model expects for pixel p is (p - mean) / std.
    mean: float = 0.0
    std: float = 1.0
    crop: str = "center"  # "center": square centre crop, or "none": squash the whole frame
    crop_fraction: float = 1.0


@dataclass(frozen=True)
class Stage:
    role: str
    file: str | None = None
    sha256: str | None = None
    source: RemoteFile | None = None
    output: str | None = None  # tensor to read; the model is cut there when it is not the output


@dataclass
class Bundle:
    path: Path
    name: str
    version: str
    description: str
    labels: list[Label]
    input: InputSpec
    stages: list[Stage]
    output: str = "probabilities"  # or "logits"
    test_time_flip: bool = False
    provenance: dict[str, Any] = field(default_factory=dict)
    status: str = "ready"
    how_to_train: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def label_names(self) -> list[str]:
        return [label.name for label in self.labels]

    def stage_models(self, *, backbone: str | None = None) -> list[bytes]:
        """The TFLite bytes of each stage, verified; remote stages fetched and cut as needed."""
        if self.status != "ready" or not self.stages:
            raise BundleError(
                f"{self.path / MANIFEST}: bundle {self.name!r} has no trained weights yet "
                f"(status {self.status!r}). {self.how_to_train}".rstrip()
            )
        return [self._stage_bytes(stage, backbone) for stage in self.stages]

    def stage_where(self, stage: Stage) -> str:
        """How errors name a stage: its file, or the member of its download."""
        if stage.source is not None:
            return f"{stage.source.member} (from {self.path / MANIFEST})"
        return str(self.path / str(stage.file))

    def _stage_bytes(self, stage: Stage, backbone: str | None) -> bytes:
        where = self.stage_where(stage)
        if stage.source is not None:
            data = resolve(stage.source, override=backbone)
        else:
            data = self._read_stage_file(stage)
        try:
            # Damage the runtimes would only report later (a name that is not UTF-8 breaks
            # get_input_details) is found here, where the file can still be named.
            tflite_format.validate(data)
            if stage.output:
                if stage.output not in tflite_format.tensor_names(data):
                    raise BundleError(f"{where}: has no tensor named {stage.output!r}")
                data = tflite_format.truncate_at_tensor(data, stage.output)
        except tflite_format.TFLiteFormatError as exc:
            raise BundleError(f"{where}: {exc}") from exc
        return data

    def _read_stage_file(self, stage: Stage) -> bytes:
        assert stage.file is not None
        path = self.path / stage.file
        try:
            if not path.is_file():
                raise BundleError(f"{path}: stage file is missing (named in {MANIFEST})")
            if not _inside(path, self.path):
                raise BundleError(f"{path}: is a symlink to {path.resolve()}, outside the "
                                  "bundle folder; copy the file into the folder instead")
            data = path.read_bytes()
        except OSError as exc:
            raise BundleError(f"{path}: cannot read the stage file: {exc}") from exc
        if sha256_bytes(data) != stage.sha256:
            raise BundleError(
                f"{path}: checksum mismatch (sha256 {sha256_bytes(data)[:12]}…, manifest "
                f"says {str(stage.sha256)[:12]}…); the file is damaged or was replaced"
            )
        return data


# --------------------------------------------------------------------------- parsing


class _Reader:
    """Pulls typed fields out of a JSON object, naming the key path on any error."""

    def __init__(self, data: Any, where: str, path: str = "") -> None:
        if not isinstance(data, dict):
            raise BundleError(f"{where}: {path or 'manifest'} must be an object")
        self.data, self.where, self.path = data, where, path

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.data:
            if default is ...:
                raise BundleError(f"{self.where}: missing required field {self._name(key)!r}")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int to isinstance, but `true` is never a number in a manifest.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            allowed = " or ".join(k.__name__ for k in kinds)
            raise BundleError(f"{self.where}: field {self._name(key)!r} must be {allowed}")
        return value

    def sub(self, key: str) -> _Reader:
        return _Reader(self.get(key, dict), self.where, self._name(key))

    def fail(self, key: str, message: str) -> BundleError:
        return BundleError(f"{self.where}: field {self._name(key)!r} {message}")


# An item larger than a compartment is not one a bin takes.
MAX_VOLUME_L = 1000.0


def _parse_labels(r: _Reader) -> list[Label]:
    raw = r.get("labels", list)
    if not raw:
        raise r.fail("labels", "must list at least one label")
    labels = []
    for i, item in enumerate(raw):
        lr = _Reader(item, r.where, f"labels[{i}]")
        volume = lr.get("volume_l", (int, float), None)
        if volume is not None and (isinstance(volume, bool) or not 0 < volume <= MAX_VOLUME_L):
            raise lr.fail("volume_l", f"is {volume!r}; must be litres above 0 and at most "
                                      f"{MAX_VOLUME_L}")
        label = Label(lr.get("name", str), lr.get("name_en", str, ""), lr.get("bin", str),
                      None if volume is None else float(volume))
        if label.bin not in BINS:
            raise lr.fail("bin", f"is {label.bin!r}; allowed bins are {', '.join(BINS)}")
        labels.append(label)
    names = [label.name for label in labels]
    if len(set(names)) != len(names):
        raise r.fail("labels", "has duplicate names")
    return labels


def _parse_stage(r: _Reader) -> Stage:
    role = r.get("role", str)
    output = r.get("output", str, None)
    if "source" in r.data:
        sr = r.sub("source")
        url, member = sr.get("url", str), sr.get("member", str)
        for key, problem in (("url", url_problem(url)), ("member", member_problem(member))):
            if problem:
                raise sr.fail(key, problem)
        remote = RemoteFile(url, _sha256(sr), member)
        return Stage(role=role, source=remote, output=output)
    file = r.get("file", str)
    sha = _sha256(r)
    parts = Path(file).parts
    if not parts or Path(file).is_absolute() or ".." in parts or "\\" in file:
        raise r.fail("file", "must be a file name inside the bundle folder")
    problem = next(filter(None, map(name_problem, parts)), None)
    if problem:
        raise r.fail("file", problem)
    return Stage(role=role, file=file, sha256=sha, output=output)


def _sha256(r: _Reader) -> str:
    sha: str = r.get("sha256", str).lower()
    if len(sha) != 64 or not all(c in "0123456789abcdef" for c in sha):
        raise r.fail("sha256", "must be 64 hex digits")
    return sha


def _check_values(data: Any, where: str) -> None:
    """Every number finite and 64-bit, nesting bounded: checked once over the whole manifest,
    so `provenance` and fields added later are covered too (NaN passes every comparison)."""
    todo: list[tuple[Any, str, int]] = [(data, "", 0)]
    while todo:
        value, path, depth = todo.pop()
        if depth > MAX_MANIFEST_DEPTH:
            raise BundleError(f"{where}: nested more than {MAX_MANIFEST_DEPTH} levels deep "
                              f"(at {path or 'the top'})")
        if isinstance(value, dict):
            todo += [(v, f"{path}.{k}" if path else str(k), depth + 1) for k, v in value.items()]
        elif isinstance(value, list):
            todo += [(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
        elif isinstance(value, float) and not math.isfinite(value):
            raise BundleError(f"{where}: field {path!r} is {value}; numbers must be finite")
        elif isinstance(value, int) and not isinstance(value, bool) \
                and abs(value) >= _INT_LIMIT:
            raise BundleError(f"{where}: field {path!r} is an integer of more than "
                              f"{MAX_INT_DIGITS} digits")


def parse_manifest(data: Any, bundle_dir: Path) -> Bundle:
    where = str(bundle_dir / MANIFEST)
    _check_values(data, where)
    r = _Reader(data, where)
    fmt = r.get("format", int)
    if fmt != FORMAT_VERSION:
        raise r.fail("format", f"is {fmt}; this smartbin reads format {FORMAT_VERSION}")
    ir = r.sub("input")
    size = ir.get("size", list)
    if len(size) != 2 or not all(type(v) is int and 0 < v <= MAX_INPUT_SIDE for v in size):
        raise ir.fail("size", f"must be [width, height] in pixels, each 1 to {MAX_INPUT_SIDE}")
    crop = ir.get("crop", str, "center")
    if crop not in ("center", "none"):
        raise ir.fail("crop", "must be 'center' or 'none'")
    color = ir.get("color", str, "RGB")
    if color != "RGB":
        raise ir.fail("color", "must be 'RGB'")
    fraction = float(ir.get("crop_fraction", (int, float), 1.0))
    if not 0.1 <= fraction <= 1.0:
        raise ir.fail("crop_fraction", "must be between 0.1 and 1.0")
    std = float(ir.get("std", (int, float), 1.0))
    if std <= 0:
        raise ir.fail("std", "must be positive")
    spec = InputSpec(size[0], size[1], float(ir.get("mean", (int, float), 0.0)), std,
                     crop, fraction)
    status = r.get("status", str, "ready")
    stages = [_parse_stage(_Reader(s, where, f"stages[{i}]"))
              for i, s in enumerate(r.get("stages", list, []))]
    if status == "ready" and not stages:
        raise r.fail("stages", "must list at least one TFLite stage when status is 'ready'")
    output = r.get("output", str, "probabilities")
    if output not in ("probabilities", "logits"):
        raise r.fail("output", "must be 'probabilities' or 'logits'")
    return Bundle(
        path=bundle_dir,
        name=r.get("name", str),
        version=r.get("version", str),
        description=r.get("description", str, ""),
        labels=_parse_labels(r),
        input=spec,
        stages=stages,
        output=output,
        test_time_flip=r.get("test_time_flip", bool, False),
        provenance=r.get("provenance", dict, {}),
        status=status,
        how_to_train=r.get("how_to_train", str, ""),
        manifest=data,
    )


def _is_name(p: Path) -> bool:
    """A bare name (`trashnet`) rather than a path (`./trashnet`, `model/trashnet`)."""
    return len(p.parts) == 1 and not p.is_absolute() and p.name not in ("", ".", "..")


def _bundle_names(folder: Path) -> str:
    if not folder.is_dir():
        return "no such folder"
    names = sorted(d.name for d in folder.iterdir() if (d / MANIFEST).is_file())
    return ", ".join(names) if names else "no bundles"


def _shown(name_or_path: str | Path) -> str:
    """A name as an error line shows it: at most 60 characters, control characters escaped."""
    text = str(name_or_path)
    return repr(text if len(text) <= 60 else text[:60] + "…")


def _check_name(name_or_path: str | Path) -> None:
    """A bundle name or path the file system can take, as one line instead of the OSError
    (ENAMETOOLONG) or ValueError (NUL) the first stat would raise."""
    text = str(name_or_path)
    problem = "contains a NUL character" if "\0" in text else None
    if problem is None:
        problem = next((f"has a part that {p}" for p in map(name_problem, Path(text).parts)
                        if p), None)
    if problem:
        raise BundleError(f"{_shown(text)}: bundle name or path {problem}")


def find_bundle(name_or_path: str | Path, *, models_dir: str | Path | None = None) -> Path:
    """A bundle folder: a path to one (or to its manifest) as it is; a bare name in
    `models_dir` (trained and taught bundles) first, then among the shipped bundles."""
    _check_name(name_or_path)
    try:
        return _find_bundle(name_or_path, models_dir)
    except (OSError, RuntimeError) as exc:  # RuntimeError: expanduser of an unknown ~user
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise BundleError(f"{_shown(name_or_path)}: cannot look for a bundle there: "
                          f"{reason}") from exc


def _find_bundle(name_or_path: str | Path, models_dir: str | Path | None) -> Path:
    p = Path(name_or_path).expanduser()
    if (p / MANIFEST).is_file():
        return p
    if p.name == MANIFEST and p.is_file():
        return p.parent
    # The models folder comes first so that a bundle retrained on the bin under a shipped
    # name (say trashnet) replaces the shipped one without touching the installed program.
    places = [("the models folder", Path(models_dir).expanduser())] if models_dir else []
    places.append(("the shipped bundles", SHIPPED_MODELS))
    if _is_name(p):
        for _, folder in places:
            if (folder / p.name / MANIFEST).is_file():
                return folder / p.name
    searched = " and ".join(f"{what} {folder} ({_bundle_names(folder)})"
                            for what, folder in places)
    put = f"put the bundle folder in {places[0][1]}, " if models_dir else ""
    # repr for a name with a newline or other control character: the error stays one line.
    shown = str(p) if str(p).isprintable() else repr(str(p))
    if _is_name(p):
        raise BundleError(f"{shown}: no model bundle by that name in {searched}; use one of "
                          f"those names, {put}or give the path of a folder with {MANIFEST}")
    raise BundleError(f"{shown}: no model bundle here (expected a folder with {MANIFEST}); "
                      f"bundles by name are looked up in {searched}")


def find_bin_map(name_or_path: str | Path) -> Path:
    """A bin map (JSON class -> bin) file by path, or by bare name among the shipped ones
    (`trashnet` for model/bin_maps/trashnet.json), so it works without a checkout."""
    p = Path(name_or_path).expanduser()
    if p.is_file() or not _is_name(p):
        return p
    shipped = BIN_MAPS / (p.name if p.suffix == ".json" else f"{p.name}.json")
    if shipped.is_file():
        return shipped
    names = sorted(f.stem for f in BIN_MAPS.glob("*.json"))
    raise SmartbinError(f"{p}: no such bin map file, nor a shipped bin map of that name "
                        f"(shipped in {BIN_MAPS}: {', '.join(names) or 'none'})")


class _NumberTooLong(ValueError):
    pass


def _parse_int(text: str) -> int:
    # Checked on the digits, before int() meets Python's 4,300-digit conversion limit.
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _NumberTooLong(f"an integer of {len(text.lstrip('-'))} digits "
                             f"(at most {MAX_INT_DIGITS})")
    return int(text)


def _read_manifest(manifest: Path) -> bytes:
    with manifest.open("rb") as f:
        data = f.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{manifest}: larger than {MAX_MANIFEST_BYTES >> 20} MB; "
                          "a manifest only lists labels and stages")
    return data


def _inside(path: Path, folder: Path) -> bool:
    """Whether path, with every symlink followed, stays inside folder."""
    return path.resolve().is_relative_to(folder.resolve())


def load_bundle(name_or_path: str | Path, *, models_dir: str | Path | None = None) -> Bundle:
    bundle_dir = find_bundle(name_or_path, models_dir=models_dir)
    manifest = bundle_dir / MANIFEST
    try:
        if not _inside(manifest, bundle_dir):
            raise BundleError(f"{manifest}: is a symlink to {manifest.resolve()}, outside the "
                              "bundle folder; copy the file into the folder instead")
        data = json.loads(_read_manifest(manifest).decode("utf-8"), parse_int=_parse_int)
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest}: cannot read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise BundleError(
            f"{manifest}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    except _NumberTooLong as exc:
        raise BundleError(f"{manifest}: {exc}") from exc
    except RecursionError as exc:
        raise BundleError(f"{manifest}: nested too deeply (at most {MAX_MANIFEST_DEPTH} "
                          "levels)") from exc
    return parse_manifest(data, bundle_dir)


def write_manifest(bundle_dir: Path, manifest: dict[str, Any]) -> None:
    bundle_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest, ensure_ascii=False, indent=2) + "\n"
    (bundle_dir / MANIFEST).write_text(text, encoding="utf-8")
