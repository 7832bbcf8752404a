"""Shared helpers for the model-side tests: one tiny model per test process and generated pixels."""

from __future__ import annotations

import dataclasses
from functools import cache

import torch

from sdfeat.models.loading import LoadedModel, load_model
from sdfeat.models.registry import shipped_config


@cache
def _tiny() -> LoadedModel:
    return load_model("tiny")


def tiny_model(scheduler_of: str | None = None) -> LoadedModel:
    """The tiny model (shared, read-only) — a fresh copy of the wrapper with a registry model's scheduler if asked."""
    model = _tiny()
    model = dataclasses.replace(model, _prompt_cache={})
    if scheduler_of is None:
        return model
    from sdfeat.models.loading import _scheduler_from_config

    return dataclasses.replace(model, scheduler=_scheduler_from_config(shipped_config(scheduler_of, "scheduler")))


def pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 (n, size, size, 3): smooth gradients plus noise, different per image."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 255, size)
    base = (ramp[None, :, None] + ramp[:, None, None].flip(0)) / 2  # (size, size, 1)
    imgs = base[None] * torch.rand(n, 1, 1, 3, generator=g) + 40 * torch.rand(n, size, size, 3, generator=g)
    return imgs.clamp(0, 255).to(torch.uint8)
