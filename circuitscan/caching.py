"""``cs.cache``: sparse SAE feature activations and their metric gradients for a batch.

Thin over ``pipelines.caching.cache_batch`` (one forward and one backward pass;
the SAEs are spliced with their error terms, so the model's output is
unchanged and every feature gets an exact gradient). The store-writing cache
job runs the same function shard by shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sae_lens import SAE, HookedSAETransformer

from circuitscan.pipelines.caching import cache_batch
from circuitscan.pipelines.prompt_pairs import PromptPairs
from circuitscan.pipelines.site_cache import SiteCache
from circuitscan.schemas.metrics import MetricSpec


def cache(
    model: HookedSAETransformer,
    saes: Sequence[SAE[Any]],
    pairs: PromptPairs,
    *,
    metric: MetricSpec | None = None,
    gradients: bool = True,
    top_k: int | None = None,
) -> dict[str, SiteCache]:
    """Every SAE site's active features on the clean prompts of ``pairs``, keyed by site label.

    Per real token (padding skipped, prompt-major): the non-zero features (or
    the ``top_k`` largest), their activations (SAE units) and, with
    ``gradients``, ∂metric/∂activation (metric units per activation unit),
    plus the SAE error norm. ``site.dense()`` gives ``[tokens, d_sae]``.

    >>> import circuitscan as cs
    >>> from circuitscan.testing import build_tiny_language_model, build_tiny_sae
    >>> model = build_tiny_language_model()
    >>> saes = [build_tiny_sae(model, cs.HookSite.parse("L1.resid_pre"))]
    >>> pairs = cs.PromptPairs.from_strings(
    ...     model, clean=["When Mary and John went to the store, John gave a drink to"],
    ...     answers=[" Mary"], wrong=[" John"])
    >>> site = cs.cache(model, saes, pairs)["L1.resid_pre"]
    >>> site.n_tokens == int(pairs.lengths.sum()), site.gradients is not None
    (True, True)
    >>> tuple(site.dense().shape)
    (15, 32)
    """
    return cache_batch(
        model,
        list(saes),
        pairs.clean,
        pairs.lengths,
        (metric or MetricSpec()) if gradients else metric,
        answer=pairs.answer,
        wrong=pairs.wrong,
        top_k=top_k,
        gradients=gradients,
    )
