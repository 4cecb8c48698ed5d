"""The warm pool's job driver: ``circuitscan run`` on a pool hands its job to it.

A ``circuitscan run`` process would spend most of a small job's start-up
importing torch and the tokenizer libraries and loading the tokenizer, before
it sends a single shard to actors that are already loaded. The pool keeps one
detached driver actor that has all of that loaded: the command sends it the
spec, its working folder and options, and follows the job's lines until it
ends (:mod:`circuitscan.services.pool_client`). The job itself runs here
exactly as :func:`~circuitscan.services.jobs.runner.run_job` runs anywhere
(the store's lease, commits, results), on the pool's actors.

Jobs run one at a time, in their caller's working folder (relative paths in
a spec mean what they mean to the caller). Ctrl-C in the command stops the
job after the shard in progress; a command killed outright leaves the job
running to its end (its store can be resumed or rerun as always).
"""

from __future__ import annotations

import os
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any

from circuitscan.schemas.errors import BRANCHES, CircuitscanError, UserInputError


class JobCancelled(UserInputError):
    """The job's caller asked it to stop (Ctrl-C); committed shards stay."""


@dataclass
class _Job:
    lines: list[str] = field(default_factory=list)
    done: bool = False
    cancelled: bool = False
    summary_json: str | None = None
    summary_text: str | None = None
    error: tuple[str, str] | None = None  # (error branch, message)
    bug: str | None = None


class PoolDriver:
    """Runs whole jobs inside the pool, with the libraries and tokenizers kept loaded."""

    def __init__(self, record_json: str, warm_model_json: str | None = None) -> None:
        from circuitscan.schemas.models import ModelSpec
        from circuitscan.services.jobs import runner, warm_pool

        record = warm_pool.PoolRecord.model_validate_json(record_json)
        # run_job here joins this very pool: it is this process's cluster.
        warm_pool._JOINED[:] = [record]
        if warm_model_json is not None:  # the pool's tokenizer, loaded before the first job
            runner._tokenizer(ModelSpec.model_validate_json(warm_model_json))
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()  # one job at a time: each runs in its caller's folder

    def ready(self) -> int:
        return os.getpid()

    def start(self, job_id: str, spec_json: str, cwd: str, options: dict[str, Any]) -> None:
        job = _Job()
        self._jobs[job_id] = job
        thread = threading.Thread(
            target=self._run, args=(job, spec_json, cwd, options), daemon=True
        )
        thread.start()

    def _run(self, job: _Job, spec_json: str, cwd: str, options: dict[str, Any]) -> None:
        from circuitscan.schemas.jobs import JobSpec
        from circuitscan.services.jobs.runner import run_job

        def echo(line: str) -> None:
            job.lines.append(line)
            if job.cancelled:  # raised from the commit's progress line: after a whole shard
                raise JobCancelled("stopped on request; committed shards stay (resume finishes)")

        if not self._lock.acquire(blocking=False):
            job.lines.append("waiting for the pool's job in progress to end")
            self._lock.acquire()
        try:
            os.chdir(cwd)
            spec = JobSpec.model_validate_json(spec_json)
            summary = run_job(spec, echo=echo, overwrite=bool(options.get("overwrite")))
            job.summary_json = summary.model_dump_json(indent=2)
            job.summary_text = summary.render()
        except CircuitscanError as exc:
            # Sent back as its branch and message: any error class crosses the wire,
            # whatever its constructor takes.
            branch = next((b for b in BRANCHES if isinstance(exc, b)), CircuitscanError)
            job.error = (branch.__name__, str(exc))
        except BaseException:  # a bug: its traceback goes back to the caller
            job.bug = traceback.format_exc()
        finally:
            self._lock.release()
            job.done = True

    def poll(self, job_id: str, since: int) -> dict[str, Any]:
        """Lines after the first ``since``; when done, the summary or the error."""
        job = self._jobs[job_id]
        done = job.done
        reply: dict[str, Any] = {"lines": job.lines[since:], "done": done}
        if done:
            reply.update(
                summary_json=job.summary_json,
                summary_text=job.summary_text,
                error=job.error,
                bug=job.bug,
            )
            self._jobs.pop(job_id, None)
        return reply

    def cancel(self, job_id: str) -> None:
        if job_id in self._jobs:
            self._jobs[job_id].cancelled = True
