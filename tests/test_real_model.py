"""The real SmolLM2-135M-Instruct through EmbeddingLM (dtype ``auto``, as the default config runs it: bf16 where the CPU has
AVX512-BF16/AMX, fp32 elsewhere)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from search_r3.model.embedding_lm import EmbeddingLM, LoraSettings

pytestmark = pytest.mark.model

QUERIES = ["0-dimensional biomaterials show inductive properties.", "who wrote hamlet", "vitamin D and bone health"]
DOCS = [
    "Hamlet is a tragedy written by William Shakespeare sometime between 1599 and 1601.",
    "The giant panda is a bear species endemic to China; it eats bamboo.",
    "Vitamin D deficiency leads to reduced bone mineral density in older adults.",
]


def test_direct_embeddings_deterministic_unit_norm(smollm2: EmbeddingLM) -> None:
    a, b = smollm2.encode(QUERIES), smollm2.encode(QUERIES)
    assert a.dtype == torch.float32 and a.shape == (3, 576)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)


def test_batch_equals_one_by_one_within_rounding(smollm2: EmbeddingLM) -> None:
    texts = QUERIES + DOCS
    batched = smollm2.encode(texts, "document", batch_size=len(texts))
    single = torch.cat([smollm2.encode([t], "document", batch_size=1) for t in texts])
    cos = (batched * single).sum(-1)
    assert cos.min() > 0.995, cos  # padding changes matmul shapes (bf16 rounding), not the result


def test_untrained_direct_mode_ranks_the_matching_passage_first(smollm2: EmbeddingLM) -> None:
    scores = smollm2.encode(["who wrote hamlet", "what do pandas eat"]) @ smollm2.encode_documents(DOCS).T
    assert scores.argmax(dim=1).tolist() == [0, 1]


def test_reasoning_mode_returns_text_and_embedding_at_the_token(smollm2: EmbeddingLM) -> None:
    out = smollm2.reasoner.reason(["who wrote hamlet"])
    assert out.texts[0].strip() and "<|embed_token|>" not in out.texts[0]
    row = out.input_ids[0][out.attention_mask[0].bool()]
    assert row[-1].item() == smollm2.embed_token_id
    with smollm2.inference():
        h = smollm2.lm(input_ids=row[None], output_hidden_states=True).hidden_states[-1][0, -1]
    cos = torch.nn.functional.cosine_similarity(out.embeddings[0], h.float(), dim=0)
    assert cos > 0.999
    direct = smollm2.encode(["who wrote hamlet"])[0]
    assert not torch.allclose(direct, out.embeddings[0], atol=1e-3)  # the analysis changes the embedding


def test_adapter_save_load_gives_identical_embeddings(tmp_path: Path) -> None:
    torch.manual_seed(0)  # LoRA's A matrices are drawn at construction: the adapter must not depend on test order
    model = EmbeddingLM(lora=LoraSettings(), show_progress=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    before = model.encode(QUERIES)
    model.save(tmp_path / "adapter")
    size_mb = sum(f.stat().st_size for f in (tmp_path / "adapter").iterdir()) / 2**20
    assert size_mb < 20, size_mb  # LoRA + one token row, not the 49k-row embedding matrix
    loaded = EmbeddingLM(adapter=str(tmp_path / "adapter"), show_progress=False, merge_adapter=False)
    torch.testing.assert_close(loaded.encode(QUERIES), before, atol=0, rtol=0)
    # Merged for inference (the default without `lora`). A bf16 merge stores W + BA rounded to bf16, a
    # different set of weights: for some adapters that alone moves an embedding by a few 1e-3 in cosine, in
    # fp32 arithmetic too. So the merged model is compared with what it should be, the fp32 merge rounded
    # to bf16 once and run in fp32; what is left is bf16 arithmetic, which must stay within the rounding
    # the unmerged model shows against fp32 (a wrong merge is off by far more; fp32 merges agree to 1e-5,
    # tests/test_embedding_lm.py).
    merged = EmbeddingLM(adapter=str(tmp_path / "adapter"), show_progress=False).encode(QUERIES)
    exact = EmbeddingLM(adapter=str(tmp_path / "adapter"), show_progress=False, dtype="float32",
                        merge_adapter=False).encode(QUERIES)
    stored = EmbeddingLM(adapter=str(tmp_path / "adapter"), show_progress=False, dtype="float32")
    with torch.no_grad():
        for p in stored.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    rounded_merge = stored.encode(QUERIES)

    def gap(embeddings: torch.Tensor, reference: torch.Tensor) -> float:
        return float(1 - torch.nn.functional.cosine_similarity(embeddings.float(), reference, dim=-1).min())

    arithmetic = gap(before, exact)
    assert gap(merged, rounded_merge) <= 2 * arithmetic + 1e-4, (gap(merged, rounded_merge), arithmetic)


def test_embedding_path_opens_no_socket(smollm2: EmbeddingLM, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[object] = []

    def guard(self, address):  # noqa: ANN001
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", guard)
    monkeypatch.setattr(socket.socket, "connect_ex", guard)
    fresh = EmbeddingLM(cache_dir=str(Path(__file__).resolve().parents[1] / ".cache/search_r3/models"),
                        show_progress=False)
    fresh.encode(QUERIES)
    fresh.reasoner.reason(["who wrote hamlet"], max_new_tokens=4)
    assert attempts == []


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare")
def test_embedding_runs_in_an_empty_network_namespace(tmp_path: Path) -> None:
    code = (
        "from search_r3.model.embedding_lm import EmbeddingLM\n"
        "m = EmbeddingLM(cache_dir='.cache/search_r3/models', show_progress=False)\n"
        "print(m.encode(['who wrote hamlet']).shape)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["unshare", "-n", sys.executable, "-c", code], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch.Size([1, 576])" in proc.stdout
