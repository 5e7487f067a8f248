"""Evaluation: exact search, ir-measures metrics, run files and the results record."""
