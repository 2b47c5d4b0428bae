"""Registering model type "lime" with transformers' Auto classes, without importing transformers for it.

`import lime_hf` promises that `AutoConfig`, `AutoModel`, `AutoModelForCausalLM` and `AutoTokenizer` know "lime".
Registering needs the LIME classes, hence torch and transformers (seconds), which `lime-hf --help` must not pay.
So `lime_hf/__init__.py` calls `register_when_used()`: it registers at once if transformers' Auto classes are
already imported, and otherwise when they are first imported.

Registering in the middle of an import is unsafe: transformers' own modules import its Auto classes while they
are half initialised (`modeling_utils` -> `quantizers.auto` -> `configuration_auto`), and so do LIME's
(`configuration_lime` imports `AutoConfig`), and registering imports those same modules again. So `AutoHook`, a
finder on `sys.meta_path`, counts the transformers and lime_hf modules being executed in each thread and
registers when the outermost of them has finished, once the Auto module is there. Then it removes itself.
"""

from __future__ import annotations

import copy
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.abc import Loader
    from importlib.machinery import ModuleSpec
    from types import ModuleType

AUTO_MODULE = "transformers.models.auto"
WATCHED = ("transformers", "lime_hf")  # the packages whose imports registering must not interrupt

_registered = False


def register() -> None:
    """Register "lime" with `AutoConfig`, `AutoModel`, `AutoModelForCausalLM` and `AutoTokenizer` (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from .configuration_lime import LimeConfig
    from .modeling_lime import LimeForCausalLM, LimeModel
    from .tokenization_lime import LimeTokenizer

    AutoConfig.register("lime", LimeConfig, exist_ok=True)
    AutoModel.register(LimeConfig, LimeModel, exist_ok=True)
    AutoModelForCausalLM.register(LimeConfig, LimeForCausalLM, exist_ok=True)
    AutoTokenizer.register(LimeConfig, tokenizer_class=LimeTokenizer, exist_ok=True)
    _registered = True


class AutoHook:  # a `sys.meta_path` finder (not importing `importlib.abc` keeps `lime-hf --help` fast)
    """Registers "lime" after the outermost import of a transformers or lime_hf module, once the Auto module is in."""

    def __init__(self) -> None:
        self.local = threading.local()  # `depth`: watched modules being executed in this thread

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        """The spec the other finders give, its loader counting the execution; `None` for modules not watched."""
        if name.partition(".")[0] not in WATCHED:
            return None
        for finder in sys.meta_path:  # the finders after this one, as the import system would ask them
            spec = (
                None if finder is self else getattr(finder, "find_spec", lambda *_: None)(name, path, target)
            )
            if spec is not None:
                break
        else:
            return None
        if hasattr(spec.loader, "exec_module"):
            spec.loader = self.counting(spec.loader)
        return spec

    def counting(self, loader: Loader) -> Loader:
        """A copy of `loader` (which may serve other modules too) whose `exec_module` the hook counts."""
        counted = copy.copy(loader)  # the same class, so `isinstance` checks on `__loader__` still hold
        original = counted.exec_module

        def exec_module(module: ModuleType) -> None:
            self.local.depth = self.depth + 1
            try:
                original(module)
            finally:
                self.local.depth -= 1
            if self.local.depth == 0 and AUTO_MODULE in sys.modules:
                uninstall()
                register()

        counted.exec_module = exec_module
        return counted

    @property
    def depth(self) -> int:
        return getattr(self.local, "depth", 0)


_hook = AutoHook()


def uninstall() -> None:
    if _hook in sys.meta_path:
        sys.meta_path.remove(_hook)


def register_when_used() -> None:
    """Register now if transformers' Auto classes are imported, else when they are (see the module docstring)."""
    if AUTO_MODULE in sys.modules and _hook.depth == 0:
        register()
    elif _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)


__all__ = ["register", "register_when_used"]
