"""Every shipped recipe parses against the current class signatures.

A renamed argument would otherwise surface only when someone runs a 20-minute recipe. `--print_config`
resolves every ``class_path`` and checks every ``init_args`` key, then exits before anything is built,
so this costs one import per recipe, not a model load.
"""

from __future__ import annotations

import argparse
import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

from search_r3.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]

# (subcommand, config files in order): overlays go on top of the recipe they name in their header.
RECIPES: list[tuple[str, list[str]]] = [
    ("test", ["cli.yaml"]),
    ("test", ["configs/baselines.yaml"]),
    ("test", ["configs/mkqa.yaml"]),
    ("test", ["configs/sft-table.yaml"]),
    ("test", ["configs/sft-nfcorpus-table.yaml"]),
    ("test", ["configs/sft-scifact-table.yaml"]),
    ("test", ["configs/rl-table.yaml"]),
    ("test", ["configs/sft-gpu-table.yaml"]),
    ("test", ["configs/stage1-table.yaml"]),
    ("test", ["configs/compare-demo.yaml"]),
    ("test", ["configs/rl-claim-table.yaml"]),
    ("test", ["configs/rl-claim-table.yaml", "configs/ablations/rl-pure-grpo-table.yaml"]),
    ("test", ["configs/rl-claim-table.yaml", "configs/ablations/rl-min-reasoning-table.yaml"]),
    ("test", ["configs/reproduce/stage2.yaml"]),
    ("fit", ["configs/sft.yaml"]),
    ("fit", ["configs/sft.yaml", "configs/sft-nfcorpus.yaml"]),
    ("fit", ["configs/sft.yaml", "configs/ablations/sft-kl0.1.yaml"]),
    ("fit", ["configs/sft.yaml", "configs/sft-gpu.yaml"]),
    ("fit", ["configs/sft.yaml", "configs/sft-gpu.yaml", "configs/ablations/sft-gpu-attn.yaml"]),
    ("fit", ["configs/sft.yaml", "configs/sft-gpu.yaml", "configs/ablations/sft-gpu-mixed.yaml"]),
    ("fit", ["configs/sft.yaml", "configs/sft-gpu.yaml", "configs/sft-gpu-nfcorpus.yaml"]),
    ("fit", ["configs/rl.yaml"]),
    ("fit", ["configs/rl.yaml", "configs/rl-claim.yaml"]),
    ("fit", ["configs/rl.yaml", "configs/rl-claim.yaml", "configs/ablations/rl-pure-grpo.yaml"]),
    ("fit", ["configs/rl.yaml", "configs/rl-claim.yaml", "configs/ablations/rl-min-reasoning.yaml"]),
    ("fit", ["configs/rl.yaml", "configs/rl-claim.yaml", "configs/ablations/rl-default.yaml"]),
    ("fit", ["configs/rl.yaml", "configs/rl-claim.yaml", "configs/ablations/rl-direct-baseline.yaml"]),
    ("fit", ["configs/rl.yaml", "configs/rl-claim.yaml", "configs/ablations/rl-direct-baseline-drgrpo.yaml"]),
    ("fit", ["configs/paper/qwen2.5-1.5b-sft.yaml"]),
    ("fit", ["configs/paper/qwen2.5-1.5b-rl.yaml"]),
]


FRAGMENTS = ROOT / "configs" / "retrievers"  # one retriever each, listed by path in table configs


def test_every_config_file_is_covered() -> None:
    listed = {f for _, files in RECIPES for f in files}
    shipped = {"cli.yaml"} | {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")
                              if FRAGMENTS not in p.parents}
    assert shipped == listed, f"add the new recipe to RECIPES: {sorted(shipped - listed)}"


def test_every_retriever_fragment_is_used_by_a_recipe() -> None:
    """A fragment nothing lists is dead; one listed under a wrong path fails the recipe's parse above."""
    texts = "\n".join(p.read_text() for p in (ROOT / "configs").rglob("*.yaml") if FRAGMENTS not in p.parents)
    unused = [p.name for p in sorted(FRAGMENTS.glob("*.yaml")) if f"retrievers/{p.name}" not in texts]
    assert not unused, unused


def _print_config(subcommand: str, files: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["search-r3"])  # pytest's own arguments are not the CLI's
    args = [subcommand]
    for f in files:
        args += ["--config", str(f)]
    out = io.StringIO()
    try:
        with redirect_stdout(out), pytest.raises(SystemExit) as done:
            run_cli(args + ["--print_config"])
    except argparse.ArgumentError:  # a config error raises (search-r3's main prints it as one line)
        return 2, out.getvalue()
    return done.value.code or 0, out.getvalue()


@pytest.mark.parametrize(("subcommand", "files"), RECIPES, ids=[" + ".join(f) for _, f in RECIPES])
def test_recipe_parses(subcommand: str, files: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, printed = _print_config(subcommand, files, monkeypatch)
    assert code == 0
    resolved = yaml.safe_load(printed)
    assert resolved["model"]["class_path"].startswith("search_r3.lightning_modules.")
    assert resolved["data"]["class_path"].startswith("search_r3.datamodules.")


def test_a_misspelt_argument_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard above is only worth having if parsing really checks keys against signatures."""
    overlay = tmp_path / "typo.yaml"
    overlay.write_text("model:\n  init_args:\n    kl_wieght: 0.5\n")
    code, _ = _print_config("fit", ["configs/sft.yaml", str(overlay)], monkeypatch)
    assert code != 0


def _values(node: object, key: str) -> list[str]:
    """Every value of ``key`` anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        return [str(v) for k, v in node.items() if k == key and v is not None] + \
            [x for v in node.values() for x in _values(v, key)]
    if isinstance(node, list):
        return [x for v in node for x in _values(v, key)]
    return []


def adapters_without_a_source(files: list[Path]) -> list[str]:
    """Adapters configs read that are neither in the repository nor written by a fit recipe here (its
    ``adapter_dir``, under which fit writes ``best/`` and ``last/``)."""
    docs = {f: yaml.safe_load(f.read_text()) for f in files}
    written = {v.rstrip("/") for doc in docs.values() for v in _values(doc, "adapter_dir")}
    return [f"{f.name}: {a}" for f, doc in docs.items() for a in _values(doc, "adapter")
            if not (ROOT / a).exists() and not any(a.startswith(w + "/") for w in written)]


def test_every_adapter_a_config_reads_is_committed_or_written_by_a_recipe(tmp_path: Path) -> None:
    files = sorted((ROOT / "configs").rglob("*.yaml")) + [ROOT / "cli.yaml"]
    assert adapters_without_a_source(files) == []
    stray = tmp_path / "stray.yaml"  # the check itself: an adapter nothing here produces is caught
    stray.write_text("model: {init_args: {encoder: {init_args: {adapter: runs/nowhere/adapter/best}}}}\n")
    assert adapters_without_a_source([*files, stray]) != []


@pytest.mark.parametrize("table", sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs" / "reproduce").glob("*.yaml")))
def test_a_reproduce_table_reads_only_committed_adapters(table: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``configs/reproduce/`` re-scores recorded rows on a fresh clone: every adapter it resolves to
    (through its retriever fragments) is a folder under ``checkpoints/`` that is in the repository."""
    code, printed = _print_config("test", [table], monkeypatch)
    assert code == 0
    adapters = _values(yaml.safe_load(printed), "adapter")
    assert adapters, "a reproduce table with no trained adapter belongs elsewhere"
    for adapter in adapters:
        assert adapter.startswith("checkpoints/") and (ROOT / adapter / "search_r3.json").is_file(), adapter
