"""CLIP models (loading, model keys) and the encode unit of work."""
