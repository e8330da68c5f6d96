"""Independent slow reference quantizer in numpy (loops, full score vectors)."""

from __future__ import annotations

import numpy as np


def bf_select(x: np.ndarray, codebook: np.ndarray, k: int, similarity: str) -> np.ndarray:
    """x [M, G, d], codebook [G, N, d] -> ids [M, G, k], most similar first."""
    m, g, _ = x.shape
    out = np.zeros((m, g, k), dtype=np.int64)
    for i in range(m):
        for j in range(g):
            v, c = x[i, j].astype(np.float64), codebook[j].astype(np.float64)
            if similarity == "cosine":
                s = (c @ v) / (np.linalg.norm(c, axis=1) * np.linalg.norm(v) + 1e-30)
            elif similarity == "dot":
                s = c @ v
            else:
                s = -np.linalg.norm(c - v, axis=1)
            out[i, j] = np.argsort(-s, kind="stable")[:k]
    return out


def bf_decode(ids: np.ndarray, codebook: np.ndarray, combine: str, k: int) -> np.ndarray:
    """ids [M, G, slots] (-1 empty) -> [M, G, d]."""
    m, g, slots = ids.shape
    out = np.zeros((m, g, codebook.shape[-1]))
    for i in range(m):
        for j in range(g):
            for s in range(slots):
                if ids[i, j, s] >= 0:
                    out[i, j] += codebook[j, ids[i, j, s]]
    return out / k if combine == "mean" else out


def bf_layernorm(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps)


def bf_quantize(x: np.ndarray, codebook: np.ndarray, cfg) -> np.ndarray:
    """Brute-force forward value of a Codebook on x [M, G, d]."""
    if cfg.input_norm == "layernorm":
        x = bf_layernorm(x)
    ids = bf_select(x, codebook, cfg.k, cfg.similarity)
    return bf_decode(ids, codebook, cfg.combine, cfg.k)


def bf_merge(codebook: np.ndarray, used: np.ndarray, threshold: float) -> np.ndarray:
    """Parked mask [G, N]: a used code with a more-used (tie: lower id) used code of cosine
    similarity > threshold, by pairwise loops."""
    g, n, _ = codebook.shape
    parked = np.zeros((g, n), dtype=bool)
    for h in range(g):
        c = codebook[h].astype(np.float64)
        for i in range(n):
            if used[h, i] <= 0:
                continue
            for j in range(n):
                if j == i or used[h, j] <= 0:
                    continue
                cos = c[i] @ c[j] / (np.linalg.norm(c[i]) * np.linalg.norm(c[j]) + 1e-30)
                more = used[h, j] > used[h, i] or (used[h, j] == used[h, i] and j < i)
                if cos > threshold and more:
                    parked[h, i] = True
    return parked
