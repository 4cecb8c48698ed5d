"""Errors the attribution engine raises on bad input; all are ValueErrors."""

from __future__ import annotations

from circuitscan.schemas.errors import UserInputError


class AttributionInputError(UserInputError):
    """Inputs that cannot be attributed; the message names the problem."""


class PositionError(AttributionInputError):
    """A position that is out of range, unknown, or cannot be aligned between prompts."""


class NodeSelectionError(AttributionInputError):
    """A node selection that names nothing, or something the model/SAEs do not have."""


class MissingSAEError(NodeSelectionError):
    """A feature/sae_error node at a hook site that has no SAE."""
