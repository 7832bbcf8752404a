"""Metric 3: high-norm anomalies (reference `run_anomaly_analysis`) and their label-free detection.

Labels are (image, x = column, y = row) of the upper-left token of a 2×2 patch on the `up_blocks.1` maps
(32×32 at 512 px; `ref_size`). At a block of size h: scale = h / ref_size, patch side max(1, int(2*scale)) at
(row int(y*scale), col int(x*scale)) (python slicing, clipped at the edge); relative norm = mean token norm in
the patch / mean token norm of the whole map (the anomaly included: quirk Q9). Reported per block: mean and
population std over labels. Standard addition (Q9): the patch's mean norm over the median norm of the image's
tokens outside every labelled patch.

Detection (label-free, on the `up_blocks.1` maps): per image, token norm / the image's median token norm; mean
over the aligned 2×2 cells (rows 2i..2i+1, cols 2j..2j+1 — the paper's labels all sit on even coordinates);
threshold t = max(min_ratio, median + k·1.4826·MAD) of all pooled cells of the dataset (robust z-score k, default
6, floor 1.5); 4-connected components of cells above t; each component is one anomaly at its peak cell,
stored as (sample, x = 2j, y = 2i) with the peak pooled ratio.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch



def label_patch(x: int, y: int, height: int, ref_size: int = 32) -> tuple[slice, slice]:
    """The (rows, cols) patch of a label at a map of `height` tokens, the reference's scaling."""
    scale = height / ref_size
    side = max(1, int(2 * scale))
    r, c = int(y * scale), int(x * scale)
    return slice(r, r + side), slice(c, c + side)


def relative_norms(norm_maps: np.ndarray, labels: np.ndarray, ref_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Relative norm per label, two references.

    norm_maps: (N, H, W) float32 indexed by labels[:, 0] (the labels' image index into norm_maps);
    labels: (L, 3) int (image, x, y). Returns (vs_mean (L,) — the paper's, vs_median_clean (L,) — Q9 fix)."""
    maps = np.asarray(norm_maps, dtype=np.float32)
    height = maps.shape[1]
    vs_mean = np.empty(len(labels))
    vs_median = np.empty(len(labels))
    clean = np.ones(maps.shape, dtype=bool)
    for img, x, y in labels:
        rows, cols = label_patch(int(x), int(y), height, ref_size)
        clean[img, rows, cols] = False
    for i, (img, x, y) in enumerate(labels):
        rows, cols = label_patch(int(x), int(y), height, ref_size)
        patch = float(torch.from_numpy(maps[img, rows, cols]).mean())
        vs_mean[i] = patch / float(torch.from_numpy(maps[img]).mean())
        vs_median[i] = patch / float(np.median(maps[img][clean[img]]))
    return vs_mean, vs_median


def anomaly_rows(vs_mean: np.ndarray, vs_median: np.ndarray) -> list[dict]:
    """Tidy rows (without model/block/order): mean and population std over labels of both references."""
    rows = []
    for variant, values in (("vs_mean", vs_mean), ("vs_median_clean", vs_median)):
        for stat, fn in (("mean", np.mean), ("std", np.std)):
            rows.append({"metric": "anomalies", "statistic": f"rel_norm_{stat}", "variant": variant,
                         "value": float(fn(values)) if len(values) else float("nan")})
    rows.append({"metric": "anomalies", "statistic": "n_labels", "variant": "labels", "value": float(len(vs_mean))})
    return rows


def pooled_ratios(norm_maps: np.ndarray | torch.Tensor) -> np.ndarray:
    """(N, H, W) norms -> (N, H//2, W//2) float32: aligned 2×2 mean of norm / the image's median norm."""
    maps = np.asarray(norm_maps, dtype=np.float32)
    median = np.maximum(np.median(maps.reshape(len(maps), -1), axis=1), 1e-30)  # (N,)
    rel = maps / median[:, None, None].astype(np.float32)
    n, h, w = rel.shape
    return rel[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))


def robust_threshold(pooled: np.ndarray, k: float = 6.0, min_ratio: float = 1.5) -> float:
    """max(min_ratio, median + k * 1.4826 * MAD) over all pooled cells."""
    values = np.asarray(pooled, dtype=np.float64).ravel()
    med = np.median(values)
    mad = np.median(np.abs(values - med))
    return float(max(min_ratio, med + k * 1.4826 * mad))


def _components(mask: np.ndarray) -> Iterable[list[tuple[int, int]]]:
    """4-connected components of a small 2-D bool mask (flood fill)."""
    seen = np.zeros_like(mask)
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, comp = [start], []
        seen[start] = True
        while stack:
            i, j = stack.pop()
            comp.append((i, j))
            for a, b in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
                if 0 <= a < mask.shape[0] and 0 <= b < mask.shape[1] and mask[a, b] and not seen[a, b]:
                    seen[a, b] = True
                    stack.append((a, b))
        yield comp


def detect(pooled: np.ndarray, threshold: float, sample_offset: int = 0) -> np.ndarray:
    """Anomalies in pooled ratio maps (N, h, w): (M, 4) float64 rows (sample, x, y, peak_ratio), x/y in tokens
    of the unpooled map (upper-left of the 2×2 cell), sample = sample_offset + index in `pooled`."""
    found = []
    for s, cells in enumerate(np.asarray(pooled)):
        for comp in _components(cells > threshold):
            i, j = max(comp, key=lambda ij: cells[ij])
            found.append((sample_offset + s, 2 * j, 2 * i, float(cells[i, j])))
    return np.array(found, dtype=np.float64).reshape(-1, 4)


def match(detected: np.ndarray, labels: np.ndarray, tolerance: int = 2) -> dict[str, float]:
    """Precision/recall of detections against labels: same sample and |dx|, |dy| <= tolerance tokens, one-to-one
    (greedy in label order)."""
    used = np.zeros(len(detected), dtype=bool)
    hits = 0
    for img, x, y in np.asarray(labels):
        near = (~used & (detected[:, 0] == img) & (np.abs(detected[:, 1] - x) <= tolerance)
                & (np.abs(detected[:, 2] - y) <= tolerance)) if len(detected) else np.zeros(0, dtype=bool)
        if near.any():
            used[np.flatnonzero(near)[0]] = True
            hits += 1
    precision = hits / len(detected) if len(detected) else float("nan")
    recall = hits / len(labels) if len(labels) else float("nan")
    return {"precision": precision, "recall": recall, "n_detected": float(len(detected)),
            "n_labels": float(len(labels)), "matched": float(hits)}
