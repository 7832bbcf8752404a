"""GPU throughput of sdfeat's extraction: the SD-1.5 architecture (random weights), 512 px, the `up_blocks.1` job.

Run on a CUDA machine:  python benchmarks/bench_gpu.py [--images 2048] [--batch 64] [--out /tmp/sdfeat-gpu]
Prints, in one process:
  1. compute only (pixels already on the GPU): VAE encode, U-Net to the deepest up_blocks.1 block (early exit)
     and the full U-Net forward, per batch size, in img/s, plus the early-exit ratio;
  2. end to end through `run_local` (decode of generated images, encode, U-Net, device->host, Zarr write, done
     markers) with the per-stage seconds of the unit reports.
Target (README): >= 250 img/s end to end for this job on one H100.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

import torch

UP1 = ["up_blocks.1.resnets.0", "up_blocks.1.attentions.0", "up_blocks.1.resnets.1", "up_blocks.1.attentions.1",
       "up_blocks.1.resnets.2", "up_blocks.1.attentions.2", "up_blocks.1.upsamplers.0"]


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
    from sdfeat.hooks import capture
    from sdfeat.models import load_model
    from sdfeat.protocol import encode, noisy_latents

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
                     "pipeline_img_s": b / (t_vae + t_noise + t_up1)})
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
               compile_vae: bool = False) -> dict:
    from sdfeat.extract import run_local
    from sdfeat.spec import parse_spec

    shutil.rmtree(out, ignore_errors=True)
    spec = parse_spec({"model": model, "protocol": "standard", "source": f"synthetic:{images}",
                       "resolution": resolution, "blocks": blocks, "timesteps": [50], "seeds": [42],
                       "batch_size": batch, "unit_size": batch, "compile": compile_vae, "output": out})
    summary = run_local(spec, progress=False)
    print(json.dumps({"end_to_end": summary}), flush=True)
    return summary


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
    parser.add_argument("--compile", action="store_true", help="torch.compile the VAE encoder (end to end, and in --vae-variants)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    print(f"device: {name} · torch {torch.__version__} · cuDNN {torch.backends.cudnn.version()}", flush=True)
    if not args.skip_compute:
        compute_only(args.model, device, args.resolution, args.batches, args.repeats)
    if args.vae_variants and device == "cuda":
        vae_variants(args.resolution, args.batch, args.repeats, args.compile)
    for blocks, out in () if args.skip_e2e else ((UP1, args.out), (UP1[-1:], args.out), (UP1, "/dev/shm/sdfeat-gpu")):
        summary = end_to_end(args.model, args.resolution, args.images, args.batch, out, blocks, args.compile)
        shutil.rmtree(out, ignore_errors=True)
        print(f"END TO END {len(blocks)} block(s) -> {out}: {summary['images_per_second']:.1f} img/s for "
              f"{summary['rows']} images (target 250); stages (s, summed over units): {summary['seconds']}",
              flush=True)

if __name__ == "__main__":
    main()
