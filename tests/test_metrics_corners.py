"""Corner/border group similarities against hand-computed values and a pairwise transcription of the reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metrics_helpers import one_torch_thread  # noqa: F401  (autouse fixture)

from sdfeat.metrics.corners import (GroupTotals, corner_means, corner_rows, group_means, group_similarity_sums,
                                    inner)


def angle_map(angles: np.ndarray) -> torch.Tensor:
    """(m, m) angles -> (1, 2, m, m) unit 2-D tokens, so cos(a, b) = cos(angle_a - angle_b)."""
    a = torch.as_tensor(angles, dtype=torch.float64)
    return torch.stack([torch.cos(a), torch.sin(a)])[None].float()


def totals(acts: torch.Tensor) -> GroupTotals:
    t = GroupTotals.empty(acts.shape[-1])
    t.add(group_similarity_sums(acts))
    return t


# A 4×4 map: corners at angle 0 except top-left at 90°, the 8 border tokens at 60°, the 4 interior at 0.
ANGLES = np.zeros((4, 4))
ANGLES[0, 1:3] = ANGLES[3, 1:3] = ANGLES[1:3, 0] = ANGLES[1:3, 3] = math.pi / 3
ANGLES[0, 0] = math.pi / 2


def test_group_means_by_hand() -> None:
    g = group_means(totals(angle_map(ANGLES)))
    # corner: 12 ordered pairs; the 6 involving top-left have cos 0, the other 6 cos 1
    assert g[0, 0] == pytest.approx(0.5, abs=1e-6)
    assert g[1, 1] == pytest.approx(1.0, abs=1e-6)  # border all equal
    assert g[2, 2] == pytest.approx(1.0, abs=1e-6)  # interior all equal
    # corner|border: 3 corners at 0 vs 60° (cos 1/2), top-left vs 60° (cos 30° = √3/2); 4·8 pairs
    assert g[0, 1] == pytest.approx((3 * 0.5 + math.sqrt(3) / 2) / 4, abs=1e-6)
    assert g[1, 0] == pytest.approx(g[0, 1], abs=1e-9)
    # corner|other: 3 corners cos 1, top-left cos 0
    assert g[0, 2] == pytest.approx(0.75, abs=1e-6)
    per_corner = corner_means(totals(angle_map(ANGLES)))
    assert per_corner[0, 0] == pytest.approx(0.0, abs=1e-6)  # top-left vs the other three corners
    assert per_corner[1, 0] == pytest.approx(2 / 3, abs=1e-6)  # top-right: cos 0, 1, 1
    assert per_corner[0, 2] == pytest.approx(0.0, abs=1e-6)  # top-left vs interior


def test_paper_counts_by_hand() -> None:
    # Q3: counts as if the map were n = m + 2 = 6: corner 4, border 4m = 16, other m² = 16 tokens.
    g = group_means(totals(angle_map(ANGLES)), paper_counts=True)
    # corner unaffected: (Σ incl. self - 4) / (16 - 4) = (6 + 4 - 4) / 12
    assert g[0, 0] == pytest.approx(0.5, abs=1e-6)
    # border: all 8·8 = 64 pairs incl. self have cos 1 -> (64 - 16) / (256 - 16)
    assert g[1, 1] == pytest.approx(48 / 240, abs=1e-6)
    # other: 16 pairs incl. self -> (16 - 16) / (256 - 16)
    assert g[2, 2] == pytest.approx(0.0, abs=1e-6)
    # corner|other: Σ = 4·(3·1 + 0) = 12 over 4·16 pairs
    assert g[0, 2] == pytest.approx(12 / 64, abs=1e-6)


def test_ratio_cropped_vs_reprcropped() -> None:
    full = torch.zeros(1, 2, 6, 6)
    full[:, :, 1:-1, 1:-1] = angle_map(ANGLES)
    ring = torch.ones(6, 6, dtype=torch.bool)
    ring[1:-1, 1:-1] = False
    full[:, :, ring] = torch.randn(1, 2, int(ring.sum()), generator=torch.Generator().manual_seed(0))
    # the outer ring holds arbitrary tokens: they must not enter the reprcropped sums
    crop = angle_map(np.where(ANGLES == math.pi / 2, 0.0, ANGLES))  # crop's corners all aligned
    rows = corner_rows(totals(crop), totals(inner(full)))
    ratio = {r["group"]: r["value"] for r in rows if r["statistic"] == "ratio"}
    assert ratio["corner"] == pytest.approx(1.0 / 0.5, abs=1e-5)
    assert ratio["border"] == pytest.approx(1.0, abs=1e-5)
    assert ratio["top_right|corner"] == pytest.approx(1.0 / (2 / 3), abs=1e-5)
    assert {r["variant"] for r in rows} == {"cropped", "reprcropped", "cropped/reprcropped"}


def reference_group_means(sim: np.ndarray, n: int) -> np.ndarray:
    """Transcription of the reference's loop: sim (N, m, m, m, m) pairwise cosine similarities; counts from n."""
    corner = [(a, b) for a in (0, -1) for b in (0, -1)]
    border = [(slice(1, -1), 0), (slice(1, -1), -1), (0, slice(1, -1)), (-1, slice(1, -1))]
    other = [(slice(1, -1), slice(1, -1))]
    groups = [corner, border, other]
    out = np.zeros((3, 3))
    ones4, ones2 = np.ones((n, n, n, n)), np.ones((n, n))
    for i, s1 in enumerate(groups):
        for j, s2 in enumerate(groups):
            count = sum(ones4[a, b, c, d].sum() for a, b in s1 for c, d in s2) * len(sim)
            selfs = sum(ones2[a, b].sum() for a, b in s1) * len(sim) if i == j else 0
            total = sum(sim[:, a, b, c, d].sum() for a, b in s1 for c, d in s2)
            out[i, j] = (total - selfs) / (count - selfs)
    return out


@pytest.mark.parametrize("m", [4, 5, 7])
def test_matches_reference_pairwise(m: int) -> None:
    acts = torch.randn(3, 7, m, m, generator=torch.Generator().manual_seed(m))
    unit = (acts / acts.norm(dim=1, keepdim=True)).double().numpy()
    sim = np.einsum("nchw,ncij->nhwij", unit, unit)  # (N, m, m, m, m)
    t = totals(acts)
    np.testing.assert_allclose(group_means(t, paper_counts=True), reference_group_means(sim, m + 2), atol=1e-6)
    np.testing.assert_allclose(group_means(t), reference_group_means(sim, m), atol=1e-6)  # counts fixed = n-2


def test_pooling_over_batches_equals_one_batch() -> None:
    acts = torch.randn(5, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    whole, parts = totals(acts), GroupTotals.empty(5)
    parts.add(group_similarity_sums(acts[:2]))
    parts.add(group_similarity_sums(acts[2:]))
    np.testing.assert_allclose(group_means(parts), group_means(whole), rtol=1e-12)
