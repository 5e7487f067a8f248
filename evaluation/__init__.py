"""Evaluation: retrievers, ir-measures metrics, run files, the results record and its reports, paired tests,
MLflow comparisons (exact search itself is :mod:`search_r3.common.search`, shared with the RL environment)."""
