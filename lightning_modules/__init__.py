"""LightningModules and the shared model wrapper of search-r3."""

from lightning_modules.embedding_lm import EmbeddingLM, LoraSettings, ReasoningOutput
from lightning_modules.prompts import EMBED_TOKEN, PromptTemplates
from lightning_modules.retrieval_eval import RetrievalEvalModule

__all__ = ["EMBED_TOKEN", "EmbeddingLM", "LoraSettings", "PromptTemplates", "ReasoningOutput", "RetrievalEvalModule"]
