"""Utilities every layer shares, importing nothing else of search-r3: user-facing errors, progress with an
ETA, content digests, cross-rank gathers and exact top-k search (used by training, the RL environment and
evaluation alike)."""
