"""Run graphs that dynamo compiled under kinkgrad's interception mode without that mode.

When `torch.compile` traces code while a `TorchFunctionMode` is active, it inlines the
mode's `__torch_function__` into the graph, but PyTorch (2.13) then runs the compiled
graph with the mode still on the stack. Every torch call the graph's wrapper code makes
(inductor's `extern_kernels.addmm`, the runtime wrappers' `_set_grad_enabled`, ...) then
passes through `__torch_function__` again: a dozen Python calls per forward of a small
MLP, 20-30 µs, for calls that the graph has already decided. (With the `eager` backend
the graph calls `torch.relu` itself, so the policy's nodes would even be built twice.)
Dynamo already wraps graphs that inlined a tensor subclass's `__torch_function__` in
`DisableTorchFunctionSubclass` for the same reason; this does the same for graphs
traced under kinkgrad's mode, with `DisableTorchFunction`.

Installed lazily (`intercept.acquire`), because importing dynamo costs a second and a
program that never compiles should not pay it; a graph compiled before installation
only pays the extra calls. If PyTorch's internals differ from what this expects, nothing
is patched: graphs then run as PyTorch runs them (slower, still right).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch

_INSTALLED = False

#: True when every graph dynamo compiles under kinkgrad's mode runs without it (the
#: patch was in place before dynamo compiled its first graph): then no catalog call
#: made by a compiled graph reaches kinkgrad at run time, and the watcher need not look
#: at the caller's frames to tell (`watch_compiled.in_compiled_graph`).
EVERY_GRAPH_WRAPPED = False


def install_if_loaded(is_ours: Callable[[Any], bool]) -> None:
    """Patch dynamo once it has been imported (by `torch.compile`); cheap otherwise."""
    global _INSTALLED, EVERY_GRAPH_WRAPPED
    if _INSTALLED:
        return
    module = sys.modules.get("torch._dynamo.output_graph")
    if module is None:
        return
    _INSTALLED = True
    graph_cls = getattr(module, "OutputGraph", None)
    original = getattr(graph_cls, "call_user_compiler", None)
    if original is None or getattr(original, "_kinkgrad", False):
        return
    utils = sys.modules.get("torch._dynamo.utils")
    counters = getattr(utils, "counters", None)
    EVERY_GRAPH_WRAPPED = counters is not None and counters["stats"]["unique_graphs"] == 0

    @functools.wraps(original)
    def call_user_compiler(self: Any, gm: Any, example_inputs: Any) -> Any:
        compiled = original(self, gm, example_inputs)
        modes = getattr(self, "torch_function_mode_stack", None) or ()
        if not any(is_ours(m) for m in modes):
            return compiled
        lazy = sys.modules.get("torch.fx._lazy_graph_module")
        if lazy is not None and isinstance(compiled, lazy._LazyGraphModule):
            # (dynamo would make this call itself, but only on the unwrapped module)
            lazy._LazyGraphModule.force_recompile(compiled)
            compiled = compiled.forward

        def without_modes(*args: Any, **kwargs: Any) -> Any:
            with torch._C.DisableTorchFunction():
                return compiled(*args, **kwargs)

        return without_modes

    call_user_compiler._kinkgrad = True  # type: ignore[attr-defined]
    graph_cls.call_user_compiler = call_user_compiler
