"""The RL retrieval environment: a versioned document index refreshed selectively as the encoder moves."""

from environment.env import RefreshPolicy, RetrievalEnvironment
from environment.rewards import dcg_reward

__all__ = ["RefreshPolicy", "RetrievalEnvironment", "dcg_reward"]
