"""From pixels to the U-Net's input: VAE encoding, latent sample, noise, timestep scaling.

Two protocols (see PROTOCOL.md):
- `paper` reproduces sdhelper 1.0.0, quirks included: pixels / 255 (Q1), the latent sample and one noise field for
  the whole batch from the global RNG seeded per batch (Q4), and the pipeline scheduler's `scale_model_input`
  on top of DDIM's `add_noise` (Q2: SD-Turbo's Euler scheduler divides by sqrt(sigma^2 + 1) once more).
- `standard`: pixels * 2 / 255 - 1; the latent's eps and the noise come from CPU generators seeded by a stable
  hash of (seed, sample id, tag), so every sample's input is a pure function of (seed, sample id, timestep),
  independent of batch size, device, worker and retries; no second scaling.

`extract` calls `encode` once per image batch, `noisy_latents` once per seed; the latent sample is drawn once per
(image, seed) and its noise reused across timesteps.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from sdfeat.errors import SpecError
from sdfeat.models import LoadedModel

PROTOCOLS = ("paper", "standard")


def _check(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise SpecError(f"protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")


def vae_input(pixels: torch.Tensor, protocol: str, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> (B, 3, H, W) in `dtype`: [0, 1] under paper (Q1), [-1, 1] under standard."""
    _check(protocol)
    x = pixels.permute(0, 3, 1, 2).to(torch.float32)  # (B, 3, H, W)
    x = x / 255 if protocol == "paper" else x * 2 / 255 - 1
    return x.to(dtype)


def encode(model: LoadedModel, pixels: torch.Tensor, protocol: str):
    """The VAE posterior (a DiagonalGaussianDistribution over (B, 4, H/8, W/8)) of uint8 pixels (B, H, W, 3)."""
    x = vae_input(pixels.to(model.device), protocol, model.vae.dtype)  # (B, 3, H, W), strides of (B, H, W, 3)
    if model.device.type == "cuda":
        x = x.contiguous()  # the contiguous VAE is faster on a GPU; on a CPU keep sdhelper's layout (bit-exact)
    with torch.inference_mode():
        return model.vae.encode(x).latent_dist


def sample_generator(seed: int, sample_id: str, tag: str) -> torch.Generator:
    """A CPU generator seeded by a stable hash of (seed, sample id, tag); tags separate the latent eps ("latent")
    from the noise ("noise"). Python's hash() is salted per process, so blake2b is used."""
    digest = hashlib.blake2b(f"{seed}\x00{sample_id}\x00{tag}".encode(), digest_size=8).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _per_sample_randn(seed: int, sample_ids: Sequence[str], tag: str, shape: torch.Size) -> torch.Tensor:
    """(B, *shape) float32 on CPU; row i depends on (seed, sample_ids[i], tag) only."""
    return torch.stack([torch.randn(shape, generator=sample_generator(seed, sid, tag)) for sid in sample_ids])


def _scale_for_unet(model: LoadedModel, latents: torch.Tensor, timestep: int) -> torch.Tensor:
    """The pipeline scheduler's `scale_model_input` at `timestep` (identity for PNDM/DDIM, / sqrt(sigma^2+1) for
    Euler). Euler needs its timesteps set and a fresh step index, so the full training schedule is set each time."""
    scheduler = model.scheduler
    scheduler.set_timesteps(scheduler.config.num_train_timesteps, device=latents.device)
    return scheduler.scale_model_input(latents, timestep)


def noisy_latents(model: LoadedModel, dist, protocol: str, seed: int, sample_ids: Sequence[str],
                  timesteps: Sequence[int]) -> dict[int, torch.Tensor]:
    """{timestep: U-Net input (B, 4, h, w)} for the posteriors `dist` of the images `sample_ids` under `seed`."""
    _check(protocol)
    if len(sample_ids) != dist.mean.shape[0]:
        raise ValueError(f"sample_ids: {len(sample_ids)} ids for a batch of {dist.mean.shape[0]} latents")
    with torch.inference_mode():
        if protocol == "paper":
            torch.manual_seed(seed)
            latents = dist.sample() * model.scaling_factor  # (B, 4, h, w), consumes the global RNG first (Q4)
            noise = torch.randn_like(latents[0:1]).expand(latents.shape)  # one field for the batch (Q4)
        else:
            mean, std = dist.mean, dist.std  # (B, 4, h, w)
            eps = _per_sample_randn(seed, sample_ids, "latent", mean.shape[1:]).to(mean.device, mean.dtype)
            latents = (mean + std * eps) * model.scaling_factor
            noise = _per_sample_randn(seed, sample_ids, "noise", mean.shape[1:]).to(latents.device, latents.dtype)
        inputs = {}
        for t in timesteps:
            noisy = model.noise_scheduler.add_noise(latents, noise, torch.tensor([t], device=latents.device))
            inputs[t] = _scale_for_unet(model, noisy, t) if protocol == "paper" else noisy
        return inputs
