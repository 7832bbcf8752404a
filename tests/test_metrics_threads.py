"""`sdfeat metrics --local` runs every task with one torch thread on purpose (a probe's Adam steps are too small
for threads to pay) and gives the process its thread count back afterwards."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sdfeat.metrics import catalog, runner


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def test_local_tasks_run_with_one_thread_and_the_count_is_restored(tiny_store: str, two_threads: None,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []

    def position_task(store_path: str, block: str, opts: runner.MetricOptions) -> list[dict]:
        seen.append(torch.get_num_threads())
        return []

    monkeypatch.setitem(catalog.METRICS, "position", replace(catalog.METRICS["position"], task=position_task))
    runner.run_metrics(tiny_store, metrics=["position"], blocks=["conv_in", "mid_block.resnets.1"], local=True)
    assert seen == [1, 1]
    assert torch.get_num_threads() == 2


def test_thread_count_is_an_option_and_restored_after_a_failing_task(two_threads: None) -> None:
    def fails() -> None:
        assert torch.get_num_threads() == 3
        raise ValueError("task failed")

    assert runner.execute([(torch.get_num_threads, ())], local=True, address=None, threads=3) == [3]
    with pytest.raises(ValueError, match="task failed"):
        runner.execute([(fails, ())], local=True, address=None, threads=3)
    assert torch.get_num_threads() == 2
