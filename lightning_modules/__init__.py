"""LightningModules and the shared model wrapper of search-r3."""

from typing import Any

from lightning_modules.embedding_lm import EmbeddingLM, LoraSettings, ReasoningOutput
from lightning_modules.prompts import EMBED_TOKEN, PromptTemplates

__all__ = ["EMBED_TOKEN", "EmbeddingLM", "LoraSettings", "PromptTemplates", "ReasoningOutput", "RetrievalEvalModule"]


def __getattr__(name: str) -> Any:
    # Lazy: the evaluation module imports evaluation.retrievers, which imports EmbeddingLM from here.
    if name == "RetrievalEvalModule":
        from lightning_modules.retrieval_eval import RetrievalEvalModule

        return RetrievalEvalModule
    raise AttributeError(name)
