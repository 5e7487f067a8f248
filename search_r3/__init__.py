"""search-r3: reason-then-embed retrieval with decoder LLMs (after Search-R3, arXiv 2510.07048).

The design-card folders at the top of the repository install under this one namespace
(``pyproject.toml`` maps them): ``search_r3.model`` (the wrapper), ``search_r3.datamodules``,
``search_r3.evaluation``, ``search_r3.environment`` and ``search_r3.lightning_modules``; the command
entry points (``cli``, ``mining``) live here. Layers, lowest first, each importing only those before
it: model, datamodules → evaluation → environment → lightning_modules → cli / mining.
"""
