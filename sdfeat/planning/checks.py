"""Cheap checks of a job against the world, run before anything heavy (torch, diffusers, a model, a meta forward):
the model is one sdfeat knows, the output can hold a store, the source exists, and the requested block names exist
in the model's config. Whether the model's weights are here is `registry.require_weights`, run by the runners
before a job writes anything (on Ray: where the actors run).

`cli extract` runs `check_job` before it imports the extraction modules, so a misspelt block or a missing source
is reported in a fraction of a second; `extract.prepare_job` runs it too (for Python callers and Ray). Each
failure is one line naming the field. Imports fsspec and `registry` only (no torch, no diffusers, no pyarrow).
"""

from __future__ import annotations

from pathlib import Path

import fsspec

from sdfeat.errors import ModelNotFoundError, SourceNotFoundError, SpecError
from sdfeat.models.blocks import check_names
from sdfeat.models.families import for_config, sd
from sdfeat.models.registry import local_unet_config, locate
from sdfeat.spec import JobSpec

_GLOB_CHARS = "*?["


def check_output(spec: JobSpec) -> None:
    """The output must be a directory or a path that does not exist yet (never an existing file)."""
    fs, path = fsspec.core.url_to_fs(spec.output)
    if fs.isfile(path):
        raise SpecError(f"field 'output': {spec.output} is an existing file; the store needs a directory (or a "
                        "path that does not exist yet)")
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        parent = Path(path).parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise SpecError(f"field 'output': {spec.output} lies under {parent}, which is a file")
        source = Path(spec.source)
        if not spec.source.startswith("synthetic:") and source.is_dir() and \
                Path(path).resolve().is_relative_to(source.resolve()):
            raise SpecError(f"field 'output': {spec.output} lies inside the source {spec.source}; the store's "
                            "files would become part of the source")


def check_source(spec: JobSpec) -> None:
    """The source path exists (or its glob matches something). Synthetic sources always exist."""
    if spec.source.startswith("synthetic:"):
        return
    fs, path = fsspec.core.url_to_fs(spec.source)
    if any(c in path for c in _GLOB_CHARS):
        if not fs.glob(path):
            raise SourceNotFoundError(f"field 'source': {spec.source}: the glob matches nothing")
    elif not fs.exists(path):
        raise SourceNotFoundError(f"field 'source': {spec.source}: no such file or directory")


def check_model(spec: JobSpec) -> None:
    """The model names a registry model, `tiny`, `random:<name>`, a hub id or a local directory (no I/O but a
    directory test)."""
    try:
        locate(spec.model)
    except ModelNotFoundError as err:
        raise SpecError(f"field 'model': {err}") from None


def check_blocks(spec: JobSpec) -> None:
    """Every requested block (and summary block) is a position of the model, by name only."""
    config = local_unet_config(spec.model)  # None for a hub id: its names are checked by the layout later
    positions = for_config(config).config_positions(config) if config is not None else None
    if positions is None:
        return  # names checked by the meta forward later
    check_names(spec.blocks, positions, "blocks", config)
    if spec.summaries is not None:
        check_names(spec.summaries.blocks, positions, "summaries.blocks", config)


def check_family(spec: JobSpec) -> None:
    """What the model's family defines: the protocol, the `conditioning` keys, a prompt, a padding intervention
    (a local or hub model whose config is not here yet counts as SD until its config is read)."""
    config = local_unet_config(spec.model)
    family = for_config(config) if config is not None else sd
    if spec.protocol not in family.PROTOCOLS:
        raise SpecError(f"field 'protocol': {spec.protocol!r} reproduces sdhelper 1.0.0 on SD-1.5, SD-2.1 and "
                        f"SD-Turbo only; model {spec.model!r} ({family.NAME} family) runs: "
                        f"{', '.join(family.PROTOCOLS)}")
    unknown = sorted(set(spec.conditioning) - set(family.SETTINGS))
    if unknown:
        raise SpecError(f"field 'conditioning.{unknown[0]}': unknown for the {family.NAME} family; known: "
                        f"{', '.join(family.SETTINGS) or 'none (the prompt conditions it)'}")
    if spec.prompt and not family.TAKES_PROMPT:
        raise SpecError(f"field 'prompt': model {spec.model!r} ({family.NAME} family) takes no prompt; its "
                        f"field 'conditioning' keys: {', '.join(family.SETTINGS)}")
    if spec.intervention is not None and spec.intervention.padding != "zeros" and not family.PADDING_INTERVENTIONS:
        raise SpecError(f"field 'intervention': model {spec.model!r} ({family.NAME} family) has no zero-padded "
                        "convolution; padding interventions do not apply")


def check_spec(spec: JobSpec) -> None:
    """The checks that need none of the job's paths (for `plan` and `submit`, whose source and output may not be
    reachable from here): the model and the block names."""
    check_model(spec)
    check_family(spec)
    check_blocks(spec)


def check_job(spec: JobSpec) -> None:
    """All cheap checks, cheapest first. Raises SpecError, SourceNotFoundError or UnknownBlockError."""
    check_model(spec)
    check_family(spec)
    check_output(spec)
    check_blocks(spec)
    check_source(spec)
