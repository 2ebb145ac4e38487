"""Cached vectors as training data: the training view, its loader, vector matrices, FAISS indexes, kNN."""
