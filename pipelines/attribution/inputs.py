"""Checks on what callers hand the attribution engine, so bad input fails with a clear message.

Every check raises an ``AttributionInputError`` subclass naming the problem
(which prompt, which node, which answer) instead of letting a shape error or a
silently wrong pairing surface deep inside a forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Int
from sae_lens import SAE, HookedSAETransformer

from circuitscan.pipelines.attribution.errors import (
    AttributionInputError,
    MissingSAEError,
    NodeSelectionError,
    PositionError,
)
from circuitscan.pipelines.attribution.node_kinds import has_mlp, ops
from circuitscan.pipelines.attribution.positions import check_aligned, check_position_map
from circuitscan.pipelines.tokens import NotSingleTokenError, single_token_id
from circuitscan.schemas.attribution import Node
from circuitscan.schemas.metrics import MetricSpec

Answers = Int[torch.Tensor, " batch"] | Sequence[str] | None


class AnswerTokenError(AttributionInputError):
    """An answer or wrong-answer string that is not exactly one token, or an id out of range."""


def check_tokens(tokens: torch.Tensor, lengths: torch.Tensor, name: str) -> None:
    """Right-padded ``[batch, seq]`` token ids with one length (1..seq) per prompt."""
    if tokens.ndim != 2:
        raise AttributionInputError(
            f"{name} must be [batch, seq] token ids, got {tuple(tokens.shape)}"
        )
    if lengths.shape != (tokens.shape[0],):
        raise AttributionInputError(
            f"{name}: expected one length per prompt ({tokens.shape[0]}), got {tuple(lengths.shape)}"
        )
    if bool((lengths < 1).any()) or bool((lengths > tokens.shape[1]).any()):
        raise AttributionInputError(
            f"{name}: lengths must be in 1..{tokens.shape[1]}, got {lengths.tolist()}"
        )


def check_pair(
    clean_tokens: torch.Tensor,
    corrupt_tokens: torch.Tensor,
    lengths: torch.Tensor,
    corrupt_lengths: torch.Tensor | None,
    position_map: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Clean and corrupted prompts must pair up position by position, or through a map.

    Returns the validated position map (None when the prompts pair one to one).
    """
    corrupt_lengths = lengths if corrupt_lengths is None else corrupt_lengths
    check_tokens(corrupt_tokens, corrupt_lengths, "corrupt_tokens")
    if position_map is not None:
        if corrupt_tokens.shape[0] != clean_tokens.shape[0]:
            raise PositionError(
                f"{clean_tokens.shape[0]} clean prompts but {corrupt_tokens.shape[0]} corrupted"
            )
        return check_position_map(position_map, tuple(clean_tokens.shape), lengths, corrupt_lengths)
    check_aligned(lengths, corrupt_lengths)
    if corrupt_tokens.shape != clean_tokens.shape:
        raise PositionError(
            f"clean tokens {tuple(clean_tokens.shape)} and corrupted tokens "
            f"{tuple(corrupt_tokens.shape)} differ in shape: clean and corrupted prompts must "
            "have the same token lengths (patching pairs them position by position) and be "
            "padded alike, or come with an explicit position map (position_map)"
        )
    return None


def answer_ids(model: HookedSAETransformer, answers: Answers, what: str) -> torch.Tensor | None:
    """Answer token ids from ids or strings; each string must be exactly one token.

    Strings carry their leading space (``' Mary'``), as the tokenizer sees them
    after the prompt.
    """
    if answers is None or isinstance(answers, torch.Tensor):
        return answers
    if isinstance(answers, str):
        raise AnswerTokenError(f"{what} must be one string per prompt, not a single string")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise AnswerTokenError(f"{what} strings need a model with a tokenizer; pass token ids")
    ids = []
    for row, text in enumerate(answers):
        try:
            ids.append(single_token_id(tokenizer, text))
        except NotSingleTokenError as exc:
            raise AnswerTokenError(f"{what} of prompt {row}: {exc}") from exc
    return torch.tensor(ids, dtype=torch.long)


def check_answers(
    model: HookedSAETransformer,
    batch: int,
    metric: MetricSpec,
    answer: torch.Tensor | None,
    wrong: torch.Tensor | None,
) -> None:
    """One in-vocabulary answer (and wrong answer for logit_diff) per prompt."""
    needed = {"logit_diff": ("answer", "wrong"), "target_logprob": ("answer",)}
    given = {"answer": answer, "wrong": wrong}
    for what in needed.get(metric.kind, ()):
        ids = given[what]
        if ids is None:
            raise AnswerTokenError(f"metric {metric.kind} needs {what} tokens, one per prompt")
        if ids.shape != (batch,):
            raise AnswerTokenError(
                f"{what}: expected one token id per prompt ({batch}), got shape {tuple(ids.shape)}"
            )
        vocab = model.cfg.d_vocab
        if bool(((ids < 0) | (ids >= vocab)).any()):
            raise AnswerTokenError(f"{what} ids {ids.tolist()} are not all in 0..{vocab - 1}")


def checked_prompts(
    model: HookedSAETransformer,
    clean_tokens: torch.Tensor,
    lengths: torch.Tensor,
    metric: MetricSpec,
    answer: Answers,
    wrong: Answers,
    corrupt_tokens: torch.Tensor | None,
    corrupt_lengths: torch.Tensor | None,
    position_map: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The checks every engine entry point makes on its prompts: (answer ids, wrong ids, map).

    The position map comes back validated (None when corrupted prompts pair one
    to one); without corrupted prompts it is returned as given, for the caller
    to refuse or use.
    """
    check_tokens(clean_tokens, lengths, "clean_tokens")
    answer_t = answer_ids(model, answer, "answer")
    wrong_t = answer_ids(model, wrong, "wrong")
    check_answers(model, clean_tokens.shape[0], metric, answer_t, wrong_t)
    if corrupt_tokens is not None:
        position_map = check_pair(
            clean_tokens, corrupt_tokens, lengths, corrupt_lengths, position_map
        )
    return answer_t, wrong_t, position_map


def n_units(model: HookedSAETransformer, saes: Mapping[str, SAE[Any]], node: Node) -> int:
    """How many features / heads / neurons the node's kind has at its site."""
    return ops(node.kind).n_units(model, saes.get(node.site.hook_name))


def check_node(model: HookedSAETransformer, saes: Mapping[str, SAE[Any]], node: Node) -> None:
    """The node exists in this model (layer, unit index) and has its SAE if it needs one."""
    if node.layer >= model.cfg.n_layers:
        raise NodeSelectionError(
            f"node {node}: layer {node.layer} does not exist (model has {model.cfg.n_layers})"
        )
    spec = ops(node.kind).spec
    if spec.sae and node.site.hook_name not in saes:
        raise MissingSAEError(
            f"node {node} needs an SAE at {node.site.label}; SAEs given at "
            f"{sorted(saes) or 'no sites'}"
        )
    if spec.needs_mlp and not has_mlp(model):
        raise NodeSelectionError(f"node {node}: this model is attention-only (no MLPs)")
    if node.index is not None and node.index >= n_units(model, saes, node):
        raise NodeSelectionError(
            f"node {node}: index {node.index} does not exist "
            f"({n_units(model, saes, node)} {node.kind} units at layer {node.layer})"
        )
