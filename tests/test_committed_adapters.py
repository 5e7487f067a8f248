"""Every adapter committed under ``checkpoints/`` loads with today's code, is the one its recorded rows were
scored with, and still gives the embedding it gave when it was committed.

The digest ties a folder to the rows of ``docs/results.json`` that name it (a re-exported or retrained
adapter committed at the same path would change it); the embedding ties the loading code to the weights (a
stacked adapter loaded without its ``base_adapter/``, a row not restored, another readout would move it).
The reference values are the first six dimensions of one fp32 query embedding, taken when the loading code
was split out of the wrapper."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from search_r3.common.digests import folder_digest
from search_r3.model.embedding_lm import EmbeddingLM

REPO = Path(__file__).resolve().parents[1]
QUERY = "Vitamin D deficiency raises the risk of fractures."
EMBEDDING_HEADS = {
    "checkpoints/smollm2-rl-direct-baseline-cpu": [-0.0030, 0.0355, 0.0591, 0.0292, 0.0419, 0.0296],
    "checkpoints/smollm2-rl-direct-baseline-drgrpo-cpu": [0.0002, 0.0339, 0.0552, 0.0262, 0.0434, 0.0285],
    "checkpoints/smollm2-rl-default-cpu": [-0.0093, 0.0368, 0.0616, 0.0311, 0.0456, 0.0263],
    "checkpoints/smollm2-sft-cpu": [0.0132, 0.0130, 0.0488, 0.0321, 0.0435, 0.0268],
    "checkpoints/smollm2-rl-claim-cpu": [-0.0082, 0.0400, 0.0584, 0.0316, 0.0414, 0.0291],
    "checkpoints/smollm2-rl-pure-grpo-cpu": [0.0148, 0.0091, 0.0491, 0.0314, 0.0402, 0.0272],
    "checkpoints/smollm2-rl-min-reasoning-cpu": [-0.0083, 0.0356, 0.0548, 0.0279, 0.0377, 0.0282],
}


def _committed() -> list[str]:
    return sorted(str(p.parent.relative_to(REPO)) for p in (REPO / "checkpoints").glob("*/search_r3.json"))


def test_every_committed_adapter_has_a_reference_embedding() -> None:
    missing = set(_committed()) - set(EMBEDDING_HEADS)
    assert not missing, f"add a reference embedding for {sorted(missing)} (see the module docstring)"


@pytest.mark.parametrize("folder", _committed())
def test_a_committed_adapter_loads_is_the_recorded_one_and_embeds_as_committed(folder: str) -> None:
    rows = [r for r in json.loads((REPO / "docs" / "results.json").read_text()) if r.get("checkpoint") == folder]
    digest = folder_digest(REPO / folder)
    assert {r["checkpoint_digest"] for r in rows if "checkpoint_digest" in r} <= {digest}, \
        f"{folder} is not the adapter its recorded rows were scored with"
    model = EmbeddingLM(adapter=str(REPO / folder), dtype="float32", show_progress=False,
                        cache_dir=str(REPO / ".cache" / "search_r3" / "models"))
    assert model.adapter_digest == digest
    embedding = model.encode([QUERY])[0]
    torch.testing.assert_close(embedding.norm(), torch.tensor(1.0))
    torch.testing.assert_close(embedding[:6], torch.tensor(EMBEDDING_HEADS[folder]), atol=2e-4, rtol=0)
