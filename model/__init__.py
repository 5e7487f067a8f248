"""The one model wrapper shared by evaluation and both training stages: ``EmbeddingLM`` (a causal LM
read out at ``<|embed_token|>``), its prompts, and how base models are found and converted."""

from search_r3.model.embedding_lm import EmbeddingLM, LoraSettings
from search_r3.model.reasoning import ReasoningOutput
from search_r3.model.prompts import EMBED_TOKEN, PromptTemplates

__all__ = ["EMBED_TOKEN", "EmbeddingLM", "LoraSettings", "PromptTemplates", "ReasoningOutput"]
