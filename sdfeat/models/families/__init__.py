"""Model families: what sdfeat must know about a kind of denoiser. The seam between "which model" and everything
that runs it: `blocks` (names, presets, shapes), `registry` (names, configs, weights), `loading` (components,
conditioning, the call) and `flops` ask the family of a model, never its architecture.

A family is one module here (`sd` for SD-1.x/2.x, `sdxl`, `dit`) with the same module-level names, listed once in
`FAMILIES`; adding a family is one module plus one entry there. The names, in two halves:

config side (no torch; `sdfeat blocks`, planning and the store template use it before anything heavy is imported)
  `NAME`, `REGISTRY` (short name -> hub id), `DENOISER` (the pipeline subfolder of the denoiser), `PROTOCOLS`,
  `owns(denoiser_config)`, `positions(config)` (every hookable block by
  its PyTorch module path, in execution order), `presets(config)`, `shapes(config, resolution)` ((C, H, W) per
  position, from the config; a meta-device forward where the config cannot say), and the docstring of
  `conditioning` (what the job spec's conditioning settings mean for the family);

torch side (imports torch inside each function)
  `tiny_components(seed)` (offline, tiny, deterministic), `random_components(name, seed)` (the full architecture
  from the shipped configs in `sdfeat/data`, random weights), `load_pretrained(source, revision, device, dtype)`
  (safetensors only; one-line `ModelNotFoundError` when weights are absent), `conditioning(components, labels,
  prompts, resolution, settings)` (the denoiser's keyword inputs besides latents and timestep), `call(denoiser,
  latents, timestep, conditioning)` (one forward; forward hooks registered by the caller capture block outputs and
  may end it early by raising) and `as_map(name, output, latent_hw)` (a hooked output as a (B, C, H, W) map, so
  every store reader, metric, report and the explorer see the same (channel, y, x) arrays for every family).

Shared by the families: `loading` (random weights created in their dtype, safetensors-only loading, the one-line
error when weights are absent) and `vae_precision` (the VAE precision rule `vae_dtype`, and when two families
share cached latents); SDXL's text encoders are `sdxl_text`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

from sdfeat.models.families import dit, sd, sdxl

FAMILIES: dict[str, ModuleType] = {family.NAME: family for family in (sd, sdxl, dit)}


def for_config(denoiser_config: Mapping[str, Any]) -> ModuleType:
    """The family whose denoiser `denoiser_config` describes (each family's `owns`); SD where none claims it."""
    return next((family for family in FAMILIES.values() if family.owns(denoiser_config)), sd)


def for_registry_name(name: str) -> ModuleType | None:
    """The family whose REGISTRY holds `name` (`sd15`, `sdxl`, `dit-xl-2`, ...), or None."""
    return next((family for family in FAMILIES.values() if name in family.REGISTRY), None)
