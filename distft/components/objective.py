"""The linear probe's objective, per head (its own `optimizer.weight_decay` wd and
`train.label_smoothing` e), as plain numpy:

    f(W, b) = 1/N sum_i CE_e(W x_i + b, y_i) + wd/2 ||W||^2   (+ wd/2 ||b||^2 with optimizer.decay_bias_and_bn)

and its sums over blocks of samples in fixed point, so that their totals are the same bits
whatever ranks computed them and in whatever order (see probe.py).
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

LOW_WORD = 2.0 ** 26  # fixed point: the second word's resolution below the first's
HIGH_BITS = 50  # the first word's total over all samples stays below 2**HIGH_BITS


class Objective:
    """f for H heads of `classes` outputs on `dim` features: a head's point is its weight
    (classes x dim, row-major) then its bias (classes), one float64 vector.

    With `mean` (the features' mean over data.train; a head with a bias), points are taken in
    centred coordinates: the weight W and c = b + W mean, the logits W (x - mean) + c. The same
    function of (W, b), only the coordinates differ: frozen features (after a ReLU, often all
    positive) share a large mean, and without it the problem is far worse conditioned (2 to 3
    times the passes, measured). `original` gives (W, b) back; the gradient norm reported
    is always by (W, b)."""

    def __init__(self, samples: int, classes: int, dim: int, weight_decay, label_smoothing, decay_bias: bool,
                 bias: bool = True, mean: Optional[np.ndarray] = None):
        self.samples, self.classes, self.dim = samples, classes, dim
        self.wd = np.asarray(weight_decay, dtype=np.float64)
        self.smoothing = np.asarray(label_smoothing, dtype=np.float64)
        self.decay_bias, self.bias = decay_bias, bias
        self.mean = None if mean is None or not bias else np.asarray(mean, dtype=np.float64).reshape(dim)

    @property
    def size(self) -> int:
        return self.classes * self.dim + (self.classes if self.bias else 0)

    def block_sums(self, points: np.ndarray, heads: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(len(heads), 2 + size): per head, the sum over one block of samples (features `x`,
        labels `y`) of its cross-entropy, of its smoothed cross-entropy, and of the smoothed
        one's gradient. `points`: (len(heads), size)."""
        h, k, d = len(heads), self.classes, self.dim
        weights = points[:, :k * d].reshape(h * k, d)
        biases = points[:, k * d:] if self.bias else np.zeros((h, k))
        e = self.smoothing[heads][None, :]  # (1, h)
        x = np.asarray(x, dtype=np.float64).reshape(len(y), -1)
        if self.mean is not None:
            x = x - self.mean
        rows = np.arange(len(y))
        z = (x @ weights.T).reshape(len(y), h, k) + biases[None]
        z -= z.max(axis=2, keepdims=True)
        p = np.exp(z)
        norm = p.sum(axis=2)
        p /= norm[..., None]
        log_norm = np.log(norm)
        z_true = z[rows, :, y]  # (n, h)
        out = np.empty((h, 2 + self.size))
        out[:, 0] = (log_norm - z_true).sum(axis=0)
        out[:, 1] = (log_norm - (1 - e) * z_true - e * z.mean(axis=2)).sum(axis=0)
        p[rows, :, y] -= 1 - e
        p -= e[..., None] / k  # the smoothed loss's gradient by the logits
        out[:, 2:2 + k * d] = (p.reshape(len(y), h * k).T @ x).reshape(h, k * d)
        if self.bias:
            out[:, 2 + k * d:] = p.sum(axis=0)
        return out

    def exponents(self, points: np.ndarray, feature_max: float) -> np.ndarray:
        """Per head and sum, the power of two that keeps the sum over all N samples below
        2**HIGH_BITS, from a bound every rank computes alike (the points, the largest
        |feature| of data.train): per sample |cross-entropy| <= 2 max|logit| + log(classes),
        |d/dW| <= max|x|, |d/db| <= 1."""
        h, k, d = len(points), self.classes, self.dim
        if self.mean is not None:  # |x - mean| <= 2 max|x|
            feature_max = 2 * feature_max
        norms = np.abs(points[:, :k * d].reshape(h, k, d)).sum(axis=2)  # (h, k): each row's L1 norm
        logit = (norms * feature_max + (np.abs(points[:, k * d:]) if self.bias else 0.0)).max(axis=1)
        bound = np.empty((h, 2 + self.size))
        bound[:, :2] = (2 * logit + np.log(k))[:, None]
        bound[:, 2:2 + k * d] = feature_max
        bound[:, 2 + k * d:] = 1.0
        bound = np.where(np.isfinite(bound), np.maximum(bound * self.samples, 1e-300), 1.0)
        return HIGH_BITS - np.frexp(bound)[1]

    def local_sums(self, points: np.ndarray, heads: np.ndarray, chunks: Iterable,
                   exponents: Optional[np.ndarray] = None) -> np.ndarray:
        """`block_sums` added over `chunks` ((features, labels) blocks of this rank). With
        `exponents`, each block's sums in fixed point, (2, len(heads), 2 + size): integer
        words of 2**-exponent and 2**-exponent / LOW_WORD, whose totals over any blocks in any
        order are the same bits; else float64 sums (len(heads), 2 + size)."""
        if exponents is None:
            out = np.zeros((len(heads), 2 + self.size))
            for x, y in chunks:
                out += self.block_sums(points, heads, x, y)
            return out
        out = np.zeros((2, len(heads), 2 + self.size))
        for x, y in chunks:
            scaled = np.ldexp(self.block_sums(points, heads, x, y), exponents)
            high = np.floor(scaled)
            out[0] += high
            out[1] += np.floor((scaled - high) * LOW_WORD)
        return out

    @staticmethod
    def from_fixed(words: np.ndarray, exponents: np.ndarray) -> np.ndarray:
        return np.ldexp(words[0] + words[1] / LOW_WORD, -exponents)

    def original(self, points: np.ndarray) -> np.ndarray:
        """Points as (W, b): the centred coordinates' c = b + W mean taken back."""
        out = points.copy()
        if self.mean is None:
            return out
        k, d = self.classes, self.dim
        out[..., k * d:] -= points[..., :k * d].reshape(*points.shape[:-1], k, d) @ self.mean
        return out

    def original_gradient(self, grads: np.ndarray) -> np.ndarray:
        """A gradient by the centred coordinates (W, c) as the gradient by (W, b): df/dW adds
        df/dc mean'."""
        if self.mean is None:
            return grads
        k, d = self.classes, self.dim
        out = grads.copy()
        out[..., :k * d] += (grads[..., k * d:, None] * self.mean).reshape(*grads.shape[:-1], k * d)
        return out

    def gradient_norm(self, grad: np.ndarray) -> float:
        """The Euclidean norm of f's gradient by (W, b), from one by the points' coordinates."""
        return float(np.linalg.norm(self.original_gradient(grad)))

    def totals(self, points: np.ndarray, heads: np.ndarray, sums: np.ndarray) -> tuple:
        """(cross-entropy, f, gradient of f by the points' coordinates) per head from the sums
        over every sample."""
        k, d = self.classes, self.dim
        wd = self.wd[heads][:, None]
        penalised = self.original(points)  # (W, b), b zeroed when it is not penalised
        if self.bias and not self.decay_bias:
            penalised[:, k * d:] = 0.0
        loss = sums[:, 0] / self.samples
        f = sums[:, 1] / self.samples + 0.5 * wd[:, 0] * np.einsum("hi,hi->h", penalised, penalised)
        grad = sums[:, 2:] / self.samples + wd * penalised
        if self.mean is not None and self.decay_bias:  # wd/2 ||c - W mean||^2 by W: -wd b mean'
            grad[:, :k * d] -= ((wd * penalised[:, k * d:])[:, :, None] * self.mean).reshape(len(points), k * d)
        return loss, f, grad
