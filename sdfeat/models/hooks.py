"""Forward hooks that capture block outputs of a denoiser (TransformerLens style).

A loaded model opens one for its denoiser (`LoadedModel.capture`) with `call` = the family's call (how its
denoiser is called) and `to_map` = the family's `as_map` (a hooked output as a (B, C, H, W) map: a DiT's tokens on
their grid); `extract` runs every forward through it. Without them the module is called with the arguments of
`run` and one rule turns an output into a tensor: **a tuple or list gives its element 0** (down blocks and
`Transformer2DModel` with `return_dict=False` return tuples; everything else returns a tensor).

With `early_exit=True` the forward stops as soon as every requested block has produced its output: the hook that
completes the set raises a private exception, which `Capture.run` catches. That is the deepest requested block in
execution order, so nothing after it is computed. Hooks are removed in `finally`, also when the forward raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from sdfeat.errors import UnknownBlockError


class _StopForward(Exception):
    """Raised by the last needed hook to end the forward early; never escapes `Capture.run`."""


def output_tensor(output: Any) -> torch.Tensor:
    """The one rule: a tuple/list output gives its element 0; a tensor is itself."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"hooked module returned {type(output).__name__}, expected a tensor or a tuple of tensors")
    return output


class Capture:
    """Hooks on `names` of one module; `run(...)` does one forward and returns `{name: output}`."""

    def __init__(self, module: torch.nn.Module, names: Sequence[str], early_exit: bool,
                 call: Callable[..., Any] | None = None,
                 to_map: Callable[[str, Any], torch.Tensor] | None = None) -> None:
        self.module = module
        self.names = list(dict.fromkeys(names))
        self.early_exit = early_exit
        self.call = call or module
        self.to_map = to_map or (lambda _name, output: output_tensor(output))
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _attach(self) -> None:
        for name in self.names:
            try:
                submodule = self.module.get_submodule(name)
            except AttributeError:
                raise UnknownBlockError(f"block {name!r}: no such module in {type(self.module).__name__}") from None
            self._handles.append(submodule.register_forward_hook(self._hook_for(name)))

    def _hook_for(self, name: str):
        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            self._outputs[name] = self.to_map(name, output).detach()
            if self.early_exit and len(self._outputs) == len(self.names):
                raise _StopForward

        return hook

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def run(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """One forward (`call`, else the module; no autograd); returns the captured outputs keyed by name, in
        `names` order."""
        self._outputs = {}
        try:
            with torch.inference_mode():
                self.call(*args, **kwargs)
        except _StopForward:
            pass
        missing = [n for n in self.names if n not in self._outputs]
        if missing:
            raise RuntimeError(f"blocks {missing} were not executed by the forward of {type(self.module).__name__}")
        outputs, self._outputs = self._outputs, {}
        return {name: outputs[name] for name in self.names}


@contextmanager
def capture(module: torch.nn.Module, names: Sequence[str], early_exit: bool = True, *,
            call: Callable[..., Any] | None = None,
            to_map: Callable[[str, Any], torch.Tensor] | None = None) -> Iterator[Capture]:
    """Hook the submodules `names` (canonical dotted paths) of `module` for the duration of the block; `run` calls
    `call` (default: the module) and keeps `to_map(name, output)` of each (default: `output_tensor`)."""
    cap = Capture(module, names, early_exit, call, to_map)
    try:
        cap._attach()
        yield cap
    finally:
        cap._detach()
