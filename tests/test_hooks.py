"""capture(): values, early exit, hook removal, the tuple rule, odd latent sizes."""

from __future__ import annotations

import pytest
import torch

from sdfeat.errors import UnknownBlockError
from sdfeat.models.blocks import block_shapes, preset_names
from sdfeat.models.hooks import capture, output_tensor
from sdfeat.models.registry import TINY_UNET_CONFIG
from modelkit import tiny_model

ALL = preset_names("all")


def _inputs(side: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(side)
    return torch.randn(batch, 4, side, side, generator=g), torch.randn(batch, 77, 32, generator=g)


class _Spy:
    """A `to_map` that records every hook that fires (it runs inside the hook): after `capture` ends, a plain
    forward must fire none of them."""

    def __init__(self) -> None:
        self.fired: list[str] = []

    def __call__(self, name: str, output: object) -> torch.Tensor:
        self.fired.append(name)
        return output_tensor(output)


def _plain_forward(unet: torch.nn.Module, sample: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """A forward outside any capture (an early-exit hook left behind would end it)."""
    with torch.inference_mode():
        return unet(sample, 50, encoder_hidden_states=context).sample


def _assert_no_hook_left(unet: torch.nn.Module, spy: _Spy, sample: torch.Tensor, context: torch.Tensor,
                         reference: torch.Tensor) -> None:
    spy.fired.clear()
    assert torch.equal(_plain_forward(unet, sample, context), reference)
    assert spy.fired == []


def test_captured_values_equal_a_plain_forward() -> None:
    unet = tiny_model().unet
    sample, context = _inputs(16)
    with torch.inference_mode():
        expected_out = unet(sample, 50, encoder_hidden_states=context).sample
        expected_in = unet.conv_in(sample)
    with capture(unet, ALL, early_exit=False) as cap:
        full = cap.run(sample, 50, encoder_hidden_states=context)
    assert list(full) == ALL
    assert torch.equal(full["conv_out"], expected_out)
    assert torch.equal(full["conv_in"], expected_in)
    with capture(unet, ["down_blocks.2.attentions.1", "up_blocks.1.upsamplers.0"]) as cap:
        early = cap.run(sample, 50, encoder_hidden_states=context)
    for name, value in early.items():
        assert torch.equal(value, full[name])


def test_early_exit_stops_after_the_deepest_requested_block() -> None:
    unet = tiny_model().unet
    sample, context = _inputs(16)
    ran: list[str] = []
    spies = [unet.get_submodule(n).register_forward_hook(lambda *_a, n=n: ran.append(n))
             for n in ("mid_block", "down_blocks.1", "conv_out")]
    try:
        with capture(unet, ["down_blocks.1.resnets.0", "conv_in"]) as cap:  # given out of order on purpose
            out = cap.run(sample, 50, encoder_hidden_states=context)
        assert ran == []  # down_blocks.1 stopped inside, nothing after it ran
        assert list(out) == ["down_blocks.1.resnets.0", "conv_in"]
        with capture(unet, ["down_blocks.1.resnets.0"], early_exit=False) as cap:
            cap.run(sample, 50, encoder_hidden_states=context)
        assert ran == ["down_blocks.1", "mid_block", "conv_out"]
    finally:
        for spy in spies:
            spy.remove()


def test_hooks_are_removed_when_the_forward_or_the_body_raises() -> None:
    unet = tiny_model().unet
    sample, context = _inputs(16)
    reference, spy = _plain_forward(unet, sample, context), _Spy()
    with capture(unet, ALL, to_map=spy) as cap:
        assert list(cap.run(sample, 50, encoder_hidden_states=context)) == ALL
        assert sorted(spy.fired) == sorted(ALL)  # 46 hooks, each fired once
        with pytest.raises(RuntimeError):
            cap.run(sample, 50, encoder_hidden_states=torch.randn(2, 77, 7))  # wrong context width
    _assert_no_hook_left(unet, spy, sample, context, reference)
    with pytest.raises(KeyError):
        with capture(unet, ALL, early_exit=False, to_map=spy):
            raise KeyError("boom")
    _assert_no_hook_left(unet, spy, sample, context, reference)


def test_unknown_module_raises_and_leaves_no_hooks() -> None:
    unet = tiny_model().unet
    sample, context = _inputs(16)
    reference, spy = _plain_forward(unet, sample, context), _Spy()
    with pytest.raises(UnknownBlockError, match="down_blocks.9.resnets.0"):
        with capture(unet, ["conv_in", "down_blocks.9.resnets.0"], to_map=spy):  # conv_in is hooked first
            pass
    _assert_no_hook_left(unet, spy, sample, context, reference)


def test_tuple_rule() -> None:
    a, b = torch.ones(2), torch.zeros(2)
    assert output_tensor((a, b)) is a
    assert output_tensor([b]) is b
    assert output_tensor(a) is a
    with pytest.raises(TypeError, match="dict"):
        output_tensor({"sample": a})


def check_odd_latent_size(resolution: int) -> None:
    """All 46 captured shapes equal block_shapes at a resolution whose latent is not a multiple of 8."""
    unet = tiny_model().unet
    side = resolution // 8
    sample, context = _inputs(side, batch=1)
    with capture(unet, ALL) as cap:
        out = cap.run(sample, 50, encoder_hidden_states=context)
    expected = {i.name: (1, i.channels, i.height, i.width) for i in block_shapes(TINY_UNET_CONFIG, resolution, ALL)}
    assert {n: tuple(v.shape) for n, v in out.items()} == expected
    assert out["conv_out"].shape[-1] == side


@pytest.mark.parametrize("resolution", [232, 240])  # latents 29 and 30 (the paper's 62..48 are in the slow tier)
def test_odd_latent_sizes_match_block_shapes(resolution: int) -> None:
    check_odd_latent_size(resolution)


def test_compiled_blocks_keep_hooks_and_early_exit_exact() -> None:
    """`compile: true` compiles each block's forward; hooks stay outside it, so captures and early exit are
    unchanged (backend "eager": dynamo's tracing without code generation, to keep the test fast on a CPU)."""
    from sdfeat.models.loading import build_tiny_pipeline, compile_unet_blocks

    unet = build_tiny_pipeline().unet.eval()
    sample, context = _inputs(16)
    names = ["down_blocks.1.attentions.0", "up_blocks.1.upsamplers.0"]
    reference, spy = _plain_forward(unet, sample, context), _Spy()
    with capture(unet, names) as cap:
        expected = cap.run(sample, 50, encoder_hidden_states=context)
    # 4 down blocks: 8 resnets, 6 attentions, 3 downsamplers; mid: 2 + 1; 4 up blocks: 12 resnets, 9 attentions,
    # 3 upsamplers
    assert compile_unet_blocks(unet, backend="eager") == 8 + 6 + 3 + 3 + 12 + 9 + 3
    with capture(unet, names, to_map=spy) as cap:
        got = cap.run(sample, 50, encoder_hidden_states=context)
    assert spy.fired == names
    spy.fired.clear()
    assert torch.allclose(_plain_forward(unet, sample, context), reference, atol=1e-5)  # compiled: within rounding
    assert spy.fired == []
    for name in names:
        assert torch.allclose(got[name], expected[name], atol=1e-6), name
