"""The per-stage clock of a unit: host stages by wall time, unknown stages refused, shares of a wall time."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sdfeat.extract import stages
from sdfeat.extract.stages import STAGES, StageClock, shares


def test_host_stages_accumulate_and_added_time_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter([10.0, 11.0, 11.25, 12.0, 12.5, 14.0])  # a clock that moves only when read: start, 2 stages, wall
    monkeypatch.setattr(stages, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    clock = StageClock(torch.device("cpu"))
    for _ in range(2):
        with clock.stage("unet"):
            pass
    clock.add("decode", 1.5)
    seconds = clock.seconds()
    assert set(seconds) == set(STAGES)
    assert seconds["unet"] == 0.75 and seconds["decode"] == 1.5 and seconds["vae"] == 0.0
    assert clock.seconds() == seconds  # reading twice does not count twice
    assert clock.wall() == 4.0


def test_unknown_stage_is_refused() -> None:
    with pytest.raises(KeyError, match="unknown stage 'encode'"):
        with StageClock(torch.device("cpu")).stage("encode"):
            pass


def test_shares_are_fractions_of_the_wall_time() -> None:
    assert shares({"vae": 1.0, "unet": 3.0}, 4.0) == {"vae": 0.25, "unet": 0.75}
    assert shares({"vae": 1.0}, 0.0) == {"vae": 0.0}
