"""Metrics, exact search, run files, the results record and the DDP merge of embeddings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from search_r3.evaluation.dense_eval import gather_rows, ordered
from search_r3.evaluation.metrics import build_run, evaluate_run, per_query
from search_r3.evaluation.paired import main as paired_main
from search_r3.evaluation.paired import paired_comparison, read_run
from search_r3.evaluation.results_record import record_rows
from search_r3.evaluation.run_files import RunProvenance, read_provenance, write_trec_run
from search_r3.common.search import exact_topk

# Graded qrels and a run whose trec_eval values are known (linear gain, trec_eval 9.0.7).
QRELS = {"q1": {"d1": 2, "d2": 1, "d5": 0}, "q2": {"d3": 1, "d9": 1}}
RUN = {"q1": {"d2": 3.0, "d1": 2.0, "d7": 1.0}, "q2": {"d4": 5.0, "d3": 4.0}}


def test_ndcg_matches_trec_eval_on_graded_case() -> None:
    # q1: DCG = 1/log2(2) + 2/log2(3); IDCG = 2 + 1/log2(3). q2: DCG = 1/log2(3); IDCG = 1 + 1/log2(3).
    q1 = (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3))
    q2 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert round(q1, 4) == 0.8597 and round(q2, 4) == 0.3869
    pq = per_query(QRELS, RUN)
    assert pq["q1"]["nDCG@10"] == pytest.approx(q1, abs=1e-6)
    assert pq["q2"]["nDCG@10"] == pytest.approx(q2, abs=1e-6)
    agg = evaluate_run(QRELS, RUN)
    assert agg["nDCG@10"] == pytest.approx((q1 + q2) / 2, abs=1e-6)
    assert agg["R@100"] == pytest.approx(0.75) and agg["RR@10"] == pytest.approx(0.75)


def test_a_judged_query_without_ranking_is_an_error() -> None:
    with pytest.raises(ValueError, match="1 judged queries have no ranking"):
        evaluate_run(QRELS, {"q1": RUN["q1"]})


def test_build_run_drops_identical_ids_like_beir() -> None:
    run = build_run(["a"], ["a", "b"], torch.tensor([[0.9, 0.5]]), torch.tensor([[0, 1]]))
    assert run == {"a": {"b": 0.5}}
    run = build_run(["a"], ["a", "b"], torch.tensor([[0.9, 0.5]]), torch.tensor([[0, 1]]), ignore_identical_ids=False)
    assert run == {"a": {"a": pytest.approx(0.9), "b": 0.5}}


def test_exact_topk_equals_brute_force_across_chunks() -> None:
    g = torch.Generator().manual_seed(0)
    docs = torch.nn.functional.normalize(torch.randn(1000, 32, generator=g), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(37, 32, generator=g), dim=-1)
    scores, idx = exact_topk(queries, docs, k=10, query_chunk=8, doc_chunk=97)
    ref_s, ref_i = (queries @ docs.T).topk(10, dim=1)
    torch.testing.assert_close(scores, ref_s)
    assert torch.equal(idx, ref_i)
    # on each device this machine has (the GPU where there is one): same ranking, results on the CPU
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        on_device, idx_device = exact_topk(queries, docs.to(torch.bfloat16), k=10, doc_chunk=97, device=device)
        assert on_device.device.type == "cpu" and idx_device.device.type == "cpu"
        ref_bf16 = (queries @ docs.to(torch.bfloat16).float().T).topk(10, dim=1)
        torch.testing.assert_close(on_device, ref_bf16.values, atol=1e-5, rtol=0)
    s, i = exact_topk(queries, docs[:5], k=10)  # k larger than the corpus
    assert s.shape == (37, 5)
    with pytest.raises(ValueError, match="shape mismatch"):
        exact_topk(queries, docs[:, :16], k=3)


def test_exact_topk_orders_ties_by_position_whatever_the_chunking() -> None:
    """Duplicate documents tie exactly; the top-k must not depend on how the corpus is chunked (or sharded):
    lowest position first, also when the tie straddles the k-th place."""
    g = torch.Generator().manual_seed(1)
    docs = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=-1)
    for copy in (40, 41, 150, 299):
        docs[copy] = docs[7]
    queries = torch.cat([docs[7:8], torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=-1)])
    for k in (2, 3, 5, 8):
        results = [exact_topk(queries, docs, k=k, doc_chunk=chunk)[1] for chunk in (300, 97, 41, 7)]
        assert all(torch.equal(r, results[0]) for r in results), (k, results)
        assert results[0][0].tolist() == [7, 40, 41, 150, 299, *results[0][0].tolist()[5:]][:k]


def test_trec_run_file_format(tmp_path: Path) -> None:
    path = write_trec_run(RUN, tmp_path / "run.trec", tag="t")
    lines = path.read_text().splitlines()
    assert lines[0] == "q1 Q0 d2 1 3.000000 t" and lines[1].startswith("q1 Q0 d1 2 ")
    import ir_measures

    reread = list(ir_measures.read_trec_run(str(path)))
    assert len(reread) == 5


def _row(**kw) -> dict:
    row = {"retriever": "bm25", "mode": None, "checkpoint": None, "dataset": "scifact", "split": "test",
           "nDCG@10": 0.5, "R@100": 0.9, "RR@10": 0.4, "command": "search-r3 test", "wall_time_s": 1.0,
           "num_queries": 300, "num_docs": 5183, "corpus_size": 5183}
    row.update(kw)
    return row


def test_results_record_upserts_and_renders(tmp_path: Path) -> None:
    path = tmp_path / "docs" / "results.json"
    record_rows([_row(), _row(retriever="minilm")], path)
    record_rows([_row(**{"nDCG@10": 0.6})], path)  # same identity: replaced, not duplicated
    rows = json.loads(path.read_text())
    assert len(rows) == 2 and {r["retriever"]: r["nDCG@10"] for r in rows} == {"bm25": 0.6, "minilm": 0.5}
    md = path.with_suffix(".md").read_text()
    assert "| scifact | test | bm25 | – | – | – | 0.6000 |" in md and "`search-r3 test`" in md
    with pytest.raises(ValueError, match="lacks"):
        record_rows([{"retriever": "x"}], path)


def test_results_record_keeps_rows_of_two_adapters_saved_at_one_path(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    old = _row(retriever="smollm2-sft", checkpoint="runs/sft/adapter/best", checkpoint_digest="aaaaaaaa11")
    new = dict(old, checkpoint_digest="bbbbbbbb22", **{"nDCG@10": 0.7})
    record_rows([old], path)
    record_rows([new], path)
    assert sorted(r["nDCG@10"] for r in json.loads(path.read_text())) == [0.5, 0.7]
    md = path.with_suffix(".md").read_text()
    assert "runs/sft/adapter/best @aaaaaaaa |" in md and "runs/sft/adapter/best @bbbbbbbb |" in md


def test_results_record_keeps_a_bf16_and_an_fp32_run_of_one_command(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    record_rows([_row(retriever="smollm2-untrained", precision="bf16", device="cpu")], path)
    record_rows([_row(retriever="smollm2-untrained", precision="fp32", device="cpu", **{"nDCG@10": 0.51})], path)
    assert sorted(r["precision"] for r in json.loads(path.read_text())) == ["bf16", "fp32"]
    md = path.with_suffix(".md").read_text()
    assert "| cpu, bf16 |" in md and "| cpu, fp32 |" in md


def _record_many(path: str, worker: int, count: int) -> None:
    for i in range(count):
        record_rows([_row(retriever=f"w{worker}-{i}")], path)


def test_results_record_keeps_every_row_of_concurrent_commands(tmp_path: Path) -> None:
    """Four processes upserting 15 rows each into one file at once: all 60 rows survive (no lost update,
    no half-written file read back), and the markdown agrees with the JSON."""
    import multiprocessing

    path = str(tmp_path / "results.json")
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_record_many, args=(path, w, 15)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert all(w.exitcode == 0 for w in workers)
    rows = json.loads(Path(path).read_text())
    assert sorted(r["retriever"] for r in rows) == sorted(f"w{w}-{i}" for w in range(4) for i in range(15))
    assert Path(path).with_suffix(".md").read_text().count("| w") >= 60


def test_paired_comparison_of_two_runs_read_back_from_trec_files(tmp_path: Path) -> None:
    # B ranks q1's best document first (nDCG 1) and misses q2 (nDCG 0): per query A - B is
    # 0.8597 - 1 and 0.3869 - 0, values known from the trec_eval case above.
    run_b = {"q1": {"d1": 3.0, "d2": 2.0}, "q2": {"d8": 1.0}}
    a = read_run(write_trec_run(RUN, tmp_path / "a.trec", tag="a"))
    b = read_run(write_trec_run(run_b, tmp_path / "b.trec", tag="b"))
    res = paired_comparison(QRELS, a, b)
    diffs = [0.8597 - 1.0, 0.3869 - 0.0]
    assert res.num_queries == 2 and (res.wins, res.ties, res.losses) == (1, 0, 1)
    assert res.mean_difference == pytest.approx(sum(diffs) / 2, abs=1e-4)
    assert res.standard_error == pytest.approx(abs(diffs[0] - diffs[1]) / 2, abs=1e-4)  # n = 2: sd/sqrt(2)
    same = paired_comparison(QRELS, a, a)
    assert same.mean_difference == 0.0 and same.p_value == 1.0 and same.ties == 2
    # a run with no line for q2 (no hit): q2 counts 0 for it, as in the table, and is reported missing
    gap = paired_comparison(QRELS, a, {"q1": run_b["q1"]})
    assert gap.num_queries == 2 and (gap.missing_a, gap.missing_b) == (0, 1)
    assert gap.mean_b == pytest.approx(0.5, abs=1e-9)


def _provenance(digest: str = "c0ffee", queries: tuple[str, ...] = ("q1", "q2")) -> RunProvenance:
    return RunProvenance(dataset="toy", split="test", corpus_documents=9, corpus_size=9, corpus_digest=digest,
                         capped=False, query_ids=queries)


def test_paired_cli_scores_the_recorded_queries_and_refuses_other_corpora(tmp_path: Path, capsys) -> None:
    """The sidecar says which queries a run was made for: one with no hit (no line in the file) counts 0,
    the CLI prints how many; runs over different corpora or query sets are refused unless --force."""
    qrels = tmp_path / "test.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{r}\n" for q, docs in QRELS.items()
                                                             for d, r in docs.items()))
    only_q1 = {"q1": RUN["q1"]}
    a = write_trec_run(RUN, tmp_path / "a.trec", tag="a", provenance=_provenance())
    b = write_trec_run(only_q1, tmp_path / "b.trec", tag="b", provenance=_provenance())
    assert read_provenance(b) == _provenance()
    paired_main([str(a), str(b), "--qrels", str(qrels), "--json"])
    res = json.loads(capsys.readouterr().out)
    assert res["num_queries"] == 2 and res["missing_b"] == 1
    assert res["mean_b"] == pytest.approx(per_query(QRELS, RUN)["q1"]["nDCG@10"] / 2, abs=1e-9)
    other = write_trec_run(RUN, tmp_path / "c.trec", tag="c", provenance=_provenance(digest="capped"))
    with pytest.raises(SystemExit) as stop:
        paired_main([str(a), str(other), "--qrels", str(qrels)])
    assert stop.value.code == 2 and "different corpora" in capsys.readouterr().err
    paired_main([str(a), str(other), "--qrels", str(qrels), "--force"])
    assert "warning: different corpora" in capsys.readouterr().err
    fewer = write_trec_run(RUN, tmp_path / "d.trec", tag="d", provenance=_provenance(queries=("q1",)))
    with pytest.raises(SystemExit):
        paired_main([str(a), str(fewer), "--qrels", str(qrels)])
    assert "different query sets" in capsys.readouterr().err


def test_paired_grid_pairs_each_table_cell_with_its_partner(tmp_path: Path, capsys) -> None:
    """--grid writes the four tests of a two-adapter table from run file names; four runs with different
    scores show each test read the right two files (a swapped mode or adapter changes a mean)."""
    qrels_dir = tmp_path / "data" / "beir" / "toy" / "qrels"
    qrels_dir.mkdir(parents=True)
    (qrels_dir / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{r}\n" for q, docs in QRELS.items() for d, r in docs.items()))
    runs = {("rl", "reasoning"): RUN, ("rl", "direct"): {"q1": {"d1": 3.0, "d2": 2.0}, "q2": {"d8": 1.0}},
            ("sft", "reasoning"): {"q1": {"d5": 1.0}, "q2": {"d3": 2.0}}, ("sft", "direct"): {"q1": {"d2": 1.0}}}
    table, other = tmp_path / "table", tmp_path / "other"
    table.mkdir(), other.mkdir()
    for (system, mode), run in runs.items():
        directory = table if system == "rl" else other  # the baseline scored by another command
        write_trec_run(run, directory / f"run.toy.{system}.{mode}.trec", tag=system, provenance=_provenance())
    paired_main(["--grid", str(table), "--system", "rl", "--baseline", "sft", "--baseline-runs", str(other),
                 "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "paired")])
    assert capsys.readouterr().out.count("| toy: ") == 4

    def mean(key: tuple[str, str]) -> float:
        return sum(s["nDCG@10"] for s in per_query(QRELS, runs[key]).values()) / len(QRELS)

    expected = {"rl.reasoning-vs-direct": (("rl", "reasoning"), ("rl", "direct")),
                "sft.reasoning-vs-direct": (("sft", "reasoning"), ("sft", "direct")),
                "reasoning.rl-vs-sft": (("rl", "reasoning"), ("sft", "reasoning")),
                "direct.rl-vs-sft": (("rl", "direct"), ("sft", "direct"))}
    assert sorted(p.name for p in (tmp_path / "paired").iterdir()) == sorted(f"toy.{n}.json" for n in expected)
    for name, (a, b) in expected.items():
        res = json.loads((tmp_path / "paired" / f"toy.{name}.json").read_text())
        assert (res["mean_a"], res["mean_b"]) == (pytest.approx(mean(a), abs=1e-9), pytest.approx(mean(b), abs=1e-9))
        assert res["num_queries"] == 2


def test_gather_rows_merges_ranks_and_drops_padding_duplicates() -> None:
    # Two simulated ranks with unequal row counts; rank 1 repeats index 0 as a sampler would.
    ranks = [(torch.tensor([0, 2, 4]), torch.tensor([[0.0], [2.0], [4.0]])), (torch.tensor([1, 3]), torch.tensor([[1.0], [3.0]]))]
    ranks[1] = (torch.cat([ranks[1][0], torch.tensor([0])]), torch.cat([ranks[1][1], torch.tensor([[0.0]])]))
    calls = {"n": 0}

    def fake_all_gather(t: torch.Tensor) -> torch.Tensor:
        # Called in the same order on every rank: count, indices, embeddings.
        call = calls["n"]
        calls["n"] += 1
        if call == 0:
            return torch.stack([torch.tensor([len(r[0])]) for r in ranks])
        width = max(len(r[0]) for r in ranks)
        rows = []
        for idx, emb in ranks:
            pad = width - len(idx)
            rows.append(torch.cat([idx, torch.full((pad,), -1)]) if call == 1
                        else torch.cat([emb, emb.new_zeros((pad, 1))]))
        return torch.stack(rows)

    idx, emb = gather_rows(*ranks[0], fake_all_gather)
    merged = ordered(idx, emb, expected=5, what="docs")
    assert merged.flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    with pytest.raises(RuntimeError, match="expected 6"):
        ordered(idx, emb, expected=6, what="docs")


def test_compare_gathers_runs_into_one_table(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from search_r3.evaluation.compare import main as compare
    from search_r3.evaluation.mlflow_runs import log_row_runs
    from search_r3.evaluation.report import ResultRow

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("search-r3", artifact_location=str(tmp_path / "art"))
    # "first" was logged before child runs existed (rows as keys on the command's run); "second" as now
    first = client.create_run(exp, run_name="first")
    client.log_metric(first.info.run_id, "test/scifact/bm25/nDCG_at_10", 0.68)
    client.log_metric(first.info.run_id, "test/nfcorpus/bm25/nDCG_at_10", 0.34)
    client.log_param(first.info.run_id, "data/scifact/num_docs", "5183")
    client.log_param(first.info.run_id, "data/scifact/corpus_size", "5183")
    client.set_terminated(first.info.run_id)
    second = client.create_run(exp, run_name="second")

    def row(retriever: str, mode: str | None, dataset: str, value: float) -> ResultRow:
        return ResultRow(retriever=retriever, mode=mode, checkpoint=None, dataset=dataset, split="test",
                         metrics={"nDCG@10": value}, num_queries=3, num_docs=5183, corpus_size=5183,
                         command="search-r3 test", wall_time_s=1.0)

    log_row_runs(client, second.info.run_id, [row("bm25", None, "scifact", 0.70), row("bm25", None, "nfcorpus", 0.35),
                                              row("minilm", "direct", "scifact", 0.64),
                                              row("minilm", "direct", "nfcorpus", 0.32)], datasets={})
    client.set_terminated(second.info.run_id)
    out = tmp_path / "cmp.md"
    compare(["--tracking-uri", uri, "--out", str(out)])
    table = out.read_text()
    assert "| bm25 (first) | " in table and "| bm25 (second) | " in table  # same system, two runs: both kept
    assert "| minilm.direct | 0.3200 | 0.6400 | 0.4800 |" in table


def test_rows_say_whether_an_adapter_was_trained_on_the_dataset(tmp_path: Path) -> None:
    from search_r3.evaluation.report import ResultRow

    def row(dataset: str, trained_on: list[str] | None) -> dict:
        return ResultRow(retriever="smollm2-sft", mode="direct", checkpoint="runs/sft/adapter/best", dataset=dataset,
                         split="test", metrics={"nDCG@10": 0.5, "R@100": 0.9, "RR@10": 0.5}, num_queries=3, num_docs=10,
                         corpus_size=10, command="search-r3 test", wall_time_s=1.0, trained_on=trained_on).record()

    path = record_rows([row("scifact", ["scifact"]), row("nfcorpus", ["scifact"]), row("trec-covid", None)],
                       tmp_path / "results.json")
    rows = {r["dataset"]: r for r in json.loads(path.read_text())}
    assert rows["scifact"]["protocol"] == "in-domain" and rows["nfcorpus"]["protocol"] == "cross-domain"
    assert "protocol" not in rows["trec-covid"]
    md = path.with_suffix(".md").read_text()
    assert "scifact train (in-domain)" in md and "scifact train (cross-domain)" in md


def test_results_md_starts_with_one_current_row_per_system(tmp_path: Path) -> None:
    """The current table keeps the latest row per identity (the same measurement by two commands shows
    once; another adapter digest or another corpus size is another system); the history keeps all."""
    path = tmp_path / "results.json"
    record_rows([_row(command="a", date="2026-11-01"), _row(command="b", date="2026-11-02", **{"nDCG@10": 0.55}),
                 _row(retriever="sft", mode="direct", checkpoint="x", checkpoint_digest="d1"),
                 _row(retriever="sft", mode="direct", checkpoint="x", checkpoint_digest="d2"),
                 _row(command="c", num_docs=1000, date="2026-11-03")], path)
    md = path.with_suffix(".md").read_text()
    current, history = md.split("## Full history")
    # the adapter "x" is not in the repository: its systems are listed as earlier ones
    assert "## Reproducible from this repository (2 systems)" in current and "## Earlier systems (2 systems)" in current
    assert "(5 rows)" in history
    assert "| 0.5500 |" in current and "`a`" not in current  # the later bm25 row of the same identity
    assert "@d1" in current and "@d2" in current and "1000 of 5183" in current
    assert "`a`" in history and "`b`" in history


def test_results_md_opens_with_the_systems_a_clone_can_rescore(tmp_path: Path) -> None:
    """An adapter committed under checkpoints/ with the digest its row names is reproducible; the same path
    with another digest (a re-export or a retrained adapter) and a runs/ adapter are not."""
    from search_r3.common.digests import folder_digest
    from search_r3.evaluation.results_record import render_markdown

    folder = tmp_path / "checkpoints" / "a"
    folder.mkdir(parents=True)
    (folder / "search_r3.json").write_text("{}")
    digest = folder_digest(folder)
    rows = [_row(retriever="kept", mode="direct", checkpoint="checkpoints/a", checkpoint_digest=digest),
            _row(retriever="stale", mode="direct", checkpoint="checkpoints/a", checkpoint_digest="0" * 16),
            _row(retriever="gone", mode="direct", checkpoint="runs/sft/adapter/best", checkpoint_digest=digest)]
    here, rest = render_markdown(rows, root=tmp_path).split("## Earlier systems")
    assert "| kept |" in here and "| bm25 |" not in here
    assert "| stale |" in rest.split("## Full history")[0] and "| gone |" in rest.split("## Full history")[0]


def test_reproduction_page_sets_each_claim_beside_its_record(tmp_path: Path) -> None:
    """The generated page reads our figure from the recorded rows (A - B, with the paired test and the
    reasoning row's analysis length) or from a JSON file, and says plainly when nothing is recorded."""
    from search_r3.evaluation.reproduction import render

    base = {"dataset": "scifact", "split": "test", "retriever": "rl", "checkpoint": "runs/rl", "num_queries": 300,
            "num_docs": 5183, "corpus_size": 5183, "date": "2026-11-30", "protocol": "in-domain", "precision": "fp32"}
    rows = [{**base, "mode": "reasoning", "nDCG@10": 0.61, "reasoning_tokens_mean": 7.5, "empty_reasoning_rate": 0.02},
            {**base, "mode": "direct", "nDCG@10": 0.58}]
    (tmp_path / "paired.json").write_text(json.dumps({"num_queries": 300, "t_statistic": 2.0, "p_value": 0.046,
                                                      "wins": 40, "ties": 200, "losses": 60}))
    (tmp_path / "telemetry.json").write_text(json.dumps({"share": 0.71}))
    claims = [
        {"claim": "reasoning beats direct", "paper": "+0.048", "paired": "paired.json", "command": "search-r3 test",
         "rows": {"a": {"retriever": "rl", "mode": "reasoning"}, "b": {"retriever": "rl", "mode": "direct"}}},
        {"claim": "not run yet", "paper": "+1", "rows": {"a": {"retriever": "other", "mode": "reasoning"},
                                                        "b": {"retriever": "rl", "mode": "direct"}}},
        {"claim": "rollouts", "paper": "69%", "benchmark": {"file": "telemetry.json", "key": "share"}},
        {"claim": "elsewhere", "paper": "x", "pending": "no data here"},
    ]
    page = render(claims, rows, tmp_path)
    assert "A 0.6100 vs B 0.5800: **+0.0300** nDCG@10 (300 queries, 5183 documents" in page
    assert "p = 0.046 (A wins 40, ties 200, loses 60)" in page
    assert "`rl` reasoning (7.5 tokens, 2% empty) / `rl` direct" in page
    assert "not measured yet (no recorded row for A: run the command)" in page
    assert "share = 0.710 (`telemetry.json`)" in page
    assert "not testable yet: no data here" in page
