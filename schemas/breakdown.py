"""A job result broken down by a prompt field: per-group means of the per-prompt values.

Every job kind keeps per-prompt values in its shards; a breakdown groups the
prompts by one field of their records (``template``, ``answer``, ``wrong``,
``text``, ``corrupted`` or any key of ``meta``, e.g. a JSONL row's
``{"meta": {"group": "a"}}``) and averages each value within each group.
Nothing is stored: a breakdown is computed from the shards when asked for.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

_STRICT = ConfigDict(frozen=True, extra="forbid")

MISSING_GROUP = "(missing)"


class PerPromptArray(BaseModel):
    """A driver-written per-prompt array of a job result (rows: the store's prompts, in order)."""

    model_config = _STRICT
    key: str = Field(description="Store key of the array (NumPy .npy bytes, Zstd-compressed).")
    checksum: str = Field(description="'<bytes>:<blake2b>' of the stored object.")
    shape: list[int] = Field(description="Array shape: [prompts, columns].")
    dtype: str = Field(description="NumPy dtype of the values (NaN: not defined on that prompt).")
    columns: list[str] = Field(description="What each column holds (e.g. the verified nodes).")


class GroupInfo(BaseModel):
    """One value of the field and how many prompts carry it."""

    model_config = _STRICT
    value: str = Field(description=f"The field's value ({MISSING_GROUP!r}: prompts without it).")
    n_prompts: int = Field(ge=0, description="Prompts of the job in this group.")


class BreakdownCell(BaseModel):
    """One item's values averaged over one group's prompts."""

    model_config = _STRICT
    group: str = Field(description="The group's field value.")
    n_prompts: int = Field(ge=0, description="Prompts of the group where the item is defined.")
    values: dict[str, float | None] = Field(
        description="Quantity → mean over those prompts (None: defined on none of them)."
    )


class BreakdownRow(BaseModel):
    """One item of the result (a node, a feature, a splice variant) across the groups."""

    model_config = _STRICT
    item: str = Field(description="The item, as the result names it.")
    cells: list[BreakdownCell] = Field(description="One cell per group, in the groups' order.")


class Breakdown(BaseModel):
    """A job result grouped by one prompt field (see the module docstring)."""

    model_config = _STRICT
    kind: str = Field(description="Result kind broken down.")
    field: str = Field(description="The prompt field grouped by.")
    n_prompts: int = Field(ge=0, description="Prompts of the job.")
    groups: list[GroupInfo] = Field(description="The field's values, sorted.")
    quantities: dict[str, str] = Field(
        description="Quantity name → what it is (units), for every name a cell's values use."
    )
    rows: list[BreakdownRow] = Field(description="Items in the result's own order.")
