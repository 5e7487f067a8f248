"""search-r3: reason-then-embed retrieval with decoder LLMs (after Search-R3, arXiv 2510.07048).

The design-card folders at the top of the repository install under this one namespace
(``pyproject.toml`` maps them): ``search_r3.common`` (shared utilities), ``search_r3.model`` (the
wrapper), ``search_r3.datamodules``, ``search_r3.environment``, ``search_r3.evaluation`` and
``search_r3.lightning_modules``; the command entry points (``cli``, ``export``, ``mining``) live here.
Which package may import which is written in ``docs/design.md`` ("Package layers") and tested.
"""
