"""The report plots, drawn with matplotlib (the optional `plots` extra).

matplotlib is imported inside the functions, never at module level, so the bin's service
and `smartbin classify` never need it. Figures are drawn on the Agg canvas directly (no
pyplot, so no display and no global figure state). Each `*_figure` builds a figure that
tests can inspect; each `*_png` saves one, with its title also in the PNG's metadata.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bin_controller.errors import SmartbinError

MISSING = "the report plots need matplotlib: pip install 'smartbin[plots]'"
# Fonts with CJK glyphs, tried after DejaVu Sans so that Chinese label names show when one
# is installed (Debian: fonts-noto-cjk or fonts-wqy-zenhei).
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "WenQuanYi Zen Hei", "Source Han Sans SC",
             "Microsoft YaHei", "SimHei")
# Counts are written in the cells only while they stay legible.
ANNOTATE_MAX_CLASSES = 30
DPI = 100


def _matplotlib() -> tuple[Any, Any]:
    """(Figure, FigureCanvasAgg), or the one-line error naming the extra."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise SmartbinError(MISSING) from exc
    return Figure, FigureCanvasAgg


def require() -> None:
    """Fail before minutes of training or evaluation rather than at the first plot."""
    _matplotlib()


def _new_figure(width: float, height: float, **kwargs: Any) -> Any:
    figure_cls, canvas_cls = _matplotlib()
    fig = figure_cls(figsize=(width, height), layout="constrained", **kwargs)
    canvas_cls(fig)
    return fig


def _fonts() -> list[str]:
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    return ["DejaVu Sans", *(f for f in CJK_FONTS if f in installed)]


def _styled(build: Callable[..., Any]) -> Callable[..., Any]:
    """Run a figure builder with the fonts set: text takes its font when it is created."""
    @functools.wraps(build)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _matplotlib()
        from matplotlib import rc_context

        with rc_context({"font.family": _fonts()}):
            return build(*args, **kwargs)
    return wrapper


def save(fig: Any, path: Path) -> None:
    """Write the figure as PNG; its title goes into the PNG's Title text chunk."""
    title = next((t.get_text() for t in fig.texts if t.get_text()), "")
    with warnings.catch_warnings():
        # Without a CJK font, Chinese names draw as boxes; say it once, not per glyph.
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font")
        fig.savefig(path, format="png", dpi=DPI, metadata={"Title": title})


def _percent_axis(ax: Any, axis: str = "y") -> None:
    from matplotlib.ticker import MultipleLocator

    getattr(ax, f"set_{axis}lim")(0, 100)
    getattr(ax, f"{axis}axis").set_major_locator(MultipleLocator(10))
    ax.grid(True, alpha=0.3)


# --- training curves ----------------------------------------------------------------------


@_styled
def curves_figure(history: list[dict[str, float]], title: str) -> Any:
    """Accuracy and loss per epoch, on two axes side by side (their units differ)."""
    from matplotlib.ticker import MaxNLocator

    fig = _new_figure(10, 4)
    ax_acc, ax_loss = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in history]

    def series(key: str, scale: float = 1.0) -> list[float]:
        return [r[key] * scale if r.get(key) is not None else math.nan for r in history]

    ax_acc.plot(epochs, series("train_acc", 100), marker=".", label="train split")
    if any("val_acc" in r for r in history):
        ax_acc.plot(epochs, series("val_acc", 100), marker=".", label="validation split")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    # The train loss is the running mean over the epoch's batches, with dropout on.
    ax_loss.plot(epochs, series("loss"), marker=".", label="train split (with dropout)")
    if any("val_loss" in r for r in history):
        ax_loss.plot(epochs, series("val_loss"), marker=".", label="validation split")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy (nats per photo)", title="loss")
    ax_loss.set_ylim(bottom=0)
    top = max([v for k in ("train_acc", "val_acc") for v in series(k, 100)
               if not math.isnan(v)] or [100])
    ax_acc.set_ylim(0, max(100, top))
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return fig


def curves_png(history: list[dict[str, float]], path: Path, title: str) -> None:
    save(curves_figure(history, title), path)


# --- confusion matrix ---------------------------------------------------------------------


@_styled
def confusion_figure(matrix: np.ndarray, names: list[str], title: str) -> Any:
    """Rows are the truth, columns the prediction; colour is the share of the row."""
    m = np.asarray(matrix)
    n = len(names)
    side = float(np.clip(0.3 * n + 3.0, 5.0, 40.0))
    fig = _new_figure(side + 1.2, side)
    ax = fig.subplots()
    share = 100.0 * m / m.sum(1, keepdims=True).clip(min=1)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(n), names, rotation=90)
    ax.set_yticks(range(n), names)
    ax.set(xlabel="predicted", ylabel="true")
    fig.colorbar(image, ax=ax, label="share of the true class (%)", shrink=0.8)
    if n <= ANNOTATE_MAX_CLASSES:
        for i, j in zip(*np.nonzero(m), strict=True):
            ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 60 else "black")
    fig.suptitle(title)
    return fig


def confusion_png(matrix: np.ndarray, names: list[str], path: Path, title: str) -> None:
    save(confusion_figure(matrix, names, title), path)


# --- calibration --------------------------------------------------------------------------


@_styled
def reliability_figure(series: dict[str, tuple[list[dict[str, Any]], float]],
                       title: str) -> Any:
    """Reliability diagram: mean confidence against accuracy per confidence bin, one line
    per series (name -> (reliability rows, ECE)), and the photos per bin below."""
    fig = _new_figure(6.5, 7)
    ax, ax_n = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot([0, 100], [0, 100], color="grey", linestyle="--", label="perfectly calibrated")
    width = 100.0 / 15 / (len(series) + 1)
    for k, (name, (rows, ece)) in enumerate(series.items()):
        conf = [100 * r["confidence"] for r in rows]
        line = ax.plot(conf, [100 * r["accuracy"] for r in rows], marker="o",
                       label=f"{name} (ECE {100 * ece:.1f} points)")[0]
        ax_n.bar([100 * (r["lo"] + r["hi"]) / 2 + (k - (len(series) - 1) / 2) * width
                  for r in rows], [r["n"] for r in rows], width=width,
                 color=line.get_color(), label=name)
    ax.set(ylabel="accuracy in the bin (%)", title="confidence against accuracy")
    ax_n.set(xlabel="confidence (%)", ylabel="photos")
    _percent_axis(ax)
    _percent_axis(ax, "x")
    ax_n.grid(True, alpha=0.3)
    ax.legend(loc="best")  # out of the way of the points
    fig.suptitle(title)
    return fig


def reliability_png(series: dict[str, tuple[list[dict[str, Any]], float]], path: Path,
                    title: str) -> None:
    save(reliability_figure(series, title), path)


@_styled
def coverage_figure(curve: list[dict[str, Any]], title: str, *, target: float,
                    chosen: float | None, current: float | None = None) -> Any:
    """Per threshold on the bin probability: the items sent to the fallback bin and the
    bin accuracy of the items sorted."""
    fig = _new_figure(7.5, 4.8)
    ax = fig.subplots()
    t = [r["threshold"] for r in curve]
    acc = [100 * r["accuracy"] if r["accuracy"] is not None else math.nan for r in curve]
    ax.plot(t, acc, label="bin accuracy of the items sorted")
    ax.plot(t, [100 * r["fallback_fraction"] for r in curve],
            label="items sent to the fallback bin")
    ax.axhline(100 * target, color="grey", linestyle="--",
               label=f"target accuracy {100 * target:g} %")
    if chosen is not None:
        ax.axvline(chosen, color="black", linestyle=":", label=f"threshold {chosen:g}")
    if current is not None:
        ax.axvline(current, color="tab:red", linestyle=":", alpha=0.6,
                   label=f"configured threshold {current:g}")
    ax.set(xlabel="model.confidence_threshold (bin probability)", ylabel="% of the items",
           xlim=(0, 1))
    _percent_axis(ax)
    ax.legend(loc="lower left")
    fig.suptitle(title)
    return fig


def coverage_png(curve: list[dict[str, Any]], path: Path, title: str, *, target: float,
                 chosen: float | None, current: float | None = None) -> None:
    save(coverage_figure(curve, title, target=target, chosen=chosen, current=current), path)


# --- the few-shot curve -------------------------------------------------------------------


@_styled
def few_shot_figure(result: dict[str, Any], title: str) -> Any:
    """Top-1 and bin accuracy on held-out photos against photos per class, one line per
    method (`training.teach_bench` result: curve, shots, methods), the spread over draws
    as error bars on top-1."""
    fig = _new_figure(11, 4.6)
    ax_top, ax_bin = fig.subplots(1, 2)
    shots = list(result["shots"])
    names = result.get("methods", {})
    for method, per in result["curve"].items():
        label = names.get(method, method)
        # Shots are int keys in memory and strings once read back from the JSON.
        rows = [per[s] if s in per else per[str(s)] for s in shots]
        line = ax_top.errorbar(shots, [100 * r["top1"] for r in rows],
                               yerr=[100 * r["top1_sd"] for r in rows], marker="o", capsize=3,
                               label=label)
        ax_bin.plot(shots, [100 * r["bin_accuracy"] for r in rows], marker="o", label=label,
                    color=line[0].get_color())
    if "majority_bin_accuracy" in result:
        ax_bin.axhline(100 * result["majority_bin_accuracy"], color="grey", linestyle="--",
                       label="always the commonest bin")
    ax_top.set(xlabel="photos per class taught", ylabel="top-1 accuracy (%)",
               title="label (top-1), ± 1 s.d. over draws")
    ax_bin.set(xlabel="photos per class taught", ylabel="bin accuracy (%)",
               title="bin (the compartment chosen)")
    for ax in (ax_top, ax_bin):
        ax.set_xticks(shots)
        _percent_axis(ax)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    return fig


def few_shot_png(result: dict[str, Any], path: Path, title: str) -> None:
    save(few_shot_figure(result, title), path)
