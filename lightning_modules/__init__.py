"""The LightningModules of search-r3 (evaluation, Stage 1, Stage 2) and the losses they train with."""

from search_r3.lightning_modules.retrieval_eval import RetrievalEvalModule
from search_r3.lightning_modules.rl import RLModule
from search_r3.lightning_modules.sft import SFTContrastiveModule

__all__ = ["RLModule", "RetrievalEvalModule", "SFTContrastiveModule"]
