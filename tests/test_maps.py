"""Figure-1-style maps: token norms, cosine similarity to a marked token, rendering."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdfeat.errors import SdfeatError
from sdfeat.report.maps import figure_1, norm_map, render_map, similarity_map


def _acts(seed: int = 0, shape: tuple[int, int, int] = (16, 8, 12)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)  # (C, H, W)


def test_planted_bright_token_is_the_argmax_of_the_norm_map() -> None:
    acts = _acts()
    acts[:, 5, 9] *= 20.0
    norms = norm_map(acts)
    assert norms.shape == (8, 12)
    assert np.unravel_index(np.argmax(norms), norms.shape) == (5, 9)
    assert norms[2, 3] == pytest.approx(float(np.sqrt((acts[:, 2, 3].astype(np.float64) ** 2).sum())), rel=1e-5)


def test_similarity_is_one_at_the_marked_token_and_follows_the_geometry() -> None:
    acts = _acts(1)
    acts[:, 0, 0] = -3.0 * acts[:, 4, 7]  # antiparallel to the marked token
    sim = similarity_map(acts, 4, 7)
    assert sim.shape == (8, 12)
    assert sim[4, 7] == pytest.approx(1.0, abs=1e-6)
    assert sim[0, 0] == pytest.approx(-1.0, abs=1e-6)
    assert np.all(np.abs(sim) <= 1.0 + 1e-6)
    a, b = acts[:, 2, 2].astype(np.float64), acts[:, 4, 7].astype(np.float64)
    assert sim[2, 2] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), abs=1e-5)


def test_zero_tokens_get_similarity_zero_not_nan() -> None:
    acts = _acts(2)
    acts[:, 3, 3] = 0.0
    sim = similarity_map(acts, 1, 1)
    assert sim[3, 3] == 0.0
    assert not np.isnan(sim).any()


@pytest.mark.parametrize(("y", "x"), [(8, 0), (0, 12), (-1, 0)])
def test_similarity_outside_the_map_names_the_argument(y: int, x: int) -> None:
    with pytest.raises(SdfeatError, match=r"at: token .* outside the 8x12 map"):
        similarity_map(_acts(), y, x)


def test_maps_reject_batched_input() -> None:
    with pytest.raises(SdfeatError, match=r"acts: expected .*\(C, H, W\)"):
        norm_map(np.zeros((2, 4, 8, 8), np.float32))


def test_render_map_writes_png_and_svg(tmp_path) -> None:
    sim = similarity_map(_acts(), 4, 7)
    png = render_map(sim, tmp_path / "sub" / "sim.png", "similarity to (4, 7)", mark=(4, 7))
    svg = render_map(norm_map(_acts()), tmp_path / "norm.svg", "norm")
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > 300
    assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()
    with pytest.raises(SdfeatError, match="values: expected an"):
        render_map(np.zeros(5), tmp_path / "bad.png", "bad")


def test_figure_1_marks_the_brightest_token_of_each_panel() -> None:
    bright = _acts(3)
    bright[:, 6, 2] *= 30.0
    fig = figure_1([("a", bright), ("b", _acts(4, (8, 4, 4)))], title="maps")
    image_axes = [ax for ax in fig.axes if ax.images and ax.get_title()]
    assert len(image_axes) == 4
    assert image_axes[1].get_title() == "a\nsimilarity to token y=6, x=2"
    mark = image_axes[1].patches[0]
    assert (mark.get_x(), mark.get_y()) == (1.5, 5.5) and not image_axes[0].patches
    assert image_axes[1].images[0].get_array()[6, 2] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(SdfeatError, match="panels: give at least one"):
        figure_1([])


def test_cosine_to_a_batch_equals_each_images_similarity_map() -> None:
    from sdfeat.report.maps import cosine_to, token_norms

    batch = np.stack([_acts(s) for s in range(5, 8)])  # (3, C, H, W)
    query = batch[1, :, 2, 3]
    sims = cosine_to(batch, query)
    assert sims.shape == (3, 8, 12)
    np.testing.assert_allclose(sims[1], similarity_map(batch[1], 2, 3), atol=1e-6)
    a = batch[2].astype(np.float64)
    expected = np.einsum("chw,c->hw", a, query) / (np.linalg.norm(a, axis=0) * np.linalg.norm(query))
    np.testing.assert_allclose(sims[2], expected, atol=1e-6)
    np.testing.assert_allclose(token_norms(batch)[0], norm_map(batch[0]), rtol=1e-6)
    assert not cosine_to(batch, np.zeros(16, np.float32)).any()  # a zero vector: similarity 0, not NaN
    with pytest.raises(SdfeatError, match=r"vector: expected \(16,\)"):
        cosine_to(batch, np.ones(3, np.float32))


def test_parse_token_reads_y_comma_x_and_names_at_otherwise() -> None:
    from sdfeat.report.maps import parse_token

    assert parse_token("2,5") == (2, 5)
    for bad in ("2", "a,b", "1,2,3"):
        with pytest.raises(SdfeatError, match=r"^at: expected 'y,x'"):
            parse_token(bad)
