"""GPU throughput of sdfeat's extraction: the SD-1.5 architecture (random weights), 512 px, the `up_blocks.1` job.

Run on a CUDA machine:  python benchmarks/bench_gpu.py [--images 2048] [--batch 64] [--out /tmp/sdfeat-gpu]
Prints, in one process:
  1. compute only (pixels already on the GPU): VAE encode, U-Net to the deepest up_blocks.1 block (early exit)
     and the full U-Net forward, per batch size, in img/s and as a share of the device's peak dense fp16 FLOP/s
     (FLOPs counted on the meta device by `sdfeat.flops`), plus the early-exit ratio;
  2. end to end through `run_local` (decode of generated images, host->device, VAE, noise, U-Net, device->host,
     Zarr write, done markers): img/s, every stage's busy seconds and share of the units' wall time, the write
     rate in GB/s; cold, then again from a warm latent cache (the first run fills it).
Targets (issue 7, one H100/H200, 512 px, the seven up_blocks.1 positions to local disk): >= 250 img/s cold,
>= 600 img/s from the latent cache, writes >= 1.6 GB/s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

import torch

TARGETS = {"cold_img_s": 250.0, "warm_img_s": 600.0, "write_gb_s": 1.6}
# Dense fp16/bf16 tensor-core peaks (vendor figures, without sparsity), TFLOP/s.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 125.0}
UP1 = ["up_blocks.1.resnets.0", "up_blocks.1.attentions.0", "up_blocks.1.resnets.1", "up_blocks.1.attentions.1",
       "up_blocks.1.resnets.2", "up_blocks.1.attentions.2", "up_blocks.1.upsamplers.0"]


def _peak_flops() -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


def _share(img_s: float, flops_per_image: int) -> float | None:
    peak = _peak_flops()
    return round(img_s * flops_per_image / peak, 3) if peak else None


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, repeats: int) -> float:
    fn()
    _sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync()
    return (time.perf_counter() - start) / repeats


def compute_only(model_name: str, device: str, resolution: int, batches: list[int], repeats: int) -> list[dict]:
    from sdfeat.flops import unet_flops, vae_encoder_flops
    from sdfeat.hooks import capture
    from sdfeat.models import load_model, shipped_config, unet_config
    from sdfeat.protocol import encode, noisy_latents

    ucfg = unet_config(model_name)
    vae_flops = vae_encoder_flops(shipped_config("sd15", "vae"), resolution) if "sd15" in model_name else 0
    up1_flops, full_flops = unet_flops(ucfg, resolution, UP1[-1]), unet_flops(ucfg, resolution)

    torch.backends.cudnn.benchmark = True
    model = load_model(model_name, device, torch.float16 if device == "cuda" else torch.float32)
    rows = []
    for b in batches:
        pixels = torch.randint(0, 256, (b, resolution, resolution, 3), dtype=torch.uint8, device=device)
        ids = [f"img{i}" for i in range(b)]
        emb = model.prompt_embeddings([""] * b)
        dist = encode(model, pixels, "standard")
        latents = noisy_latents(model, dist, "standard", 42, ids, [50])[50]

        def unet(names: list[str], early: bool) -> None:
            with torch.inference_mode(), capture(model.unet, names, early_exit=early) as hooked:
                hooked.run(latents, 50, encoder_hidden_states=emb)

        t_vae = _timed(lambda: encode(model, pixels, "standard").mean, repeats)
        t_noise = _timed(lambda: noisy_latents(model, dist, "standard", 42, ids, [50]), repeats)
        t_up1 = _timed(lambda: unet(UP1, True), repeats)
        t_full = _timed(lambda: unet(UP1 + ["conv_out"], False), repeats)
        rows.append({"batch": b, "vae_img_s": b / t_vae, "noise_img_s": b / t_noise, "unet_up1_img_s": b / t_up1,
                     "unet_full_img_s": b / t_full, "early_exit_ratio": t_full / t_up1,
                     "pipeline_img_s": b / (t_vae + t_noise + t_up1),
                     "vae_peak_share": _share(b / t_vae, vae_flops),
                     "unet_up1_peak_share": _share(b / t_up1, up1_flops),
                     "unet_full_peak_share": _share(b / t_full, full_flops)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def vae_variants(resolution: int, batch: int, repeats: int, compile_encoder: bool) -> None:
    """VAE encoder img/s by memory format (and torch.compile), plus its top CUDA kernels: the encoder at 512 px
    costs 1.39x the U-Net's FLOPs, so it bounds the whole pipeline."""
    from sdfeat.models import load_model

    model = load_model("random:sd15", "cuda", torch.float16)
    vae = model.vae
    x = torch.randn(batch, 3, resolution, resolution, device="cuda", dtype=torch.float16)

    def run(inp: torch.Tensor) -> None:
        with torch.inference_mode():
            vae.encode(inp).latent_dist.mean

    t_cl = _timed(lambda: run(x.contiguous(memory_format=torch.channels_last)), repeats)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(x.contiguous(memory_format=torch.channels_last))
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60), flush=True)
    torch.nn.Module.to(vae, memory_format=torch.contiguous_format)
    t_contig = _timed(lambda: run(x), repeats)
    row = {"vae_batch": batch, "channels_last_img_s": batch / t_cl, "contiguous_img_s": batch / t_contig}
    print(json.dumps(row), flush=True)
    if compile_encoder:
        torch.nn.Module.to(vae, memory_format=torch.channels_last)
        start = time.perf_counter()
        vae.encoder = torch.compile(vae.encoder)
        run(x.contiguous(memory_format=torch.channels_last))
        compile_s = time.perf_counter() - start
        t_comp = _timed(lambda: run(x.contiguous(memory_format=torch.channels_last)), repeats)
        print(json.dumps({"vae_batch": batch, "compiled_img_s": batch / t_comp, "compile_s": compile_s}), flush=True)


def end_to_end(model: str, resolution: int, images: int, batch: int, out: str, blocks: list[str] = UP1,
               compiled: bool = False, latent_cache: str | None = None) -> dict:
    from sdfeat.extract import run_local
    from sdfeat.query import open_store
    from sdfeat.spec import parse_spec

    shutil.rmtree(out, ignore_errors=True)
    spec = {"model": model, "protocol": "standard", "source": f"synthetic:{images}", "resolution": resolution,
            "blocks": blocks, "timesteps": [50], "seeds": [42], "batch_size": batch, "unit_size": batch,
            "compile": compiled, "output": out}
    if latent_cache:
        spec["latent_cache"] = latent_cache
    summary = run_local(parse_spec(spec), progress=False)
    stored = open_store(out).info()["bytes_raw"]
    summary["write_gb_s"] = round(stored / 1e9 / max(summary["seconds"]["write"], 1e-9), 3)
    print(json.dumps({"end_to_end": summary}), flush=True)
    return summary


def _print_e2e(label: str, summary: dict, target: float | None) -> None:
    busy = ", ".join(f"{k} {v:.1f}s ({summary['share'][k]:.0%})" for k, v in summary["seconds"].items() if v)
    goal = f" (target >= {target:g})" if target else ""
    print(f"END TO END {label}: {summary['images_per_second']:.1f} img/s{goal} for {summary['rows']} images; "
          f"writes {summary['write_gb_s']:.2f} GB/s (target >= {TARGETS['write_gb_s']}); busy (share of unit wall "
          f"time): {busy}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="/tmp/sdfeat-gpu")
    parser.add_argument("--skip-compute", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--model", default="random:sd15", help="tiny for a quick dry run on CPU")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--vae-variants", action="store_true", help="VAE memory formats + kernel profile")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the VAE encoder and the U-Net blocks (end to end; VAE in --vae-variants)")
    parser.add_argument("--latent-cache", default="/tmp/sdfeat-gpu-latents",
                        help="latent cache for the warm run (emptied first)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    print(f"device: {name} · torch {torch.__version__} · cuDNN {torch.backends.cudnn.version()}", flush=True)
    if not args.skip_compute:
        compute_only(args.model, device, args.resolution, args.batches, args.repeats)
    if args.vae_variants and device == "cuda":
        vae_variants(args.resolution, args.batch, args.repeats, args.compile)
    if args.skip_e2e:
        return
    shutil.rmtree(args.latent_cache, ignore_errors=True)
    runs = [("7 blocks, cold, filling the latent cache", UP1, args.latent_cache, TARGETS["cold_img_s"]),
            ("7 blocks, warm latent cache", UP1, args.latent_cache, TARGETS["warm_img_s"]),
            ("7 blocks, no cache", UP1, None, TARGETS["cold_img_s"]),
            ("up_blocks.1.upsamplers.0 only, no cache", UP1[-1:], None, None)]
    for label, blocks, cache, target in runs:
        summary = end_to_end(args.model, args.resolution, args.images, args.batch, args.out, blocks, args.compile,
                             cache)
        shutil.rmtree(args.out, ignore_errors=True)
        _print_e2e(f"{label} -> {args.out}", summary, target)

if __name__ == "__main__":
    main()
