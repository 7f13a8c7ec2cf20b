"""Property tests: whatever a manifest, a .tflite file or an image file holds, the parsers
give a result or their one typed error (BundleError, TFLiteFormatError, ImageError)."""

from __future__ import annotations

import copy
import io
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bin_controller.errors import BundleError, ImageError
from bin_controller.vision import tflite_format as tfl
from bin_controller.vision.bundle import (
    SHIPPED_MODELS,
    Bundle,
    InputSpec,
    load_bundle,
    parse_manifest,
)
from bin_controller.vision.preprocess import MAX_IMAGE_PIXELS, load_image

# Each property stays under ~10 s on a busy two-core machine.
FAST = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

DEMO = json.loads((SHIPPED_MODELS / "demo" / "manifest.json").read_text(encoding="utf-8"))
TRASHNET = json.loads((SHIPPED_MODELS / "trashnet" / "manifest.json").read_text(
    encoding="utf-8"))

MEMBERS = st.one_of(
    st.sampled_from(["m.tflite", "../../x", "/abs/path", "a/b", "..", ".", "", "x\0y",
                     "n" * 300, "..\\x", "\ud800", "~", "-rf"]),
    st.text(max_size=40),
)
URLS = st.one_of(
    st.sampled_from(["https://example.invalid/m.tgz", "http://127.0.0.1/m.tgz",
                     "file:///etc/passwd", "ftp://h/x", "https://", "https://h:99999/x",
                     "https://[::1/x", "data:,x", "//h/x", "https://h/a b", "javascript:x"]),
    st.builds(lambda scheme, rest: f"{scheme}:{rest}",
              st.sampled_from(["https", "http", "file", "HTTPS", ""]), st.text(max_size=30)),
    st.text(max_size=40),
)
LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(),
    st.integers(min_value=10**17, max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), MEMBERS, URLS,
)
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12,
)


def _deep(depth: int) -> Any:
    value: Any = 1
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


# Values that once got through, or crashed the parser, drawn as often as everything else.
SPECIAL = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 10**18, -(10**30), True, 0, -1, 0.05, "",
                     [], {}, [64, 64], [True, True]]),
    # Built, not listed: a listed value is repr'd, and Python will not print 5,000 digits.
    st.builds(lambda: 10**5000),
)
HOSTILE = st.one_of(SPECIAL, VALUES, st.integers(1, 3000).map(_deep))


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Key paths into a JSON value (the value itself is the empty path), 6 levels deep."""
    out = [prefix]
    if len(prefix) >= 6:
        return out
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _parent(root: Any, path: tuple) -> Any:
    for key in path[:-1]:
        root = root[key]
    return root


# Where a mutation matters most; other paths (mostly labels) are drawn as often as these.
FOCUS = [("format",), ("name",), ("input",), ("input", "size"), ("input", "size", 0),
         ("input", "mean"), ("input", "std"), ("input", "crop_fraction"), ("input", "crop"),
         ("stages",), ("stages", 0), ("stages", 0, "file"), ("stages", 0, "sha256"),
         ("stages", 0, "source"), ("stages", 0, "source", "url"),
         ("stages", 0, "source", "member"), ("stages", 0, "output"), ("labels",),
         ("labels", 0), ("labels", 0, "bin"), ("output",), ("status",), ("provenance",),
         ("test_time_flip",)]


def _some_path(draw: st.DrawFn, data: Any) -> tuple:
    """A path to mutate: a focus field (made if missing) or any path the data has."""
    inside = _paths(data)[1:]
    return draw(st.sampled_from(FOCUS) if not inside
                else st.one_of(st.sampled_from(FOCUS), st.sampled_from(inside)))


def _set(data: Any, path: tuple, value: Any) -> None:
    """Put value at path, making the containers on the way when they are missing."""
    for key in path[:-1]:
        if isinstance(data, dict):
            data = data.setdefault(key, {} if isinstance(key, str) else [])
        elif isinstance(data, list) and isinstance(key, int) and key < len(data):
            data = data[key]
        else:
            return
    fits = isinstance(data, list) and isinstance(path[-1], int) and path[-1] < len(data)
    if isinstance(data, dict) or fits:
        data[path[-1]] = value


@st.composite
def manifests(draw: st.DrawFn, leaf: st.SearchStrategy[Any] = HOSTILE) -> Any:
    """The demo or trashnet manifest with a few keys removed, retyped or replaced."""
    data = copy.deepcopy(draw(st.sampled_from([DEMO, TRASHNET])))
    if draw(st.integers(0, 19)) == 0:
        return draw(leaf)  # the whole manifest something else
    for _ in range(draw(st.integers(1, 4))):
        path = _some_path(draw, data)
        try:
            parent = _parent(data, path)
        except (KeyError, IndexError, TypeError):
            parent = None
        if isinstance(parent, dict) and path[-1] in parent and draw(st.integers(0, 3)) == 0:
            del parent[path[-1]]
        else:
            _set(data, path, draw(st.one_of(leaf, MEMBERS, URLS)))
    if draw(st.integers(0, 2)) == 0:  # a complete download stage: url and member matter
        _set(data, ("stages", 0), {"role": "backbone", "source": {
            "url": draw(st.one_of(st.just("https://example.invalid/m.tgz"), URLS)),
            "member": draw(MEMBERS),
            "sha256": draw(st.sampled_from(["a" * 64, "A" * 64, "g" * 64, "../" * 21 + "a"]))}})
    return data


def _finite(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return not isinstance(value, int) or abs(value) < 10**18


def _check_result(bundle: Bundle) -> None:
    """What a parsed bundle promises: the checks that let it through held."""
    assert _finite(bundle.manifest)
    for stage in bundle.stages:
        if stage.source is not None:
            assert stage.source.url.startswith("https://")
            assert "/" not in stage.source.member and stage.source.member not in ("", "..")
        else:
            assert stage.file and not Path(stage.file).is_absolute()
            assert ".." not in Path(stage.file).parts
    spec = bundle.input
    assert all(math.isfinite(v) for v in (spec.mean, spec.std, spec.crop_fraction))
    assert spec.std > 0 and 0.1 <= spec.crop_fraction <= 1
    assert all(type(v) is int and 0 < v <= 4096 for v in (spec.width, spec.height))


@FAST
@given(manifests())
def test_parse_manifest_gives_a_bundle_or_bundle_error(data):
    try:
        bundle = parse_manifest(data, Path("/nowhere/bundle"))
    except BundleError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("/nowhere/bundle/manifest.json: ")
        return
    _check_result(bundle)


MARK = "@@raw@@"
RAW_VALUES = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "9" * 5000,
                              "-" + "9" * 30, "[" * 5000 + "]" * 5000,
                              '{"a":' * 3000 + "1" + "}" * 3000, '"\\ud800"', '"\\u0000"',
                              "1" + "0" * 19, "0.0", "true"])
SPLICES = st.sampled_from(["\0", "\udcff", "}", ",", "[", '"', "\\", "NaN"])


@st.composite
def manifest_texts(draw: st.DrawFn) -> bytes:
    """Manifest files: hostile raw JSON (NaN, 5000-digit numbers, 5000-deep nesting) in
    valid positions, sometimes a stray character spliced in, sometimes random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    data = draw(manifests())
    if isinstance(data, dict) and draw(st.booleans()):
        _set(data, _some_path(draw, data), MARK)
    try:
        text = json.dumps(data, ensure_ascii=draw(st.booleans()))
    except (ValueError, RecursionError):  # over Python's own digit or depth limits
        text = json.dumps(DEMO)
    while f'"{MARK}"' in text:
        text = text.replace(f'"{MARK}"', draw(RAW_VALUES), 1)
    if draw(st.integers(0, 4)) == 0:
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(SPLICES) + text[at + draw(st.integers(0, 3)):]
    return text.encode("utf-8", "surrogatepass")


@FAST
@given(manifest_texts())
def test_load_bundle_gives_a_bundle_or_bundle_error(raw):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "b"
        folder.mkdir()
        (folder / "manifest.json").write_bytes(raw)
        try:
            bundle = load_bundle(folder)
        except BundleError as exc:
            assert "\n" not in str(exc) and str(folder / "manifest.json") in str(exc)
            return
        _check_result(bundle)


@FAST
@given(st.one_of(st.text(max_size=300), MEMBERS,
                 st.builds(lambda n: "x" * n, st.integers(200, 5000))))
def test_any_bundle_name_gives_a_bundle_or_bundle_error(name):
    try:
        assert isinstance(load_bundle(name), Bundle)
    except BundleError as exc:
        assert "\n" not in str(exc)


# --------------------------------------------------------------------------- TFLite

MODELS = [(SHIPPED_MODELS / "demo" / name).read_bytes()
          for name in ("backbone.tflite", "head.tflite")]
NAMES = sorted({n for m in MODELS for n in tfl.tensor_names(m)})


@st.composite
def damaged_models(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:  # random bytes, half of them with the TFLite identifier
        data = bytearray(draw(st.binary(max_size=600)))
        if draw(st.booleans()):
            data[4:8] = b"TFL3"
        return bytes(data)
    data = bytearray(draw(st.sampled_from(MODELS)))
    if kind == 1:
        return bytes(data[: draw(st.integers(0, len(data)))])
    flips = draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)),
                          min_size=1, max_size=8))
    for at, value in flips:
        # kind 3 aims at the first kilobyte, where the tables and offsets are
        data[at % 1024 if kind == 3 else at] = value
    return bytes(data)


@settings(max_examples=300, deadline=None)
@given(damaged_models(), st.one_of(st.sampled_from(NAMES), st.text(max_size=10)))
def test_tflite_reader_gives_a_result_or_format_error(data, name):
    for read in (tfl.tensor_names, tfl.validate,
                 lambda d: tfl.truncate_at_tensor(d, name)):
        try:
            read(data)
        except tfl.TFLiteFormatError as exc:
            assert "\n" not in str(exc)


# --------------------------------------------------------------------------- images


def _encoded(fmt: str, mode: str, **kw: Any) -> bytes:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (12, 16, 3), np.uint8)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


IMAGES = [
    _encoded("PNG", "RGB"), _encoded("PNG", "LA"), _encoded("PNG", "P"),
    _encoded("JPEG", "RGB", quality=80), _encoded("JPEG", "L"), _encoded("GIF", "P"),
    _encoded("BMP", "RGB"), _encoded("TIFF", "RGB"), _encoded("TIFF", "CMYK"),
    _encoded("WEBP", "RGB"), _encoded("PPM", "RGB"), _encoded("ICO", "RGBA"),
]


@st.composite
def damaged_images(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=400))
    data = bytearray(draw(st.sampled_from(IMAGES)))
    if kind == 1:
        return bytes(data[: draw(st.integers(0, len(data)))])
    flips = draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)),
                          min_size=1, max_size=6))
    for at, value in flips:
        data[at % 64 if kind == 3 else at] = value  # kind 3: the header
    return bytes(data)


@FAST
@given(damaged_images(), st.booleans())
def test_load_image_gives_an_rgb_image_or_image_error(data, with_spec):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "photo"
        path.write_bytes(data)
        try:
            image = load_image(path, InputSpec(8, 8) if with_spec else None)
        except ImageError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)
            return
        assert image.mode == "RGB" and image.width * image.height <= MAX_IMAGE_PIXELS
