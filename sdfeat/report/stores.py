"""What the report reads from a store besides its results: Figure-1 token maps of a few images beside their inputs,
and the padding intervention the store was extracted under (the legend of the interventions figure).

A report can be made from a folder that holds only `results/` (copied off a cluster): then there are no token
maps and no intervention label, and the rest of the report is drawn as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from sdfeat.errors import SdfeatError, StoreError
from sdfeat.report.tables import weights_note

if TYPE_CHECKING:
    from sdfeat.store.query import FeatureStore

log = logging.getLogger(__name__)

MAP_BLOCKS = ("up_blocks.1.upsamplers.0", "up_blocks.1.resnets.2", "down_blocks.1.attentions.0")  # Figure-1 maps
MAP_SAMPLES = 2


def has_features(store: str | Path) -> bool:
    """Whether the folder holds a feature store (`features.zarr`), not only results."""
    from sdfeat.store.files import FEATURES, filesystem, join

    fs, root = filesystem(str(store))
    return fs.exists(join(root, FEATURES))


def intervention_label(store: str | Path) -> str | None:
    """`padding reflect (unet)` from a store's spec, `padding zeros (as released)` without an intervention; None
    where the folder holds no feature store (only results)."""
    if not has_features(store):
        return None
    from sdfeat.store.files import read_attrs

    try:
        found = read_attrs(str(store)).spec.get("intervention")
    except StoreError:
        return None
    return f"padding {found['padding']} ({found['scope']})" if found else "padding zeros (as released)"


def _input_images(features: FeatureStore, rows: Sequence[int]) -> list[np.ndarray | None]:
    """The decoded, cropped input images of store rows (as the job saw them), or None where the source is out of
    reach from here."""
    from sdfeat.sources import read_images
    from sdfeat.sources.refs import manifest_refs
    from sdfeat.store.files import read_manifest

    try:
        manifest = read_manifest(features.path)
        refs = [manifest_refs(manifest.slice(r, 1))[0] for r in rows]
        return [d.pixels for d in read_images(refs, int(features.spec.resolution))]
    except (SdfeatError, OSError, TypeError, KeyError) as err:
        log.info("token maps: input images unavailable (%s)", err)
        return [None] * len(rows)


def token_maps(store: str | Path, n_samples: int = MAP_SAMPLES, blocks: Sequence[str] = MAP_BLOCKS) -> Figure | None:
    """Figure-1 maps of the first `n_samples` usable images at the `blocks` the store holds in full (else its first
    two), first timestep and seed, each beside its input image; None for a store without full activations."""
    if not has_features(store):
        return None
    from sdfeat.report.maps import figure_1
    from sdfeat.store.query import open_store

    features = open_store(str(store))
    chosen = [b for b in blocks if b in features.blocks] or features.blocks[:2]
    rows = [int(r) for r in np.flatnonzero(features.ok)[:n_samples]]
    if not chosen or not rows:
        return None
    t, seed = features.timesteps[0], features.seeds[0]
    panels = [(f"{features.sample_ids[r]} · {b}", features.read(b, [r], timestep=t, seed=seed)[0])
              for r in rows for b in chosen]  # each (C, H, W)
    images = _input_images(features, rows)
    fig = figure_1(panels, title=f"token maps (timestep {t}, seed {seed})",
                   images=[images[i] for i in range(len(rows)) for _ in chosen])
    if weights_note(features.spec.model):
        fig.text(0.01, 0.995, f"{features.spec.model}: random weights, not the paper's results", va="top", fontsize=9,
                 color="#b22222", fontweight="bold")
    return fig
