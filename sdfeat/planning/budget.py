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
from sdfeat.planning.rates import Rates
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
