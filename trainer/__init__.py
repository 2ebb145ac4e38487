"""The detector of Santosh et al. (2024): MLP, CVaR + AUC losses, SAM, metrics, the fit loop.

Plain torch: importable without DuckDB or open_clip; it knows tensors, not files.
"""
