"""Teaching the bin from a few photos: imprinting, then a regularised fit, in numpy only.

The teach runs on the bin, so nothing here needs TensorFlow or scikit-learn. Every head it
returns is a list of `training.head.Dense` layers on the backbone's raw pooled features,
so `forward`/`softmax` run it and `export_head` writes it as int8 TFLite unchanged.

The method (`fit_few_shot`):

1. Embedding: features centred on the mean of the taught photos (all their views) and
   divided by their median norm, a constant, so that the deployed head is exactly the
   head that was fitted (a per-photo normalisation would not fold into a dense layer).
2. Imprinting: each taught class starts as the L2-normalised mean of its photos'
   L2-normalised embeddings (Qi et al., "Low-shot learning with imprinted weights").
3. Fit: softmax cross-entropy over every view of every photo, on `scale * z @ W.T`, with
   the weights pulled towards their imprint (`pull / 2 * |W - W_imprint|^2`, the L2-SP
   regulariser). The problem is convex, so L-BFGS solves it to the optimum in a fraction
   of a second: no epochs or learning rate to tune. A strong pull is imprinting again,
   a weak one is logistic regression started from it.
4. Settings: the pull (and the scale, when a grid of scales is given) by stratified
   k-fold cross-validation over photos (all views of a photo in one fold, held-out photos
   scored on the view the bin sees); with one photo per class there is nothing to hold out
   and the defaults are used.
5. Calibration: a temperature fitted on the cross-validated logits, folded into the head.
6. With a base head: its labels come first and its logits stay as they are (one or two
   dense layers; the new labels' weights are fitted against them and merged into one head).

On TrashNet this beats both baselines by 1.9 and 2.4 points of top-1 at 5 and 10 photos
per class with the views a teach takes of so few photos (eight; training.teach.teach_views),
0.3-1 point with two: see `teach_bench`.

Tried and not adopted (TrashNet, 20 draws of 5 / 10 photos per class, top-1, the same
draws for all; this method scored 59.8 / 67.6, nearest class mean 58.8 / 65.1, logistic
regression 58.9 / 67.3): every linear head on these features lands within a point of the
others. sqrt power transform and L2 norm before this fit 60.3 / 68.0 (it would need a
run-time transform, and could not share a dense head with a base; with all 14 views
61.0 / 68.9); the same before NCM 58.6-58.9 / 64.2-64.7 and before logistic regression,
C 0.01-10, 59.4-59.9 / 67.2-67.6; shrinkage LDA 59.1-59.9 / 66.5-67.5; imprint and fit
logits averaged 59.8-59.9 / 67.0-67.6; Gaussian feature noise 57.8-58.5 / 66.3-66.8 and
within-class mixup 59.0 / 67.1; more views: all 14 60.7 / 68.6 (seven times the backbone
time), four corner crops 59.9 / 67.7, windows of the 7 x 7 feature map 58.9-59.1 /
67.0-67.3, one sample per map cell no better than logistic regression; other pooled
features (max, GeM, the 320-channel projection, earlier blocks, ImageNet logits or
probabilities) 45.5-60.3 / 50.9-67.8; flip at test time +0.3 for every method.
Distribution calibration (Yang et al. 2021) needs base-class statistics, which a teach
without a base dataset does not have.

Tried later, with the eight views (20 draws, 5 / 10 photos, against the same draws' best
baseline): a pull from 0.003 to 0.3 fixed, or scales 5 and 20, all within 0.2 point of the
cross-validated choice; which eight views: turned copies pay (the current set, and turned
plus re-lit ones, 62.6 / 68.3), shifted crops and re-lit ones alone do not (61.4 / 66.9);
the other four turns and flips of the centre crop +0.2 / 0.0, small rotations (20 degrees)
-0.4; self-training on 1,250 unlabelled photos (the most confident 4 x shots per class,
pseudo-labels 84 % right) lost 0.8-1.1; centring on the mean of 50-300 unlabelled photos
of the site instead of the taught ones -0.3; pooled features of earlier blocks added to
these (projections of blocks 12-16, each scaled to the same norm) +0.2-0.8 for every
method, the gap unchanged; foreground-weighted pooling of the 7 x 7 map (weights by
distance from the border cells' or the dataset's background feature, or by norm) -0.5 to
-3.5 for every method.

`nearest_class_mean` and `logistic_regression` are the baselines of the few-shot bench.
"""

from __future__ import annotations

import ctypes
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.head import Dense, forward, softmax

# Candidate settings tried by cross-validation: the pull (weight decay towards the
# imprinted weights) from strong to weak. On 20 TrashNet draws of 2, 5 and 10 photos per
# class, stronger pulls (0.1, 1, or imprinting alone) lost 0.2-1 point when CV chose them,
# and weaker ones than 0.001 changed nothing.
PULLS: tuple[float | None, ...] = (0.03, 0.01, 0.003, 0.001)
# The scale of the cosine-style logits (their inverse temperature while fitting). It is
# nearly redundant with the pull (fitting V = scale * W is the same problem with the prior
# scaled and the pull divided by scale^2), CV over 5, 10 and 20 changed nothing on
# TrashNet and tripled the time, and calibration fits its own temperature afterwards.
SCALES: tuple[float, ...] = (10.0,)
# Used when there is nothing to cross-validate (one photo per class): the middle of the
# grid; on TrashNet's 1-photo draws every candidate scored within 0.5 point of the others.
DEFAULT_SCALE = 10.0
DEFAULT_PULL = 0.01
# k of the k-fold cross-validation; fewer when the largest class has fewer photos.
CV_FOLDS = 5
# L-BFGS iterations per fit: the convex problems converge well within this; it only
# bounds the time of a badly conditioned one.
MAX_ITER = 100
# Scale of the cosine logits that turns nearest-class-mean scores into probabilities
# (needed for the bin decision, which sums probabilities): the teach's own scale.
NCM_SCALE = 10.0
# The default inverse regularisation strength of the logistic-regression baseline, on
# standardised features, as scikit-learn's LogisticRegression(C=1.0) defines it.
LOGREG_C = 1.0


# --- numerics ------------------------------------------------------------------------


def lbfgs(fun: Callable[[np.ndarray], tuple[float, np.ndarray]], x0: np.ndarray, *,
          max_iter: int = MAX_ITER, memory: int = 10, tol: float = 1e-6) -> np.ndarray:
    """Minimise a smooth function given as value and gradient (two-loop L-BFGS with
    backtracking). Returns the best point found, of x0's shape."""
    x = np.asarray(x0, np.float64).ravel().copy()
    f, g = fun(x)
    s_hist: list[np.ndarray] = []
    y_hist: list[np.ndarray] = []
    for _ in range(max_iter):
        if np.linalg.norm(g) <= tol * max(1.0, float(np.linalg.norm(x))):
            break
        direction = _two_loop(g, s_hist, y_hist)
        slope = float(g @ direction)
        if slope >= 0:  # not a descent direction: the curvature memory misleads, reset it
            direction, slope = -g, -float(g @ g)
            s_hist.clear()
            y_hist.clear()
        # Without curvature information the first step is scaled so it cannot overshoot
        # wildly; afterwards the two-loop direction is already scaled.
        step = 1.0 if s_hist else min(1.0, 1.0 / max(float(np.abs(g).sum()), 1e-12))
        for _ in range(30):
            x_new = x + step * direction
            f_new, g_new = fun(x_new)
            if f_new <= f + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            break
        s_vec, y_vec = x_new - x, g_new - g
        if s_vec @ y_vec > 1e-12:
            s_hist.append(s_vec)
            y_hist.append(y_vec)
            if len(s_hist) > memory:
                s_hist.pop(0)
                y_hist.pop(0)
        done = abs(f - f_new) <= 1e-10 * max(1.0, abs(f))
        x, f, g = x_new, f_new, g_new
        if done:
            break
    return x.reshape(np.shape(x0))


def _two_loop(g: np.ndarray, s_hist: list[np.ndarray], y_hist: list[np.ndarray]) -> np.ndarray:
    q = g.copy()
    alphas = []
    for s, y in zip(reversed(s_hist), reversed(y_hist), strict=True):
        a = (s @ q) / (y @ s)
        alphas.append(a)
        q -= a * y
    if s_hist:
        q *= (s_hist[-1] @ y_hist[-1]) / (y_hist[-1] @ y_hist[-1])
    for s, y, a in zip(s_hist, y_hist, reversed(alphas), strict=True):
        q += (a - (y @ q) / (y @ s)) * s
    return -q


# (set, get) thread-count functions of OpenBLAS builds: numpy's own wheels (scipy-openblas,
# 64-bit integers) and a system OpenBLAS.
_BLAS_THREAD_SYMBOLS = (
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
)


def _openblas_threads() -> tuple[Any, Any] | None:
    """numpy's OpenBLAS thread setter and getter, found among the loaded libraries;
    None where that cannot be done (not Linux, another BLAS)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for path in sorted({line.split()[-1] for line in maps.splitlines()
                        if "openblas" in line.lower() and line.split()[-1].startswith("/")}):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in _BLAS_THREAD_SYMBOLS:
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                return getattr(lib, set_name), getattr(lib, get_name)
    return None


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run numpy's matrix products on one thread inside the block.

    The teach's products are small (hundreds of rows), and OpenBLAS's threads spin
    waiting for a core that something else holds: a 26 x 10-photo fit took 1.2 s on one
    thread and 3.6-12 s on two when another process kept one of the two cores busy, as
    the sorting loop does on the bin.
    """
    functions = _openblas_threads()
    if functions is None:
        yield
        return
    set_threads, get_threads = functions
    before = int(get_threads())
    set_threads(1)
    try:
        yield
    finally:
        set_threads(before)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def nll(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits)."""
    if not len(labels):
        return float("nan")
    return float(-_log_softmax(np.asarray(logits, np.float64))[np.arange(len(labels)),
                                                                 labels].mean())


# --- calibration ---------------------------------------------------------------------


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *,
                    bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) on held-out logits.

    The NLL is convex in 1/T, so its derivative is monotone and bisection finds the
    minimum; T stays within `bounds` (a set whose every answer is right with a margin
    would otherwise drive T to 0).
    """
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels)
    if not len(y):
        return 1.0
    z_true = z[np.arange(len(y)), y]

    def slope(log_beta: float) -> float:  # d NLL / d beta, beta = 1/T
        p = softmax(z * math.exp(log_beta))
        return float(((p * z).sum(1) - z_true).mean())

    lo, hi = -math.log(bounds[1]), -math.log(bounds[0])
    if slope(lo) >= 0:
        return bounds[1]
    if slope(hi) <= 0:
        return bounds[0]
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slope(mid) < 0 else (lo, mid)
    return float(math.exp(-0.5 * (lo + hi)))


def reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> list[dict[str, Any]]:
    """Per equal-width confidence bin: its range, count, mean confidence and accuracy
    (the points of a reliability diagram; empty bins are left out)."""
    p = np.asarray(probs, np.float64)
    conf, pred = p.max(1), p.argmax(1)
    correct = pred == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Right-closed bins, so a confidence of exactly 1 lands in the last one.
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        mask = which == b
        if mask.any():
            rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(mask.sum()),
                         "confidence": float(conf[mask].mean()),
                         "accuracy": float(correct[mask].mean())})
    return rows


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE: the count-weighted mean gap between confidence and accuracy over bins."""
    rows = reliability(probs, labels, n_bins)
    total = sum(r["n"] for r in rows)
    if not total:
        return float("nan")
    return float(sum(r["n"] * abs(r["confidence"] - r["accuracy"]) for r in rows) / total)


# --- baselines -----------------------------------------------------------------------


def imprint(embeddings: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Imprinted weights [n_classes, width]: per class the L2-normalised mean of its
    L2-normalised embeddings; a class without samples gets a zero row."""
    sums = np.zeros((n_classes, embeddings.shape[1]), np.float64)
    np.add.at(sums, np.asarray(labels), l2_normalize(np.asarray(embeddings, np.float64)))
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return np.where(norms > 0, sums / np.maximum(norms, 1e-12), 0.0)


def nearest_class_mean(features: np.ndarray, labels: np.ndarray, n_classes: int, *,
                       scale: float = NCM_SCALE) -> list[Dense]:
    """Imprinting alone: cosine to each class's normalised mean, no fitting.

    The argmax of cosine similarity does not depend on the photo's norm, so the head is
    linear; its probabilities are softmax(scale * cosine) only for photos of median norm.
    """
    weights = imprint(features, labels, n_classes)
    norm = float(np.median(np.linalg.norm(features, axis=1))) or 1.0
    w = (scale / norm) * weights
    return [Dense(w.astype(np.float32), np.zeros(n_classes, np.float32))]


def logistic_regression(features: np.ndarray, labels: np.ndarray, n_classes: int, *,
                        c: float = LOGREG_C) -> list[Dense]:
    """Plain multinomial logistic regression on standardised features, L2-regularised as
    scikit-learn defines C (sum of losses + |W|^2 / 2C); solved by L-BFGS."""
    x = np.asarray(features, np.float32)
    mean = x.mean(0)
    spread = x.std(0)
    # A feature constant over the few photos would divide by ~0: floor the spread.
    std = np.maximum(spread, 0.1 * float(np.median(spread)) + 1e-6)
    xs = np.hstack([(x - mean) / std, np.ones((len(x), 1), np.float32)])
    n = len(x)
    penalty = np.ones((n_classes, xs.shape[1]))
    penalty[:, -1] = 0.0  # as in scikit-learn, the intercept is not penalised
    targets = np.eye(n_classes)[labels]

    def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
        w = flat.reshape(n_classes, -1)
        logp = _log_softmax(xs @ w.T.astype(np.float32))
        loss = -(targets * logp).sum() + 0.5 / c * (penalty * w * w).sum()
        grad = (np.exp(logp) - targets).T @ xs + penalty * w / c
        return float(loss) / n, grad.ravel() / n  # /n: same optimum, better scaled

    w = lbfgs(fun, np.zeros((n_classes, xs.shape[1])), max_iter=200)
    weight = w[:, :-1] / std
    bias = w[:, -1] - weight @ mean
    return [Dense(weight.astype(np.float32), bias.astype(np.float32))]


# --- the teach method ----------------------------------------------------------------


@dataclass(frozen=True)
class TeachSettings:
    scale: float
    pull: float | None  # None: imprinting alone, no fit

    def describe(self) -> str:
        fit = "imprinting alone" if self.pull is None else f"pull {self.pull:g}"
        return f"scale {self.scale:g}, {fit}"


@dataclass
class TeachResult:
    """What a teach produced. `layers` take raw features and give calibrated logits
    (temperature folded in); their first `n_base` outputs are the base head's labels."""

    layers: list[Dense]
    settings: TeachSettings
    temperature: float
    calibrated: bool  # False when there was nothing held out to fit the temperature on
    cv_scheme: str
    cv: list[dict[str, Any]] = field(default_factory=list)  # per candidate: top1, nll, n
    cv_top1: float | None = None
    cv_ece: float | None = None  # of the calibrated cross-validated probabilities
    n_base: int = 0
    seconds: float = 0.0

    def record(self) -> dict[str, Any]:
        """What a bundle's manifest keeps about the teach (JSON-ready)."""
        return {"method": "imprinting + softmax fit pulled to the imprint (L2-SP), "
                          "settings by cross-validation, temperature-calibrated",
                "scale": self.settings.scale, "pull": self.settings.pull,
                "temperature": round(self.temperature, 4), "calibrated": self.calibrated,
                "cv": self.cv_scheme,
                "cv_top1": None if self.cv_top1 is None else round(self.cv_top1, 4),
                "cv_ece": None if self.cv_ece is None else round(self.cv_ece, 4),
                "candidates": [{k: r[k] for k in ("settings", "top1", "nll", "n")}
                               for r in self.cv],
                "seconds": round(self.seconds, 2)}


@dataclass
class _Base:
    """A base head, frozen: the teach adds labels next to its logits, never changes them
    (so a teach from photos of new items only cannot push the old labels down)."""

    layers: list[Dense]
    width: int


@dataclass
class _Fit:
    center: np.ndarray
    radius: float
    weights: np.ndarray  # [n_new, width], on the embedding
    scale: float


class _Problem:
    """The training samples of one fit, embedded and imprinted once for every setting.

    The gradient of the loss only ever adds rows of z to the weights, and the imprint is
    made of rows of z, so the optimum lies in their span: with fewer samples than
    features, solving in an orthonormal basis of that span is exact and several times
    cheaper per step. The basis comes from the samples' Gram matrix (cheaper than an SVD
    of the samples themselves).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, n_classes: int,
                 base_logits: np.ndarray | None, n_base: int) -> None:
        self.y, self.n_classes, self.n_base = y, n_classes, n_base
        self.base_logits = None if base_logits is None else base_logits.astype(np.float32)
        self.center = x.mean(0)
        z = x - self.center
        self.radius = float(np.median(np.linalg.norm(z, axis=1))) or 1.0
        z = (z / self.radius).astype(np.float32)
        new = y >= n_base
        self.prior = imprint(z[new], y[new] - n_base, n_classes - n_base)
        self.basis: np.ndarray | None = None
        self.z = z
        if len(z) < z.shape[1]:
            evals, evecs = np.linalg.eigh(z.astype(np.float64) @ z.T.astype(np.float64))
            keep = evals > evals[-1] * 1e-10
            sv = np.sqrt(evals[keep])
            self.z = (evecs[:, keep] * sv).astype(np.float32)  # = z @ basis
            self.basis = (z.T @ (evecs[:, keep] / sv)).astype(np.float32)  # [width, rank]
        self.prior_r = self.prior if self.basis is None else self.prior @ self.basis

    def solve(self, settings: TeachSettings, warm: _Fit | None = None) -> _Fit:
        if settings.pull is None:
            return _Fit(self.center, self.radius, self.prior, settings.scale)
        start = warm.weights if warm is not None else self.prior
        if self.basis is not None:
            start = start @ self.basis
        w = self._lbfgs(settings, start)
        if self.basis is not None:
            # Back to feature space; the imprint's part outside the span (rounding only)
            # is kept as it was.
            w = w @ self.basis.T + (self.prior - self.prior_r @ self.basis.T)
        return _Fit(self.center, self.radius, w, settings.scale)

    def _lbfgs(self, settings: TeachSettings, start: np.ndarray) -> np.ndarray:
        """Weights of the new labels minimising the mean cross-entropy over all samples
        (against the frozen base logits too) plus the pull towards the imprint."""
        assert settings.pull is not None
        pull, scale = settings.pull, np.float32(settings.scale)
        z, prior, n_base, base_logits = self.z, self.prior_r, self.n_base, self.base_logits
        targets = np.eye(self.n_classes, dtype=np.float32)[self.y]
        inv_n = np.float32(1.0 / len(z))

        def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
            w = flat.reshape(prior.shape)
            logits = scale * (z @ w.T.astype(np.float32))
            if base_logits is not None:
                logits = np.hstack([base_logits, logits])
            logp = _log_softmax(logits)
            delta = (np.exp(logp) - targets) * inv_n
            d_w = w - prior
            loss = -float((targets * logp).sum()) * inv_n + 0.5 * pull * float((d_w * d_w).sum())
            grad = scale * (delta[:, n_base:].T @ z) + pull * d_w
            return loss, grad.ravel()

        return lbfgs(fun, start)


def _logits(fit: _Fit, x: np.ndarray, base_logits: np.ndarray | None) -> np.ndarray:
    new = fit.scale * (((x - fit.center) / fit.radius) @ fit.weights.T)
    return new if base_logits is None else np.hstack([base_logits, new])


def _layers(fit: _Fit, base: _Base | None, temperature: float, width: int,
            nonnegative: bool) -> list[Dense]:
    """The fit as dense layers on raw features, the temperature folded in."""
    w_new = (fit.scale / (fit.radius * temperature)) * fit.weights
    b_new = -w_new @ fit.center
    if base is None:
        return [Dense(w_new.astype(np.float32), b_new.astype(np.float32))]
    k = 1.0 / temperature
    if len(base.layers) == 1:
        top = base.layers[0]
        return [Dense(np.vstack([k * top.weight, w_new]).astype(np.float32),
                      np.concatenate([k * top.bias, b_new]).astype(np.float32))]
    if len(base.layers) != 2:
        raise ValueError("a base head must have one or two dense layers")
    hidden, out = base.layers
    # The new labels need the raw features after the hidden layer: pass them through it
    # as extra relu units, x itself when features are never negative (MobileNet's pooled
    # features come after a ReLU6), else relu(x) and relu(-x).
    eye = np.eye(width)
    through = eye if nonnegative else np.vstack([eye, -eye])
    n_hidden, n_through = hidden.weight.shape[0], through.shape[0]
    w1 = np.vstack([hidden.weight, through])
    b1 = np.concatenate([hidden.bias, np.zeros(n_through)])
    w_pass = w_new if nonnegative else np.hstack([w_new, -w_new])
    w2 = np.block([[k * out.weight, np.zeros((out.weight.shape[0], n_through))],
                   [np.zeros((w_new.shape[0], n_hidden)), w_pass]])
    b2 = np.concatenate([k * out.bias, b_new])
    return [Dense(w1.astype(np.float32), b1.astype(np.float32), relu=True),
            Dense(w2.astype(np.float32), b2.astype(np.float32))]


def _base_scale(base_logits: np.ndarray, of_base: np.ndarray) -> float:
    """The highest scale new labels get next to a base head: the median top logit the
    base gives its labels' photos (all photos when none is of a base label).

    The new labels' logits are cosines times the scale, next to the frozen base logits; a
    base trained to stay unsure off its kinds (outlier exposure: top logits about 6, not
    30) is outshouted by new labels at scale 10, and from 3 photos a class they took 5
    points of its old items. A base with larger logits leaves the scale as it is.
    """
    rows = base_logits[of_base] if of_base.any() else base_logits
    return max(1.0, float(np.median(rows.max(axis=1))))


def _folds(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Fold of each photo, stratified: each class's photos dealt round the folds from a
    random start, so a class of m < k photos lands in m different folds."""
    fold = np.zeros(len(labels), int)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fold[idx] = (np.arange(len(idx)) + rng.integers(k)) % k
    return fold


def candidates(scales: Sequence[float] = SCALES,
               pulls: Sequence[float | None] = PULLS) -> list[TeachSettings]:
    return [TeachSettings(s, p) for s in scales for p in pulls]


def fit_few_shot(features_by_view: Mapping[str, np.ndarray], labels: np.ndarray,
                 n_classes: int, *, deploy_view: str = "full",
                 base_head: list[Dense] | None = None,
                 grid: Sequence[TeachSettings] | None = None, folds: int = CV_FOLDS,
                 seed: int = 0) -> TeachResult:
    """Teach a head from a few photos.

    features_by_view: raw pooled features [n_photos, width] per view of the same photos
    (row i of every view is photo i); `deploy_view` is what the bin sees, the one that
    held-out photos are scored on, and must be among them. labels: class index of each
    photo. With `base_head` (dense layers on the same features), its outputs are labels
    0..base_width-1, kept frozen (only the calibration temperature rescales them), and the
    taught labels are base_width..n_classes-1. Give it photos of the old labels too (a
    few per label, e.g. the base's split or the site's reviewed photos): they are what
    stops the new labels from taking old items, and without them the pull is not
    cross-validated but set to the strongest of the grid. Every new label needs a photo.
    """
    with one_blas_thread():
        return _fit_few_shot(features_by_view, labels, n_classes, deploy_view=deploy_view,
                             base_head=base_head, grid=grid, folds=folds, seed=seed)


def _fit_few_shot(features_by_view: Mapping[str, np.ndarray], labels: np.ndarray,
                  n_classes: int, *, deploy_view: str, base_head: list[Dense] | None,
                  grid: Sequence[TeachSettings] | None, folds: int, seed: int) -> TeachResult:
    started = time.perf_counter()
    if deploy_view not in features_by_view:
        raise ValueError(f"deploy view {deploy_view!r} not among {sorted(features_by_view)}")
    views = [deploy_view, *(v for v in features_by_view if v != deploy_view)]
    stack = np.stack([np.asarray(features_by_view[v], np.float32) for v in views])
    y = np.asarray(labels, int)
    n_views, n_photos, width = stack.shape
    if len(y) != n_photos:
        raise ValueError(f"{len(y)} labels for {n_photos} photos")
    base = _Base(base_head, base_head[-1].weight.shape[0]) if base_head else None
    n_base = base.width if base else 0
    if n_base >= n_classes:
        raise ValueError("nothing to teach: every class is a base label")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"labels must be 0..{n_classes - 1}")
    missing = sorted(set(range(n_base, n_classes)) - set(y.tolist()))
    if missing:
        raise ValueError(f"classes {missing} have no photos")
    base_logits = None
    if base is not None:
        flat = stack.reshape(-1, width)
        base_logits = forward(base.layers, flat)[-1].reshape(n_views, n_photos, -1)
    grid = list(grid) if grid else candidates()
    cap = math.inf if base_logits is None else _base_scale(base_logits[0], y < n_base)
    grid = list(dict.fromkeys(TeachSettings(min(s.scale, cap), s.pull) for s in grid))

    def problem(photos: np.ndarray) -> _Problem:
        xs = stack[:, photos].reshape(-1, width)
        bl = None if base_logits is None else base_logits[:, photos].reshape(-1, n_base)
        return _Problem(xs, np.tile(y[photos], n_views), n_classes, bl, n_base)

    # Held-out photos are scorable when their label can be predicted at all: a base label
    # always, a new label only if another photo of it stays in training.
    counts = np.bincount(y, minlength=n_classes)
    k = min(folds, int(counts.max()))
    rows: list[dict[str, Any]] = []
    oof: dict[TeachSettings, np.ndarray] = {}
    scheme = "none: one photo per class, default settings"
    scored = np.zeros(n_photos, bool)
    if k >= 2:
        fold = _folds(y, k, np.random.default_rng(seed))
        scheme = f"{k}-fold by photo, {n_views} view(s) each"
        oof = {s: np.zeros((n_photos, n_classes)) for s in grid}
        for f in range(k):
            held, kept = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
            known = np.bincount(y[kept], minlength=n_classes) > 0
            known[:n_base] = True
            held = held[known[y[held]]]
            if not len(held):
                continue
            scored[held] = True
            fold_problem = problem(kept)
            warm: _Fit | None = None
            for s in grid:
                # Along a scale, from the strongest pull to the weakest: each solution
                # starts the next one.
                fit = fold_problem.solve(s, warm if warm and warm.scale == s.scale else None)
                warm = fit if s.pull is not None else warm
                bl = None if base_logits is None else base_logits[0, held]
                logits = np.full((len(held), n_classes), -1e4)
                cols = np.flatnonzero(known)
                full = _logits(fit, stack[0, held], bl)
                logits[:, cols] = full[:, cols]
                oof[s][held] = logits
    if not scored.any():
        if k >= 2:
            scheme = "none: no photo could be held out, default settings"
        chosen = TeachSettings(min(DEFAULT_SCALE, cap), DEFAULT_PULL)
        temperature, cv_top1, cv_ece, calibrated = 1.0, None, None, False
    else:
        ys = y[scored]
        for s in grid:
            pred = oof[s][scored]
            rows.append({"settings": s.describe(), "scale": s.scale, "pull": s.pull,
                         "top1": float((pred.argmax(1) == ys).mean()),
                         "nll": nll(pred, ys), "n": int(scored.sum())})
        # Most held-out photos right; ties to the lower NLL, then to the earlier (more
        # strongly regularised) candidate.
        best = min(range(len(grid)), key=lambda i: (-rows[i]["top1"], rows[i]["nll"], i))
        if base is not None and not (y < n_base).any():
            # Without photos of the base's labels, nothing held out can show a new label
            # taking old items, and the weakest pull always looks best: keep the
            # strongest (on synthetic data the weakest cost old labels 7-12 points).
            best = max(range(len(grid)), key=lambda i: (grid[i].pull or math.inf, -i))
            scheme += "; strongest pull: no photos of the base labels to check it on"
        chosen = grid[best]
        held_out = oof[chosen][scored]
        # No mistakes held out: the NLL falls all the way to T -> 0, which says nothing about
        # the mistakes new photos will bring. Soften if need be, never sharpen.
        floor = 1.0 if (held_out.argmax(1) == ys).all() else 0.05
        temperature = fit_temperature(held_out, ys, bounds=(floor, 20.0))
        probs = softmax(oof[chosen][scored] / temperature)
        cv_top1, cv_ece = rows[best]["top1"], expected_calibration_error(probs, ys)
        calibrated = True
    final = problem(np.arange(n_photos)).solve(chosen)
    nonnegative = bool(stack.min() >= 0)
    layers = _layers(final, base, temperature, width, nonnegative)
    return TeachResult(layers, chosen, temperature, calibrated, scheme, rows, cv_top1,
                       cv_ece, n_base, time.perf_counter() - started)


__all__ = [
    "TeachResult",
    "TeachSettings",
    "candidates",
    "expected_calibration_error",
    "fit_few_shot",
    "fit_temperature",
    "imprint",
    "l2_normalize",
    "lbfgs",
    "logistic_regression",
    "nearest_class_mean",
    "nll",
    "one_blas_thread",
    "reliability",
]
