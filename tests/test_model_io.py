"""Models in and out: a checkpoint that already holds the embed token keeps its trained row, and
``search-r3 export`` writes a plain Hugging Face folder that embeds like the adapter, through search-r3
and through ten lines of plain ``transformers``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from search_r3.model.embedding_lm import EmbeddingLM, LoraSettings

QUERIES = ["vitamin D deficiency in elderly patients", "who wrote Hamlet?", "0-dimensional biomaterials"]


@pytest.mark.parametrize("base", ["tiny_lm_dir", "tiny_qwen2_padded_dir"])
def test_a_checkpoint_with_a_trained_token_row_keeps_it(base: str, request: pytest.FixtureRequest,
                                                        tmp_path: Path) -> None:
    """Tied (the row appended) and untied with padding rows (the token lands in one, as on Qwen2.5)."""
    model = EmbeddingLM(base_model=str(request.getfixturevalue(base)), dtype="float32", show_progress=False)
    torch.manual_seed(3)
    with torch.no_grad():  # a row training moved far from the mean it started at
        row = model.lm.get_input_embeddings().weight[model.embed_token_id]
        row.copy_(3 * torch.randn_like(row))
    trained = model.encode(QUERIES)
    model.lm.save_pretrained(tmp_path / "released")
    model.tokenizer.save_pretrained(tmp_path / "released")
    loaded = EmbeddingLM(base_model=str(tmp_path / "released"), dtype="float32", show_progress=False)
    assert loaded.embed_token_id == model.embed_token_id
    assert torch.equal(loaded.encode(QUERIES), trained)


def test_the_token_string_is_a_config_field(tiny_lm_dir: Path) -> None:
    from search_r3.model.prompts import PromptTemplates

    prompts = PromptTemplates(embed_token="<|emb|>")
    assert prompts.embed_prefix == "The embedding is <|emb|>" and "<|emb|>" in prompts.reasoning_system
    model = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False, prompts=prompts)
    ids = model.direct_prompt_ids(QUERIES[:1], "query")[0]
    assert ids[-1] == model.embed_token_id == model.tokenizer.convert_tokens_to_ids("<|emb|>")
    assert PromptTemplates().fingerprint() == PromptTemplates(embed_token="<|embed_token|>").fingerprint()


def _plain_transformers_embedding(folder: Path, query: str) -> torch.Tensor:
    """The README's snippet: embed a query with nothing but transformers and the exported folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = json.loads((folder / "search_r3.json").read_text())
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    messages = [{"role": "system", "content": info["prompts"]["query_system"]}, {"role": "user", "content": query},
                {"role": "assistant", "content": info["direct_assistant_turn"]}]
    text = tok.apply_chat_template(messages, tokenize=False)
    text = text[: text.rindex(info["embed_token"]) + len(info["embed_token"])]
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        hidden = model(**ids, output_hidden_states=True).hidden_states[-1][0, -1]
    return torch.nn.functional.normalize(hidden.float(), dim=-1)


def test_export_writes_a_plain_model_that_embeds_like_the_adapter(tiny_lm_dir: Path, tmp_path: Path,
                                                                   perturb_trainable, monkeypatch) -> None:
    from search_r3.cli import main

    trained = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False,
                          lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    perturb_trainable(trained, noise=True)
    trained.save(tmp_path / "adapter")
    monkeypatch.setattr(sys, "argv", ["search-r3", "export", "--adapter", str(tmp_path / "adapter"),
                                      "--out", str(tmp_path / "exported")])
    main()
    out = tmp_path / "exported"
    assert {"config.json", "model.safetensors", "tokenizer.json", "search_r3.json"} <= {p.name for p in out.iterdir()}
    via_adapter = EmbeddingLM(base_model=str(tiny_lm_dir), adapter=str(tmp_path / "adapter"), dtype="float32",
                              show_progress=False).encode(QUERIES)
    via_export = EmbeddingLM(base_model=str(out), dtype="float32", show_progress=False).encode(QUERIES)
    assert torch.equal(via_export, via_adapter)
    plain = _plain_transformers_embedding(out, QUERIES[1])
    torch.testing.assert_close(plain, via_adapter[1], atol=1e-5, rtol=0)
    with pytest.raises(SystemExit) as stop:  # an export never overwrites
        main()
    assert stop.value.code == 2
