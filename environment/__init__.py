"""The RL retrieval environment: a versioned document index refreshed selectively as the encoder moves."""

from search_r3.environment.env import FidelityProbe, RefreshPolicy, RefreshStats, RetrievalEnvironment
from search_r3.environment.index import ExactIndex, HNSWIndex, VectorIndex
from search_r3.environment.rewards import dcg_reward

__all__ = ["ExactIndex", "FidelityProbe", "HNSWIndex", "RefreshPolicy", "RefreshStats", "RetrievalEnvironment",
           "VectorIndex", "dcg_reward"]
