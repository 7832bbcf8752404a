"""Speed and memory of sdfeat's extractor against the authors' sdhelper 1.0.0, on the same weights and images.

Both tools load one local diffusers directory (SD-1.5 architecture, deterministic random weights, saved once under
--cache by this script) through their real loading code, get the same `synthetic:N` images (sdfeat reads them as
a source; sdhelper gets them as PIL images made with sdfeat.sources.synthetic + sdfeat.sources.decode.center_crop_resize) and the
same blocks, timestep(s) and seed. Every run is its own subprocess (fresh memory, `torch.set_num_threads`); the
child reports its peak RSS (ru_maxrss) and its extraction time without model loading (reported separately).

Configurations (see benchmarks/README.md for targets and how to read the output):
  1 paper   45 paper blocks, timestep 50                    sdhelper vs sdfeat, interleaved A B A B ...
  2 early   paper blocks up to up_blocks.1.upsamplers.0     sdfeat stops the forward there (early exit)
  3 steps4  45 blocks, timesteps 50, 200, 500, 800          sdhelper: one img2repr call per timestep
  4 flat    sdfeat peak RSS at --flat-sizes images          SD-1.5 at --flat-resolution px, and the tiny model
  5 warm    config 1 with a warm latent cache               warmed by an untimed sdfeat run first
  6 warm    config 2 with a warm latent cache               (the VAE is neither run nor loaded)

    .venv/bin/python benchmarks/bench_extract.py --n 8 --repeats 2
    .venv/bin/python benchmarks/bench_extract.py --model tiny --n 4 --flat-sizes 20,60   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SDHELPER_REFERENCE = {"img_per_s": 0.184, "peak_rss_gb_20_images": 8.2, "rss_growth_mb_per_image": 48}
EARLY_EXIT_LAST_BLOCK = "up_blocks.1.upsamplers.0"
FOUR_TIMESTEPS = [50, 200, 500, 800]
SEED = 42
RESULT_TAG = "BENCH-RESULT "


# -- measurements inside a child process ------------------------------------------------------------------

def _rss_gb(field_name: str) -> float:
    """VmRSS (current) or VmHWM (peak so far) of this process in GB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: kB


def _cpu_s() -> float:
    """CPU seconds (user + system, all threads) this process has used: less disturbed by other users' load than
    wall time, though threads spinning while descheduled inflate it too."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _loaded() -> dict[str, float]:
    """RSS after loading and the peak so far; then resets the peak (VmHWM) so the end shows the extraction's own."""
    measured = {"loaded_rss_gb": _rss_gb("VmRSS"), "load_peak_gb": _rss_gb("VmHWM"), "cpu_at_load_end": _cpu_s()}
    Path("/proc/self/clear_refs").write_text("5")
    return measured


def _blocks(kind: str) -> list[str]:
    from sdfeat.models.blocks import preset_names

    names = preset_names("paper")
    if kind == "early":
        return names[: names.index(EARLY_EXIT_LAST_BLOCK) + 1]
    return names


def _images(n: int, resolution: int) -> list:
    """The PIL images sdfeat's `synthetic:N` source yields, cropped and resized as sdfeat does."""
    from PIL import Image

    from sdfeat.sources.decode import center_crop_resize
    from sdfeat.sources.synthetic import synthetic_image

    return [Image.fromarray(center_crop_resize(synthetic_image(i), resolution)) for i in range(n)]


def child_sdhelper(job: dict) -> dict:
    import torch

    torch.set_num_threads(job["threads"])
    from sdhelper import SD

    from sdfeat.models.blocks import paper_name

    t = time.perf_counter()
    sd = SD("SD1.5", device="cpu", config={"name": job["model_dir"]}, local_files_only=True,
            disable_progress_bar=True)
    load_s = time.perf_counter() - t
    memory = _loaded()
    images = _images(job["n"], job["resolution"])
    positions = [paper_name(b) for b in _blocks(job["blocks"])]
    t = time.perf_counter()
    # one call per timestep (sdhelper takes one `step`); results kept, as a user collecting features would
    results = [sd.img2repr(images, positions, step=step, batch_size=job["batch_size"], seed=SEED)
               for step in job["timesteps"]]
    extract_s = time.perf_counter() - t
    n_values = sum(r[p].numel() for per_step in results for r in per_step for p in positions)
    return {"load_s": load_s, "extract_s": extract_s, "units_s": extract_s, **memory, "values": n_values}


def child_sdfeat(job: dict) -> dict:
    import torch

    torch.set_num_threads(job["threads"])
    # imported before the clock starts, as `from sdhelper import SD` imports them for sdhelper (diffusers' lazy
    # submodules cost seconds the first time, whichever code touches them first)
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    from sdfeat.spec import parse_spec
    from sdfeat.store.query import open_store
    import sdfeat.extract.local as extract  # run_local's module: it looks UnitRunner up there at call time

    timing: dict[str, float] = {"units_s": 0.0}

    class TimedRunner(extract.UnitRunner):
        """run_local's UnitRunner with its construction (= model loading) and its units timed; nothing else
        changes. Job overheads outside units (store template, block shapes, finalize) = extract_s - units_s."""

        def __init__(self, *args, **kwargs) -> None:
            t = time.perf_counter()
            super().__init__(*args, **kwargs)
            timing["load_s"] = time.perf_counter() - t
            timing.update(_loaded())

        def run_many(self, units):
            t = time.perf_counter()
            yield from super().run_many(units)
            timing["units_s"] += time.perf_counter() - t

    extract.UnitRunner = TimedRunner
    out = tempfile.mkdtemp(prefix="sdfeat-bench-", dir=job["tmp"])
    try:
        spec = parse_spec({
            "model": job["model_dir"], "source": f"synthetic:{job['n']}", "resolution": job["resolution"],
            "protocol": "paper", "blocks": _blocks(job["blocks"]), "timesteps": job["timesteps"], "seeds": [SEED],
            "batch_size": job["batch_size"], "output": out, "latent_cache": job.get("cache"),
        })
        t = time.perf_counter()
        summary = extract.run_local(spec, progress=False, threads=job["threads"])
        total_s = time.perf_counter() - t
        store = open_store(out)
        if not store.ok.all() or len(store.blocks) != len(_blocks(job["blocks"])):
            raise RuntimeError(f"store incomplete: ok={int(store.ok.sum())}/{len(store.ok)}, blocks={len(store.blocks)}")
        store_bytes = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {**timing, "extract_s": total_s - timing["load_s"], "stages_s": summary["seconds"],
            "store_gb": store_bytes / 1e9}


def child_build(job: dict) -> dict:
    """Save an SD-1.5-architecture pipeline with deterministic random weights (float16 safetensors, what both
    tools load and then cast to float32) as a normal diffusers directory."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdfeat.models.loading import build_tiny_pipeline, save_tiny_pipeline
    from sdfeat.models.registry import shipped_config

    path = Path(job["model_dir"])
    if job["model"] == "tiny":
        save_tiny_pipeline(path)
        return {}
    tokenizer = build_tiny_pipeline().tokenizer  # a valid CLIP tokenizer; random text weights make text moot
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(shipped_config("sd15", "unet"))
    torch.manual_seed(1)
    vae = AutoencoderKL.from_config(shipped_config("sd15", "vae"))
    torch.manual_seed(2)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**shipped_config("sd15", "text_encoder"), **ids}))
    scheduler_config = shipped_config("sd15", "scheduler")
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(path, safe_serialization=True)
    return {}


CHILDREN = {"sdhelper": child_sdhelper, "sdfeat": child_sdfeat, "build": child_build}


def child_main(tool: str, job_json: str) -> None:
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    result = CHILDREN[tool](json.loads(job_json))
    if "cpu_at_load_end" in result:
        result["extract_cpu_s"] = _cpu_s() - result.pop("cpu_at_load_end")
    if "load_peak_gb" in result:  # peak since loading ended (VmHWM was reset then) and over the whole process
        result["extract_peak_gb"] = _rss_gb("VmHWM")
        result["peak_rss_gb"] = max(result["load_peak_gb"], result["extract_peak_gb"])
    else:
        result["peak_rss_gb"] = _peak_rss_gb()
    print(RESULT_TAG + json.dumps(result), flush=True)


# -- the driver -----------------------------------------------------------------------------------------

@dataclass
class Run:
    tool: str
    job: dict
    result: dict = field(default_factory=dict)
    load_before: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.job["n"] / self.result["extract_s"]

    @property
    def images_per_cpu_s(self) -> float:
        return self.job["n"] / self.result["extract_cpu_s"]


def run_child(tool: str, job: dict) -> Run:
    run = Run(tool, job, load_before=os.getloadavg()[0])
    proc = subprocess.run([sys.executable, __file__, "_child", tool, json.dumps(job)], capture_output=True,
                          text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode or not lines:
        sys.exit(f"{tool} child failed (exit {proc.returncode}) for {job}:\n{proc.stderr[-3000:]}")
    run.result = json.loads(lines[-1].removeprefix(RESULT_TAG))
    r = run.result
    extra = f" img/s={run.images_per_s:.3f} img/cpu-s={run.images_per_cpu_s:.3f}" if tool != "build" else ""
    shown = {k: v for k, v in job.items() if k not in ("model_dir", "tmp", "cache")}
    if job.get("cache") and tool == "sdfeat":
        shown["latent_cache"] = "yes"
    print(f"  [{tool:8s}] {json.dumps(shown)}"
          f" load={r.get('load_s', 0):.1f}s extract={r.get('extract_s', 0):.1f}s{extra}"
          f" (units {r.get('units_s', 0):.1f}s) peak={r['peak_rss_gb']:.2f}GB (load peak "
          f"{r.get('load_peak_gb', 0):.2f}, after load {r.get('loaded_rss_gb', 0):.2f}, extraction peak "
          f"{r.get('extract_peak_gb', 0):.2f}) loadavg={run.load_before:.1f}", flush=True)
    return run


def ensure_model_dir(model: str, cache: Path) -> Path:
    path = cache / ("tiny" if model == "tiny" else "sd15-random-fp16")
    if not (path / "model_index.json").is_file():
        print(f"building {path} (once)", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        run_child("build", {"model": model, "model_dir": str(partial)})
        partial.rename(path)
    return path


def best(runs: list[Run]) -> Run:
    """The fastest repeat (least disturbed by other load on a shared machine); peak RSS is the max of repeats."""
    return max(runs, key=lambda r: r.images_per_s)


def compare(name: str, base_job: dict, repeats: int) -> dict:
    """sdhelper and sdfeat interleaved (A B A B ...) on the same job."""
    runs: dict[str, list[Run]] = {"sdhelper": [], "sdfeat": []}
    for _ in range(repeats):
        for tool in runs:
            runs[tool].append(run_child(tool, base_job))
    h, f = best(runs["sdhelper"]), best(runs["sdfeat"])
    h_rss = max(r.result["peak_rss_gb"] for r in runs["sdhelper"])
    f_rss = max(r.result["peak_rss_gb"] for r in runs["sdfeat"])
    h_x = max(r.result["extract_peak_gb"] for r in runs["sdhelper"])
    f_x = max(r.result["extract_peak_gb"] for r in runs["sdfeat"])
    h_cpu = max(r.images_per_cpu_s for r in runs["sdhelper"])
    f_cpu = max(r.images_per_cpu_s for r in runs["sdfeat"])
    return {"config": name, "h_ips": h.images_per_s, "f_ips": f.images_per_s, "h_rss": h_rss, "f_rss": f_rss,
            "cpu_ratio": f_cpu / h_cpu,
            "h_x": h_x, "f_x": f_x, "f_unit_ips": f.job["n"] / f.result["units_s"],
            "all_h": [round(r.images_per_s, 3) for r in runs["sdhelper"]],
            "all_f": [round(r.images_per_s, 3) for r in runs["sdfeat"]], "f_stages": f.result["stages_s"],
            "loads": [round(r.load_before, 1) for rs in runs.values() for r in rs]}


def flatness(label: str, job: dict, sizes: list[int]) -> dict:
    results = [run_child("sdfeat", {**job, "n": n}).result for n in sizes]
    peaks = [r["peak_rss_gb"] for r in results]
    extraction = [r["extract_peak_gb"] for r in results]  # without the model-loading transient
    return {"config": label, "sizes": sizes, "peaks": peaks, "ratio": peaks[-1] / peaks[0],
            "extraction_ratio": extraction[-1] / extraction[0]}


def machine_line(threads: int) -> str:
    import torch

    return (f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, Python "
            f"{platform.python_version()}, torch {torch.__version__} ({threads} threads per run), "
            f"load average now {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def print_table(rows: list[dict], flat: list[dict], targets: dict) -> None:
    print("\n| config | sdhelper img/s | sdfeat img/s | speed ratio | target | sdhelper peak RSS | sdfeat peak RSS "
          "| RSS ratio | target | extraction-phase peak h / f | sdfeat img/s in units | speed ratio per CPU-second "
          "| load avg during runs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        speed, rss = r["f_ips"] / r["h_ips"], r["f_rss"] / r["h_rss"]
        t_speed, t_rss = targets[r["config"]]
        ok_speed = "ok" if speed >= t_speed else "MISS"
        ok_rss = "" if t_rss is None else (" ok" if rss <= t_rss else " MISS")
        print(f"| {r['config']} | {r['h_ips']:.3f} {r['all_h']} | {r['f_ips']:.3f} {r['all_f']} | {speed:.2f}× "
              f"| ≥{t_speed}× {ok_speed} | {r['h_rss']:.2f} GB | {r['f_rss']:.2f} GB | {rss:.2f}× "
              f"| {'–' if t_rss is None else f'≤{t_rss}×'}{ok_rss} | {r['h_x']:.2f} / {r['f_x']:.2f} GB "
              f"| {r['f_unit_ips']:.3f} | {r['cpu_ratio']:.2f}× | {r['loads']} |")
    for f in flat:
        peaks = " → ".join(f"{p:.2f} GB @ {n}" for n, p in zip(f["sizes"], f["peaks"]))
        print(f"| {f['config']} | – | – | – | – | – | {peaks} | {f['ratio']:.3f}× (large/small; extraction "
              f"phase {f['extraction_ratio']:.3f}×) "
              f"| flat (≤1.05×) {'ok' if f['ratio'] <= 1.05 else 'MISS'} | – | – | – | – |")
    print("\nsdfeat stage seconds (fastest repeat; busy time per stage, see sdfeat/extract/stages.py):")
    for r in rows:
        print(f"  {r['config']}: {r['f_stages']}")


def weights_gb(model_dir: Path, bytes_per_value: int = 4) -> float:
    """U-Net + VAE encoder (+ quant_conv) in the compute dtype (float32 on a CPU), from the safetensors headers."""
    import struct

    total = 0
    for sub, keep in (("unet", lambda n: True), ("vae", lambda n: n.startswith(("encoder.", "quant_conv.")))):
        with open(model_dir / sub / "diffusion_pytorch_model.safetensors", "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        header.pop("__metadata__", None)
        for name, info in header.items():
            if keep(name):
                n = 1
                for d in info["shape"]:
                    n *= d
                total += n
    return total * bytes_per_value / 1e9


def print_rss_target(rows: list[dict], model_dir: Path) -> None:
    limit = weights_gb(model_dir) + 1.0
    print(f"\nsdfeat peak RSS target: weights in float32 {limit - 1:.2f} GB + 1 GB = {limit:.2f} GB")
    for r in rows:
        print(f"  {r['config']}: {r['f_rss']:.2f} GB {'ok' if r['f_rss'] <= limit else 'MISS'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["sd15", "tiny"], default="sd15",
                        help="sd15: SD-1.5 architecture, random weights (the targets); tiny: a smoke test")
    parser.add_argument("--n", type=int, default=8, help="images per run in configs 1-3")
    parser.add_argument("--batch-size", type=int, default=8, help="both tools' batch size (sdhelper default 20)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of config 1 (A B A B ...)")
    parser.add_argument("--repeats-other", type=int, default=1, help="repeats of configs 2 and 3")
    parser.add_argument("--configs", default="1,2,3,4,5,6", help="comma-separated subset of 1,2,3,4,5,6")
    parser.add_argument("--flat-sizes", default="100,1000", help="config 4: image counts compared")
    parser.add_argument("--flat-resolution", type=int, default=64, help="config 4: resolution for SD-1.5")
    parser.add_argument("--flat-tiny-resolution", type=int, default=256, help="config 4: resolution for tiny")
    parser.add_argument("--flat-models", default="sd15,tiny", help="config 4: which models (sd15, tiny)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/sdfeat-bench"))
    args = parser.parse_args()
    configs = {int(c) for c in args.configs.split(",")}
    sizes = [int(s) for s in args.flat_sizes.split(",")]

    print(machine_line(args.threads), flush=True)
    print(f"sdhelper 1.0.0 reference (SD-1.5, 256 px, 45 blocks, 2 threads, 20 images): "
          f"{SDHELPER_REFERENCE['img_per_s']} img/s, {SDHELPER_REFERENCE['peak_rss_gb_20_images']} GB peak, "
          f"+{SDHELPER_REFERENCE['rss_growth_mb_per_image']} MB per image", flush=True)
    model_dir = ensure_model_dir(args.model, args.cache)
    tmp = args.cache / "stores"
    tmp.mkdir(parents=True, exist_ok=True)
    base = {"model_dir": str(model_dir), "tmp": str(tmp), "n": args.n, "batch_size": args.batch_size,
            "resolution": args.resolution, "threads": args.threads, "blocks": "paper", "timesteps": [50]}
    rows, flat = [], []
    targets = {"1 paper 45 blocks": (1.0, 0.6), "2 early exit (up_blocks.1)": (1.5, None),
               "3 four timesteps": (1.7, None), "5 paper 45 blocks, warm latent cache": (2.0, None),
               "6 early exit (up_blocks.1), warm latent cache": (3.0, None)}
    if 1 in configs:
        print(f"config 1: 45 paper blocks, t=50, {args.n} images, {args.resolution} px", flush=True)
        rows.append(compare("1 paper 45 blocks", base, args.repeats))
    if 2 in configs:
        print(f"config 2: paper blocks up to {EARLY_EXIT_LAST_BLOCK}", flush=True)
        rows.append(compare("2 early exit (up_blocks.1)", {**base, "blocks": "early"}, args.repeats_other))
    if 3 in configs:
        print(f"config 3: timesteps {FOUR_TIMESTEPS}", flush=True)
        rows.append(compare("3 four timesteps", {**base, "timesteps": FOUR_TIMESTEPS}, args.repeats_other))
    for config, name, blocks in ((5, "5 paper 45 blocks, warm latent cache", "paper"),
                                 (6, "6 early exit (up_blocks.1), warm latent cache", "early")):
        if config in configs:
            cache = args.cache / f"latent-cache-{config}"
            shutil.rmtree(cache, ignore_errors=True)
            job = {**base, "blocks": blocks, "cache": str(cache)}
            print(f"config {name}: warming {cache} (untimed sdfeat run)", flush=True)
            run_child("sdfeat", job)
            rows.append(compare(name, job, args.repeats_other))
    if 4 in configs:
        for model in args.flat_models.split(","):
            res = args.flat_tiny_resolution if model == "tiny" else args.flat_resolution
            mdir = ensure_model_dir(model, args.cache) if model != args.model else model_dir
            label = f"4 flat RSS, {'SD-1.5' if model == 'sd15' else model} @ {res} px"
            print(f"config {label}: sdfeat at {sizes} images (batch {args.batch_size})", flush=True)
            flat.append(flatness(label, {**base, "model_dir": str(mdir), "resolution": res}, sizes))
    print_table(rows, flat, targets)
    if rows:
        print_rss_target(rows, model_dir)
    print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_child":
        child_main(sys.argv[2], sys.argv[3])
    else:
        main()
