"""The RL retrieval environment: a versioned document index refreshed selectively as the encoder moves."""

from environment.env import FidelityProbe, RefreshPolicy, RefreshStats, RetrievalEnvironment
from environment.index import ExactIndex, HNSWIndex, VectorIndex
from environment.rewards import dcg_reward

__all__ = ["ExactIndex", "FidelityProbe", "HNSWIndex", "RefreshPolicy", "RefreshStats", "RetrievalEnvironment",
           "VectorIndex", "dcg_reward"]
