"""How wide the activation at a hook site is: the ``d_in`` an SAE there must have.

Loading checks a user's SAE against it, and the tiny test SAEs are built to it,
so both agree on what fits where.
"""

from __future__ import annotations

from transformer_lens import HookedTransformer, HookedTransformerConfig

from circuitscan.schemas.errors import UserInputError
from circuitscan.schemas.hooks import HookSite


def site_width(model: HookedTransformer, site: HookSite) -> int:
    """The SAE input width at a site: d_model, d_mlp, or n_heads·d_head for z.

    ``hook_z`` carries ``[.., n_heads, d_head]``; an SAE there reads it
    flattened, so its width is the product.
    """
    return config_site_width(model.cfg, site)


def config_site_width(cfg: HookedTransformerConfig, site: HookSite) -> int:
    """:func:`site_width` from a model's config alone (a driver checks SAEs before loading weights)."""
    if site.point == "z":
        return cfg.n_heads * cfg.d_head
    if site.point in ("mlp_post", "mlp_pre"):
        if cfg.d_mlp is None:
            raise UserInputError(f"{site.label}: this model has no MLPs (attention-only)")
        return cfg.d_mlp
    return cfg.d_model
