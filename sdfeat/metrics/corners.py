"""Metric 2: corner / border token similarity (reference `run_token_group_similarities`).

Per image, the cosine similarity of every token pair of an m×m map (m = n-2) is summarised per group: corner
(the 4 corner tokens), border (edge tokens without corners), other (interior). Two maps over the same content:
*cropped* (the image cropped by one token, `crop = resolution // n` px, extracted again; stored at
`crops/<margin>/<block>`) and *reprcropped* (the full image's map with its outer ring removed). Group mean
G[g,h] = sum of cos(a, b) over ordered pairs a in g, b in h, a ≠ b, pooled over images / number of such pairs.
The paper plots G_cropped[g,g] / G_reprcropped[g,g] for corner and border.

Sums are computed without the (m²)² similarity matrix: with unit tokens u (fp32 norms, zero tokens -> 0) and
group sums U_g = Σ_{a∈g} u_a (float64), Σ_{a∈g, b∈h} u_a·u_b = U_g·U_h; the diagonal Σ|u_a|² is subtracted for
g = h. Mathematically the reference's pairwise sum; numerically within ~1e-7.

`paper_counts=True` reproduces quirk Q3: the reference counts pairs (and subtracts self-similarities by count) as
if the map were n×n, i.e. corner 4, border 4m, other m² tokens instead of 4, 4(m-2), (m-2)².
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

GROUPS: tuple[str, ...] = ("corner", "border", "other")
CORNERS: tuple[str, ...] = ("top_left", "top_right", "bottom_left", "bottom_right")
VARIANTS: tuple[str, ...] = ("cropped", "reprcropped")


def group_masks(m: int) -> torch.Tensor:
    """(3, m, m) bool masks of corner, border, other on an m×m map (m >= 2)."""
    corner = torch.zeros(m, m, dtype=torch.bool)
    corner[[0, 0, -1, -1], [0, -1, 0, -1]] = True
    edge = torch.zeros(m, m, dtype=torch.bool)
    edge[[0, -1], :] = True
    edge[:, [0, -1]] = True
    return torch.stack([corner, edge & ~corner, ~edge])


def group_sizes(m: int, paper_counts: bool = False) -> np.ndarray:
    """Tokens per group (3,); with paper_counts the reference's n-based counts (n = m + 2)."""
    if paper_counts:
        return np.array([4, 4 * m, m * m], dtype=np.int64)
    return np.array([4, 4 * (m - 2), (m - 2) ** 2], dtype=np.int64)


def pair_counts(m: int) -> np.ndarray:
    """(3, 3) ordered pairs a ≠ b with a in g, b in h, per image."""
    k = group_sizes(m)
    return np.outer(k, k) - np.diag(k)


@functools.lru_cache(maxsize=64)
def _device_constants(m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The group masks (3, m*m) float64 and the corner token indices (4,) of an m×m map, made on `device` once:
    a copy from the host per batch would make the host wait for the device (extraction summaries)."""
    masks = group_masks(m).flatten(1).double().to(device)
    return masks, torch.tensor([0, m - 1, (m - 1) * m, m * m - 1], device=device)


@functools.lru_cache(maxsize=64)
def device_pair_counts(m: int, device: torch.device) -> torch.Tensor:
    """`pair_counts(m)` as an int64 tensor on `device`, made once per (m, device)."""
    return torch.as_tensor(pair_counts(m), device=device)


def group_similarity_sums(acts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image pair sums of cosine similarity on an m×m map; any device.

    acts (B, C, m, m) -> {"groups": (B, 3, 3) float64 sums over pairs a ≠ b,
                           "groups_diag": (B, 3) float64 sums of cos(a, a) (1 per nonzero token),
                           "corner_groups": (B, 4, 3) float64: corner c with every other token of group h}."""
    b, c, m, _ = acts.shape
    x = acts.float()
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)  # (B, C, m, m), fp32 like the reference
    unit = unit.flatten(2).double()  # (B, C, m*m)
    masks, corner_idx = _device_constants(m, acts.device)  # (3, m*m) float64, (4,) int64
    sums = torch.einsum("bct,gt->bgc", unit, masks)  # (B, 3, C) U_g
    self_sim = (unit * unit).sum(1)  # (B, m*m) |u_a|^2
    diag = self_sim @ masks.T  # (B, 3)
    groups = torch.einsum("bgc,bhc->bgh", sums, sums) - torch.diag_embed(diag)
    corner_units = unit[:, :, corner_idx]  # (B, C, 4)
    corner_groups = torch.einsum("bck,bgc->bkg", corner_units, sums)
    corner_groups[:, :, 0] -= self_sim[:, corner_idx]  # exclude a = b for corner with its own group
    return {"groups": groups, "groups_diag": diag, "corner_groups": corner_groups}


@dataclass
class GroupTotals:
    """Pooled sums over images for one variant of one block."""

    m: int
    n_images: int
    groups: np.ndarray  # (3, 3) float64
    groups_diag: np.ndarray  # (3,)
    corner_groups: np.ndarray  # (4, 3)

    @classmethod
    def empty(cls, m: int) -> "GroupTotals":
        return cls(m, 0, np.zeros((3, 3)), np.zeros(3), np.zeros((4, 3)))

    def add(self, sums: dict[str, torch.Tensor | np.ndarray]) -> None:
        """Add per-image sums (from `group_similarity_sums` or summaries), shapes (B, ...)."""
        groups = np.asarray(sums["groups"], dtype=np.float64)
        self.n_images += len(groups)
        self.groups += groups.sum(0)
        self.groups_diag += np.asarray(sums["groups_diag"], dtype=np.float64).sum(0)
        self.corner_groups += np.asarray(sums["corner_groups"], dtype=np.float64).sum(0)


def group_means(t: GroupTotals, paper_counts: bool = False) -> np.ndarray:
    """(3, 3) G[g, h]: mean similarity over ordered pairs a ≠ b, pooled over images.

    paper_counts: the reference's formula (Σ_all - k_q)/(k_q² - k_q) on the diagonal, Σ/(k_q,g·k_q,h) off it,
    with k_q the n-based group sizes (Q3)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        if not paper_counts:
            return t.groups / (t.n_images * pair_counts(t.m))
        k = group_sizes(t.m, paper_counts=True).astype(np.float64)
        total = t.groups + np.diag(t.groups_diag)  # pair sums including a = b, as the reference sums them
        count = np.outer(k, k) * t.n_images
        self_count = np.diag(k) * t.n_images
        return (total - self_count) / (count - self_count)


def corner_means(t: GroupTotals) -> np.ndarray:
    """(4, 3) mean similarity of each corner token with the other tokens of each group."""
    k = group_sizes(t.m).astype(np.float64)
    counts = np.tile(k, (4, 1))
    counts[:, 0] -= 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return t.corner_groups / (t.n_images * counts)


def inner(acts: torch.Tensor) -> torch.Tensor:
    """(B, C, n, n) -> (B, C, n-2, n-2): the full map with its outer ring removed (the reprcropped content)."""
    return acts[:, :, 1:-1, 1:-1]


def corner_rows(cropped: GroupTotals, reprcropped: GroupTotals, paper_counts: bool = False) -> list[dict]:
    """Tidy rows (without model/block/order): group means per variant (all 3×3), per-corner means, ratios."""
    rows: list[dict] = []
    means = {"cropped": group_means(cropped, paper_counts), "reprcropped": group_means(reprcropped, paper_counts)}
    per_corner = {"cropped": corner_means(cropped), "reprcropped": corner_means(reprcropped)}
    for variant in VARIANTS:
        for i, g in enumerate(GROUPS):
            for j, h in enumerate(GROUPS):
                name = g if i == j else f"{g}|{h}"
                rows.append({"metric": "corners", "statistic": "group_mean", "group": name, "variant": variant,
                             "value": float(means[variant][i, j])})
        for c, corner in enumerate(CORNERS):
            for j, h in enumerate(GROUPS):
                rows.append({"metric": "corners", "statistic": "corner_mean", "group": f"{corner}|{h}",
                             "variant": variant, "value": float(per_corner[variant][c, j])})
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = means["cropped"] / means["reprcropped"]
        corner_ratio = per_corner["cropped"][:, 0] / per_corner["reprcropped"][:, 0]
    for i, g in enumerate(GROUPS):
        rows.append({"metric": "corners", "statistic": "ratio", "group": g, "variant": "cropped/reprcropped",
                     "value": float(ratio[i, i])})
    for c, corner in enumerate(CORNERS):
        rows.append({"metric": "corners", "statistic": "ratio", "group": f"{corner}|corner",
                     "variant": "cropped/reprcropped", "value": float(corner_ratio[c])})
    for r in rows:
        r["paper_counts"] = paper_counts
    return rows
