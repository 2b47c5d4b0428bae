"""Every field at once: per-field parameters (the heads' classifiers, the metadata tables) stacked into one tensor.

A generation step feeds one token. There, what a few small fields cost is the number of operations, not their
arithmetic: on the 4 x 256 benchmark backbone, one classifier, argmax and lookup per field cost as much as a tenth of
the backbone's step. Stacked, the heads are one matmul and one argmax, and the lookup one embedding, for every field.

Stacking costs a few operations itself, so within a `parameters_fixed()` block (one `generate` call, one
self-tagged pass), where nothing trains, each stacked tensor is built once and kept. Everywhere else it is built at
every call: the parameters may have changed in ways no cheap check sees (a fused optimizer step writes them in
place without raising their version), and with gradients on training must read the parameters themselves.

This file is copied next to the weights by ``save_pretrained`` (remote code), so it imports only ``torch``.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

import torch

Stacked = TypeVar("Stacked")

# The current `parameters_fixed` block: a fresh object per block, so that nothing built in one is used in another.
_FIXED: ContextVar[object | None] = ContextVar("lime_parameters_fixed", default=None)


@contextmanager
def parameters_fixed() -> Iterator[None]:
    """Within this block no parameter changes: every `StackedParameters` builds its tensor once (without gradients)."""
    token = _FIXED.set(object())
    try:
        yield
    finally:
        _FIXED.reset(token)


class StackedParameters:
    """One tensor (or tuple of tensors) stacked from some parameters: built once per `parameters_fixed` block."""

    def __init__(self):
        self._value = None
        self._built_in: object | None = (
            None  # the block it was built in (kept alive, so never mistaken for another)
        )

    def get(self, build: Callable[[], Stacked]) -> Stacked:
        """`build()`, or inside a `parameters_fixed` block without gradients the value it gave first there."""
        if (
            torch.compiler.is_compiling()
        ):  # a compiled graph stacks inside itself (and cannot read a ContextVar)
            return build()
        fixed = _FIXED.get()
        if fixed is None or torch.is_grad_enabled():
            return build()
        if self._built_in is not fixed:
            self._value, self._built_in = build(), fixed
        return self._value


__all__ = ["StackedParameters", "parameters_fixed"]
