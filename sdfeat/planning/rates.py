"""Measured throughput per stage, as rates that transfer between jobs: FLOP/s of the VAE encoder and of the U-Net,
bytes/s of writes, host seconds of decoding per image.

Two sources:
- `recorded_rates`: the GPU numbers recorded in `sdfeat/data/gpu_rates.json` (sdfeat's own `bench_gpu.py` on an
  H100/H200, SD-1.5, 512 px, fp16; dated, not re-measured here), turned into FLOP/s with `costs`' FLOP counts;
- `store_rates`: a finished (or partly finished) store's unit reports (`progress/*.json`, busy seconds per stage),
  divided into the FLOPs and bytes that store's own job did.
`budget` multiplies another job's FLOPs and bytes by these rates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from sdfeat.errors import SpecError, StoreError
from sdfeat.store.schema import UnitReport

RATES_FILE = Path(__file__).parent.parent / "data" / "gpu_rates.json"


@dataclass(frozen=True)
class Rates:
    source: str                        # where the numbers come from, for the printed table
    vae_flops_per_s: float | None      # None: not measured (e.g. a store made from a warm latent cache)
    unet_flops_per_s: float
    write_bytes_per_s: float
    decode_s_per_image: float | None = None  # host busy time; None: not measured (recorded GPU rates)
    peak_flops_per_s: float | None = None    # the device's dense fp16 peak, for the achieved share


@lru_cache(maxsize=1)
def recorded() -> dict:
    """The recorded-rates table (sdfeat/data/gpu_rates.json)."""
    return json.loads(RATES_FILE.read_text())


def end_to_end_runs() -> list[dict]:
    """Recorded whole-job GPU rates (`bench_gpu.py`): {"job", "cache", "img_s", "device", "recorded"} each."""
    return list(recorded().get("end_to_end", {}).get("runs", []))


def host_costs() -> dict[str, dict[str, float]]:
    """Recorded host CPU-seconds per image of a worker by job and cache ({"up_blocks.1": {"cold": s, "warm": s}}),
    measured with a simulated device; empty when not recorded."""
    host = recorded().get("host", {})
    return {job: costs for job, costs in host.items() if isinstance(costs, dict)}


def peak_flops(device: str) -> float:
    peaks = {k: v for k, v in recorded()["peak_dense_fp16_tflops"].items() if k != "note"}
    if device not in peaks:
        raise SpecError(f"--device: no recorded peak for {device!r}; known: {', '.join(sorted(peaks))}")
    return peaks[device] * 1e12


def recorded_rates(compiled_vae: bool = True, device: str = "H200", write_bytes_per_s: float | None = None) -> Rates:
    """FLOP/s implied by the recorded img/s: VAE encoder (compiled or eager) and the whole U-Net forward."""
    from sdfeat.planning.costs import unet_flops_to, vae_flops

    table = recorded()
    model, side, ips = table["model"], table["resolution"], table["images_per_second"]
    vae = ips["vae_encoder_compiled" if compiled_vae else "vae_encoder"]
    unet = ips["unet_full"]
    write = write_bytes_per_s or table["write_bytes_per_second"]["value"]
    return Rates(
        source=(f"recorded {table['recorded']}: VAE {vae['value']} img/s ({vae['device']}"
                f"{', compiled' if compiled_vae else ''}), U-Net {unet['value']} img/s ({unet['device']}), "
                f"{model} {side} px fp16; writes {write / 1e9:.2f} GB/s"),
        vae_flops_per_s=vae["value"] * vae_flops(model, side),
        unet_flops_per_s=unet["value"] * unet_flops_to(model, side),
        write_bytes_per_s=write,
        peak_flops_per_s=peak_flops(device),
    )


def plan_rates(compiled_vae: bool, device: str, from_store: str | None = None,
               write_bytes_per_s: float | None = None) -> Rates:
    """The rates `sdfeat plan` estimates with: those measured in a store (`store_rates`), else the recorded GPU
    benchmark's (`recorded_rates`); a given write rate replaces either's."""
    if not from_store:
        return recorded_rates(compiled_vae, device, write_bytes_per_s)
    rates = store_rates(from_store)
    return replace(rates, write_bytes_per_s=write_bytes_per_s) if write_bytes_per_s else rates


def _seconds(reports: list[UnitReport], *stages: str) -> float:
    return float(sum(r.seconds.get(k, 0.0) for r in reports for k in stages))


def store_rates(path: str) -> Rates:
    """Rates from a store's unit reports: each stage's busy seconds over the work that stage did in that job."""
    from sdfeat import store
    from sdfeat.planning.costs import pass_costs
    from sdfeat.planning.layout import job_layout
    from sdfeat.store.query import open_store

    features = open_store(path)
    done = sorted(store.done_units(path))
    if not done:
        raise StoreError(f"{path}: no finished units (progress/*.json) to measure rates from")
    reports = store.read_markers(path, done)
    layout = job_layout(features.spec)
    n, crop_rows = len(features), features.crop_samples
    ok = features.ok
    images = crop_images = encoded = crop_encoded = 0   # encoded: images of units that ran the VAE (not cached)
    written = 0
    for r in reports:
        rows = features.attrs.rows_of(r.unit)
        start, stop = rows.start, rows.stop
        unit_images, unit_crops = int(ok[start:stop].sum()), int(ok[start:min(stop, crop_rows)].sum())
        images += unit_images
        crop_images += unit_crops
        if _seconds([r], "vae", "encode") > 0:  # a unit served by the latent cache runs no VAE
            encoded += unit_images
            crop_encoded += unit_crops
        written += sum(a.bytes_per_sample() * max(0, min(stop, a.n_rows(n)) - start) for a in layout.arrays)
    vae = unet = 0.0
    for cost in pass_costs(features.spec, layout):
        vae += (encoded if cost.margin == 0 else crop_encoded) * cost.vae_flops
        unet += (images if cost.margin == 0 else crop_images) * cost.unet_flops
    # pixel upload and VAE belong to encoding (absent for cached units); the noise, drawn per seed like the U-Net's
    # passes, and the copies back belong to the U-Net. "encode" (older reports) = VAE + noise.
    vae_s = _seconds(reports, "vae", "encode", "h2d")
    unet_s = _seconds(reports, "unet", "d2h", "noise")
    write_s = _seconds(reports, "write")
    decode_s = _seconds(reports, "decode") or _seconds(reports, "read")
    if unet_s <= 0 or write_s <= 0 or images == 0:
        raise StoreError(f"{path}: unit reports carry no U-Net or write seconds to measure rates from")
    return Rates(
        source=f"store {path}: {len(reports)} unit reports, {images:,} images",
        vae_flops_per_s=vae / vae_s if vae_s > 0 and encoded else None,
        unet_flops_per_s=unet / unet_s,
        write_bytes_per_s=written / write_s,
        decode_s_per_image=decode_s / images,
    )
