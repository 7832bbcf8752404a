"""Models: which model a name means, its blocks and shapes, and loading it for extraction.

Second in the flow (sources -> **models** -> store -> planning -> extract -> ...): `registry` resolves a name
(`sd15`, a hub id, a local directory, `tiny`, `random:<name>`) to its configs without torch or weights (once per
job: `registry.ModelRef`); `blocks` names the hookable positions and their shapes from a config; `loading` builds
or reads the weights (`load_model` -> `LoadedModel`, with `weights` for safetensors, `interventions` for the
padding study and `vae_encoder` for the VAE without its decoder); `hooks` captures block outputs; `flops` counts a
forward's FLOPs on the meta device. Only `loading`, `hooks`, `flops`, `weights`, `interventions` and `vae_encoder`
import torch.
"""
