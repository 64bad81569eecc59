"""Hook names and the hooked-model surface that the rest of cna_lens relies on (imports nothing of cna_lens).

A hooked model is a TransformerLens 4 ``TransformerBridge`` in compatibility mode or a TL 3
``HookedTransformer``: ``run_with_hooks``, ``hooks()``, ``hook_dict``, ``cfg`` and ``tokenizer``,
with hook points named ``blocks.{layer}.{hook}`` (``mlp.hook_post`` is the down projection's input).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

#: a TransformerLens forward hook: ``(hook point name, fn(activation, hook) -> activation)``
FwdHook = tuple[str, Callable[[Tensor, Any], Tensor]]


@runtime_checkable
class HookedModel(Protocol):
    """The TransformerLens surface cna_lens uses (structural: any object with these members fits)."""

    cfg: Any
    tokenizer: Any
    hook_dict: dict[str, Any]

    def run_with_hooks(self, *args: Any, **kwargs: Any) -> Any: ...

    def hooks(self, *args: Any, **kwargs: Any) -> Any: ...


def hook_name(layer: int, hook: str = "mlp.hook_post") -> str:
    """The TransformerLens hook point of ``hook`` in block ``layer``."""
    return f"blocks.{layer}.{hook}"


def check_hook(model: HookedModel, hook: str) -> None:
    """Raise unless ``model`` has the hook point ``blocks.0.{hook}``."""
    if hook_name(0, hook) not in model.hook_dict:
        raise ValueError(
            f"model has no hook point {hook_name(0, hook)!r}: cna_lens needs a TransformerLens hooked "
            "model with MLP hooks (a TransformerBridge in compatibility mode, or a HookedTransformer)"
        )
