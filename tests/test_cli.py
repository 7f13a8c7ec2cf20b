"""`smartbin classify` as a user runs it: a real process, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hardware_sim import items
from tests.conftest import REPO


def smartbin(*args: str, env: dict | None = None, python: str = sys.executable):
    return subprocess.run([python, "-m", "bin_controller", *args], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, **(env or {})}, timeout=300)


@pytest.fixture
def photos(tmp_path):
    rng = np.random.default_rng(99)
    paths = []
    for kind in (items.KINDS[0], items.KINDS[5]):
        p = tmp_path / f"{kind.name_en.replace(' ', '_')}.jpg"
        Image.fromarray(items.render(kind, rng)).save(p, quality=95)
        paths.append(p)
    return paths


def test_classify_json(photos):
    r = smartbin("classify", "--json", *map(str, photos))
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["image"] for rec in records] == [str(p) for p in photos]
    assert [rec["bin"] for rec in records] == ["kitchen", "hazardous"]
    for rec in records:
        assert set(rec) >= {"image", "label", "label_en", "bin", "confidence", "top",
                            "latency_ms", "backend"}
        assert rec["top"][0]["label"] == rec["label"] and rec["backend"] == "litert"
        assert 0 < rec["confidence"] <= 1 and rec["latency_ms"] > 0


def test_bad_image_is_reported_and_the_rest_continue(photos, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    r = smartbin("classify", "--json", str(corrupt), str(tmp_path / "missing.png"),
                 str(photos[0]))
    assert r.returncode == 1
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert "corrupt.jpg" in records[0]["error"] and "no such file" in records[1]["error"]
    assert records[2]["bin"] == "kitchen"
    assert "Traceback" not in r.stderr


def test_broken_bundle_is_one_line_no_traceback(tmp_path, photos):
    (tmp_path / "manifest.json").write_text("{nope")
    r = smartbin("classify", "--model", str(tmp_path), str(photos[0]))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if not line.startswith("INFO:")]
    assert len(lines) == 1 and "manifest.json: malformed JSON" in lines[0]


def test_unknown_backend_is_a_clear_error(photos):
    r = smartbin("classify", "--backend", "onnx", str(photos[0]))
    assert r.returncode == 2 and "unknown backend 'onnx'" in r.stderr


def test_human_output(photos):
    r = smartbin("classify", str(photos[1]))
    assert r.returncode == 0 and "battery -> hazardous" in r.stdout
