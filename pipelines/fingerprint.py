"""Content fingerprints of weights, so a store can tell which model/SAE wrote it."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def fingerprint_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex digest over parameter names, shapes, dtypes and bytes (order-independent).

    Two weight sets with the same fingerprint are bit-identical; loading the
    same files twice always gives the same fingerprint.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
