"""Block names, presets and meta-device shapes."""

from __future__ import annotations

import pytest

from sdfeat.errors import SpecError, UnknownBlockError
from sdfeat.models.blocks import _shape_table, block_shapes, canonical_name, paper_name, preset_names, resolve_blocks
from sdfeat.models.registry import TINY_UNET_CONFIG, unet_config

PAPER_45 = """conv_in
down_blocks[0].resnets[0] down_blocks[0].attentions[0] down_blocks[0].resnets[1] down_blocks[0].attentions[1]
down_blocks[0].downsamplers[0]
down_blocks[1].resnets[0] down_blocks[1].attentions[0] down_blocks[1].resnets[1] down_blocks[1].attentions[1]
down_blocks[1].downsamplers[0]
down_blocks[2].resnets[0] down_blocks[2].attentions[0] down_blocks[2].resnets[1] down_blocks[2].attentions[1]
down_blocks[2].downsamplers[0]
down_blocks[3].resnets[0] down_blocks[3].resnets[1]
mid_block.resnets[0] mid_block.attentions[0] mid_block.resnets[1]
up_blocks[0].resnets[0] up_blocks[0].resnets[1] up_blocks[0].upsamplers[0]
up_blocks[1].resnets[0] up_blocks[1].attentions[0] up_blocks[1].resnets[1] up_blocks[1].attentions[1]
up_blocks[1].resnets[2] up_blocks[1].attentions[2] up_blocks[1].upsamplers[0]
up_blocks[2].resnets[0] up_blocks[2].attentions[0] up_blocks[2].resnets[1] up_blocks[2].attentions[1]
up_blocks[2].resnets[2] up_blocks[2].attentions[2] up_blocks[2].upsamplers[0]
up_blocks[3].resnets[0] up_blocks[3].attentions[0] up_blocks[3].resnets[1] up_blocks[3].attentions[1]
up_blocks[3].resnets[2] up_blocks[3].attentions[2]
conv_out""".split()

# PROTOCOL.md's shape table for SD-1.5 at 512 px: (channels, side) per block, grouped as written there.
SD15_512 = {
    **{n: (320, 64) for n in ["conv_in", *[f"down_blocks.0.{k}" for k in
                                            ("resnets.0", "attentions.0", "resnets.1", "attentions.1")]]},
    "down_blocks.0.downsamplers.0": (320, 32),
    **{f"down_blocks.1.{k}": (640, 32) for k in ("resnets.0", "attentions.0", "resnets.1", "attentions.1")},
    "down_blocks.1.downsamplers.0": (640, 16),
    **{f"down_blocks.2.{k}": (1280, 16) for k in ("resnets.0", "attentions.0", "resnets.1", "attentions.1")},
    "down_blocks.2.downsamplers.0": (1280, 8),
    "down_blocks.3.resnets.0": (1280, 8), "down_blocks.3.resnets.1": (1280, 8),
    "mid_block.resnets.0": (1280, 8), "mid_block.attentions.0": (1280, 8), "mid_block.resnets.1": (1280, 8),
    "up_blocks.0.resnets.0": (1280, 8), "up_blocks.0.resnets.1": (1280, 8), "up_blocks.0.resnets.2": (1280, 8),
    "up_blocks.0.upsamplers.0": (1280, 16),
    **{f"up_blocks.1.{k}.{j}": (1280, 16) for k in ("resnets", "attentions") for j in range(3)},
    "up_blocks.1.upsamplers.0": (1280, 32),
    **{f"up_blocks.2.{k}.{j}": (640, 32) for k in ("resnets", "attentions") for j in range(3)},
    "up_blocks.2.upsamplers.0": (640, 64),
    **{f"up_blocks.3.{k}.{j}": (320, 64) for k in ("resnets", "attentions") for j in range(3)},
    "conv_out": (4, 64),
}


def test_canonical_name_accepts_both_notations() -> None:
    assert canonical_name("down_blocks[0].resnets[1]") == "down_blocks.0.resnets.1"
    assert canonical_name("up_blocks.1.upsamplers.0") == "up_blocks.1.upsamplers.0"
    assert canonical_name(" conv_in ") == "conv_in"
    assert paper_name("up_blocks.1.upsamplers.0") == "up_blocks[1].upsamplers[0]"
    assert paper_name("mid_block.attentions[0]") == "mid_block.attentions[0]"


@pytest.mark.parametrize("bad", ["", "down_blocks[x]", "down_blocks..0", "up blocks.0", "0.resnets"])
def test_canonical_name_rejects_bad_syntax(bad: str) -> None:
    with pytest.raises(UnknownBlockError, match="block"):
        canonical_name(bad)


def test_presets_are_the_papers_45_and_all_46() -> None:
    paper = preset_names("paper")
    assert paper == [canonical_name(n) for n in PAPER_45]
    everything = preset_names("all")
    assert len(paper) == 45 and len(everything) == 46
    i = everything.index("up_blocks.0.resnets.1")
    assert everything[i + 1] == "up_blocks.0.resnets.2"
    assert [n for n in everything if n != "up_blocks.0.resnets.2"] == paper
    with pytest.raises(UnknownBlockError, match="'paper'"):
        preset_names("papers")


def test_sd15_shapes_at_512_match_the_protocol_table() -> None:
    infos = resolve_blocks(unet_config("sd15"), "all", 512)
    assert [i.name for i in infos] == preset_names("all")
    assert {i.name: (i.channels, i.height) for i in infos} == SD15_512
    assert all(i.height == i.width for i in infos)
    assert [i.order for i in infos] == list(range(46))
    assert sum(i.channels * i.height * i.width for i in infos) == 29_753_344  # 46 maps of SD-1.5 at 512 px, summed by hand from SD15_512


def test_resolve_orders_dedupes_and_keeps_all_list_order() -> None:
    infos = resolve_blocks(TINY_UNET_CONFIG, ["conv_out", "down_blocks[1].resnets[0]", "down_blocks.1.resnets.0",
                                              "conv_in"], 256)
    assert [i.name for i in infos] == ["conv_in", "down_blocks.1.resnets.0", "conv_out"]
    assert [i.order for i in infos] == [0, 6, 45]
    assert infos[1].paper_name == "down_blocks[1].resnets[0]"
    assert (infos[1].channels, infos[1].height, infos[1].width) == (64, 16, 16)


def test_unknown_block_names_the_closest_valid_ones() -> None:
    with pytest.raises(UnknownBlockError) as err:
        resolve_blocks(TINY_UNET_CONFIG, ["down_blocks.0.resnet.0"], 256)
    message = str(err.value)
    assert "down_blocks.0.resnet.0" in message and "down_blocks.0.resnets.0" in message
    assert "\n" not in message
    with pytest.raises(UnknownBlockError, match="up_blocks.0.resnets.2"):
        block_shapes(TINY_UNET_CONFIG, 256, ["up_blocks.0.resnets.3"])


def test_odd_crop_resolutions_give_the_diffusers_sizes() -> None:
    # 512 cropped by 8 px per side -> 62 latent tokens; stride-2 convs round up (31 -> 16 -> 8)
    sides = {i.name: i.height for i in resolve_blocks(unet_config("sd15"), "all", 496)}
    assert sides["conv_in"] == 62 and sides["down_blocks.0.downsamplers.0"] == 31
    assert sides["down_blocks.1.downsamplers.0"] == 16 and sides["down_blocks.2.downsamplers.0"] == 8
    assert sides["up_blocks.0.upsamplers.0"] == 16 and sides["up_blocks.1.upsamplers.0"] == 31
    assert sides["conv_out"] == 62


def test_resolution_must_be_a_multiple_of_8() -> None:
    with pytest.raises(SpecError, match="resolution 500"):
        block_shapes(TINY_UNET_CONFIG, 500, ["conv_in"])


def test_shapes_are_cached_per_config_and_resolution() -> None:
    config = {**TINY_UNET_CONFIG, "_diffusers_version": "x"}
    block_shapes(config, 192, ["conv_in"])
    before = _shape_table.cache_info()
    for _ in range(20):
        block_shapes(dict(config), 192, preset_names("all"))  # an equal config (private keys aside): no new forward
    after = _shape_table.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + 20
