"""circuitscan: SAE feature caches and attribution (AtP, AtP*, exact patching, ablation scans).

The researcher's front door, ``import circuitscan as cs``::

    model = cs.load_model()                          # or a HF folder, a .gguf, an official name
    saes = cs.load_saes(model, ["default/L15.z"])    # a sequence; each SAE's site from its config
    pairs = cs.PromptPairs.from_strings(model, clean=[...], corrupted=[...],
                                        answers=[" Mary"], wrong=[" John"])
    result = cs.attribute(model, saes, pairs, method="atpstar", nodes=["z", "feature"],
                          positions=["last"])
    delta = cs.exact_patch(model, saes, pairs, result.top(10))   # verify the top nodes
    bound = cs.certify(model, saes, pairs, result.nodes(), verified=result.top(10),
                       samples=200)                               # θ on what was not verified
    sites = cs.cache(model, saes, pairs)                          # activations + gradients
    store = cs.open_store("runs/ioi-cache")                       # a job's store, and its queries

Names are imported on first use (PEP 562), so ``import circuitscan`` loads
neither torch nor Ray. The layers underneath are ``circuitscan.schemas``,
``circuitscan.pipelines`` and ``circuitscan.services``; test fixtures (tiny
models, SAEs and stores) are in ``circuitscan.testing``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name → the module that defines it.
_EXPORTS: dict[str, str] = {
    "load_model": "circuitscan.loading",
    "load_saes": "circuitscan.loading",
    "PromptPairs": "circuitscan.pipelines.prompt_pairs",
    "attribute": "circuitscan.attribution",
    "exact_patch": "circuitscan.attribution",
    "certify": "circuitscan.attribution",
    "ablation_scan": "circuitscan.attribution",
    "cache": "circuitscan.caching",
    "open_store": "circuitscan.stores",
    "StoreView": "circuitscan.stores",
    "AttributionMethod": "circuitscan.schemas.attribution",
    "Node": "circuitscan.schemas.attribution",
    "NodeSelection": "circuitscan.schemas.attribution",
    "HookSite": "circuitscan.schemas.hooks",
    "MetricSpec": "circuitscan.schemas.metrics",
}

__all__ = [
    "AttributionMethod",
    "HookSite",
    "MetricSpec",
    "Node",
    "NodeSelection",
    "PromptPairs",
    "StoreView",
    "ablation_scan",
    "attribute",
    "cache",
    "certify",
    "exact_patch",
    "load_model",
    "load_saes",
    "open_store",
]

if TYPE_CHECKING:
    from circuitscan.attribution import ablation_scan, attribute, certify, exact_patch
    from circuitscan.caching import cache
    from circuitscan.loading import load_model, load_saes
    from circuitscan.pipelines.prompt_pairs import PromptPairs
    from circuitscan.schemas.attribution import AttributionMethod, Node, NodeSelection
    from circuitscan.schemas.hooks import HookSite
    from circuitscan.schemas.metrics import MetricSpec
    from circuitscan.stores import StoreView, open_store


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'circuitscan' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
