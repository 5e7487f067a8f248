"""The adapter folder format: what :meth:`EmbeddingLM.save <search_r3.model.embedding_lm.EmbeddingLM.save>`
writes and the constructor reads back.

A folder holds ``search_r3.json`` (base model, prompts, LoRA settings, the embed token), then either peft's
LoRA files (with the trained embed-token row) or, for a row-only adapter, ``embed_token_row.pt``; a folder
trained on top of another adapter carries that one in ``base_adapter/``, so it loads on its own. Every way
a folder can be unusable is an :class:`~search_r3.common.errors.AdapterError` naming the folder.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from search_r3.common.errors import AdapterError
from search_r3.model.prompts import PromptTemplates

log = logging.getLogger(__name__)

META_FILE = "search_r3.json"
TOKEN_ROW_FILE = "embed_token_row.pt"
BASE_ADAPTER_DIR = "base_adapter"


def add_embed_token_row(lm: nn.Module, token_id: int) -> None:
    """Give the embed token its row, initialised to the mean of the rows of every token before it, in the
    input embeddings and (if untied) the output embeddings.

    The same whether the matrix must grow (SmolLM2: the token is one past the last row) or the token
    lands in a padding row the checkpoint already has (Qwen2.5: id 151665 of 151936 rows, whose values are
    whatever the padding held). A deterministic mean (rather than transformers' sampled "mean resizing")
    makes an untrained wrapper give the same embeddings on every load, and starts the row inside the
    embedding cloud.
    """
    if token_id >= lm.get_input_embeddings().weight.shape[0]:
        lm.resize_token_embeddings(token_id + 1, mean_resizing=False)
    with torch.no_grad():
        weight = lm.get_input_embeddings().weight
        weight[token_id] = weight[:token_id].float().mean(0).to(weight.dtype)
        out = lm.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != weight.data_ptr():
            out.weight[token_id] = out.weight[:token_id].float().mean(0).to(out.weight.dtype)


def load_adapter_chain(lm: nn.Module, folder: Path, base_model: str, prompts: PromptTemplates, token_id: int,
                        merge_top: bool) -> nn.Module:
    """Apply an adapter folder (and, first, the adapters it was stacked on) to ``lm``.

    Every adapter below the top one is merged into the weights, in the order they were trained. The top
    one stays a (frozen) peft adapter unless ``merge_top``. A row-only adapter (no LoRA) writes its
    embed-token row into the embedding matrix, which is a merge already."""
    meta = read_meta(str(folder))
    check_adapter(meta, str(folder), base_model, prompts)
    if meta.get("stacked_on"):
        lm = load_adapter_chain(lm, folder / meta["stacked_on"], base_model, prompts, token_id, merge_top=True)
    try:
        if meta.get("lora") is None:
            row = torch.load(folder / TOKEN_ROW_FILE, map_location="cpu", weights_only=True)
            with torch.no_grad():
                lm.get_input_embeddings().weight[token_id] = row.to(lm.dtype)
            return lm
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(folder), is_trainable=False)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as err:
        # a truncated or corrupt weights file: safetensors and torch.load raise these, with messages
        # that do not name the folder
        detail = (str(err).splitlines() or [""])[0][:200]
        raise AdapterError(f"adapter folder {str(folder)!r}: its weights cannot be read ({type(err).__name__}: "
                           f"{detail}); the file is corrupt or truncated: copy, re-export or retrain it") from err
    return lm.merge_and_unload() if merge_top else lm


def token_row_modules(lm: nn.Module, token_id: int) -> dict[str, list[int]]:
    """peft's ``trainable_token_indices``: the embed token's input row and, for a model whose output
    embeddings are not tied to the input ones (Qwen2.5-7B, tiny test models), its output row as well,
    so the LM loss can make the token likely by moving its own logit row."""
    names = {id(m): n for n, m in lm.named_modules()}
    modules = {names[id(lm.get_input_embeddings())].split(".")[-1]: [token_id]}
    out = lm.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != lm.get_input_embeddings().weight.data_ptr():
        modules[names[id(out)].split(".")[-1]] = [token_id]
    return modules


def copy_folder(source: Path, target: Path) -> None:
    """Replace ``target`` by a copy of ``source`` through a temporary sibling, so a crash mid-copy
    never leaves a half-written base adapter behind."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def check_adapter(meta: dict, adapter: str, base_model: str, prompts: PromptTemplates) -> None:
    """An adapter only means something on the base model it was trained on, with its prompts."""
    trained_on = str(meta.get("base_model"))
    same_folder = Path(trained_on).is_dir() and Path(base_model).is_dir() and \
        Path(trained_on).resolve() == Path(base_model).resolve()
    if trained_on != base_model and not same_folder:
        raise AdapterError(f"adapter {adapter!r} was trained on base model {meta.get('base_model')!r}, "
                           f"not {base_model!r}: set base_model to that model")
    if meta.get("prompts") and meta["prompts"] != prompts.as_dict():
        log.warning("adapter %s was trained with other prompts than the ones configured now: %s", adapter,
                    {k: v for k, v in meta["prompts"].items() if prompts.as_dict().get(k) != v})


def read_meta(adapter: str) -> dict:
    """The adapter's ``search_r3.json``; every way a folder can be unusable is an :class:`AdapterError`
    that says which (checked before the base model's weights load, so a typo costs no time)."""
    folder = Path(adapter)
    if not folder.exists():
        raise AdapterError(f"adapter folder {adapter!r} does not exist (train one with `search-r3 fit`, or fix the "
                           f"path; committed adapters are under checkpoints/)")
    path = folder / META_FILE
    if not path.is_file():
        raise AdapterError(f"adapter folder {adapter!r} has no {META_FILE}: not written by EmbeddingLM.save")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path}: corrupt adapter metadata ({err}); re-export or retrain the adapter") from err
    if not isinstance(meta, dict):
        raise AdapterError(f"{path}: corrupt adapter metadata (not a JSON object); re-export or retrain the adapter")
    return meta
