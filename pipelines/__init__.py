"""Pure computation on tensors: caching, attribution, ablation, splice evaluation, DFA.

No Ray, no Zarr, no HTTP, no global state.
"""
