"""Dropout + dense heads on frozen features, trained in numpy (no TensorFlow needed)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Dense:
    weight: np.ndarray  # [out, in], the TFLite FULLY_CONNECTED layout
    bias: np.ndarray
    relu: bool = False


@dataclass
class HeadResult:
    layers: list[Dense]
    history: list[dict[str, float]] = field(default_factory=list)


def forward(layers: list[Dense], x: np.ndarray) -> list[np.ndarray]:
    """Activations after each layer (the last is logits)."""
    outs = []
    for layer in layers:
        x = x @ layer.weight.T + layer.bias
        if layer.relu:
            x = np.maximum(x, 0)
        outs.append(x)
    return outs


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _accuracy(layers: list[Dense], x: np.ndarray, y: np.ndarray) -> float:
    return float((forward(layers, x)[-1].argmax(1) == y).mean()) if len(y) else float("nan")


def train_head(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    *,
    hidden: int = 0,
    dropout: float = 0.5,
    lr: float = 1e-4,
    epochs: int = 30,
    batch_size: int = 16,
    weight_decay: float = 0.0,
    seed: int = 0,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    x_outlier: np.ndarray | None = None,
    outlier_target: np.ndarray | None = None,
    outlier_weight: float = 0.5,
    log=None,
) -> HeadResult:
    """Adam on softmax cross-entropy, dropout on the features as in the study's head.

    Features are standardized for training and the scaling folded back into the first
    layer, so the exported head takes the backbone's raw features.

    Outlier exposure (Hendrycks et al. 2019): with `x_outlier`, features of things that
    are none of the classes, every batch also takes `batch_size` of them and adds
    `outlier_weight` times their cross-entropy against the soft `outlier_target` (a
    probability vector over the classes), so the head learns to be unsure off its classes
    instead of confidently calling them the nearest one. Without it training is unchanged.
    """
    if x_outlier is not None:
        target = (None if outlier_target is None
                  else np.asarray(outlier_target, dtype=np.float32))
        if target is None or target.shape != (n_classes,) or np.any(target < 0) \
                or abs(float(target.sum()) - 1) > 1e-4:
            raise ValueError(f"outlier_target must be a probability vector of {n_classes} "
                             "values with x_outlier")
        if x_outlier.ndim != 2 or x_outlier.shape[1] != x.shape[1] or not len(x_outlier):
            raise ValueError(f"x_outlier must be [n, {x.shape[1]}] features, got "
                             f"{list(x_outlier.shape)}")
        if outlier_weight < 0:
            raise ValueError(f"outlier_weight must be 0 or more, got {outlier_weight}")
    rng = np.random.default_rng(seed)
    x = x.astype(np.float32)
    mean = x.mean(0)
    # A near-constant feature would get a huge folded weight, and one huge weight ruins
    # the per-tensor int8 scale of the whole layer: floor the scaling.
    spread = x.std(0)
    std = np.maximum(spread, 0.1 * float(np.median(spread)) + 1e-6)
    xs = (x - mean) / std
    xv = None if x_val is None else ((x_val.astype(np.float32) - mean) / std)
    # Outliers are scaled like the known features (the folded head sees both raw) and
    # drawn from their own generator, so the known samples' order and dropout masks
    # depend on the seed alone.
    xo = None if x_outlier is None else ((x_outlier.astype(np.float32) - mean) / std)
    out_rng = np.random.default_rng([seed, 1])
    out_order = np.zeros(0, np.int64)
    dims = [x.shape[1], *([hidden] if hidden else []), n_classes]
    layers = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
        limit = np.sqrt(6.0 / (d_in + d_out))
        w = rng.uniform(-limit, limit, (d_out, d_in)).astype(np.float32)
        layers.append(Dense(w, np.zeros(d_out, np.float32), relu=i < len(dims) - 2))
    params = [p for layer in layers for p in (layer.weight, layer.bias)]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    beta1, beta2, eps, step = 0.9, 0.999, 1e-7, 0
    history = []
    onehot = np.eye(n_classes, dtype=np.float32)
    for epoch in range(epochs):
        order = rng.permutation(len(xs))
        total = total_out = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            a = xs[idx]
            n_known = len(idx)
            if xo is not None:
                if len(out_order) < batch_size:  # cycle through the outliers, reshuffled
                    out_order = np.concatenate([out_order, out_rng.permutation(len(xo))])
                a = np.concatenate([a, xo[out_order[:batch_size]]])
                out_order = out_order[batch_size:]
            if dropout > 0:
                a = a * ((rng.random(a.shape, dtype=np.float32) >= dropout)
                         * np.float32(1 / (1 - dropout)))
            acts = [a]
            for layer in layers:
                z = acts[-1] @ layer.weight.T + layer.bias
                if layer.relu:
                    z = np.maximum(z, 0)
                    if dropout > 0:  # dropout again before the output layer
                        z = z * ((rng.random(z.shape, dtype=np.float32) >= dropout)
                                 * np.float32(1 / (1 - dropout)))
                acts.append(z)
            p = softmax(acts[-1])
            if xo is None:
                t = onehot[y[idx]]
                total += float(-np.log(np.clip(p[np.arange(len(idx)), y[idx]], 1e-12,
                                               1)).sum())
                grad = ((p - t) / len(idx)).astype(np.float32)
            else:
                pk, po = p[:n_known], p[n_known:]
                total += float(-np.log(np.clip(pk[np.arange(n_known), y[idx]], 1e-12,
                                               1)).sum())
                total_out += float(-(target * np.log(np.clip(po, 1e-12, 1))).sum())
                # Soft-target cross-entropy has the same gradient form, p - target.
                grad = np.concatenate([(pk - onehot[y[idx]]) / n_known,
                                       np.float32(outlier_weight) * (po - target) / len(po)]
                                      ).astype(np.float32)
            grads = []
            for li in range(len(layers) - 1, -1, -1):
                layer = layers[li]
                gw = grad.T @ acts[li] + np.float32(weight_decay) * layer.weight
                gb = grad.sum(0)
                grads[:0] = [gw, gb]
                if li:
                    # Through relu and dropout: kept units pass the gradient, scaled.
                    keep = np.float32(1 / (1 - dropout)) if dropout > 0 else np.float32(1)
                    grad = (grad @ layer.weight) * (acts[li] > 0) * keep
            step += 1
            for i, (p_, g) in enumerate(zip(params, grads, strict=True)):
                m[i] = beta1 * m[i] + (1 - beta1) * g
                v[i] = beta2 * v[i] + (1 - beta2) * g * g
                mh = m[i] / (1 - beta1**step)
                vh = v[i] / (1 - beta2**step)
                p_ -= (lr * mh / (np.sqrt(vh) + eps)).astype(np.float32)
        record = {"epoch": epoch + 1, "loss": total / len(xs),
                  "train_acc": _accuracy(layers, xs, y)}
        if xo is not None:
            record["outlier_loss"] = total_out / (batch_size * -(-len(xs) // batch_size))
        if xv is not None and y_val is not None:
            pv = softmax(forward(layers, xv)[-1])
            record["val_loss"] = float(-np.log(np.clip(pv[np.arange(len(y_val)), y_val],
                                                       1e-12, 1)).mean())
            record["val_acc"] = float((pv.argmax(1) == y_val).mean())
        history.append(record)
        if log:
            log(record)
    first = layers[0]
    folded_w = first.weight / std
    folded_b = first.bias - folded_w @ mean
    layers[0] = Dense(folded_w.astype(np.float32), folded_b.astype(np.float32), first.relu)
    return HeadResult(layers, history)


def ensemble(members: list[list[Dense]]) -> list[Dense]:
    """K heads as one: averaging their logits is exact and costs one wider layer.

    Linear heads merge into one dense layer; two-layer heads concatenate their hidden
    units and average through the output layer.
    """
    k = len(members)
    if k == 1:
        return members[0]
    if all(len(m) == 1 for m in members):
        return [Dense(np.mean([m[0].weight for m in members], 0),
                      np.mean([m[0].bias for m in members], 0))]
    if not all(len(m) == 2 for m in members):
        raise ValueError("can only merge heads of one or two layers")
    hidden = Dense(np.concatenate([m[0].weight for m in members]),
                   np.concatenate([m[0].bias for m in members]), relu=True)
    out = Dense(np.concatenate([m[1].weight for m in members], axis=1) / k,
                np.mean([m[1].bias for m in members], 0))
    return [hidden, out]
