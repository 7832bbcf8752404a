"""The job spec: one YAML file names the model, the images, the blocks, timesteps, seeds and the output store.

Everything downstream (planning, the store template, the workers, the metrics) reads a validated `JobSpec`.
Validation is strict (unknown keys are errors) and happens before any model is loaded. `spec_hash` identifies
the work a spec describes; it ignores `output`, so the same job written elsewhere keeps its identity, and
`latent_cache` and `write_workers`, which change no stored byte (a job with a warm, cold or no cache, written by
any number of threads, is the same job).
"""

from __future__ import annotations

import hashlib
import json
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sdfeat.errors import SpecError

SPEC_VERSION = 1
MAX_SEED = 2**63 - 1  # seeds are stored as int64 (the store's `seed` coordinate) and seed torch's RNG


def _unique(values: list | str, what: str) -> list | str:
    """The list field's values, refusing repeats (a repeated timestep, seed, block or crop would store the same
    work twice); `what` names the values in the message. Presets such as "paper" pass through."""
    if isinstance(values, list) and len(set(values)) != len(values):
        raise ValueError(f"{what} must be unique")
    return values


class _Strict(BaseModel):
    # strict: YAML's `yes`/`on` are booleans and 1.0 a float; neither may silently become an int (or vice versa)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Variants(_Strict):
    """Extra extractions of each image, stored beside the full-size arrays.

    `crops`: margins in pixels; every image is cropped by the margin on each side (no resize) and extracted again.
    `auto` takes, for every block size n among the requested blocks, the paper's one-token margin resolution // n.
    `samples`: extract the crops of the first N store rows only (rows 0..N-1; the corner/border means converge long
    before a full ImageNet); crop arrays then have exactly min(N, samples) rows. None: every row.
    """

    crops: list[int] | Literal["auto"] = Field(default_factory=list)
    samples: int | None = Field(default=None, ge=1)

    @field_validator("crops")
    @classmethod
    def _positive_margins(cls, v: list[int] | str) -> list[int] | str:
        if isinstance(v, list):
            if any(m <= 0 for m in v):
                raise ValueError("crop margins must be positive pixel counts")
        return _unique(v, "crop margins")


class Summaries(_Strict):
    """Small per-image summaries computed on the device for every summary block (full-ImageNet jobs).

    Full tensors are then stored only for `JobSpec.blocks`; the metrics run on the summaries.
    """

    blocks: list[str] | str = "paper"  # names, or a preset of the model's family (`paper`, `all`, ...)
    tokens_per_image: int = Field(default=16, ge=1, le=4096)


Protocol = Literal["paper", "standard"]  # what each means: PROTOCOL.md; which a model runs: its family's PROTOCOLS
PROTOCOLS: tuple[str, ...] = typing.get_args(Protocol)
PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]
PADDING_MODES: tuple[str, ...] = typing.get_args(PaddingMode)
PaddingScope = Literal["unet", "unet+vae"]
PADDING_SCOPES: tuple[str, ...] = typing.get_args(PaddingScope)


class Intervention(_Strict):
    """Change the model at load time (`sdfeat.models.interventions`): every padded Conv2d in `scope` pads with `padding`
    instead of zeros (weights untouched). `zeros` is the model as released and counts as no intervention."""

    padding: PaddingMode = "zeros"
    scope: PaddingScope = "unet"


class JobSpec(_Strict):
    spec_version: Literal[1] = SPEC_VERSION
    model: str = "tiny"
    revision: str | None = None
    protocol: Protocol = "standard"
    source: str
    source_format: Literal["auto", "parquet", "folder", "webdataset", "synthetic"] = "auto"
    limit: int | None = Field(default=None, ge=1)
    classes: list[int] | None = None
    resolution: int = Field(default=512, ge=64, le=2048)
    blocks: list[str] | str = "paper"  # names, or a preset of the model's family (`paper`, `all`, ...)
    timesteps: list[int] = Field(default_factory=lambda: [50], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [42], min_length=1)
    batch_size: int = Field(default=20, ge=1, le=4096)
    prompt: str = ""
    conditioning: dict[str, Any] = Field(default_factory=dict)  # the family's own settings (SDXL time ids, DiT class)
    dtype: Literal["float16", "float32"] = "float16"
    compute_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    codec: Literal["none", "zstd"] = "none"
    compile: bool = False  # torch.compile the VAE encoder and the U-Net blocks on a GPU (warm-up per worker)
    unit_size: int | None = Field(default=None, ge=1)
    variants: Variants = Field(default_factory=Variants)
    summaries: Summaries | None = None
    intervention: Intervention | None = None
    latent_cache: str | None = None  # folder or fsspec URL of the VAE latent cache (`sdfeat.extract.latent_cache`)
    write_workers: int | None = Field(default=None, ge=1)  # shards written at once per worker; None: min(4, cores)
    output: str

    @field_validator("resolution")
    @classmethod
    def _resolution_multiple_of_64(cls, v: int) -> int:
        if v % 64:
            raise ValueError(f"must be a multiple of 64 (the U-Net halves the latent three times), got {v}")
        return v

    @field_validator("output")
    @classmethod
    def _output_names_a_place(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a directory or URL for the store (got an empty string)")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt_placeholders(cls, v: str) -> str:
        try:
            v.format(class_name="x")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"the only placeholder allowed is {{class_name}} (got {err!s})") from None
        return v

    @field_validator("timesteps")
    @classmethod
    def _timesteps_in_range(cls, v: list[int]) -> list[int]:
        if any(not 0 <= t <= 999 for t in v):
            raise ValueError("every timestep must lie in 0..999")
        return _unique(v, "timesteps")

    @field_validator("seeds")
    @classmethod
    def _seeds_unique(cls, v: list[int]) -> list[int]:
        if any(not 0 <= s <= MAX_SEED for s in v):
            raise ValueError(f"every seed must lie in 0..2**63-1 ({MAX_SEED})")
        return _unique(v, "seeds")

    @field_validator("intervention")
    @classmethod
    def _zeros_is_no_intervention(cls, v: Intervention | None) -> Intervention | None:
        return None if v is None or v.padding == "zeros" else v  # same hash and store as a job without the key

    @field_validator("classes")
    @classmethod
    def _classes_non_negative(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(c < 0 for c in v)):
            raise ValueError("must be a non-empty list of non-negative class indices")
        return v

    @field_validator("blocks")
    @classmethod
    def _blocks_unique(cls, v: list[str] | str) -> list[str] | str:
        return _unique(v, "block names")

    @model_validator(mode="after")
    def _needs_something_to_store(self) -> "JobSpec":
        if self.blocks == [] and self.summaries is None:
            raise ValueError("blocks is empty and no summaries are asked for: nothing would be stored")
        return self

    @model_validator(mode="after")
    def _reflect_needs_room(self) -> "JobSpec":
        if self.intervention is not None and self.intervention.padding == "reflect" and self.resolution < 128:
            raise ValueError("intervention padding 'reflect' needs resolution >= 128 (the deepest maps are "
                             "resolution/64 tokens wide and reflection needs more than the 1-token padding)")
        return self


def spec_hash(spec: JobSpec) -> str:
    """16 hex digits identifying the work (every field except `output`, `latent_cache` and `write_workers`)."""
    payload = spec.model_dump(mode="json", exclude={"output", "latent_cache", "write_workers"})
    if payload["variants"].get("samples") is None:
        payload["variants"].pop("samples", None)  # unset: the hash of stores made before the key existed
    if payload.get("intervention", 0) is None:
        payload.pop("intervention")  # none (or zeros): the hash of stores made before the key existed
    if not payload.get("conditioning", True):
        payload.pop("conditioning")  # none: the hash of stores made before the key existed
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _model_at(loc: tuple) -> Any:
    """The pydantic model that holds the key at `loc` (JobSpec for a top-level key), or None."""
    import typing

    model: Any = JobSpec
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        nested = [a for a in (field.annotation, *typing.get_args(field.annotation)) if hasattr(a, "model_fields")]
        if not nested:
            return None
        model = nested[0]
    return model


def _nearest_key(loc: tuple) -> str:
    """'; did you mean 'x'?' for an unknown key at `loc`, from the keys of the model that holds it (difflib); for
    a top-level key that belongs to a section (`crops` of `variants:`), where to indent it."""
    import difflib

    model = _model_at(loc)
    if model is None:
        return ""
    keys = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    if len(loc) == 1:
        for section in JobSpec.model_fields:
            owner = _model_at((section, loc[-1]))
            if owner is not None and owner is not JobSpec and loc[-1] in owner.model_fields:
                return f"; it is a key of '{section}:' (indent it under '{section}:')"
    return f"; valid keys: {', '.join(keys)}"


def _field(loc: tuple) -> str:
    """The dotted key of an error's location, without pydantic's tags of union members (`list[str]`)."""
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and ("[" in p or "(" in p))) or "(top level)"


def _message(error: dict) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key" + _nearest_key(error["loc"])
    if error.get("input", "") is None:
        return "has no value (an empty key in the YAML; if the lines below it belong to it, indent them)"
    return error["msg"]


def _format_validation_error(err: ValidationError, origin: str, shown: int = 3) -> str:
    """Every problem in one line, unknown keys first (a dedented key makes its section empty too: the unknown key
    says why); the messages of one key's union members joined."""
    by_field: dict[str, list[str]] = {}
    for error in sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden"):
        messages = by_field.setdefault(_field(error["loc"]), [])
        if _message(error) not in messages:
            messages.append(_message(error))
    parts = [f"field '{field}': {' or '.join(messages)}" for field, messages in by_field.items()]
    more = f" (and {len(parts) - shown} more)" if len(parts) > shown else ""
    return f"{origin}: " + "; ".join(parts[:shown]) + more


def parse_spec(data: Any, origin: str = "job spec", **overrides: Any) -> JobSpec:
    """Validate a mapping (already parsed YAML) into a `JobSpec`; `overrides` replace keys (None = keep)."""
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: expected a mapping of keys to values, got {type(data).__name__}")
    merged = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return JobSpec.model_validate(merged)
    except ValidationError as err:
        raise SpecError(_format_validation_error(err, origin)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (lines {first} and {line})", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_spec(path: str | Path, **overrides: Any) -> JobSpec:
    """Read a YAML job spec with a safe loader that refuses duplicate keys; errors name the file and the field."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"job spec not found: {path}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(f"{where}: not valid YAML: {problem}") from None
    return parse_spec(data, origin=str(path), **overrides)


def spec_to_yaml(spec: JobSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
