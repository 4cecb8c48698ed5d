"""Scan jobs on Ray: specs → prompts → shards → actors → committed store.

Entry points::

    run_job(spec, address=None, overwrite=False, echo=None, keep_actors=False, verify=False)
        -> JobSummary
    resume_job(store_url, address=None, echo=None, verify=False) -> JobSummary   # runner.py

Job kinds (``cache``, ``attribute``, ``ablation_scan``, ``splice_eval``,
``dfa``) are one module each under ``kinds/``, registered once in
``kinds/__init__.py`` (:class:`~circuitscan.services.jobs.job_kind.JobKind`).
Inside the worker actors a kind's runner (``shard_runner.ShardRunner``)
computes a shard and writes it, with its typed partial result, under the
shard's prefix; the shard becomes visible when the driver commits its
manifest entry; the driver then merges the committed shards' partials into
the job-level result, read with ``circuitscan.services.store.results``.
"""
