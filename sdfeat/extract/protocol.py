"""From pixels to the U-Net's input: VAE encoding, latent sample, noise, timestep scaling.

Two protocols (see PROTOCOL.md):
- `paper` reproduces sdhelper 1.0.0, quirks included: pixels / 255 (Q1), the latent sample and one noise field for
  the whole batch from the global RNG seeded per batch (Q4), and the pipeline scheduler's `scale_model_input`
  on top of DDIM's `add_noise` (Q2: SD-Turbo's Euler scheduler divides by sqrt(sigma^2 + 1) once more).
- `standard`: pixels * 2 / 255 - 1; the latent's eps and the noise come from CPU generators seeded by a stable
  hash of (seed, sample id, tag), so every sample's input is a pure function of (seed, sample id, timestep),
  independent of batch size, device, worker and retries; no second scaling.

The worker calls `encode` once per image batch, `noisy_latents` once per seed; the latent sample is drawn once per
(image, seed) and its noise reused across timesteps. Nothing here makes the host wait for the device: `standard`'s
draws come from the host ahead of time (`standard_noise`), timesteps are device tensors made once (`Schedule`).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence

import torch

from sdfeat.errors import SpecError
from sdfeat.models.loading import LoadedModel
from sdfeat.spec import PROTOCOLS



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
        dist = model.vae.encode(x).latent_dist
        if dist.parameters.dtype != model.dtype:  # a VAE upcast for precision (SDXL's): latents in the compute dtype
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

            dist = DiagonalGaussianDistribution(dist.parameters.to(model.dtype))
        return dist


def sample_generator(seed: int, sample_id: str, tag: str) -> torch.Generator:
    """A CPU generator seeded by a stable hash of (seed, sample id, tag); tags separate the latent eps ("latent")
    from the noise ("noise"). Python's hash() is salted per process, so blake2b is used."""
    digest = hashlib.blake2b(f"{seed}\x00{sample_id}\x00{tag}".encode(), digest_size=8).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _per_sample_randn(seed: int, sample_ids: Sequence[str], tag: str, shape: Sequence[int]) -> torch.Tensor:
    """(B, *shape) float32 on CPU; row i depends on (seed, sample_ids[i], tag) only."""
    return torch.stack([torch.randn(tuple(shape), generator=sample_generator(seed, sid, tag)) for sid in sample_ids])


def standard_noise(seed: int, sample_ids: Sequence[str], shape: Sequence[int],
                   pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`standard`'s draws for a batch: (latent eps, noise), each (B, *shape) float32 on the host (pinned with `pin`,
    for an asynchronous copy). Drawn ahead of the device by the feeder (`feed.Feeder`), as the device never waits
    for the CPU generators."""
    eps, noise = (_per_sample_randn(seed, sample_ids, tag, shape) for tag in ("latent", "noise"))
    return (eps.pin_memory(), noise.pin_memory()) if pin else (eps, noise)


class Schedule:
    """The per-timestep constants of a job, made once on `device`: each timestep as an int64 tensor (for the noise
    scheduler's `add_noise` and the U-Net: a Python int there becomes a host->device copy per call) and, under
    `paper`, the pipeline scheduler prepared for `scale_model_input` at that timestep (Euler reads its step index
    from the device once, here, instead of per batch)."""

    def __init__(self, model: LoadedModel, protocol: str, timesteps: Sequence[int], device: torch.device) -> None:
        _check(protocol)
        self.protocol = protocol
        self.timestep = {t: torch.tensor([t], dtype=torch.int64, device=device) for t in timesteps}
        # DDIM's add_noise moves its table to the samples' device on first use: here, not in the first batch
        noise_scheduler = model.noise_scheduler
        noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
        self._scalers = {}
        if protocol == "paper":
            probe = torch.zeros(1, device=device)
            for t in timesteps:
                scheduler = copy.deepcopy(model.scheduler)
                # the full training schedule and a fresh step index at t, as the pipeline's scheduler would be
                scheduler.set_timesteps(scheduler.config.num_train_timesteps, device=device)
                scheduler.scale_model_input(probe, t)
                self._scalers[t] = scheduler

    def unet_input(self, noisy: torch.Tensor, timestep: int) -> torch.Tensor:
        """The U-Net's input at `timestep`: `noisy` itself, or under `paper` the pipeline scheduler's
        `scale_model_input` on top (Q2)."""
        scaler = self._scalers.get(timestep)
        return noisy if scaler is None else scaler.scale_model_input(noisy, timestep)


def noisy_latents(model: LoadedModel, dist, protocol: str, seed: int, sample_ids: Sequence[str],
                  timesteps: Sequence[int], *, schedule: Schedule | None = None,
                  noise: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """{timestep: U-Net input (B, 4, h, w)} for the posteriors `dist` of the images `sample_ids` under `seed`.

    `schedule`: the job's `Schedule` (made here when None); `noise`: `standard`'s host draws for this batch
    (`standard_noise`, drawn here when None)."""
    _check(protocol)
    if len(sample_ids) != dist.mean.shape[0]:
        raise ValueError(f"sample_ids: {len(sample_ids)} ids for a batch of {dist.mean.shape[0]} latents")
    schedule = schedule or Schedule(model, protocol, timesteps, dist.mean.device)
    with torch.inference_mode():
        if protocol == "paper":
            torch.manual_seed(seed)
            latents = dist.sample() * model.scaling_factor  # (B, 4, h, w), consumes the global RNG first (Q4)
            field = torch.randn_like(latents[0:1]).expand(latents.shape)  # one field for the batch (Q4)
        else:
            mean, std = dist.mean, dist.std  # (B, 4, h, w)
            eps, field = noise if noise is not None else standard_noise(seed, sample_ids, mean.shape[1:])
            # up in float32 (an asynchronous copy from pinned memory), cast on the device: a copy that also casts
            # would cast on the host into pageable memory, and a pageable copy waits for the device
            eps = eps.to(mean.device, non_blocking=True).to(mean.dtype)
            latents = (mean + std * eps) * model.scaling_factor
            field = field.to(latents.device, non_blocking=True).to(latents.dtype)
        inputs = {}
        for t in timesteps:
            noisy = model.noise_scheduler.add_noise(latents, field, schedule.timestep[t])
            inputs[t] = schedule.unet_input(noisy, t)
        return inputs
