"""``cs.open_store``: a feature store written by a job, with its queries as methods.

Thin over ``services.store`` (``FeatureStore``, ``queries``, ``tensor_reads``) and
``services.store.results``: the same reads the CLI's ``query`` and ``results``
commands make. A site may be left out when the store has only one.
"""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float

from circuitscan.schemas.breakdown import Breakdown
from circuitscan.schemas.job_results import JobResult, NodeEffect
from circuitscan.schemas.rankings import AttributionRanking, RankBy, RankPer
from circuitscan.schemas.store import ActiveFeatures, FeatureExample, FeatureSummary
from circuitscan.services.store import FeatureStore, StoreError, queries, results
from circuitscan.services.store.queries import Decode
from circuitscan.services.store.tensor_reads import dense_slice


class StoreView:
    """One opened store: its sites, prompts, cached features and job results.

    ``store.backend`` is the underlying ``FeatureStore`` for anything not here.
    """

    def __init__(self, backend: FeatureStore) -> None:
        self.backend = backend

    def __repr__(self) -> str:
        return f"StoreView({self.backend.url!r}, sites={self.sites}, prompts={self.n_prompts})"

    @property
    def sites(self) -> list[str]:
        """Site labels the store caches (e.g. ``["L15.resid_post", "L15.z"]``)."""
        return [site.label for site in self.backend.layout.sites]

    @property
    def n_prompts(self) -> int:
        """Prompts in committed shards."""
        return self.backend.n_prompts()

    def _site(self, site: str | None) -> str:
        if site is not None:
            self.backend.layout.site(site)
            return site
        if len(self.sites) != 1:
            raise StoreError(
                f"this store has sites {', '.join(self.sites) or '(none)'}: choose one with site="
            )
        return self.sites[0]

    def prompt_tokens(self, prompt: int) -> list[int]:
        """A stored prompt's token ids (BOS included)."""
        return [int(t) for t in self.backend.prompt_tokens(prompt)]

    def features_at(
        self,
        prompt: int,
        position: int,
        site: str | None = None,
        *,
        sort_by: Literal["attribution", "activation"] = "attribution",
        limit: int | None = None,
    ) -> ActiveFeatures:
        """Features active at (prompt, position), by |activation · gradient| (or activation)."""
        return queries.features_at(
            self.backend,
            self._site(site),
            prompt,
            position,
            sort_by=sort_by,
            limit=limit,
        )

    def top_examples(
        self,
        feature: int,
        site: str | None = None,
        *,
        n: int = 20,
        context: int = 8,
        decode: Decode | None = None,
    ) -> list[FeatureExample]:
        """The ``n`` top-activating (prompt, position) hits of a feature, with ±context tokens
        (``decode`` turns token ids into strings)."""
        return queries.top_examples(
            self.backend, self._site(site), feature, n, context=context, decode=decode
        )

    def summary(self, feature: int, site: str | None = None) -> FeatureSummary:
        """Count, sum, max and frequency of one feature over the whole store."""
        return queries.feature_summary(self.backend, self._site(site), feature)

    def top_attributions(
        self,
        site: str | None = None,
        *,
        feature: int | None = None,
        per: RankPer | None = None,
        n: int = 20,
        rank_by: RankBy = "sum",
    ) -> AttributionRanking:
        """Corpus-wide rankings by a·∂m/∂a, from the store's index (no shard is read).

        Without ``feature``: the features that push the metric most over the whole
        store (|Σ a·g|, or Σ |a·g| with ``rank_by="abs"``); with it, the prompts
        (``per="prompt"``, the default) or (prompt, position) entries
        (``per="position"``) where that feature pushes it most.
        """
        from circuitscan.services.store.rankings import top_attributions

        chosen: RankPer = per or ("feature" if feature is None else "prompt")
        return top_attributions(
            self.backend, self._site(site), per=chosen, feature=feature, n=n, rank_by=rank_by
        )

    def dense(
        self, prompt: int, site: str | None = None, *, gradients: bool = False
    ) -> Float[torch.Tensor, "positions features"]:
        """A prompt's activations (or gradients) as a dense ``[positions, d_sae]`` matrix."""
        return dense_slice(self.backend, self._site(site), prompt, gradients=gradients)

    def result(self, kind: str | None = None) -> JobResult:
        """The job result of ``kind`` (default: the only one the store holds)."""
        return results.read_result(self.backend, kind)

    def breakdown(self, by: str, kind: str | None = None, *, top: int = 20) -> Breakdown:
        """The job result's first ``top`` items averaged per value of the prompt field ``by``.

        ``by`` is a record field (``template``, ``answer``, ``wrong``, ``corrupted``,
        ``text``) or a ``meta`` key; computed from the per-prompt values in the shards
        (the CLI's ``results --by``).
        """
        from circuitscan.services.jobs.kinds import job_kind

        result = self.result(kind)
        return job_kind(result.kind).breakdown(self.backend, result, by, top)

    def top_nodes(self, k: int = 20) -> list[NodeEffect]:
        """An attribute job's k highest-effect nodes, with their verification."""
        return results.top_nodes(self.backend, k)


def open_store(url: str) -> StoreView:
    """Open a store by URL: a local path, ``memory://NAME`` or ``s3://BUCKET/PREFIX``.

    >>> import circuitscan as cs
    >>> from circuitscan.testing import build_tiny_language_model, build_tiny_sae
    >>> from circuitscan.testing import write_tiny_store
    >>> model = build_tiny_language_model()
    >>> saes = [build_tiny_sae(model, cs.HookSite.parse("L1.resid_pre"))]
    >>> url = write_tiny_store("memory://doc-store", model, saes, [
    ...     {"text": "When Mary and John went to the store, John gave a drink to",
    ...      "answer": " Mary", "wrong": " John"},
    ...     {"text": "Then, Tom and Amy had a long day at the park. Amy handed a ring to",
    ...      "answer": " Tom", "wrong": " Amy"}])
    >>> store = cs.open_store(url)
    >>> store.sites, store.n_prompts
    (['L1.resid_pre'], 2)
    >>> active = store.features_at(prompt=0, position=3, limit=5)
    >>> len(active.feature_ids) <= 5, active.attributions is not None
    (True, True)
    >>> best = store.top_examples(active.feature_ids[0], n=1)[0]
    >>> store.summary(active.feature_ids[0]).max == best.activation
    True
    >>> ranking = store.top_attributions(n=3)  # features pushing the metric most
    >>> pushes = store.top_attributions(feature=ranking.rows[0].feature, n=2)  # its prompts
    >>> len(ranking.rows), pushes.per, pushes.rows[0].feature == ranking.rows[0].feature
    (3, 'prompt', True)
    """
    return StoreView(FeatureStore.open(url))
