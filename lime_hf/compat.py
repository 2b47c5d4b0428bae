"""Every difference between the supported Transformers versions that the model meets, in one place.

Transformers 5.24 renamed the KV cache argument and output from `past_key_values` to `cache` (its models take the
old name with `@deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")`). This model's code says `cache`
everywhere; the helpers here translate at the edges: what the installed `generate` passes, what a backbone takes,
and what an output holds.

This file is copied next to the weights by ``save_pretrained`` (remote code), so it imports only ``torch``,
``transformers`` and its flat siblings.
"""

import inspect
from collections.abc import Callable
from functools import wraps

from transformers import GenerationMixin
from transformers.utils.deprecation import deprecate_kwarg

# The name under which the installed transformers passes the KV cache (`generate`'s model kwargs, model forwards).
CACHE_NAME = (
    "cache"
    if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    else "past_key_values"
)
# The backbones' own deprecation horizon for the old name (transformers 5.24's `modeling_llama.py`).
PAST_KEY_VALUES_REMOVAL = "5.40.0"


def accept_past_key_values(forward: Callable) -> Callable:
    """Decorate a forward whose KV cache argument is `cache`, so that it takes `past_key_values` as the backbone does.

    Where the installed transformers says `cache`, `past_key_values=` is deprecated: transformers' own
    `deprecate_kwarg` renames it and warns, with the backbones' horizon. Before 5.24 `past_key_values` is the current
    name (`generate` passes it): it is renamed silently.
    """
    if CACHE_NAME == "cache":
        renamed = deprecate_kwarg("past_key_values", PAST_KEY_VALUES_REMOVAL, new_name="cache")(forward)
        # `generate` reads a remote-code model's forward signature at every step (`is_remote_code`): computed once
        # here, `inspect.signature` returns it at once instead of unwrapping the decorator each time.
        renamed.__signature__ = inspect.signature(forward)
        return renamed

    @wraps(forward)
    def renamed(*args, **kwargs):
        if "past_key_values" in kwargs:
            if kwargs.get("cache") is not None:
                raise ValueError("Pass the KV cache once: as `past_key_values` (or `cache`), not both.")
            kwargs["cache"] = kwargs.pop("past_key_values")
        return forward(*args, **kwargs)

    # `generate` (before 5.24) checks its model kwargs against the forward's signature: list the old name there too.
    signature = inspect.signature(forward)
    parameters = list(signature.parameters.values())
    at = next((i for i, p in enumerate(parameters) if p.kind is p.VAR_KEYWORD), len(parameters))
    old_name = inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None)
    renamed.__signature__ = signature.replace(parameters=[*parameters[:at], old_name, *parameters[at:]])
    return renamed


_PARAMETERS: dict[type, frozenset[str]] = {}


def backbone_parameters(module) -> frozenset[str]:
    """The argument names of `module.forward`, read once per class (they decide how the backbone is called)."""
    owner = type(module)
    if owner not in _PARAMETERS:
        _PARAMETERS[owner] = frozenset(inspect.signature(owner.forward).parameters)
    return _PARAMETERS[owner]


def cache_keyword(module) -> str:
    """The name under which `module.forward` takes the KV cache (a remote-code backbone may keep the old name on a
    newer transformers)."""
    return "cache" if "cache" in backbone_parameters(module) else "past_key_values"


def output_cache(outputs):
    """The KV cache of a model output, under whichever name it carries it (`None` if it has none)."""
    cache = outputs.get("cache")
    return cache if cache is not None else outputs.get("past_key_values")


__all__ = ["CACHE_NAME", "accept_past_key_values", "backbone_parameters", "cache_keyword", "output_cache"]
