"""Model interventions applied at load time: the padding mode of the convolutions.

The paper suggests that zero padding is where the positional information and the corner/border anomalies come
from. The spec key `intervention: {padding: zeros|reflect|replicate|circular, scope: unet|unet+vae}` tests it:
`models.load_model` calls `set_padding` on the U-Net (and, for `unet+vae`, the VAE encoder) so that every padded
`nn.Conv2d` (padding > 0) pads with that mode instead of zeros. Weights are untouched; only `padding_mode`
changes, which torch implements as `F.pad(x, mode)` followed by a convolution with padding 0.

Not switched: convolutions without padding (1×1 projections, and the VAE encoder's downsamplers, which pad
asymmetrically with an explicit `F.pad(..., value=0)` before an unpadded convolution).
`zeros` is the model as released; `spec` normalises it to "no intervention" so that such a job keeps the hash
and the store bytes of a job without the key.
"""

from __future__ import annotations

import logging

import torch

from sdfeat.errors import SpecError
from sdfeat.spec import PADDING_MODES, PADDING_SCOPES

log = logging.getLogger(__name__)


def is_padded(conv: torch.nn.Conv2d) -> bool:
    """True when the convolution pads its input (numeric padding > 0, or 'same' with a kernel larger than 1)."""
    # torch keeps the per-side amounts its forward pads with (also for padding='same') in this attribute
    return any(p > 0 for p in conv._reversed_padding_repeated_twice)


def set_padding(module: torch.nn.Module, mode: str) -> int:
    """Switch every padded `nn.Conv2d` inside `module` to `mode`; returns how many were switched."""
    if mode not in PADDING_MODES:
        raise ValueError(f"padding mode must be one of {', '.join(PADDING_MODES)}, got {mode!r}")
    switched = 0
    for conv in module.modules():
        if isinstance(conv, torch.nn.Conv2d) and is_padded(conv):
            conv.padding_mode = mode
            switched += 1
    return switched


def apply_padding(unet: torch.nn.Module | None, vae: torch.nn.Module | None, mode: str = "zeros",
                  scope: str = "unet") -> int:
    """The spec's padding intervention on a loaded model's denoiser and VAE (None: one not loaded by this call, as
    a VAE loaded lazily later); `zeros` changes nothing. Returns the convs switched."""
    if scope not in PADDING_SCOPES:
        raise ValueError(f"intervention scope must be one of {', '.join(PADDING_SCOPES)}, got {scope!r}")
    if mode == "zeros":
        return 0
    switched = set_padding(unet, mode) if unet is not None else 0
    if scope == "unet+vae" and vae is not None:
        switched += set_padding(vae, mode)
    log.info("padding intervention: %d convolutions now pad with %r (scope %s)", switched, mode, scope)
    return switched


def smallest_map(side_px: int) -> int:
    """Side (tokens) of the deepest U-Net map for a `side_px` image: the latent (side / 8) halved three times by
    stride-2 convolutions with padding 1 (ceil each time)."""
    size = side_px // 8
    for _ in range(3):
        size = (size + 1) // 2
    return size


def check_padding(mode: str, sides_px: dict[int, int]) -> None:
    """Reflection needs every padded map wider than its padding (1 token). sides_px: crop margin (0: the full
    image) -> the image side the U-Net sees. Raises SpecError naming the pass that is too small."""
    if mode != "reflect":
        return
    for margin, side in sorted(sides_px.items()):
        if smallest_map(side) < 2:
            what = f"the crop pass of margin {margin} px" if margin else "the full image"
            raise SpecError(f"field 'intervention.padding': 'reflect' cannot pad {what}: its {side} px images "
                            f"give {smallest_map(side)}-token maps in the deepest U-Net blocks (needs 2; "
                            "use a larger resolution, fewer crop variants, or replicate/circular)")
