"""Issue 12, vision part: hostile and clumsy bundles, TFLite files and images.

Each case was once a traceback, a file written outside the cache, a silently wrong
answer or a 1.38 GB decode; now each is one typed error naming the file.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bin_controller.errors import BundleError, ImageError
from bin_controller.vision import tflite_format as tfl
from bin_controller.vision.backends import make_interpreter
from bin_controller.vision.bundle import (
    MAX_MANIFEST_BYTES,
    SHIPPED_MODELS,
    InputSpec,
    load_bundle,
    parse_manifest,
)
from bin_controller.vision.classifier import Classifier
from bin_controller.vision.fetch import sha256_bytes
from bin_controller.vision.preprocess import MAX_IMAGE_PIXELS, load_image, prepare_image
from tests.conftest import MOBILENET_SHA
from tests.helpers import local_bundle
from tests.test_cli import smartbin


@pytest.fixture
def demo(tmp_path) -> Path:
    dst = tmp_path / "demo"
    shutil.copytree(SHIPPED_MODELS / "demo", dst)
    return dst


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


def _write(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


def _source_stage(member: str = "mobilenet_v2_1.0_224_quant.tflite",
                  url: str = "https://example.invalid/m.tgz") -> dict:
    return {"role": "backbone", "source": {"url": url, "sha256": MOBILENET_SHA,
                                           "member": member}}


# --------------------------------------------------------------------------- bundles


@pytest.mark.parametrize("member", ["../../x", "/abs/path", "a/b.tflite", "..", ".", "",
                                    "x\0.tflite", "m" * 300, "..\\..\\x"])
def test_member_must_be_a_plain_name(demo, member):
    m = _manifest(demo)
    m["stages"][0] = _source_stage(member)
    with pytest.raises(BundleError, match=r"manifest\.json: field 'stages\[0\]\.source\.member'"):
        parse_manifest(m, demo)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "http://example.com/m.tgz",
                                 "ftp://example.com/m.tgz", "/srv/m.tgz", "https://",
                                 "https://exa mple.com/m.tgz", "gopher://x/y"])
def test_only_https_urls(demo, url):
    m = _manifest(demo)
    m["stages"][0] = _source_stage(url=url)
    with pytest.raises(BundleError, match=r"field 'stages\[0\]\.source\.url' must (be|name)"):
        parse_manifest(m, demo)


def test_http_only_behind_the_explicit_option(demo, monkeypatch):
    m = _manifest(demo)
    m["stages"][0] = _source_stage(url="http://127.0.0.1:8000/m.tgz")
    monkeypatch.setenv("SMARTBIN_ALLOW_HTTP", "1")
    assert parse_manifest(m, demo).stages[0].source is not None
    m["stages"][0] = _source_stage(url="file:///etc/passwd")
    with pytest.raises(BundleError, match="must be an https:// URL, not file://"):
        parse_manifest(m, demo)


def test_a_valid_source_stage_still_loads(demo):
    m = _manifest(demo)
    m["stages"][0] = _source_stage()
    stage = parse_manifest(m, demo).stages[0]
    assert stage.source is not None and stage.source.member.endswith(".tflite")


def test_sha256_must_be_hex(demo):
    m = _manifest(demo)
    m["stages"][0]["sha256"] = "../" * 21 + "a"
    with pytest.raises(BundleError, match=r"stages\[0\]\.sha256' must be 64 hex digits"):
        parse_manifest(m, demo)


def test_stage_file_symlink_out_of_the_bundle_is_refused(demo, tmp_path):
    outside = tmp_path / "elsewhere.tflite"
    shutil.move(demo / "head.tflite", outside)
    (demo / "head.tflite").symlink_to(outside)
    with pytest.raises(BundleError, match=r"head\.tflite: is a symlink to .*elsewhere\.tflite, "
                                          r"outside the bundle folder"):
        Classifier(demo)


def test_stage_file_symlink_inside_the_bundle_is_fine(demo):
    shutil.move(demo / "head.tflite", demo / "real-head.tflite")
    (demo / "head.tflite").symlink_to("real-head.tflite")
    assert len(Classifier(demo).stages) == 2


def test_manifest_symlink_out_of_the_bundle_is_refused(demo, tmp_path):
    outside = tmp_path / "other.json"
    shutil.move(demo / "manifest.json", outside)
    (demo / "manifest.json").symlink_to(outside)
    with pytest.raises(BundleError, match=r"manifest\.json: is a symlink to .*other\.json"):
        load_bundle(demo)


@pytest.mark.parametrize("field, literal", [("mean", "NaN"), ("std", "NaN"),
                                            ("std", "Infinity"), ("mean", "-Infinity"),
                                            ("std", "1e999")])
def test_non_finite_normalization_is_rejected(demo, field, literal):
    text = (demo / "manifest.json").read_text(encoding="utf-8")
    text = text.replace(f'"{field}": {"0.0" if field == "mean" else "1.0"}',
                        f'"{field}": {literal}')
    assert literal in text
    (demo / "manifest.json").write_text(text, encoding="utf-8")
    with pytest.raises(BundleError, match=rf"field 'input\.{field}' is -?(nan|inf); numbers "
                                          "must be finite"):
        load_bundle(demo)


def test_non_finite_anywhere_is_rejected(demo):
    m = _manifest(demo)
    m["provenance"]["metrics"]["val_top1"] = float("nan")
    with pytest.raises(BundleError, match=r"'provenance\.metrics\.val_top1' is nan"):
        parse_manifest(m, demo)


def test_deep_nesting_is_one_line_naming_the_file(demo):
    text = (demo / "manifest.json").read_text(encoding="utf-8")
    deep = "[" * 100_000 + "]" * 100_000
    (demo / "manifest.json").write_text(text.replace('"provenance": {', f'"x": {deep}, '
                                                     '"provenance": {'), encoding="utf-8")
    with pytest.raises(BundleError, match=rf"{demo}/manifest\.json: nested too deeply"):
        load_bundle(demo)


def test_moderate_nesting_over_the_limit(demo):
    m = _manifest(demo)
    nest: list = []
    for _ in range(50):
        nest = [nest]
    m["provenance"]["deep"] = nest
    with pytest.raises(BundleError, match="nested more than 32 levels"):
        parse_manifest(m, demo)


def test_huge_integer_is_one_line_naming_the_file(demo):
    text = (demo / "manifest.json").read_text(encoding="utf-8")
    (demo / "manifest.json").write_text(text.replace('"format": 1', '"format": 1' + "0" * 5000),
                                        encoding="utf-8")
    with pytest.raises(BundleError, match=rf"{demo}/manifest\.json: an integer of 5001 digits"):
        load_bundle(demo)


def test_huge_integer_given_as_data(demo):
    m = _manifest(demo)
    m["format"] = 10**5000
    with pytest.raises(BundleError, match="'format' is an integer of more than 18 digits"):
        parse_manifest(m, demo)


def test_manifest_over_the_size_limit(demo):
    m = _manifest(demo)
    m["description"] = "x" * MAX_MANIFEST_BYTES
    _write(demo, m)
    with pytest.raises(BundleError, match=r"manifest\.json: larger than 1 MB"):
        load_bundle(demo)


@pytest.mark.parametrize("change, message", [
    (lambda m: m["input"].update(size=[True, True]), r"input\.size"),
    (lambda m: m["input"].update(size=[64, 10**6]), r"input\.size.*1 to 4096"),
    (lambda m: m["input"].update(std=True), r"'input\.std' must be int or float"),
    (lambda m: m["stages"][0].update(file=""), r"stages\[0\]\.file"),
    (lambda m: m["stages"][0].update(file="a\0b"), r"stages\[0\]\.file.*NUL"),
    (lambda m: m["stages"][0].update(file="f" * 300), r"stages\[0\]\.file.*255 bytes"),
])
def test_more_malformed_fields(demo, change, message):
    m = _manifest(demo)
    change(m)
    with pytest.raises(BundleError, match=message):
        parse_manifest(m, demo)


@pytest.mark.parametrize("name", ["n" * 300, "model/" + "n" * 300, "demo\0", "a\0/b"])
def test_bundle_name_the_file_system_cannot_take(name):
    with pytest.raises(BundleError, match="bundle name or path"):
        load_bundle(name)
    with pytest.raises(BundleError, match="bundle name or path"):
        Classifier(name)


def test_bundle_path_longer_than_the_path_limit():
    with pytest.raises(BundleError, match=r"^'(a/){30}…': cannot look for a bundle there: "
                                          "File name too long$"):
        load_bundle("a/" * 3000)


def test_unknown_home_folder():
    with pytest.raises(BundleError, match="cannot look for a bundle there"):
        load_bundle("~no-such-user-hopefully/demo")


# --------------------------------------------------------------------------- TFLite


def _rename_first_tensor(model: bytes, new_first_byte: int) -> bytes:
    name = tfl.tensor_names(model)[0].encode()
    at = model.find(name)
    data = bytearray(model)
    data[at] = new_first_byte
    return bytes(data)


def _replace_stage(folder: Path, file: str, data: bytes) -> None:
    (folder / file).write_bytes(data)
    m = _manifest(folder)
    for stage in m["stages"]:
        if stage.get("file") == file:
            stage["sha256"] = sha256_bytes(data)
    _write(folder, m)


def test_non_utf8_tensor_name():
    head = (SHIPPED_MODELS / "demo" / "head.tflite").read_bytes()
    with pytest.raises(tfl.TFLiteFormatError, match="not UTF-8"):
        tfl.tensor_names(_rename_first_tensor(head, 0xFF))
    with pytest.raises(tfl.TFLiteFormatError, match="not UTF-8"):
        tfl.validate(_rename_first_tensor(head, 0xFF))


def test_non_utf8_tensor_name_in_a_bundle_names_the_file(demo):
    # The runtime itself loads this model and only fails in get_input_details.
    head = (demo / "head.tflite").read_bytes()
    _replace_stage(demo, "head.tflite", _rename_first_tensor(head, 0xFF))
    with pytest.raises(BundleError, match=r"head\.tflite: .*not UTF-8"):
        Classifier(demo)


def test_truncated_model_in_a_bundle_names_the_file(demo):
    head = (demo / "head.tflite").read_bytes()
    _replace_stage(demo, "head.tflite", head[: len(head) // 2])
    with pytest.raises(BundleError, match=r"head\.tflite: "):
        Classifier(demo)


def test_every_truncation_is_a_format_error():
    model = (SHIPPED_MODELS / "demo" / "backbone.tflite").read_bytes()
    for n in range(len(model)):
        try:
            tfl.tensor_names(model[:n])
        except tfl.TFLiteFormatError:
            continue


@pytest.mark.parametrize("patch", [
    lambda d: struct.pack_into("<I", d, 0, len(d) + 100),       # root table past the end
    lambda d: struct.pack_into("<I", d, 0, 0xFFFFFFF0),         # root far past the end
    lambda d: struct.pack_into("<i", d, struct.unpack_from("<I", d, 0)[0], len(d) * 2),
    lambda d: struct.pack_into("<i", d, struct.unpack_from("<I", d, 0)[0], -(len(d) * 2)),
])
def test_offsets_out_of_range(patch):
    data = bytearray((SHIPPED_MODELS / "demo" / "head.tflite").read_bytes())
    patch(data)
    with pytest.raises(tfl.TFLiteFormatError, match=r"outside the file|broken vtable"):
        tfl.tensor_names(bytes(data))
    with pytest.raises(tfl.TFLiteFormatError):
        tfl.truncate_at_tensor(bytes(data), "dense0/out")


def _mismatched_fc() -> bytes:
    """A well-formed flatbuffer the runtime cannot prepare: weights for 5 inputs, 4 given."""
    g = tfl.Graph()
    x = g.add(tfl.Tensor("x", [1, 4], tfl.INT8, 1.0, -128))
    w = g.add(tfl.Tensor("w", [3, 5], tfl.INT8, 1 / 64, 0, np.zeros((3, 5), np.int8)))
    b = g.add(tfl.Tensor("b", [3], tfl.INT32, 1 / 64, 0, np.zeros(3, np.int32)))
    y = g.add(tfl.Tensor("y", [1, 3], tfl.INT8, 2.0, 10))
    g.ops = [tfl.Op(tfl.FULLY_CONNECTED, [x, w, b], [y])]
    g.inputs, g.outputs = [x], [y]
    return tfl.write_model(g)


def test_interpreter_that_cannot_allocate_is_a_bundle_error(backend):
    model = _mismatched_fc()
    tfl.validate(model)  # nothing wrong for the format reader
    with pytest.raises(BundleError, match=r"fc\.tflite: .* cannot load the model"):
        make_interpreter(backend, model, where="fc.tflite")


def test_bundle_whose_model_cannot_allocate_names_the_file(tmp_path, backend):
    labels = [{"name": f"c{i}", "bin": "other"} for i in range(3)]
    folder = local_bundle(tmp_path / "fc", {"fc.tflite": _mismatched_fc()}, labels, 1)
    with pytest.raises(BundleError, match=r"fc\.tflite: .* cannot load the model"):
        Classifier(folder, backend=backend)


# --------------------------------------------------------------------------- images


def _png_of_size(path: Path, width: int, height: int) -> Path:
    """A 1-bit PNG written row by row: a few KB on disk whatever its pixel count."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))
    row = b"\0" * (1 + (width + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    huge = _png_of_size(tmp_path / "huge.png", 13_000, 13_000)
    assert huge.stat().st_size < 500_000
    with pytest.raises(ImageError, match=r"huge\.png: 13000 x 13000 = 169,000,000 pixels, "
                                         r"more than the 50,000,000"):
        load_image(huge)


def test_just_under_the_limit_decodes(tmp_path):
    ok = _png_of_size(tmp_path / "ok.png", 1000, 1000)
    assert load_image(ok).size == (1000, 1000)
    assert MAX_IMAGE_PIXELS == 50_000_000


def test_pillow_decompression_bomb_error_is_an_image_error(tmp_path):
    # Over twice Pillow's own limit, so Pillow refuses it already in Image.open.
    bomb = _png_of_size(tmp_path / "bomb.png", 20_000, 20_000)
    with pytest.raises(ImageError, match=r"bomb\.png: "):
        load_image(bomb)


def test_pillow_bomb_warning_never_escapes(tmp_path):
    big = _png_of_size(tmp_path / "big.png", 10_000, 10_000)  # over Pillow's warning line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError, match="100,000,000 pixels"):
            load_image(big)


def test_a_large_jpeg_is_decoded_reduced_when_the_model_needs_less(tmp_path):
    path = tmp_path / "wide.jpg"
    Image.new("L", (8000, 7000), 128).save(path, quality=50)  # 56 MP
    spec = InputSpec(64, 64)
    image = load_image(path, spec)
    assert image.mode == "RGB" and image.width * image.height <= MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match="56,000,000 pixels"):
        load_image(path)  # no model size: nothing to reduce to


def test_exif_orientation_kept_for_a_grey_jpeg(tmp_path):
    img = Image.new("L", (40, 20), 0)
    img.paste(255, (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise when displayed
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    upright = np.asarray(load_image(path))
    assert upright.shape == (40, 20, 3)
    assert upright[-10:].mean() > 200 and upright[:10].mean() < 60  # white half at the bottom


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 256 * 16).astype(np.uint16).reshape(16, 256)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    rgb = np.asarray(load_image(path)).astype(int)
    assert rgb.shape == (16, 256, 3)
    expected = np.round(ramp.astype(float) * 255 / 65535)
    assert np.abs(rgb[..., 0] - expected).max() <= 1
    assert (rgb[..., 0] == rgb[..., 2]).all() and 120 < rgb.mean() < 135  # not all white


def _save(image: Image.Image, path: Path, **kw) -> Path:
    image.save(path, **kw)
    return path


def test_32_bit_int_and_float_images(tmp_path):
    ints = np.full((8, 8), 32768, np.int32)
    i_img = load_image(_save(Image.fromarray(ints), tmp_path / "i.tiff"))
    assert np.asarray(i_img)[0, 0].tolist() == [128, 128, 128]
    floats = np.full((8, 8), 0.5, np.float32)
    floats[0, 0] = np.nan
    f_img = np.asarray(load_image(_save(Image.fromarray(floats), tmp_path / "f.tiff")))
    assert f_img[1, 1].tolist() == [128, 128, 128] and f_img[0, 0].tolist() == [0, 0, 0]


def test_transparency_is_flattened_onto_white(tmp_path):
    la = Image.new("LA", (4, 4), (0, 0))  # black, fully transparent
    assert np.asarray(load_image(_save(la, tmp_path / "la.png"))).min() == 255
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    p_path = _save(p, tmp_path / "p.png", transparency=0)
    pixels = np.asarray(load_image(p_path))
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[1, 1].tolist() == [255, 0, 0]


def test_cmyk_and_one_bit(tmp_path):
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # red
    red = np.asarray(load_image(_save(cmyk, tmp_path / "c.jpg", quality=100)))[0, 0]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    one = Image.new("1", (4, 4), 1)
    assert np.asarray(load_image(_save(one, tmp_path / "one.png"))).min() == 255


def test_every_mode_comes_out_rgb(tmp_path):
    for mode in ("1", "L", "LA", "P", "RGBA", "CMYK", "YCbCr", "I", "F", "I;16"):
        im = Image.new(mode, (3, 2))
        buf = io.BytesIO()
        fmt = "TIFF" if mode in ("I", "F", "CMYK", "YCbCr") else "PNG"
        im.save(buf, fmt)
        path = tmp_path / f"m{mode.replace(';', '_')}.{fmt.lower()}"
        path.write_bytes(buf.getvalue())
        out = load_image(path)
        assert out.mode == "RGB" and out.size == (3, 2), mode
    for mode in ("PA", "La", "RGBa", "LAB", "HSV", "I;16B"):  # no file format writes these
        assert prepare_image(Image.new(mode, (3, 2)), InputSpec(3, 2)).shape == (2, 3, 3), mode


def test_nul_in_a_path(tmp_path):
    with pytest.raises(ImageError, match="NUL"):
        load_image(str(tmp_path / "a\0b.png"))


def test_a_folder_or_fifo_is_not_an_image(tmp_path):
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(fifo)  # would block forever if opened


def test_classify_goes_on_after_bad_images(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(good)
    huge = _png_of_size(tmp_path / "huge.png", 13_000, 13_000)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:60])
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(deep)
    r = smartbin("classify", "--json", str(huge), str(cut), str(tmp_path), str(good),
                 str(deep))
    assert r.returncode == 1, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["image"] for rec in records] == [str(huge), str(cut), str(tmp_path),
                                                 str(good), str(deep)]
    assert "169,000,000 pixels" in records[0]["error"]
    assert "cut.png: not a readable image" in records[1]["error"]
    assert "not a regular file" in records[2]["error"]
    assert "bin" in records[3] and "bin" in records[4]
    assert "Traceback" not in r.stderr
