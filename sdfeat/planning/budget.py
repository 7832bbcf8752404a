"""Hours before anything runs: a job's time per stage from its FLOPs and bytes at measured rates (`rates`), and the
full-ImageNet budget (ImageNet-train × sd15, sd21, sdturbo, with and without a warm latent cache).

Stages, per image: the VAE encoder (skipped with a warm latent cache); the U-Net up to the deepest hooked block
(its FLOPs from `costs`, so an early exit costs its share of the forward) once per seed × timestep; per crop margin
the same two on the cropped image, for the first `variants.samples` rows only; writes (the store's bytes over the
write rate); decoding on the host (skipped with a warm cache). GPU actors decode and write while the device
computes, so the job takes max(compute, writes, decoding); the serial sum is printed beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdfeat.errors import SpecError
from sdfeat.models.families import for_config
from sdfeat.models.registry import unet_config
from sdfeat.planning.costs import pass_costs
from sdfeat.planning.layout import Layout, job_layout
from sdfeat.planning.rates import Rates, end_to_end_runs, host_costs, recorded
from sdfeat.spec import JobSpec

IMAGENET_TRAIN = 1_281_167
BUDGET_MODELS: tuple[str, ...] = ("sd15", "sd21", "sdturbo")
AIM_GPU_HOURS = 5.0   # all three models
AIM_BYTES = 5e12      # all three stores


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str                 # vae, unet, write, decode
    images: int
    seconds_per_image: float
    flops_per_image: float | None = None

    @property
    def seconds(self) -> float:
        return self.images * self.seconds_per_image


@dataclass
class StageEstimate:
    spec: JobSpec
    n_samples: int
    rates: Rates
    warm_cache: bool
    bytes: int
    stages: list[Stage] = field(default_factory=list)

    def seconds(self, *kinds: str) -> float:
        return sum(s.seconds for s in self.stages if s.kind in kinds)

    @property
    def flops(self) -> float:
        return sum(s.images * (s.flops_per_image or 0.0) for s in self.stages)

    @property
    def serial_hours(self) -> float:
        return self.seconds("vae", "unet", "write", "decode") / 3600

    @property
    def hours(self) -> float:
        """Decoding and writes overlap the device's work: the slowest of the three bounds the job."""
        return max(self.seconds("vae", "unet"), self.seconds("write"), self.seconds("decode")) / 3600

    def as_dict(self) -> dict:
        """`sdfeat plan --json`: hours per stage and for the job, from which rates."""
        return {"n_samples": self.n_samples, "warm_cache": self.warm_cache, "bytes": self.bytes,
                "hours": self.hours, "serial_hours": self.serial_hours, "rates": self.rates.source,
                "stages": [{"name": s.name, "kind": s.kind, "images": s.images,
                            "seconds_per_image": s.seconds_per_image, "flops_per_image": s.flops_per_image,
                            "hours": s.seconds / 3600} for s in self.stages]}


def estimate_stages(spec: JobSpec, n_samples: int, rates: Rates, warm_cache: bool = False,
                    layout: Layout | None = None) -> StageEstimate:
    layout = layout or job_layout(spec)
    crop_images = min(n_samples, spec.variants.samples or n_samples)
    total_bytes = layout.total_bytes(n_samples)
    est = StageEstimate(spec, n_samples, rates, warm_cache, total_bytes)
    for cost in pass_costs(spec, layout):
        images = n_samples if cost.margin == 0 else crop_images
        label = "full image" if cost.margin == 0 else f"crop {cost.margin} px"
        if not warm_cache:
            if rates.vae_flops_per_s is None:
                raise SpecError(f"{rates.source} measured no VAE time (a warm latent cache?); "
                                "estimate with the recorded rates or --warm-cache")
            est.stages.append(Stage(f"VAE encoder · {label}", "vae", images,
                                    cost.vae_flops / rates.vae_flops_per_s, cost.vae_flops))
        est.stages.append(Stage(f"U-Net · {label}", "unet", images,
                                cost.unet_flops / rates.unet_flops_per_s, cost.unet_flops))
    est.stages.append(Stage("write", "write", n_samples, total_bytes / n_samples / rates.write_bytes_per_s))
    if rates.decode_s_per_image is not None and not warm_cache:
        est.stages.append(Stage("decode (host)", "decode", n_samples, rates.decode_s_per_image))
    return est


def _tb(n: float) -> str:
    return f"{n / 1e12:.2f} TB"


def render_stages(est: StageEstimate):  # -> rich.table.Table
    from rich.table import Table

    cache = " · warm latent cache" if est.warm_cache else ""
    table = Table("stage", "images", "GFLOP/img", "ms/img", "hours",
                  title=f"{est.spec.model} · {est.n_samples:,} images · time per stage{cache}")
    for s in est.stages:
        gflop = f"{s.flops_per_image / 1e9:,.0f}" if s.flops_per_image is not None else "–"
        table.add_row(s.name, f"{s.images:,}", gflop, f"{s.seconds_per_image * 1e3:.3f}", f"{s.seconds / 3600:.2f}")
    table.add_row("[bold]job", "", f"{est.flops / est.n_samples / 1e9:,.0f}", "", f"[bold]{est.hours:.2f}")
    table.caption = (f"{est.hours:.2f} h with decoding and writes overlapping the device ({est.serial_hours:.2f} h "
                     f"in sequence); {_tb(est.bytes)} written; rates: {est.rates.source}")
    return table


@dataclass
class ModelBudget:
    model: str
    cold: StageEstimate
    warm: StageEstimate

    @property
    def cache_fill_hours(self) -> float:
        """Filling the latent cache: the cold run's VAE stages, once per distinct VAE."""
        return self.cold.seconds("vae") / 3600

    def as_dict(self) -> dict:
        return {"model": self.model, "cold_hours": self.cold.hours, "warm_cache_hours": self.warm.hours,
                "cache_fill_hours": self.cache_fill_hours, "bytes": self.cold.bytes}


def imagenet_budget(spec: JobSpec, rates: Rates, n_samples: int = IMAGENET_TRAIN,
                    models: tuple[str, ...] = BUDGET_MODELS) -> list[ModelBudget]:
    """The job `spec` over `n_samples` images for each of `models` (the spec's model replaced). For a model of
    another family the spec's parts that its family does not define are replaced by the family's analogues, and the
    row names them: a block preset it lacks by `all` (every position), `protocol: paper` by `standard`."""
    budgets = []
    for model in models:
        job, label = _for_model(spec, model)
        layout = job_layout(job)
        budgets.append(ModelBudget(label, estimate_stages(job, n_samples, rates, False, layout),
                                   estimate_stages(job, n_samples, rates, True, layout)))
    return budgets


def _for_model(spec: JobSpec, model: str) -> tuple[JobSpec, str]:
    """`spec` for `model`, and the budget row's label (the model, and what was replaced for its family)."""
    config = unet_config(model)
    family = for_config(config)
    presets = family.presets(config)
    update: dict = {"model": model}
    changed = []
    if isinstance(spec.blocks, str) and spec.blocks not in presets:
        update["blocks"] = "all"
        changed.append("blocks: all")
    if spec.summaries is not None and isinstance(spec.summaries.blocks, str) and spec.summaries.blocks not in presets:
        update["summaries"] = spec.summaries.model_copy(update={"blocks": "all"})
        changed.append("summaries: all")
    if spec.protocol not in family.PROTOCOLS:
        update["protocol"] = "standard"
        changed.append("standard")
    return spec.model_copy(update=update), model + (f" ({', '.join(changed)})" if changed else "")


def _end_to_end_line(budgets: list[ModelBudget]) -> str:
    """What the hours above rest on: recorded whole-job rates where a GPU run measured them, else a warning that
    stage rates measured apart were added as if decoding and writing overlapped perfectly, with the host cost."""
    runs = [r for r in end_to_end_runs() if r.get("job") == "summaries"]
    if runs:
        measured = ", ".join(f"{r['cache']} {r['img_s']:g} img/s" for r in runs)
        hours = {r["cache"]: len(budgets) * budgets[0].cold.n_samples / r["img_s"] / 3600 for r in runs}
        return (f"end to end (recorded {runs[0].get('recorded')}, {runs[0].get('device')}, SD-1.5 summaries job): "
                f"{measured} → " + ", ".join(f"{k} {v:.2f} GPU-h" for k, v in hours.items()) +
                f" for {len(budgets)} models at that rate")
    host = host_costs().get("summaries", {})
    feed = "" if not host else (
        f"; the host needs {host['cold'] * 1e3:.0f} ms CPU per image cold, {host['warm'] * 1e3:.0f} ms warm "
        f"(simulated device), i.e. ≥{host['cold'] * budgets[0].cold.n_samples / max(budgets[0].cold.hours, 1e-9) / 3600:.1f} "
        "cores per GPU at the cold rate above")
    return ("end to end: not measured on a GPU yet; these hours add stage rates measured apart, as if decoding "
            "and writing overlapped the device perfectly" + feed)


def _fits(value: float, aim: float) -> str:
    return "fits" if value <= aim else f"over by {value / aim:.2f}×"


def render_budget(budgets: list[ModelBudget], device_peak: float | None):  # -> (Table, list[str])
    from rich.table import Table

    n = budgets[0].cold.n_samples
    table = Table("model", "cold GPU-h", "warm-cache GPU-h", "cache fill GPU-h", "stored",
                  title=f"{n:,} images (ImageNet-train) × {len(budgets)} models")
    for b in budgets:
        table.add_row(b.model, f"{b.cold.hours:.2f}", f"{b.warm.hours:.2f}", f"{b.cache_fill_hours:.2f}",
                      _tb(b.cold.bytes))
    cold = sum(b.cold.hours for b in budgets)
    warm = sum(b.warm.hours for b in budgets)
    fill = sum(b.cache_fill_hours for b in budgets)
    stored = sum(b.cold.bytes for b in budgets)
    table.add_row("[bold]total", f"[bold]{cold:.2f}", f"[bold]{warm:.2f}", f"{fill:.2f}", f"[bold]{_tb(stored)}")
    lines = [
        f"aim: ≤{AIM_GPU_HOURS:g} GPU-hours and ≤{AIM_BYTES / 1e12:g} TB for all {len(budgets)} models",
        f"cold (no latent cache): {cold:.2f} GPU-h → {_fits(cold, AIM_GPU_HOURS)}",
        f"warm latent cache: {warm:.2f} GPU-h → {_fits(warm, AIM_GPU_HOURS)}; filling the cache costs "
        f"{fill:.2f} GPU-h more if no two models' VAEs hash the same, once (later jobs reuse it)",
        f"storage: {_tb(stored)} → {_fits(stored, AIM_BYTES)}",
        f"rates: {budgets[0].cold.rates.source}",
        _end_to_end_line(budgets),
    ]
    if device_peak:
        flops = sum(b.cold.flops for b in budgets)
        achieved = flops / (sum(b.cold.seconds("vae", "unet") for b in budgets) or 1) / device_peak
        table_flops = recorded()["gflop_per_image"]
        arithmetic = (table_flops["vae_encoder"] + table_flops["unet_full"]) * 1e9 * n * len(budgets)
        lines.append(
            f"cross-check (FLOP arithmetic): VAE {table_flops['vae_encoder']:,} + U-Net {table_flops['unet_full']:,} "
            f"GFLOP per image × {n:,} × {len(budgets)} = {arithmetic / 1e18:.2f} EFLOP without crops = "
            f"{arithmetic / device_peak / 3600:.2f} GPU-h at the {device_peak / 1e12:,.0f} TFLOP/s peak, "
            f"{arithmetic / (device_peak / 2) / 3600:.2f} at half; this job cold: {flops / 1e18:.2f} EFLOP = "
            f"{flops / (device_peak / 2) / 3600:.2f} GPU-h at half peak; the rates above reach "
            f"{achieved:.0%} of peak")
    return table, lines
