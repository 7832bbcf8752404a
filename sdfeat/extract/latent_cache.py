"""The latent cache: VAE posteriors computed once, reused by later jobs over the same images.

Spec key `latent_cache: DIR` (a local path or an fsspec URL such as s3://bucket/cache). `worker.UnitRunner` asks
the cache, per unit, whether the posterior of every VAE batch the unit would encode is there; if so the unit
decodes no image and runs no VAE (and a runner whose units are all warm never loads the VAE). Otherwise the unit
runs as without a cache and stores its posteriors afterwards.

What an entry holds: `latent_dist.parameters` (mean and logvar, (B, 2*4, h, w)) of one VAE batch exactly as it
was computed, in the compute dtype (bfloat16 kept as float32, exactly). Rebuilding
`DiagonalGaussianDistribution(parameters)` gives the same mean and std, so `protocol.noisy_latents` and its RNG
draws (`protocol: paper` samples from the global RNG) are replayed unchanged: a warm job writes the same bytes.

Why per batch and not per image: a VAE's output for one image changes in the last bits with the other images of
its batch (CPU kernels: up to 4e-4 on the tiny model between batch sizes 1 and 8), so only the same batch of the
same images gives the same bytes. Jobs over the same source with the same `batch_size` form the same batches
(units hold whole batches), whatever their blocks, timesteps, seeds or protocol with the same pixel scaling.

Layout (one folder per key, so models whose VAE encoders hold the same weights share entries and other VAEs,
preprocessing or numerics get their own folder):

    DIR/<key>/key.json                      what every entry depends on (`cache_key`); <key> = its digest
    DIR/<key>/latents.zarr                  Zarr v3 group
        <g>/<b>                             one array per (VAE batch, crop margin): (B, 2C, h, w)
    DIR/<key>/done/<g>/<b>.json             written after the array (atomically): margin, sample ids, shape
    DIR/<key>/failed/<g>/<s>.json           an image that could not be decoded, with the reason

<g> = digest of (source, the file the batch's first image comes from), so one listing finds a unit's entries;
<b> = digest of (margin, the batch's sample ids); <s> = digest of the sample id. An array without its marker (a
run killed mid-write) is not an entry: the unit is computed again and the array overwritten. A folder whose
key.json disagrees with its name, or a DIR that is itself a key folder of another key, is refused with one line.

Imports numpy, zarr and fsspec only (no torch).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import zarr

from sdfeat.errors import StoreError

FORMAT = 1
DECODE_VERSION = 1  # bump when decode.center_crop_resize changes the pixels it gives
KEY_FILE = "key.json"


def _digest(*parts: object, size: int = 16) -> str:
    text = "\x00".join(str(p) for p in parts)
    return hashlib.blake2b(text.encode(), digest_size=size // 2).hexdigest()


def cache_key(vae_weights: str, protocol: str, resolution: int, dtype: str, device: str, compiled: bool,
              vae_padding: str, versions: dict[str, str]) -> dict:
    """Everything an entry's bytes depend on besides the images: the VAE encoder's weights (digest of their
    values as computed with), the pixel scaling (paper [0, 1], standard [-1, 1]), resolution, compute dtype,
    device type, a compiled encoder, the VAE's padding mode (interventions), and the decode/torch/diffusers
    versions. The crop margin and the sample ids key the entries inside the folder."""
    return {"format": FORMAT, "vae_weights": vae_weights,
            "pixels": "[0,1]" if protocol == "paper" else "[-1,1]", "resolution": resolution, "dtype": dtype,
            "device": device, "compiled": compiled, "vae_padding": vae_padding, "decode": DECODE_VERSION,
            **{f"{name}_version": v for name, v in sorted(versions.items())}}


def _key_digest(key: dict) -> str:
    return _digest(json.dumps(key, sort_keys=True))


def _differences(found: dict, wanted: dict) -> str:
    fields = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
    return "; ".join(f"{k}: {found.get(k)!r} there, {wanted.get(k)!r} here" for k in fields)


def _file_group(sample_id: str) -> str:
    """The file an image comes from: `<file>#<row|member>` ids give the file, folder ids their directory."""
    if "#" in sample_id:
        return sample_id.rsplit("#", 1)[0]
    return sample_id.rsplit("/", 1)[0] if "/" in sample_id else ""


@dataclass(frozen=True)
class Batch:
    """One VAE batch of a unit: its rows (unit-relative) and the crop margins it is encoded at."""

    rows: list[int]
    margins: tuple[int, ...]


class LatentCache:
    """One key's folder of a latent cache, for images of `source`."""

    def __init__(self, root: str, key: dict, source: str) -> None:
        self.fs, path = fsspec.core.url_to_fs(root)
        self.local = "file" in self.fs.protocol if isinstance(self.fs.protocol, tuple) else self.fs.protocol == "file"
        self.key = key
        self.source = source.rstrip("/")
        digest = _key_digest(key)
        if self.fs.exists(f"{path.rstrip('/')}/{KEY_FILE}"):  # DIR is a key folder itself
            found = self._read_key(f"{path.rstrip('/')}/{KEY_FILE}", root)
            if found != key:
                raise StoreError(f"latent cache {root} holds latents of another VAE or preprocessing "
                                 f"({_differences(found, key)}); give its parent folder or another path")
            self.path = path.rstrip("/")
        else:
            self.path = f"{path.rstrip('/')}/{digest}"
            key_path = f"{self.path}/{KEY_FILE}"
            if self.fs.exists(key_path):
                found = self._read_key(key_path, root)
                if found != key:
                    raise StoreError(f"latent cache {self.url(key_path)}: key.json does not match its folder "
                                     f"name ({_differences(found, key)}); the folder is corrupt, remove it")
            else:
                self._write_text(key_path, json.dumps(key, indent=1, sort_keys=True))
        zarr.open_group(self.url(f"{self.path}/latents.zarr"), mode="a")

    def url(self, path: str) -> str:
        return path if self.local else self.fs.unstrip_protocol(path)

    def _read_key(self, path: str, root: str) -> dict:
        try:
            with self.fs.open(path, "r") as f:
                return json.load(f)
        except ValueError:
            raise StoreError(f"latent cache {root}: {path} is not valid JSON; the folder is corrupt") from None

    def _write_text(self, path: str, text: str) -> None:
        """Atomically: a temporary name then a rename on a local disk; one PUT (atomic itself) elsewhere."""
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if not self.local:
            self.fs.pipe_file(path, text.encode())
            return
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    # -- names ------------------------------------------------------------------------------------------------

    def _group(self, sample_id: str) -> str:
        return _digest(self.source, _file_group(sample_id))

    def _entry(self, sample_ids: Sequence[str], margin: int) -> tuple[str, str]:
        """(group, batch) names of one batch's entry at `margin`."""
        return self._group(sample_ids[0]), _digest(self.source, margin, *sample_ids, size=32)

    def _listing(self, folder: str) -> set[str]:
        try:
            return {p.rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False)}
        except FileNotFoundError:
            return set()

    # -- lookups ------------------------------------------------------------------------------------------------

    def failures(self, sample_ids: Sequence[str]) -> dict[str, str]:
        """{sample id: reason} of the images among `sample_ids` recorded as undecodable."""
        out: dict[str, str] = {}
        wanted = set(sample_ids)
        for group in dict.fromkeys(self._group(s) for s in sample_ids):
            folder = f"{self.path}/failed/{group}"
            names = self._listing(folder)
            for sid in wanted:
                if self._group(sid) == group and f"{_digest(sid)}.json" in names:
                    with self.fs.open(f"{folder}/{_digest(sid)}.json", "r") as f:
                        out[sid] = json.load(f)["reason"]
        return out

    def has_all(self, batches: Sequence[tuple[Sequence[str], int]]) -> bool:
        """Whether every (batch sample ids, margin) has its done marker."""
        listings: dict[str, set[str]] = {}
        for ids, margin in batches:
            group, name = self._entry(ids, margin)
            if group not in listings:
                listings[group] = self._listing(f"{self.path}/done/{group}")
            if f"{name}.json" not in listings[group]:
                return False
        return True

    def load(self, sample_ids: Sequence[str], margin: int, dtype: str) -> tuple[np.ndarray, str]:
        """The posterior parameters (B, 2C, h, w) of one batch at `margin`, in `dtype` (float32 for bfloat16),
        and the memory format the VAE gave them in (`channels_last` or `contiguous`; elementwise kernels may
        round differently per layout, so the caller restores it)."""
        group, name = self._entry(sample_ids, margin)
        with self.fs.open(f"{self.path}/done/{group}/{name}.json", "r") as f:
            marker = json.load(f)
        if marker["sample_ids"] != list(sample_ids) or marker["margin"] != margin:
            raise StoreError(f"latent cache {self.url(self.path)}: entry {group}/{name} holds other images")
        values = zarr.open_array(self.url(f"{self.path}/latents.zarr/{group}/{name}"), mode="r")[...]
        if list(values.shape) != marker["shape"] or values.dtype != np.dtype(dtype):
            raise StoreError(f"latent cache {self.url(self.path)}: entry {group}/{name} is {values.dtype} "
                             f"{values.shape}, its marker says {dtype} {tuple(marker['shape'])}")
        return values, marker["memory_format"]

    # -- writes ------------------------------------------------------------------------------------------------

    def put(self, sample_ids: Sequence[str], margin: int, parameters: np.ndarray,
            memory_format: str = "contiguous") -> None:
        """Store one batch's parameters (B, 2C, h, w), then its marker."""
        group, name = self._entry(sample_ids, margin)
        root = zarr.open_group(self.url(f"{self.path}/latents.zarr"), mode="a")
        array = root.require_group(group).create_array(
            name, shape=parameters.shape, chunks=parameters.shape,
            dtype=parameters.dtype, compressors=None, fill_value=0, overwrite=True,
            dimension_names=["sample", "parameter", "y", "x"],
            attributes={"margin": margin, "source": self.source, "sample_ids": list(sample_ids)})
        with zarr.config.set({"array.write_empty_chunks": True}):
            array[...] = parameters
        marker = {"margin": margin, "sample_ids": list(sample_ids), "shape": list(parameters.shape),
                  "dtype": parameters.dtype.name, "memory_format": memory_format, "source": self.source}
        self._write_text(f"{self.path}/done/{group}/{name}.json", json.dumps(marker))

    def put_failure(self, sample_id: str, reason: str) -> None:
        self._write_text(f"{self.path}/failed/{self._group(sample_id)}/{_digest(sample_id)}.json",
                         json.dumps({"sample_id": sample_id, "reason": reason, "source": self.source}))


def plan_batches(n_rows: int, failed: set[int], batch_size: int, margins: Sequence[int],
                 crop_rows: int | None) -> list[Batch]:
    """The VAE batches of a unit of `n_rows` whose rows `failed` could not be decoded, as `extract` forms them:
    the usable rows in order, `batch_size` at a time; crop margins only for batches that start below
    `crop_rows` (None: every batch)."""
    usable = [r for r in range(n_rows) if r not in failed]
    out = []
    for start in range(0, len(usable), batch_size):
        rows = usable[start:start + batch_size]
        keep = tuple(m for m in margins if m == 0 or crop_rows is None or rows[0] < crop_rows)
        out.append(Batch(rows, keep))
    return out
