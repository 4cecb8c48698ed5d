"""The attribution engine: feature attribution, AtP, AtP*, exact patching, ablation scans.

Public API (all tensors right-padded ``[batch, seq]`` token ids with ``lengths``
counting real tokens, BOS included; scores in metric units):

- ``run_atp(model, saes, clean_tokens, corrupt_tokens, lengths, metric, answer, wrong,
  nodes, *, method=AttributionMethod(qk_fix=..., graddrop=...), named_positions=None,
  corrupt_lengths=None) -> AttributionResult`` — AtP / AtP* for every selected node.
- ``feature_attribution(model, saes, tokens, lengths, metric, answer, wrong, nodes=None,
  *, named_positions=None) -> AttributionResult`` — a·∂m/∂a on single prompts.
- ``exact_patch(model, saes, clean_tokens, lengths, metric, answer, wrong, nodes: list[Node],
  *, mode='corrupt'|'zero'|'mean', corrupt_tokens=None, reference_tokens=None,
  reference_lengths=None, named_positions=None, batch_size=64, skip_unchanged=True,
  freeze_later_patterns=False, fraction=1.0) -> Tensor[batch, n_nodes]`` — true Δm per
  (prompt, node), many patches per forward pass; each reruns only the blocks from the
  node's own on, up to the metric's position. Optionally with every later attention
  pattern frozen at its clean value, or only a fraction of the way to the patch value.
- ``patch_path(model, saes, clean_tokens, corrupt_tokens, lengths, metric, answer, wrong,
  nodes, *, named_positions=None, fractions=(0.05, 0.25, 0.5, 0.75)) -> PatchPath`` —
  why an estimate misses a node: exact, frozen-pattern and partial patches beside AtP/AtP*.
- ``verify(estimate, truth, k, budget=None) -> VerificationReport`` and
  ``verify_by_patching(...)`` — recall@K and cost of verified recall.
- ``certify(model, saes, clean_tokens, lengths, metric, answer, wrong, nodes, *, samples,
  p=0.25, confidence=0.95, seed=0, mode=..., corrupt_tokens=None, ...) ->
  CertificationResult`` — an upper confidence bound θ on the largest mean |Δm| of any
  unverified node, from patching S random subsets of them together (AtP* paper's
  diagnostic; batched and suffix-only like exact patching).
- ``ablation_scan(model, sae, site, tokens, lengths, metric, answer, wrong, *, mode,
  positions, named_positions=None, batch_size=64, seed=0) -> ScanResult`` — Δm of
  ablating every active SAE feature, prefix computed once per prompt.

``answer``/``wrong`` are token ids or strings of exactly one token each.
``circuitscan.testing.evaluation.compare_rankings`` scores AtP/AtP* rankings against
exhaustive patching (for tests and benchmarks).

``saes`` is a sequence of sae_lens SAEs, each at the site its own config names (a
mapping from HookSite / site label / hook name is still accepted). SAEs are NOT
attached to the model, and a model with SAEs attached is refused rather than reset:
the engine splices them itself (``circuitscan.pipelines.sae_splice``, keeping the
error term, so the model's output is unchanged). Nodes and selections are ``circuitscan.schemas.attribution``.
Bad input raises ``AttributionInputError`` (a ValueError) or one of its subclasses.
"""

from circuitscan.pipelines.attribution.ablation_scan import ScanResult, ablation_scan
from circuitscan.pipelines.attribution.atp import feature_attribution, run_atp
from circuitscan.pipelines.attribution.certify import certify
from circuitscan.pipelines.attribution.errors import (
    AttributionInputError,
    MissingSAEError,
    NodeSelectionError,
    PositionError,
)
from circuitscan.pipelines.attribution.patch_path import PatchPath, patch_path
from circuitscan.pipelines.attribution.patching import exact_patch
from circuitscan.pipelines.attribution.result import AttributionResult
from circuitscan.pipelines.attribution.verification import (
    recall_at_k,
    verify,
    verify_by_patching,
)

__all__ = [
    "AttributionInputError",
    "AttributionResult",
    "MissingSAEError",
    "NodeSelectionError",
    "PatchPath",
    "PositionError",
    "ScanResult",
    "ablation_scan",
    "certify",
    "exact_patch",
    "feature_attribution",
    "patch_path",
    "recall_at_k",
    "run_atp",
    "verify",
    "verify_by_patching",
]
