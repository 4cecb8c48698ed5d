"""Scan jobs on Ray: specs → prompts → shards → actors → committed store.

Entry points::

    run_job(spec, address=None, overwrite=False, echo=None, keep_actors=False) -> JobSummary
    resume_job(store_url, address=None, echo=None) -> JobSummary        # runner.py

Kinds (one runner each, inside the worker actors): ``cache`` (kinds.py),
``attribute`` (kind_attribute.py), ``ablation_scan`` (kind_ablation.py),
``splice_eval`` (kind_splice.py), ``dfa`` (kind_dfa.py). Each shard's outputs are written by its
worker under the shard's prefix and become visible when the driver commits
the shard's manifest entry; the driver then aggregates the committed shards
into the job-level result (aggregate.py), read with
``circuitscan.services.store.results``.
"""
