"""Figure-1-style token maps of one image at one block: the per-token norm and the cosine similarity of every
token to a marked token. Pure numpy in, PNG/SVG out (matplotlib's Agg canvas, no pyplot state).

`sdfeat show STORE --block B --sample ID --kind norm|similarity [--at y,x]` reads one (C, H, W) activation from
the store (query.py) and calls `norm_map` / `similarity_map`, then `render_map`; the report draws `figure_1` grids
for a few samples and blocks. `sdfeat explore` serves the same maps, and its cross-image top-k uses
`cosine_to` (the function `similarity_map` is built on) over a batch of images: one implementation everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.patches import Rectangle

from sdfeat.errors import ArgumentError
from sdfeat.metrics.norms import token_norms


def _check_acts(acts: np.ndarray) -> np.ndarray:
    if acts.ndim != 3:
        raise ArgumentError(f"acts: expected one image's activations (C, H, W), got shape {tuple(acts.shape)}")
    return np.asarray(acts, dtype=np.float32)


def cosine_to(acts: np.ndarray, vector: np.ndarray, norms: np.ndarray | None = None) -> np.ndarray:
    """(..., C, H, W) tokens and a (C,) vector -> (..., H, W): the cosine similarity of every token to `vector`.

    One image or a batch (the explorer's cross-image top-k). `norms` (..., H, W): `token_norms(acts)` when the
    caller has them already. Tokens with zero norm (or a zero vector) get similarity 0 (instead of NaN)."""
    acts = np.asarray(acts, dtype=np.float32)
    vector = np.asarray(vector, dtype=np.float32)  # (C,)
    *lead, c, h, w = acts.shape
    if vector.shape != (c,):
        raise ArgumentError(f"vector: expected ({c},) to match the tokens' channels, got shape {vector.shape}")
    dots = np.matmul(vector, acts.reshape(*lead, c, h * w)).reshape(*lead, h, w)  # (..., H, W)
    scale = (token_norms(acts) if norms is None else norms) * np.linalg.norm(vector)
    return np.divide(dots, scale, out=np.zeros_like(dots), where=scale > 0)


def norm_map(acts: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W): the L2 norm of every token's channel vector."""
    return token_norms(_check_acts(acts))


def similarity_map(acts: np.ndarray, y: int, x: int) -> np.ndarray:
    """(C, H, W) -> (H, W): cosine similarity of every token to the token at row `y`, column `x`.

    Tokens with zero norm get similarity 0 (instead of NaN).
    """
    acts = _check_acts(acts)
    _, height, width = acts.shape
    if not (0 <= y < height and 0 <= x < width):
        raise ArgumentError(f"at: token (y={y}, x={x}) lies outside the {height}x{width} map")
    return cosine_to(acts, acts[:, y, x])


def _draw(fig: Figure, ax: Axes, values: np.ndarray, title: str, mark: tuple[int, int] | None) -> None:
    image = ax.imshow(values, cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.85)
    if mark is not None:
        y, x = mark
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_title(title, fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))      # tokens are whole positions
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("x (token column)", fontsize=8)
    ax.set_ylabel("y (token row)", fontsize=8)


def render_map(values: np.ndarray, path: str | Path, title: str, mark: tuple[int, int] | None = None) -> Path:
    """Draw an (H, W) map with a colour bar; `mark` = (y, x) outlines that token. The suffix of `path` picks the
    format (.png, .svg). Returns the path written."""
    if values.ndim != 2:
        raise ArgumentError(f"values: expected an (H, W) map, got shape {tuple(values.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(4.6, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    _draw(fig, ax, values, title, mark)
    ax.set_xlabel("x (token column)")
    ax.set_ylabel("y (token row)")
    fig.savefig(path, dpi=150)
    return path


def figure_1(panels: Sequence[tuple[str, np.ndarray]], title: str = "",
             images: Sequence[np.ndarray | None] | None = None) -> Figure:
    """One row per (label, acts (C, H, W)): the token-norm map, and the cosine similarity of every token to the
    highest-norm token (marked) — the paper's Figure 1 story: anomalous tokens are bright and alike. `images`
    (one (H, W, 3) uint8 input image per panel, or None) adds the input image as the first column."""
    if not panels:
        raise ArgumentError("panels: give at least one (label, activations) pair")
    with_images = images is not None and any(i is not None for i in images)
    fig = Figure(figsize=(11.5 if with_images else 8.0, 3.3 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 3 if with_images else 2, squeeze=False)
    if with_images:
        for (label, _), image, ax in zip(panels, images, axes[:, 0]):
            if image is not None:
                ax.imshow(image)
            ax.set_title(f"{label.split(' · ')[0]}\ninput image", fontsize=9)
            ax.set_axis_off()
        axes = axes[:, 1:]
    for (label, acts), (ax_norm, ax_sim) in zip(panels, axes):
        norms = norm_map(acts)
        peak = tuple(int(i) for i in np.unravel_index(np.argmax(norms), norms.shape))
        _draw(fig, ax_norm, norms, f"{label}\ntoken norm", None)
        _draw(fig, ax_sim, similarity_map(acts, *peak), f"{label}\nsimilarity to token y={peak[0]}, x={peak[1]}", peak)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def parse_token(text: str) -> tuple[int, int]:
    """(y, x) of a token written `y,x` (the CLI's `--at`)."""
    try:
        y, x = (int(v) for v in text.split(","))
    except ValueError:
        raise ArgumentError(f"at: expected 'y,x' (two integers), got {text!r}") from None
    return y, x


def draw_store_map(path: str, block: str, sample: int | str, out: str | Path, kind: str = "norm",
                   at: tuple[int, int] | None = None, timestep: int | None = None, seed: int | None = None) -> Path:
    """`sdfeat show`: the `kind` map ("norm" or "similarity" to the token `at`, default the centre one) of one
    sample (id or row) at a block of the store at `path`, at a timestep and seed (default: the store's first),
    drawn to `out`. A token outside the map raises `ArgumentError` naming `at`."""
    from sdfeat.store.query import open_store

    features = open_store(path)
    t = timestep if timestep is not None else features.timesteps[0]
    s = seed if seed is not None else features.seeds[0]
    acts = features.read(block, [sample], timestep=t, seed=s)[0]  # (C, H, W)
    if kind == "norm":
        values, mark = norm_map(acts), None
    else:
        mark = at or (acts.shape[1] // 2, acts.shape[2] // 2)
        if not (0 <= mark[0] < acts.shape[1] and 0 <= mark[1] < acts.shape[2]):
            raise ArgumentError(f"at: token {mark} is outside the {acts.shape[1]}×{acts.shape[2]} map")
        values = similarity_map(acts, *mark)
    return render_map(values, out, title=f"{block} · {sample} · {kind} · t={t}", mark=mark)
