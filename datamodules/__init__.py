"""DataModules: BEIR-format retrieval tasks (and, later, training rows and MKQA)."""

from datamodules.beir import BEIRDataModule, BEIRSuiteDataModule, RetrievalTask
from datamodules.beir_files import DataFormatError

__all__ = ["BEIRDataModule", "BEIRSuiteDataModule", "DataFormatError", "RetrievalTask"]
