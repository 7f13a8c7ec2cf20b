"""Bundles made on the fly for tests."""

from __future__ import annotations

import json
from pathlib import Path

from bin_controller.vision.fetch import sha256_bytes
from tests.conftest import MOBILENET_MEMBER, MOBILENET_SHA, MOBILENET_URL


def imagenet_bundle(folder: Path, labels_file: Path, *, url: str = MOBILENET_URL,
                    output: str | None = None) -> Path:
    """The full ImageNet MobileNetV2 as a one-stage bundle named by URL + sha256."""
    names = labels_file.read_text().splitlines()
    stage = {"role": "classifier",
             "source": {"url": url, "sha256": MOBILENET_SHA, "member": MOBILENET_MEMBER}}
    if output:
        stage["output"] = output
    manifest = {
        "format": 1, "name": "imagenet", "version": "1",
        "labels": [{"name": f"{i}:{n}", "name_en": n, "bin": "other"}
                   for i, n in enumerate(names)],
        "input": {"size": [224, 224], "mean": 128.0, "std": 128.0},
        "stages": [stage],
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def local_bundle(folder: Path, stages: dict[str, bytes], labels: list[dict],
                 size: int, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, data in stages.items():
        (folder / name).write_bytes(data)
        entries.append({"role": name, "file": name, "sha256": sha256_bytes(data)})
    manifest = {"format": 1, "name": folder.name, "version": "1", "labels": labels,
                "input": {"size": [size, size]}, "stages": entries, **extra}
    (folder / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False))
    return folder
