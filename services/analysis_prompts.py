"""What a circuit analysis runs on: a model, its SAEs, a job spec's prompt source and metric.

``circuitscan analyze`` takes its prompts exactly as a job spec does (the same
schema, :class:`~circuitscan.schemas.jobs.PromptSource`, read by the same
:mod:`~circuitscan.services.jobs.prompt_sources`): a JSONL or text file, a
dataset on disk, a template filler or generated IOI prompts, with the spec's
metric. ``--spec FILE`` uses a job spec's prompts, metric, model and SAEs;
``--prompts-file FILE`` a JSONL (or text) file; neither: seeded IOI prompts.

Positions are given as a job's are: a name the prompts carry (``IO``,
``END``, a JSONL row's ``positions`` key; BOS is 0), a 0-based index, or
``last`` (each prompt's last real token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE, HookedSAETransformer

from circuitscan.pipelines.analyses import AnalysisInputError
from circuitscan.pipelines.batching import TokenBatch, tokenize_prompts
from circuitscan.schemas.analyses import AnalysisContext
from circuitscan.schemas.jobs import (
    IOISource,
    JobSpec,
    JsonlSource,
    PromptSource,
    StoreSource,
    TextFileSource,
)
from circuitscan.schemas.metrics import MetricKind, MetricSpec
from circuitscan.schemas.models import ModelSpec, SAESpec
from circuitscan.schemas.prompts import PromptRecord

IOI_CORRUPTION = "IOI ABC prompts (IO, S1, S2 replaced by three other names)"


@dataclass
class Setup:
    """A model, its SAEs by site label, a prompt set, its reference prompts and the metric.

    ``reference`` is what mean ablations average over and what patching patches
    towards: each prompt's corrupted counterpart where every prompt has one,
    else the clean prompts themselves (``reference_label`` says which).
    """

    model: HookedSAETransformer
    saes: dict[str, SAE]
    records: list[PromptRecord]
    batch: TokenBatch
    reference: TokenBatch
    context: AnalysisContext
    metric: MetricSpec = field(default_factory=MetricSpec)
    reference_label: str = IOI_CORRUPTION
    paired: bool = True  # every prompt has a corrupted counterpart


@dataclass(frozen=True)
class AnalysisInputs:
    """Where an analysis's prompts, metric, model and SAEs come from (no file read yet)."""

    source: PromptSource
    metric: MetricSpec
    model: ModelSpec | None = None
    saes: list[SAESpec] | None = None
    limit: int | None = None  # the first N prompts of a file or dataset


def analysis_inputs(
    *,
    spec: Path | None = None,
    prompts_file: Path | None = None,
    n_prompts: int | None = None,
    seed: int = 0,
    metric: MetricKind | None = None,
) -> AnalysisInputs:
    """The CLI's prompt options as inputs: ``--spec``, ``--prompts-file`` or IOI (the default).

    ``n_prompts``: IOI prompts generated (default 16), or the first N of a
    file, dataset or template source (default: all of them).
    """
    if spec is not None and prompts_file is not None:
        raise AnalysisInputError("give --spec or --prompts-file, not both")
    if n_prompts is not None and n_prompts < 2:
        raise AnalysisInputError(f"need at least 2 prompts, got {n_prompts}")
    metric_spec = MetricSpec(kind=metric) if metric is not None else None
    if spec is not None:
        from circuitscan.services.jobs.spec_io import load_spec

        job: JobSpec = load_spec(spec)
        return AnalysisInputs(
            source=job.prompts,
            metric=metric_spec or job.metric,
            model=job.model,
            saes=list(job.saes) or None,
            limit=n_prompts,
        )
    if prompts_file is not None:
        kind: Any = TextFileSource if prompts_file.suffix in (".txt", ".text") else JsonlSource
        source: Any = kind(
            kind="text" if kind is TextFileSource else "jsonl", path=str(prompts_file)
        )
        return AnalysisInputs(source=source, metric=metric_spec or MetricSpec(), limit=n_prompts)
    ioi = IOISource(kind="ioi", n=16 if n_prompts is None else n_prompts, seed=seed)
    return AnalysisInputs(source=ioi, metric=metric_spec or MetricSpec())


def _records(inputs: AnalysisInputs, tokenizer: Any) -> list[PromptRecord]:
    from circuitscan.services.jobs.prompt_sources import open_prompts

    if isinstance(inputs.source, StoreSource):
        raise AnalysisInputError(
            "analyses read their prompts from a prompt source (jsonl, text, dataset, template, "
            "ioi), not from a store: use the spec that wrote the store"
        )
    prompts = open_prompts(inputs.source, lambda: tokenizer)
    n = len(prompts) if inputs.limit is None else min(inputs.limit, len(prompts))
    records = prompts.records(0, n)  # a bad row is named before a count is refused
    if n < 2:
        raise AnalysisInputError(f"need at least 2 prompts, the source has {len(prompts)}")
    return records


def prompt_setup(
    inputs: AnalysisInputs,
    *,
    model: HookedSAETransformer | Any | None = None,
    model_name: str | None = None,
    saes: dict[str, SAE] | list[Any] | None = None,
    model_source: str | None = None,
    sae_sources: list[str] | None = None,
) -> Setup:
    """Load (or take) the model and SAEs, and read the prompts of ``inputs``.

    File and dataset prompts are read (and checked) before the model loads, so
    a bad file costs no model load. ``model``/``saes`` as in :func:`ioi_setup`;
    ``model_source``/``sae_sources`` (the CLI's ``--model``/``--sae``) win over
    the spec's.
    """
    # Only IOI prompts need the tokenizer to be drawn; every other source is read first.
    records = None if isinstance(inputs.source, IOISource) else _records(inputs, None)
    if model is None:
        from circuitscan.services.model_loading import load_model

        spec = ModelSpec(source=model_source) if model_source else inputs.model
        model = load_model(spec)
    if not isinstance(model, HookedSAETransformer):  # a LoadedModel
        model_name = model_name or model.name
        model = model.model
    if saes is None:
        from circuitscan.services.sae_loading import load_default_saes, load_sae

        chosen: list[Any] | None = list(sae_sources) if sae_sources else inputs.saes
        saes = [load_sae(s, model) for s in chosen] if chosen else load_default_saes(model)
    if isinstance(saes, list):
        saes = {loaded.site.label: loaded.sae for loaded in saes}
    if model.tokenizer is None:
        raise AnalysisInputError("analyses tokenize text prompts: the model needs a tokenizer")
    if records is None:
        records = _records(inputs, model.tokenizer)
    batch = tokenize_prompts(model, records)
    paired = all(r.corrupted is not None for r in records)
    reference = tokenize_prompts(model, [PromptRecord(text=r.corrupted or r.text) for r in records])
    source = inputs.source
    ioi = isinstance(source, IOISource)
    context = AnalysisContext(
        model=model_name or model.cfg.model_name,
        saes=sorted(saes),
        task="ioi" if ioi else source.kind,
        n_prompts=len(records),
        seed=int(getattr(source, "seed", 0)),
        source=None if ioi else source.model_dump_json(),
        metric=None if inputs.metric == MetricSpec() else inputs.metric,
    )
    if ioi:
        label = IOI_CORRUPTION
    elif paired:
        label = "the prompts' corrupted counterparts"
    else:
        label = "the prompts themselves (they have no corrupted counterparts)"
    return Setup(model, saes, records, batch, reference, context, inputs.metric, label, paired)


def ioi_setup(
    n_prompts: int = 16,
    seed: int = 0,
    *,
    model: HookedSAETransformer | Any | None = None,
    model_name: str | None = None,
    saes: dict[str, SAE] | list[Any] | None = None,
    model_source: str | None = None,
    sae_sources: list[str] | None = None,
) -> Setup:
    """Load (or take) the model and SAEs, and generate ``n_prompts`` seeded IOI prompts.

    Defaults: the default model and its default SAEs. ``model`` may be a
    HookedSAETransformer or a ``LoadedModel``; ``saes`` a dict site label
    (``L15.z``) → SAE or a list of ``LoadedSAE`` (as ``load_default_saes`` returns).
    """
    inputs = analysis_inputs(n_prompts=n_prompts, seed=seed)
    return prompt_setup(
        inputs, model=model, model_name=model_name, saes=saes, model_source=model_source,
        sae_sources=sae_sources,
    )  # fmt: skip


# --- positions ---------------------------------------------------------------------


def parse_position(text: str | int) -> str | int:
    """A CLI position: ``last``, a 0-based index (BOS is 0) or a name the prompts carry."""
    if isinstance(text, int):
        return text
    return int(text) if text.strip().isdigit() else text.strip()


def named_everywhere(setup: Setup, name: str) -> bool:
    """Whether every prompt names position ``name``."""
    return all(name in record.positions for record in setup.records)


def metric_position(setup: Setup) -> str | int:
    """Where the metric reads the logits: ``last`` or the metric's fixed index."""
    return setup.metric.position


def positions_of(setup: Setup, position: str | int) -> torch.Tensor:
    """Each prompt's token index of ``position`` (a name, an index or ``last``), checked."""
    lengths = setup.batch.lengths
    if position == "last":
        return lengths - 1
    if isinstance(position, int):
        index = torch.full_like(lengths, position)
    else:
        missing = [i for i, r in enumerate(setup.records) if position not in r.positions]
        if missing:
            names = sorted({n for r in setup.records for n in r.positions})
            raise AnalysisInputError(
                f"prompt {missing[0]} names no position {position!r}; the prompts name "
                f"{', '.join(names) or 'none'} (or give an index, BOS at 0, or last)"
            )
        index = torch.tensor([r.positions[position] for r in setup.records])
    beyond = torch.nonzero(index >= lengths).flatten()
    if beyond.numel():
        i = int(beyond[0])
        raise AnalysisInputError(
            f"position {position!r} is token {int(index[i])} of prompt {i}, which has only "
            f"{int(lengths[i])} tokens (BOS included)"
        )
    return index
