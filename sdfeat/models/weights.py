"""Safetensors weights read tensor by tensor: a model built without memory, and a digest of chosen weights.

`models` loads the U-Net and the VAE of a diffusers directory through `load_module`: the module is built on the
meta device (no memory), then every tensor is read from the file with plain reads (no mmap, whose touched pages
would count as resident until the file is closed), cast — rounded through float16 first when asked, as sdhelper's
loading does — and assigned in place. The peak is the final weights plus one tensor; diffusers' `from_pretrained`
peaked at 5.4 GB for SD-1.5 (fp16 file, fp32 weights) against 3.6 GB of weights.

`digest` hashes the weights a module holds after that same cast, from the file alone (the latent cache keys its
entries by the VAE encoder's digest without loading the VAE).

The safetensors format: 8 bytes little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw little-endian tensor bytes. Nothing here unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from sdfeat.errors import ModelNotFoundError

_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _header(f: Any, path: Path) -> tuple[dict[str, Any], int]:
    raw = f.read(8)
    if len(raw) != 8:
        raise ModelNotFoundError(f"{path}: not a safetensors file (shorter than its header)")
    (length,) = struct.unpack("<Q", raw)
    try:
        header = json.loads(f.read(length))
    except ValueError:
        raise ModelNotFoundError(f"{path}: not a safetensors file (unreadable header)") from None
    header.pop("__metadata__", None)
    return header, 8 + length


def tensor_names(path: str | Path) -> list[str]:
    path = Path(path)
    with open(path, "rb") as f:
        return list(_header(f, path)[0])


def read_tensors(path: str | Path, keep: Callable[[str], bool] = lambda name: True
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor in the file's dtype) for every tensor `keep` accepts, in file order, one at a time."""
    path = Path(path)
    with open(path, "rb") as f:
        header, base = _header(f, path)
        entries = sorted(((name, info) for name, info in header.items() if keep(name)),
                         key=lambda item: item[1]["data_offsets"][0])
        for name, info in entries:
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise ModelNotFoundError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            start, stop = info["data_offsets"]
            out = torch.empty(info["shape"], dtype=dtype)
            view = out.view(-1).view(torch.uint8).numpy() if out.numel() else bytearray()
            if stop - start != len(view):
                raise ModelNotFoundError(f"{path}: tensor {name} has {stop - start} bytes, its shape needs {len(view)}")
            f.seek(base + start)
            if f.readinto(view) != len(view):
                raise ModelNotFoundError(f"{path}: truncated at tensor {name}")
            yield name, out


def cast(tensor: torch.Tensor, dtype: torch.dtype, fp16_rounded: bool) -> torch.Tensor:
    """The value a loaded weight takes: rounded through float16 first (sdhelper's loading), then `dtype`."""
    if fp16_rounded and tensor.is_floating_point():
        tensor = tensor.to(torch.float16)
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def load_module(build: Callable[[], torch.nn.Module], path: str | Path, dtype: torch.dtype,
                fp16_rounded: bool, device: torch.device) -> torch.nn.Module | None:
    """`build()` on the meta device, then every weight read from `path`, cast and assigned on `device`.

    Tensors the module does not hold (a dropped VAE decoder) are not read. Returns None (the caller falls back
    to diffusers' loader) when the file lacks one of the module's state-dict names (checkpoints with old
    attention names, which diffusers converts)."""
    with torch.device("meta"):
        module = build()
    expected = set(module.state_dict())
    if not expected <= set(tensor_names(path)):
        return None
    for name, tensor in read_tensors(path, keep=expected.__contains__):
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        value = cast(tensor, dtype, fp16_rounded).to(device)
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[leaf] = value
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise ModelNotFoundError(f"{path}: no weights for {', '.join(left[:3])} (module built on meta)")
    return module


def digest(tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype, fp16_rounded: bool) -> str:
    """32 hex digits over (name, dtype, shape, bytes) of every tensor after `cast`, in name order."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        value = cast(tensor.detach().cpu(), dtype, fp16_rounded).contiguous()
        h.update(f"{name}\x00{value.dtype}\x00{tuple(value.shape)}\x00".encode())
        if value.numel():
            h.update(value.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
