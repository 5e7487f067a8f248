"""Training rows and the no-duplicates batch sampler on the real NFCorpus/SciFact triples."""

from __future__ import annotations

from collections import Counter
import json
from pathlib import Path

import pytest

from search_r3.datamodules.beir_files import DataFormatError
from search_r3.datamodules.training_rows import NoDuplicatesBatchSampler, read_training_rows


@pytest.fixture(scope="module")
def nfcorpus_rows(data_root: Path):
    return read_training_rows(data_root / "train" / "nfcorpus_train_triples.jsonl.gz")


def test_real_rows_parse(shared_data_root: Path) -> None:
    rows = read_training_rows(shared_data_root / "train" / "nfcorpus_train_triples.jsonl.gz")
    assert len(rows) == 9394 and len({r.query_id for r in rows}) == 2590
    assert len(read_training_rows(shared_data_root / "train" / "scifact_train_triples.jsonl.gz")) == 919
    assert all(r.pos_id not in r.neg_ids for r in rows)


@pytest.mark.parametrize("num_negatives", [0, 3])
def test_sampler_never_repeats_a_query_or_document_and_yields_every_row_once(nfcorpus_rows, num_negatives: int) -> None:
    keys = [r.keys(num_negatives) for r in nfcorpus_rows]
    # The data really has clashes: NFCorpus queries come with up to 4 positives each.
    assert max(Counter(r.query_id for r in nfcorpus_rows).values()) > 1
    sampler = NoDuplicatesBatchSampler(keys, batch_size=32, seed=0)
    seen = []
    for batch in sampler:
        ids = [k for i in batch for k in keys[i]]
        assert len(ids) == len(set(ids)), "duplicate query or document inside a batch"
        seen += batch
    assert sorted(seen) == list(range(len(keys)))
    first = next(iter(sampler))
    sampler.set_epoch(1)
    assert next(iter(sampler)) != first  # reshuffled per epoch, deterministically
    sampler.set_epoch(0)
    assert next(iter(sampler)) == first


def test_sampler_length_counts_the_extra_batches_that_clashes_cause() -> None:
    # Five rows share document "d": each needs its own batch, so len() must be 5, not ceil(6 / 3) = 2.
    keys = [{"q0", "d"}, {"q1", "d"}, {"q2", "d"}, {"q3", "d"}, {"q4", "d"}, {"q5", "e"}]
    for epoch in range(3):
        sampler = NoDuplicatesBatchSampler(keys, batch_size=3, seed=0)
        sampler.set_epoch(epoch)
        assert len(sampler) == len(list(sampler)) == 5
    assert len(NoDuplicatesBatchSampler(keys, batch_size=3, drop_last=True)) == 0  # first batch is short


def test_bad_rows_name_their_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"query_id": "q1", "query": "ok", "pos_id": "d1"}\n{"query_id": "q2", "query": " ", "pos_id": "d2"}\n')
    with pytest.raises(DataFormatError, match=r"rows\.jsonl:2: empty query"):
        read_training_rows(path)
    path.write_text('{"query_id": "q1", "query": "ok"}\n')
    with pytest.raises(DataFormatError, match=r"rows\.jsonl:1: training row without \['pos_id'\]"):
        read_training_rows(path)


def test_ranks_split_the_global_batches_one_process_would_train(nfcorpus_rows) -> None:
    """3 ranks with batch 16 take, step by step, the three slices of the 48-row batch one process with
    batch 48 trains: the same rows in the same steps, no key twice across the global batch (a document
    on two ranks would be its own cross-device negative), every rank running the same number of steps."""
    keys = [r.keys(1) for r in nfcorpus_rows[:500]]
    whole = list(NoDuplicatesBatchSampler(keys, batch_size=48, seed=3))
    shards = [list(NoDuplicatesBatchSampler(keys, batch_size=16, seed=3, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    assert len(NoDuplicatesBatchSampler(keys, batch_size=16, seed=3, num_replicas=3, rank=1)) == len(shards[1])
    kept = [b for b in whole if len(b) >= 3]  # a tail batch with fewer rows than ranks is dropped
    assert len(shards[0]) == len(kept)
    for step, batch in enumerate(kept):
        assert shards[0][step] + shards[1][step] + shards[2][step] == batch
        assert max(map(len, (s[step] for s in shards))) - min(map(len, (s[step] for s in shards))) <= 1
        used = [k for i in batch for k in keys[i]]
        assert len(used) == len(set(used))


def test_an_injected_sampler_is_refused_with_the_fix() -> None:
    from torch.utils.data import SequentialSampler

    with pytest.raises(TypeError, match="use_distributed_sampler: false"):
        NoDuplicatesBatchSampler(SequentialSampler(range(4)), batch_size=2)


def test_resume_skips_the_batches_already_trained_once(nfcorpus_rows) -> None:
    """A resumed sampler is placed by the step count alone, read at its first batch: mid-epoch it goes on
    with the next batch of that epoch's own shuffle, at an epoch's end with the whole next epoch."""
    keys = [r.keys(1) for r in nfcorpus_rows[:200]]
    sampler = NoDuplicatesBatchSampler(keys, batch_size=16, seed=5)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0 and sorted(i for b in epoch1 for i in b) == sorted(i for b in epoch0 for i in b)
    assert sampler.position(len(epoch0) + 3) == (1, 3)
    steps = [0]
    resumed = NoDuplicatesBatchSampler(keys, batch_size=16, seed=5)
    resumed.resume_after(lambda: steps[0])
    first_pass = iter(resumed)
    steps[0] = len(epoch0) + 3  # the count is read at the first batch (after Lightning restored it), not before
    assert list(first_pass) == epoch1[3:]  # the resumed pass starts at epoch 1's fourth batch
    assert list(resumed) == epoch1  # and only that pass: the next one is the whole epoch again
    at_end = NoDuplicatesBatchSampler(keys, batch_size=16, seed=5)
    at_end.resume_after(lambda: len(epoch0))  # a checkpoint from epoch 0's last batch
    assert list(at_end) == epoch1


def _toy_dataset(root: Path, name: str, words: str) -> None:
    """A BEIR folder whose ids (documents 1-6, queries 1-3) clash with every other toy dataset's."""
    folder = root / "beir" / name
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": str(i), "title": "", "text": f"{words} document {i}"}) + "\n" for i in range(1, 7)))
    (folder / "queries.jsonl").write_text("".join(
        json.dumps({"_id": str(q), "text": f"{words} query {q}"}) + "\n" for q in range(1, 4)))
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{q}\t1\n" for q in range(1, 4)))
    (root / "train").mkdir(exist_ok=True)
    (root / "train" / f"{name}_train_triples.jsonl").write_text("".join(
        json.dumps({"query_id": str(q), "query": f"{words} query {q}", "pos_id": str(q), "neg_ids": [str(q + 3)]})
        + "\n" for q in range(1, 4)))


def test_two_datasets_with_clashing_ids_keep_their_own_texts_masks_and_keys(tmp_path: Path) -> None:
    """Query 1 and document 1 exist in both corpora: after namespacing, each row's texts are its own
    corpus's, a query's known positives are only its dataset's, and the sampler may put scifact/1 and
    nfcorpus/1 in one batch (they are different documents)."""
    from search_r3.datamodules.contrastive import ContrastiveDataModule, known_positive_mask

    _toy_dataset(tmp_path, "alpha", "apple")
    _toy_dataset(tmp_path, "beta", "banana")
    data = ContrastiveDataModule(data_root=str(tmp_path), train_files=["train/alpha_train_triples.jsonl",
                                                                       "train/beta_train_triples.jsonl"],
                                 num_negatives=1, batch_size=4, val_queries=1, val_corpus_docs=6)
    data.setup("fit")
    assert {r.query_id for r in data.rows} == {"alpha/2", "alpha/3", "beta/2", "beta/3"}  # query 1: validation
    for row in data.rows:
        dataset = row.query_id.split("/")[0]
        words = {"alpha": "apple", "beta": "banana"}[dataset]
        assert data.texts[row.pos_id] == f"{words} document {row.pos_id.split('/')[1]}"
        assert all(data.texts[n].startswith(words) for n in row.neg_ids)
    relevant = data.collator.relevant
    assert relevant["alpha/2"] == {"alpha/2"} and relevant["beta/2"] == {"beta/2"}
    # beta's document 2 is not a known positive of alpha's query 2, though their raw ids are equal
    mask = known_positive_mask(["alpha/2"], ["alpha/3", "beta/2"], [0], relevant)
    assert not mask.any()
    keys = [r.keys(1) for r in data.rows]
    assert not set.intersection(*[k for k, r in zip(keys, data.rows) if r.query_id.endswith("/2")])
