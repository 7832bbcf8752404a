"""How every family builds and loads its modules: random weights created in the dtype they run in, pretrained
weights from safetensors only, and a one-line `ModelNotFoundError` before any hub request when they are absent.

Used by the family modules (`sdxl`, `dit`) for their `tiny_components`, `random_components` and `load_pretrained`;
imports torch, diffusers and huggingface_hub inside the functions that need them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sdfeat.errors import ModelNotFoundError


@contextmanager
def created_in(dtype: Any, seed: int) -> Iterator[None]:
    """Inside: new parameters are created in `dtype` from the RNG seeded with `seed` (no float32 copy of a
    bfloat16 model ever exists); the caller's global RNG state and default dtype are restored after."""
    import torch

    default = torch.get_default_dtype()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.set_default_dtype(dtype)
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_default_dtype(default)


def fired_shapes(model: Any, names: Iterable[str], inputs: tuple[tuple[Any, ...], dict[str, Any]],
                 as_map: Callable[[str, Any], Any]) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of each hooked position's output as a map (`as_map(name, output)`) in one forward of `model` on
    `inputs` = (args, kwargs), a meta-device model and inputs: the dict is in hook-firing (execution) order. The
    hooks are removed afterwards."""
    import torch

    found: dict[str, tuple[int, int, int]] = {}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda _module, _inputs, output, name=name: found.__setitem__(name, tuple(as_map(name, output).shape[1:])))
        for name in names]
    try:
        with torch.inference_mode():
            model(*inputs[0], **inputs[1])
    finally:
        for handle in handles:
            handle.remove()
    return found


def prepare(module: Any, device: Any, dtype: Any) -> Any:
    """eval, no grad, on `device` in `dtype` (torch's own `to`: diffusers' warns on every dtype cast)."""
    import torch

    module.eval().requires_grad_(False)
    torch.nn.Module.to(module, device=device, dtype=dtype)
    return module


def scheduler_from_config(config: Mapping[str, Any]) -> Any:
    """The diffusers scheduler a config names (looked up as an attribute of diffusers, never evaluated)."""
    import diffusers

    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ModelNotFoundError(f"scheduler config: unknown scheduler class {config.get('_class_name')!r}")
    return cls.from_config(dict(config))


def not_available(source: str, family: str, reason: str, patterns: Sequence[str]) -> ModelNotFoundError:
    """The one-line error for weights that are not here, with the command that fetches them."""
    include = " ".join(f"'{p}'" for p in patterns)
    return ModelNotFoundError(
        f"model {source!r}: {family} weights are not available locally ({reason}); with network access run "
        f"`hf download {source} --include {include}` (or set HF_HUB_OFFLINE=0 to let sdfeat download it), or "
        f"pass a local diffusers {family} pipeline directory with safetensors weights")


def require_local(source: str, revision: str | None, denoiser: str, family: str, names: Sequence[str],
                  patterns: Sequence[str]) -> None:
    """Fail in one line, before any hub request, when `source` is neither a local pipeline directory (with
    `<denoiser>/config.json`) nor in the Hugging Face cache, unless the user opted in to downloads with
    HF_HUB_OFFLINE=0. `names` are the family's registry names (for the message)."""
    from huggingface_hub import try_to_load_from_cache

    marker = f"{denoiser}/config.json"
    if Path(source).is_dir():
        if not (Path(source) / marker).is_file():
            raise ModelNotFoundError(f"model {source!r}: {marker} is missing (not a diffusers {family} pipeline "
                                     f"directory)")
        return
    if source.count("/") != 1 or source.startswith((".", "/")):
        raise ModelNotFoundError(f"model {source!r}: not one of the {family} names ({', '.join(sorted(names))}), "
                                 f"a hub id owner/name or an existing local directory")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("0", "false", "no"):
        return
    if not isinstance(try_to_load_from_cache(source, marker, revision=revision), str):
        raise not_available(source, family, "not in the Hugging Face cache", patterns)
