"""The VAE precision rule of the families, and when two families' latents are the same bytes.

**Precision.** SDXL's VAE overflows in float16 (its activations exceed 65504 and turn into inf/NaN). diffusers marks
such VAEs with the config flag `force_upcast` (default True when the key is absent) and its SDXL pipelines run the
VAE in float32 whenever the flag is set, encoding included (`StableDiffusionXLImg2ImgPipeline.prepare_latents`).
sdfeat does the same: `vae_dtype` gives float32 for a VAE with `force_upcast` under any compute dtype narrower than
float32 (float16 and bfloat16), else the compute dtype; the latents are cast to the compute dtype afterwards. The
community "fp16-fix" SDXL VAE (`force_upcast: false`) is a re-trained VAE with other weights, hence other latents:
sdfeat never substitutes it; a user who wants it passes it as the model's VAE and gets other latents, and the
latent cache keeps them apart (below).

**Sharing latents.** sdfeat's latent cache is keyed by a digest of the VAE *encoder* weights as computed with
(after any rounding and the cast to the VAE's dtype), plus pixel preprocessing, resolution, crop margin and sample
id. DiT-XL/2 ships an SD VAE (`stabilityai/sd-vae-ft-ema` per diffusers' conversion script); the ft-EMA/ft-MSE VAEs
fine-tuned only the decoder of the original SD VAE, so their encoder digest is expected to equal SD-1.x's and a DiT
job at the same resolution, preprocessing and VAE dtype reuses SD-1.x's cached latents unchanged; a different
digest (other weights, or another VAE dtype from `vae_dtype`) keeps them apart. Nothing here assumes it: the digest
decides. Imports torch only inside `vae_dtype`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def vae_dtype(vae_config: Mapping[str, Any], compute_dtype: Any) -> Any:
    """The dtype the VAE runs in for a job computing in `compute_dtype`: float32 where the config's `force_upcast`
    (diffusers' default: True) is set and `compute_dtype` is narrower than float32, else `compute_dtype`."""
    import torch

    if not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point:
        raise TypeError(f"compute_dtype: expected a floating torch.dtype, got {compute_dtype!r}")
    narrower = compute_dtype.itemsize < torch.float32.itemsize
    return torch.float32 if narrower and bool(vae_config.get("force_upcast", True)) else compute_dtype
