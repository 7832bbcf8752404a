"""The VAE as extraction runs it: the encoder only (`encoder_only`), its resnet blocks computing their activations
and residual sum in place.

The VAE encoder's first blocks work on full-resolution maps (128 channels at the image's size: 268 MB per map for
8 images of 256 px in float32), and diffusers' `ResnetBlock2D.forward` keeps up to four of them alive besides its
caller's (the block's input, the normalised map and its activation, the sum and its scaled copy). That transient,
not the weights, is a cold job's peak memory beside the resident U-Net. `lean_resnet_forward` gives the same values
with three alive at most: SiLU is elementwise, so in place it computes the same numbers; the residual
`hidden + input` equals `input + hidden` bit for bit (IEEE addition commutes) and is divided by the same scale.
Only blocks that use none of the paths it leaves out (time embedding, up/down sampling, another activation) get it;
the others keep diffusers' forward. Used by every family's loader (`loading`, `families.sdxl`, `families.dit`).
"""

from __future__ import annotations

from types import MethodType
from typing import Any


def encoder_only(vae: Any) -> Any:
    """Extraction never decodes: the VAE without its decoder, its encoder's plain resnet blocks run lean."""
    vae.decoder = None
    vae.post_quant_conv = None
    for module in vae.encoder.modules():
        if _plain_resnet(module):
            module.forward = MethodType(lean_resnet_forward, module)
    return vae


def _plain_resnet(module: Any) -> bool:
    """A `ResnetBlock2D` whose forward is norm, SiLU, conv, norm, SiLU, (dropout), conv, plus its shortcut."""
    import torch
    from diffusers.models.resnet import ResnetBlock2D

    if type(module) is not ResnetBlock2D:
        return False
    unused = ("upsample", "downsample", "time_emb_proj")  # a diffusers without one of them: keep its forward
    return (all(getattr(module, name, "?") is None for name in unused)
            and getattr(module, "time_embedding_norm", None) == "default"
            and isinstance(getattr(module, "nonlinearity", None), torch.nn.SiLU))


def lean_resnet_forward(self: Any, input_tensor: Any, temb: Any = None, *args: Any, **kwargs: Any) -> Any:
    """diffusers' `ResnetBlock2D.forward` for a plain block (`_plain_resnet`, `temb` None) with its activations and
    residual sum in place: the same values, at most three maps of the input's size alive."""
    import torch.nn.functional as F

    hidden = F.silu(self.norm1(input_tensor), inplace=True)  # (B, C_in, H, W)
    hidden = self.conv1(hidden)                               # (B, C_out, H, W)
    hidden = F.silu(self.norm2(hidden), inplace=True)
    hidden = self.conv2(self.dropout(hidden))
    shortcut = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
    return hidden.add_(shortcut).div_(self.output_scale_factor)
