"""Circuit analyses on a model with SAEs (DESIGN.md methods 7–10). Pure torch/TL/sae_lens.

Public API (results are pydantic models from ``circuitscan.schemas.analyses``):

- ``splice_eval(model, saes, prompts_tokens, lengths, metric, answer, wrong, *, layer_sets,
  reference_tokens, reference_lengths, keep_bos=True, all_positions_kl=True, batch_size=16)
  -> list[SpliceEvalRow]`` — method 7: metric and KL(original ‖ variant) with SAE
  reconstructions spliced in (per site or per set, sequentially recomputed), the error term
  mean-ablated, and a mean-ablation baseline.
- ``head_feature_logit(model, sae, feature, answer_id, wrong_id, norm_scale, *,
  input_scales=None, top_k=8, activation=None, attention=None) -> HeadFeatureLogitResult``
  — method 8, every downstream head ranked by its direct logit-difference effect per unit of
  the feature, and with the prompt's activation and attention (``source_attention``) its
  actual contribution (``frozen_norm_scales`` gives the scales from a forward pass;
  ``head_logit_vectors`` the full vocab rows).
- ``dfa(model, saes, tokens, feature, layer, dest_pos) -> DFAResult`` and
  ``recursive_dfa(model, saes, tokens, feature, layer, dest_pos, pruning=Pruning()) -> DFANode``
  — method 9 for hook_z SAE features; ``check_tree_sums(tree)`` verifies exactness.
- ``qk_feature_pairs(model, sae, tokens, layer, head, dest_pos, src_pos, *, key_sae=None)
  -> QKPairTable`` (``qk_feature_pairs_batch`` for a padded batch, one forward pass) and
  ``qk_pair_variance(tables, top_n) -> QKVarianceExplained`` — method 10.

- ``feature_attributions(model, sae, tokens, lengths, positions, metric, answer, wrong)
  -> (activations, attributions)`` per prompt at one position each — how the analyses pick
  a feature by default.

Invalid requests raise ``AnalysisInputError`` (a ValueError).
"""

from circuitscan.pipelines.analyses.dfa import Pruning, check_tree_sums, dfa, recursive_dfa
from circuitscan.pipelines.analyses.feature_choice import feature_attributions
from circuitscan.pipelines.analyses.head_feature_logit import (
    feature_direction,
    frozen_norm_scales,
    head_feature_logit,
    head_logit_vectors,
    source_attention,
)
from circuitscan.pipelines.analyses.linear_parts import AnalysisInputError
from circuitscan.pipelines.analyses.qk_pairs import (
    qk_feature_pairs,
    qk_feature_pairs_batch,
    qk_pair_variance,
)
from circuitscan.pipelines.analyses.splice_eval import reference_means, splice_eval

__all__ = [
    "AnalysisInputError",
    "Pruning",
    "check_tree_sums",
    "dfa",
    "feature_attributions",
    "feature_direction",
    "frozen_norm_scales",
    "head_feature_logit",
    "head_logit_vectors",
    "qk_feature_pairs",
    "qk_feature_pairs_batch",
    "qk_pair_variance",
    "recursive_dfa",
    "reference_means",
    "source_attention",
    "splice_eval",
]
