"""The detector of Santosh et al. (2024): models, losses, optimisers, metrics — plain torch.

Importable without DuckDB or open_clip; it knows tensors, not files. (Built under the trainer issue.)
"""
