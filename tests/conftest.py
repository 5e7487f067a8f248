"""Shared fixtures: the repository's real-data fixture (``tests/data``), the full offline mirror where
present, small real BEIR subsets, a tiny random LM, the real SmolLM2."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import lightning as L
import torch
import pytest

from search_r3.lightning_modules.rl import RLModule
from search_r3.lightning_modules.rollout import Rollout

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


FIXTURE_DATA = REPO / "tests" / "data"
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_configure(config: pytest.Config) -> None:
    """Hermetic data resolution for every test and every command a test starts: a cache of the session's
    own, no offline mirror found implicitly, and a BEIR download base that refuses at once (port 9,
    discard) so that nothing can reach the network. Tests that exercise these paths set their own."""
    import tempfile

    cache = Path(tempfile.mkdtemp(prefix="search-r3-test-cache-"))
    os.environ["SEARCH_R3_CACHE"] = str(cache)
    os.environ["SEARCH_R3_MIRRORS"] = ""
    os.environ["SEARCH_R3_BEIR_MIRROR"] = "http://127.0.0.1:9"
    os.environ.pop("SEARCH_R3_DATA", None)
    os.environ.pop("SEARCH_R3_HF_MIRROR", None)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that read the full mirror carry the ``shared_data`` marker (``pytest -m shared_data``)."""
    for item in items:
        if {"shared_data_root", "full_scifact_dir"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.shared_data)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The repository's own real-data fixture (a SciFact slice, MKQA's sample): always there."""
    return FIXTURE_DATA


@pytest.fixture(scope="session")
def shared_data_root() -> Path:
    """The full offline mirror ``../shared/data``, for the few tests that need a whole corpus; they skip
    with a one-line reason where it is absent (a clone with nothing beside it)."""
    if not (SHARED_DATA / "beir" / "scifact").is_dir():
        pytest.skip(f"needs the full SciFact/NFCorpus mirror at {SHARED_DATA} (absent here)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def scifact_dir(data_root: Path) -> Path:
    return data_root / "beir" / "scifact"


@pytest.fixture(scope="session")
def full_scifact_dir(shared_data_root: Path) -> Path:
    return shared_data_root / "beir" / "scifact"


def write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


@pytest.fixture(scope="session")
def mini_scifact(tmp_path_factory: pytest.TempPathFactory, scifact_dir: Path) -> Path:
    """A real SciFact subset: 8 test queries, their judged documents and 40 other documents."""
    from search_r3.datamodules.beir_files import ReadReport, find_file, iter_jsonl, read_qrels

    out = tmp_path_factory.mktemp("mini") / "scifact"
    qrels, _ = read_qrels(scifact_dir / "qrels" / "test.tsv", ReadReport(), "error")
    qids = list(qrels)[:8]
    judged = {d for q in qids for d in qrels[q]}
    docs, others = [], 0
    for _, obj in iter_jsonl(find_file(scifact_dir, "corpus.jsonl")):
        if obj["_id"] in judged or others < 40:
            others += obj["_id"] not in judged
            docs.append(obj)
    write_jsonl_gz(out / "corpus.jsonl.gz", docs)
    queries = [obj for _, obj in iter_jsonl(find_file(scifact_dir, "queries.jsonl")) if obj["_id"] in qids]
    write_jsonl_gz(out / "queries.jsonl.gz", queries)
    (out / "qrels").mkdir()
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{r}" for q in qids for d, r in qrels[q].items()]
    (out / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with a byte-level BPE tokenizer trained here: fast, offline, real code paths."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_lm")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "Please represent user queries and documents. The embedding is here.",
        "Vitamin D deficiency is associated with many diseases in elderly patients.",
        "First briefly analyse what the query is looking for, then finish.",
        "Who wrote Hamlet? William Shakespeare wrote the tragedy around 1600.",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def _tiny_qwen2(out: Path, tokenizer_dir: Path, padding: int, tied: bool) -> Path:
    """A 2-layer random Qwen2 with the tiny tokenizer, its vocabulary padded by ``padding`` rows (as
    Qwen2.5 pads 151,665 tokens to 151,936 rows) and tied or untied output embeddings."""
    import shutil

    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    for f in tokenizer_dir.iterdir():
        if "token" in f.name or f.name.endswith(".jinja"):
            shutil.copy(f, out / f.name)
    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(1)
    config = Qwen2Config(
        vocab_size=len(tok) + padding, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=tied,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # padding rows hold values far from the vocabulary's, as a checkpoint's may
        model.get_input_embeddings().weight[len(tok):] = 5.0
        if not tied:
            model.get_output_embeddings().weight[len(tok):] = -5.0
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_qwen2_padded_dir(tmp_path_factory: pytest.TempPathFactory, tiny_lm_dir: Path) -> Path:
    return _tiny_qwen2(tmp_path_factory.mktemp("qwen2_padded"), tiny_lm_dir, padding=16, tied=False)


@pytest.fixture(scope="session")
def tiny_qwen2_tied_dir(tmp_path_factory: pytest.TempPathFactory, tiny_lm_dir: Path) -> Path:
    return _tiny_qwen2(tmp_path_factory.mktemp("qwen2_tied"), tiny_lm_dir, padding=0, tied=True)


@pytest.fixture()
def tiny_lm(tiny_lm_dir: Path, tmp_path: Path):
    from search_r3.model.embedding_lm import EmbeddingLM

    return EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", max_document_tokens=64, max_query_tokens=32,
                       max_reasoning_tokens=8, batch_size=4, show_progress=False)


@pytest.fixture(scope="session")
def smollm2():
    """The real default model, loaded once for all marked tests (dtype ``auto``, as the default config runs it)."""
    from search_r3.model.embedding_lm import EmbeddingLM

    return EmbeddingLM(cache_dir=str(REPO / ".cache" / "search_r3" / "models"), show_progress=False,
                       max_reasoning_tokens=32)


@pytest.fixture(scope="session")
def mini_train_root(tmp_path_factory: pytest.TempPathFactory, scifact_dir: Path, data_root: Path) -> Path:
    """A data root with real SciFact training rows (24) and a corpus holding their documents + 20 others."""
    from search_r3.datamodules.beir_files import find_file, iter_jsonl

    root = tmp_path_factory.mktemp("train_root")
    rows = [obj for _, obj in iter_jsonl(data_root / "train" / "scifact_train_triples.jsonl.gz")][:24]
    for r in rows:
        r["neg_ids"] = r["neg_ids"][:2]
    needed = {r["pos_id"] for r in rows} | {n for r in rows for n in r["neg_ids"]}
    docs, extra = [], 0
    for _, obj in iter_jsonl(find_file(scifact_dir, "corpus.jsonl")):
        if obj["_id"] in needed or extra < 20:
            extra += obj["_id"] not in needed
            docs.append(obj)
    out = root / "beir" / "scifact"
    write_jsonl_gz(out / "corpus.jsonl.gz", docs)
    queries = {r["query_id"]: r["query"] for r in rows}
    write_jsonl_gz(out / "queries.jsonl.gz", [{"_id": q, "text": t} for q, t in queries.items()])
    (out / "qrels").mkdir()
    (out / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{r['query_id']}\t{r['pos_id']}\t1\n" for r in rows))
    write_jsonl_gz(root / "train" / "scifact_train_triples.jsonl.gz", rows)
    return root


class InterruptAtStep(L.Callback):
    """An interruption right after optimizer step ``step``: writes ``mid.ckpt`` there and stops, as a
    killed run leaves its last periodic checkpoint (the resume tests of both stages start from it)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(Path(trainer.default_root_dir) / "mid.ckpt")
            trainer.should_stop = True


@pytest.fixture()
def interrupt_at_step() -> type[InterruptAtStep]:
    return InterruptAtStep


class SampledTokenReward(RLModule):  # module level: ddp_spawn pickles it by reference
    """Stage 2 with a reward = the share of a rollout's policy tokens that fall in a fixed half of the vocabulary.

    It depends on nothing but what the policy samples: not on the embedding, the environment or the
    documents. With the embedding term and the KL off, the only thing that can raise it is the policy
    gradient moving probability towards the tokens of better-than-average rollouts. It also gives every
    group unequal rewards, which the tiny model's retrieval rewards (all 0) do not."""

    def rollout_rewards(self, r: Rollout, emb, positives):
        rewarded = (r.targets % 2 == 0) & r.policy
        return rewarded.sum(1).float() / r.policy.sum(1).clamp(min=1)


@pytest.fixture()
def sampled_token_reward() -> type:
    return SampledTokenReward


class AlternatingParityReward(RLModule):  # module level: ddp_spawn pickles it by reference
    """Stage 2 with a reward = the share of a rollout's policy tokens whose parity is their position's in
    the response (even ids at positions 0, 2, ..., odd ids at 1, 3, ...).

    Like :class:`SampledTokenReward` it depends on the sampled tokens alone, but *where* each token sits
    matters: a policy gradient whose log-probs are read one position off (hidden states misaligned with
    their targets) pushes each position towards the parity of its neighbour and cannot raise it."""

    def rollout_rewards(self, r: Rollout, emb, positives):
        position = r.policy.long().cumsum(1) - 1
        rewarded = (r.targets % 2 == position % 2) & r.policy
        return rewarded.sum(1).float() / r.policy.sum(1).clamp(min=1)


@pytest.fixture()
def alternating_parity_reward() -> type:
    return AlternatingParityReward


class AnalysisHelpsOrHurts(RLModule):  # module level: ddp_spawn pickles it by reference
    """Stage 2 where one kind of analysis helps and another hurts, against a direct embedding worth 0.5:
    an analysis whose first token is even scores 1, one whose first token is odd scores 0, and an empty
    one (the embed token at once) scores what the direct embedding does."""

    def rollout_rewards(self, r: Rollout, emb, positives):
        first = r.policy.float().argmax(1)
        token = r.targets.gather(1, first[:, None]).squeeze(1)
        empty = token == self.encoder.embed_token_id
        return torch.where(empty, torch.full_like(token, 0.5, dtype=torch.float), (token % 2 == 0).float())

    def direct_rewards(self, direct, positives):
        return torch.full((direct.shape[0],), 0.5)


@pytest.fixture()
def analysis_helps_or_hurts() -> type:
    return AnalysisHelpsOrHurts


def _perturb_trainable(model, scale: float = 0.1, noise: bool = False) -> None:
    """Move every trainable parameter (LoRA A and B, the token rows) away from its initial value, as
    training would: LoRA's B starts at zero, so an untrained adapter would hide what a test checks."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p) if noise else torch.full_like(p, scale))


@pytest.fixture()
def perturb_trainable():
    return _perturb_trainable
