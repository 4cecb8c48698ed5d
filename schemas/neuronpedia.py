"""JSON Schemas of the records a Neuronpedia import reads, as ``circuitscan export`` writes them.

Written from Neuronpedia's public export format (the ``neuronpedia-utils``
package of the neuronpedia repository: its ``db_models/feature.py`` and
``db_models/activation.py`` dataclasses, and the SAEDashboard → Neuronpedia
converter that writes them): an export folder holds
``<modelId>/<layer>/`` with ``source.jsonl``, ``features/batch-N.jsonl.gz``
(one Feature per line) and ``activations/batch-N.jsonl.gz`` (one Activation
per line), where ``layer`` is the source id ``<layer number>-<source set>``
and a feature is identified by ``modelId/layer/index``. Only the fields we
fill are required here; the importer's optional fields keep their defaults.
"""

from __future__ import annotations

from typing import Any

_NUMBERS = {"type": "array", "items": {"type": "number"}}
_STRINGS = {"type": "array", "items": {"type": "string"}}
_SOURCE_ID = {"type": "string", "pattern": r"^[0-9]+-[a-z0-9][a-z0-9-]*$"}
_INDEX = {"type": "string", "pattern": r"^[0-9]+$"}

FEATURE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Neuronpedia Feature record",
    "type": "object",
    "required": [
        "modelId",
        "layer",
        "index",
        "maxActApprox",
        "hookName",
        "frac_nonzero",
        "pos_str",
        "pos_values",
        "neg_str",
        "neg_values",
        "freq_hist_data_bar_heights",
        "freq_hist_data_bar_values",
    ],
    "properties": {
        "modelId": {"type": "string", "minLength": 1},
        "layer": _SOURCE_ID,
        "index": _INDEX,
        "creatorId": {"type": ["string", "null"]},
        "maxActApprox": {"type": "number", "minimum": 0},
        "hasVector": {"type": "boolean"},
        "vector": _NUMBERS,
        "hookName": {"type": ["string", "null"]},
        "frac_nonzero": {"type": "number", "minimum": 0, "maximum": 1},
        "pos_str": _STRINGS,
        "pos_values": _NUMBERS,
        "neg_str": _STRINGS,
        "neg_values": _NUMBERS,
        "freq_hist_data_bar_heights": _NUMBERS,
        "freq_hist_data_bar_values": _NUMBERS,
        "logits_hist_data_bar_heights": _NUMBERS,
        "logits_hist_data_bar_values": _NUMBERS,
    },
    "additionalProperties": True,
}

ACTIVATION_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Neuronpedia Activation record",
    "type": "object",
    "required": [
        "id",
        "modelId",
        "layer",
        "index",
        "tokens",
        "values",
        "maxValue",
        "maxValueTokenIndex",
        "minValue",
    ],
    "properties": {
        "id": {"type": "string", "minLength": 1},
        "modelId": {"type": "string", "minLength": 1},
        "layer": _SOURCE_ID,
        "index": _INDEX,
        "creatorId": {"type": ["string", "null"]},
        "tokens": {**_STRINGS, "minItems": 1},
        "values": {**_NUMBERS, "minItems": 1},
        "maxValue": {"type": "number"},
        "maxValueTokenIndex": {"type": "integer", "minimum": 0},
        "minValue": {"type": "number"},
        "dfaValues": _NUMBERS,
        "dfaTargetIndex": {"type": ["integer", "null"], "minimum": 0},
        "dfaMaxValue": {"type": ["number", "null"]},
        "dataSource": {"type": ["string", "null"]},
        "dataIndex": {"type": ["string", "null"]},
    },
    "additionalProperties": True,
}

SOURCE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Neuronpedia Source record",
    "type": "object",
    "required": ["id", "modelId", "setName"],
    "properties": {
        "id": _SOURCE_ID,
        "modelId": {"type": "string", "minLength": 1},
        "setName": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9-]*$"},
        "visibility": {"type": "string"},
        "hookName": {"type": "string"},
    },
    "additionalProperties": True,
}
