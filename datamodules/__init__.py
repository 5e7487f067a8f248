"""DataModules: BEIR-format retrieval tasks (and, later, training rows and MKQA)."""

from search_r3.datamodules.beir import BEIRDataModule, BEIRSuiteDataModule, RetrievalTask
from search_r3.datamodules.beir_files import DataFormatError

__all__ = ["BEIRDataModule", "BEIRSuiteDataModule", "DataFormatError", "RetrievalTask"]
