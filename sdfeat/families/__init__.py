"""Model families: what sdfeat must know about a kind of denoiser beyond the SD-1.x/2.x U-Nets.

A family is one module here (`sdxl`, `dit`) with the same module-level names, in two halves:

config side (no torch; `sdfeat blocks`, planning and the store template use it before anything heavy is imported)
  `NAME`, `REGISTRY` (short name -> hub id), `owns(denoiser_config)`, `positions(config)` (every hookable block by
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
