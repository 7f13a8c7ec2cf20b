"""PNG plots drawn with Pillow alone (no matplotlib on the bin)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed size
        return ImageFont.load_default()


def confusion_png(matrix: np.ndarray, names: list[str], path: Path, title: str) -> None:
    """Row-normalised heat map with counts; rows are the truth, columns the prediction."""
    n = len(names)
    cell = max(28, min(60, 600 // max(n, 1)))
    label_w = 8 + 7 * max(len(s) for s in names)
    top = 40 + label_w
    img = Image.new("RGB", (label_w + n * cell + 20, top + n * cell + 20), "white")
    d = ImageDraw.Draw(img)
    font = _font(11)
    d.text((10, 10), title, fill="black", font=_font(14))
    rows = matrix.sum(1, keepdims=True).clip(min=1)
    share = matrix / rows
    for i in range(n):
        d.text((6, top + i * cell + cell // 2 - 6), names[i], fill="black", font=font)
        for j in range(n):
            v = share[i, j]
            color = (int(255 - 200 * v), int(255 - 120 * v), 255)
            x0, y0 = label_w + j * cell, top + i * cell
            d.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=color, outline="#ccc")
            if matrix[i, j]:
                d.text((x0 + 4, y0 + cell // 2 - 6), str(int(matrix[i, j])),
                       fill="black" if v < 0.6 else "white", font=font)
    # Column names, written vertically above the grid.
    for j, name in enumerate(names):
        tile = Image.new("RGB", (label_w, 14), "white")
        ImageDraw.Draw(tile).text((0, 0), name, fill="black", font=font)
        tile = tile.rotate(90, expand=True)
        img.paste(tile, (label_w + j * cell + cell // 2 - 7, 36))
    img.save(path)


def curves_png(history: list[dict[str, float]], path: Path, title: str) -> None:
    """Training and validation accuracy and loss per epoch."""
    w, h, pad = 640, 360, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), title, fill="black", font=_font(14))
    epochs = [r["epoch"] for r in history]
    series = {k: [r.get(k) for r in history] for k in ("train_acc", "val_acc", "loss",
                                                       "val_loss")}
    colors = {"train_acc": "#1f77b4", "val_acc": "#ff7f0e", "loss": "#2ca02c",
              "val_loss": "#d62728"}
    top_loss = max([v for k in ("loss", "val_loss") for v in series[k] if v is not None] or [1])
    d.rectangle([pad, pad, w - pad, h - pad], outline="black")
    for k, values in series.items():
        pts = []
        for e, v in zip(epochs, values, strict=True):
            if v is None:
                continue
            scale = 1.0 if k.endswith("acc") else top_loss
            x = pad + (w - 2 * pad) * (e - 1) / max(len(epochs) - 1, 1)
            y = h - pad - (h - 2 * pad) * (v / scale)
            pts.append((x, y))
        if len(pts) > 1:
            d.line(pts, fill=colors[k], width=2)
        d.text((w - pad - 90, pad + 5 + 14 * list(series).index(k)), k, fill=colors[k],
               font=_font(11))
    d.text((pad, h - pad + 8), f"epoch 1..{len(epochs)}; accuracy 0..1, loss 0..{top_loss:.2f}",
           fill="black", font=_font(11))
    img.save(path)
