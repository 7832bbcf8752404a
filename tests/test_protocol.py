"""The paper and standard protocols: VAE input, latent sample, noise, timestep scaling (PROTOCOL.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from sdfeat.errors import SpecError
from sdfeat.extract.protocol import encode, noisy_latents, sample_generator, vae_input
from modelkit import pixels, tiny_model

IDS = ["a.jpg", "b.jpg", "c.jpg"]


def _alpha_bar(t: int) -> float:
    """ᾱ_t of SD's scaled_linear schedule, computed here from the betas."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return float(np.cumprod(1 - betas)[t])


def _fixed_dist(mean: torch.Tensor) -> DiagonalGaussianDistribution:
    """A posterior with std 0: its sample is `mean` (it still draws from the global RNG, as the VAE's does)."""
    return DiagonalGaussianDistribution(torch.cat([mean, torch.zeros_like(mean)], dim=1), deterministic=True)


def _zeros(batch: int) -> DiagonalGaussianDistribution:
    return _fixed_dist(torch.zeros(batch, 4, 8, 8))


def test_vae_input_ranges_q1() -> None:
    px = pixels(2, 16)
    paper, standard = vae_input(px, "paper", torch.float32), vae_input(px, "standard", torch.float32)
    assert paper.shape == (2, 3, 16, 16)
    assert torch.equal(paper, px.permute(0, 3, 1, 2).float() / 255)
    assert torch.allclose(standard, px.permute(0, 3, 1, 2).float() / 127.5 - 1, atol=1e-6)
    assert torch.allclose(paper * 2 - 1, standard, atol=1e-6)  # Q1 undone, the two agree
    assert vae_input(px, "paper", torch.float16).dtype == torch.float16
    with pytest.raises(SpecError, match="protocol 'papers'"):
        vae_input(px, "papers", torch.float32)


def test_encode_feeds_the_vae_the_protocols_input() -> None:
    model, px = tiny_model(), pixels(2, 64)
    with torch.no_grad():
        expected = model.vae.encode(px.permute(0, 3, 1, 2).float() / 255).latent_dist
    got = encode(model, px, "paper")
    assert got.mean.shape == (2, 4, 8, 8)
    assert torch.equal(got.mean, expected.mean) and torch.equal(got.std, expected.std)
    assert not torch.equal(encode(model, px, "standard").mean, got.mean)


def test_paper_matches_sdhelpers_loop_for_one_batch() -> None:
    model, px, t = tiny_model(), pixels(3, 64), 50
    got = noisy_latents(model, encode(model, px, "paper"), "paper", 42, IDS, [t])[t]
    # sdhelper 1.0.0, written out by hand
    torch.manual_seed(42)
    with torch.no_grad():
        x = px.permute(0, 3, 1, 2).float() / 255
        latents = model.vae.encode(x).latent_dist.sample() * model.vae.config.scaling_factor
        noise = torch.randn_like(latents[0:1]).expand(latents.shape)
        latents = DDIMScheduler.from_config(model.scheduler.config).add_noise(latents, noise, torch.tensor(t))
        expected = model.scheduler.scale_model_input(latents, t)
    assert torch.equal(got, expected)


def test_add_noise_coefficients_at_t50() -> None:
    model, mean = tiny_model(), torch.randn(3, 4, 8, 8)
    got = noisy_latents(model, _fixed_dist(mean), "standard", 7, IDS, [50])[50]
    noise = torch.stack([torch.randn(4, 8, 8, generator=sample_generator(7, sid, "noise")) for sid in IDS])
    a = _alpha_bar(50)
    assert a**0.5 == pytest.approx(0.9755, abs=5e-5) and (1 - a) ** 0.5 == pytest.approx(0.2201, abs=5e-5)
    assert torch.allclose(got, a**0.5 * 0.18215 * mean + (1 - a) ** 0.5 * noise, atol=1e-6)


def test_paper_noise_is_one_field_per_batch_q4() -> None:
    model, t = tiny_model(), 50
    paper = noisy_latents(model, _zeros(3), "paper", 42, IDS, [t])[t]
    assert torch.equal(paper[0], paper[1]) and torch.equal(paper[0], paper[2])
    # the VAE sample consumes the RNG first, so the shared field depends on the batch size
    alone = noisy_latents(model, _zeros(1), "paper", 42, IDS[:1], [t])[t]
    assert not torch.equal(alone[0], paper[0])
    standard = noisy_latents(model, _zeros(3), "standard", 42, IDS, [t])[t]
    assert not torch.equal(standard[0], standard[1])


def test_standard_is_batch_size_independent() -> None:
    model, px, timesteps = tiny_model(), pixels(3, 64), [50, 400]
    mean = torch.randn(3, 4, 8, 8)
    dist = DiagonalGaussianDistribution(torch.cat([mean, torch.full_like(mean, -1.0)], dim=1))
    together = noisy_latents(model, dist, "standard", 5, IDS, timesteps)
    for i, sid in enumerate(IDS):
        one = DiagonalGaussianDistribution(dist.parameters[i : i + 1])
        alone = noisy_latents(model, one, "standard", 5, [sid], timesteps)
        for t in timesteps:
            assert torch.equal(alone[t][0], together[t][i])
    # and through the VAE (batch 3 vs batches of 1; conv kernels may round differently per batch size)
    batch = noisy_latents(model, encode(model, px, "standard"), "standard", 5, IDS, [50])[50]
    singles = torch.cat([noisy_latents(model, encode(model, px[i : i + 1], "standard"), "standard", 5, [sid],
                                       [50])[50] for i, sid in enumerate(IDS)])
    assert torch.allclose(batch, singles, atol=1e-5)
    # the global RNG plays no part
    torch.manual_seed(0)
    again = noisy_latents(model, dist, "standard", 5, IDS, timesteps)
    assert all(torch.equal(again[t], together[t]) for t in timesteps)


def test_noise_is_reused_across_timesteps() -> None:
    model = tiny_model()
    for protocol in ("paper", "standard"):
        out = noisy_latents(model, _zeros(2), protocol, 3, IDS[:2], [10, 50, 500])
        fields = [out[t] / (1 - _alpha_bar(t)) ** 0.5 for t in (10, 50, 500)]
        assert torch.allclose(fields[0], fields[1], atol=1e-5) and torch.allclose(fields[0], fields[2], atol=1e-5)


def test_sdturbo_second_scaling_in_paper_mode_only_q2() -> None:
    sd15, turbo, t = tiny_model("sd15"), tiny_model("sdturbo"), 50
    dist = _fixed_dist(torch.randn(2, 4, 8, 8))
    factor = _alpha_bar(t) ** 0.5  # 1 / sqrt(sigma^2 + 1) with sigma^2 = (1 - ᾱ) / ᾱ
    assert factor == pytest.approx(0.9755, abs=5e-5)
    paper15 = noisy_latents(sd15, dist, "paper", 42, IDS[:2], [t])[t]
    paper_turbo = noisy_latents(turbo, dist, "paper", 42, IDS[:2], [t])[t]
    assert torch.allclose(paper_turbo, paper15 * factor, atol=1e-5)
    std15 = noisy_latents(sd15, dist, "standard", 42, IDS[:2], [t, 200])
    std_turbo = noisy_latents(turbo, dist, "standard", 42, IDS[:2], [t, 200])
    assert all(torch.equal(std15[k], std_turbo[k]) for k in (t, 200))
    # several timesteps in one call: each gets its own sigma
    two = noisy_latents(turbo, dist, "paper", 42, IDS[:2], [200, t])
    assert torch.equal(two[t], paper_turbo)


def test_sample_generator_is_stable_and_separates_tags() -> None:
    first = torch.randn(3, generator=sample_generator(42, "a.jpg", "noise"))
    assert torch.equal(first, torch.randn(3, generator=sample_generator(42, "a.jpg", "noise")))
    assert not torch.equal(first, torch.randn(3, generator=sample_generator(42, "a.jpg", "latent")))
    assert not torch.equal(first, torch.randn(3, generator=sample_generator(43, "a.jpg", "noise")))
    # pinned: the seed must not depend on the process (Python's hash() would)
    assert sample_generator(42, "a.jpg", "noise").initial_seed() == PINNED_SEED


def test_sample_ids_must_match_the_batch() -> None:
    with pytest.raises(ValueError, match="sample_ids"):
        noisy_latents(tiny_model(), _zeros(2), "standard", 0, IDS, [50])


PINNED_SEED = 7780923430769145710
