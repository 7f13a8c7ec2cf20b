from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# In CI the property tests draw the same examples every run (a landing never fails on a
# new random draw); on a developer's machine they explore new ones each time.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parent.parent
MOBILENET_SHA = "7aad0c74c5e3c06e5eb3c827e13304fdd68a83da6087d92ee169c24ff9fd4776"
MOBILENET_URL = ("https://storage.googleapis.com/download.tensorflow.org/models/"
                 "tflite_11_05_08/mobilenet_v2_1.0_224_quant.tgz")
MOBILENET_MEMBER = "mobilenet_v2_1.0_224_quant.tflite"


def shared_dir() -> Path | None:
    p = Path(os.environ.get("SMARTBIN_SHARED", REPO.parent / "shared"))
    return p if p.is_dir() else None


def require_shared(sub: str) -> Path:
    """A path under ../shared; CI must have it, a laptop without it skips."""
    base = shared_dir()
    path = base / sub if base else None
    if path is None or not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"../shared/{sub} is missing in CI")
        pytest.skip(f"../shared/{sub} not available")
    return path


@pytest.fixture(scope="session")
def backend() -> str:
    """The runtime under test: LiteRT by default, tflite-runtime in its own venv leg."""
    return os.environ.get("SMARTBIN_TEST_BACKEND", "auto")


@pytest.fixture(scope="session")
def mobilenet_file() -> Path:
    return require_shared(f"models/mobilenet_v2_1.0_224_quant/{MOBILENET_MEMBER}")


@pytest.fixture(scope="session")
def trashnet_dir() -> Path:
    return require_shared("datasets/trashnet")


def trashnet_sample(root: Path, per_class: int) -> list[Path]:
    """The first photos of each class in name order: a fixed, class-balanced sample."""
    out = []
    for cls in sorted(d for d in root.iterdir() if d.is_dir()):
        out += sorted(cls.glob("*.jpg"))[:per_class]
    return out


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """No test touches the user's cache or the network by accident."""
    monkeypatch.setenv("SMARTBIN_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("SMARTBIN_OFFLINE", "1")
    monkeypatch.delenv("SMARTBIN_BACKBONE", raising=False)


@pytest.fixture
def broker(tmp_path):
    """A real mosquitto on a free port, for one test."""
    from tests.broker import Broker

    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def demo():
    """The shipped demo bundle's classifier (tests that only read it share one)."""
    from bin_controller.vision.classifier import Classifier

    return Classifier("demo")
