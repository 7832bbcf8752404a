"""Per-image summaries: metrics from summaries equal metrics from full tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from metrics_helpers import one_torch_thread  # noqa: F401  (autouse fixture)

from sdfeat.extract.summaries import sample_positions, summarize, token_positions
from sdfeat.metrics.anomalies import relative_norms
from sdfeat.metrics.corners import GroupTotals, group_means, group_similarity_sums, inner
from sdfeat.metrics.norms import token_norms
from sdfeat.metrics.position import ProbeSettings, probe_tokens
from sdfeat.planning.layout import summary_layout


@dataclass(frozen=True)
class Block:  # the fields of blocks.BlockInfo that summaries use
    name: str
    channels: int
    height: int
    width: int


def planted(n_images: int, n: int, channels: int) -> torch.Tensor:
    acts = torch.randn(n_images, channels, n, n, generator=torch.Generator().manual_seed(0)) * 0.5
    eye = torch.eye(n)
    acts[:, :n] += 20 * eye[:, :, None]
    acts[:, n:2 * n] += 20 * eye[:, None, :]
    return acts


def summarize_ids(acts: torch.Tensor, block: Block, ids: list[str], tokens: int, seed: int,
                  crop_acts: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    return summarize(acts, torch.from_numpy(sample_positions(seed, ids, block, tokens)), crop_acts)


def test_layout_matches_output() -> None:
    block = Block("b", 24, 8, 8)
    acts = torch.randn(3, 24, 8, 8)
    out = summarize_ids(acts, block, ["a", "b", "c"], 5, seed=1, crop_acts=torch.randn(3, 24, 6, 6))
    layout = summary_layout(block, 5, with_crop=True)
    assert set(out) == set(layout)
    for name, (shape, dtype) in layout.items():
        assert tuple(out[name].shape) == (3, *shape), name
        assert str(out[name].dtype).removeprefix("torch.") == dtype, name
    assert "groups" not in summary_layout(Block("s", 4, 2, 2), 5)


def test_positions_depend_only_on_seed_and_sample() -> None:
    a = token_positions(42, "img#1", 8, 8, 6)
    assert np.array_equal(a, token_positions(42, "img#1", 8, 8, 6))
    assert not np.array_equal(a, token_positions(42, "img#2", 8, 8, 6))
    assert len({tuple(p) for p in a}) == 6 and a.max() < 8
    acts = torch.randn(2, 4, 8, 8)
    together = summarize_ids(acts, Block("b", 4, 8, 8), ["x", "y"], 6, seed=42)["tokens"]
    alone = summarize_ids(acts[1:], Block("b", 4, 8, 8), ["y"], 6, seed=42)["tokens"]
    assert torch.equal(together[1], alone[0])  # batch-independent
    rows, cols = token_positions(42, "y", 8, 8, 6).T
    assert torch.equal(alone[0], acts[1, :, rows, cols].T.half())


def test_corners_and_anomalies_from_summaries_equal_full_tensors() -> None:
    acts = torch.randn(6, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    crop = torch.randn(6, 16, 6, 6, generator=torch.Generator().manual_seed(2))
    block = Block("b", 16, 8, 8)
    summ = summarize_ids(acts[:4], block, [str(i) for i in range(4)], 4, 0, crop[:4])
    summ2 = summarize_ids(acts[4:], block, ["4", "5"], 4, 0, crop[4:])
    for variant, prefix, full in (("repr", "", inner(acts)), ("crop", "crop_", crop)):
        from_summ, from_full = GroupTotals.empty(6), GroupTotals.empty(6)
        for s in (summ, summ2):
            from_summ.add({k: s[prefix + k] for k in ("groups", "groups_diag", "corner_groups")})
        from_full.add(group_similarity_sums(full))
        for paper in (False, True):
            # equal up to float64 summation order (pooled in two batches vs one)
            np.testing.assert_allclose(group_means(from_summ, paper), group_means(from_full, paper), rtol=1e-12)
    labels = np.array([[0, 4, 8], [5, 30, 2]])
    norms = np.concatenate([summ["norms"].numpy(), summ2["norms"].numpy()])
    np.testing.assert_array_equal(relative_norms(norms, labels), relative_norms(token_norms(acts).numpy(), labels))


def test_probe_on_sampled_tokens_reads_planted_codes() -> None:
    acts = planted(120, 8, 24)
    s = summarize_ids(acts, Block("b", 24, 8, 8), [f"s{i}" for i in range(120)], 32, seed=42)
    res = probe_tokens(s["tokens"].numpy(), s["token_yx"].numpy(), 8, ProbeSettings(lr=2e-2))
    assert res.epochs[-1].accuracy == {8: 1.0, 16: 1.0, 32: 1.0, 64: 1.0}


def test_group_sums_in_float32_would_stay_within_the_stated_bound() -> None:
    """The corner metric's pair sums are accumulated in float64 (unit vectors are float32, as the reference's):
    on a GPU that costs < 1 % of a batch, and it keeps stores byte-identical. The bound a float32 accumulation
    would give, stated here for whoever weighs that trade: relative error of the group means <= 1e-5."""
    acts = torch.randn(4, 320, 30, 30, generator=torch.Generator().manual_seed(3))  # a 32x32 map's inner part
    exact = group_similarity_sums(acts)
    x = acts.float()
    unit = (x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)).flatten(2)  # float32 throughout
    from sdfeat.metrics.corners import group_masks

    masks = group_masks(30).flatten(1).float()
    sums = torch.einsum("bct,gt->bgc", unit, masks)
    groups32 = torch.einsum("bgc,bhc->bgh", sums, sums) - torch.diag_embed((unit * unit).sum(1) @ masks.T)
    exact_means, fp32_means = GroupTotals.empty(30), GroupTotals.empty(30)
    exact_means.add(exact)
    fp32_means.add({"groups": groups32.double(), "groups_diag": exact["groups_diag"],
                    "corner_groups": exact["corner_groups"]})
    a, b = group_means(exact_means), group_means(fp32_means)
    relative = np.abs(a - b) / np.abs(a).max()
    assert relative.max() <= 1e-5
    assert relative.max() > 0  # float32 does round differently: the stored float64 bytes would change
