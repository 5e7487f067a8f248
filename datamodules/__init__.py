"""DataModules: retrieval tasks by dataset name (BEIR, Hugging Face, MKQA) and the training data of both
stages; where a named dataset comes from is :mod:`search_r3.datamodules.sources`."""

from search_r3.datamodules.beir import BEIRDataModule, BEIRSuiteDataModule, RetrievalTask
from search_r3.datamodules.beir_files import DataFormatError

__all__ = ["BEIRDataModule", "BEIRSuiteDataModule", "DataFormatError", "RetrievalTask"]
