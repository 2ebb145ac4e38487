"""FAISS indexes over a store's vectors: `plan` (which index fits the budget), `build` (train, fill,
tune, write) and `search` (map, search, re-rank). Import the submodule you need; nothing is re-exported."""
