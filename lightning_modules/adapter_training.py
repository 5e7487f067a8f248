"""``AdapterTrainingModule``: what Stage 1 (SFT) and Stage 2 (RL) share around the one ``EmbeddingLM``.

Both stages train LoRA + the embed-token row with manual optimisation, select the adapter by held-out
nDCG@10, save it where ``search-r3 test`` loads it (``EmbeddingLM(adapter=...)``) and keep only the
trainable parameters in checkpoints. Keeping that here means the two stage modules hold only their
losses.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from search_r3.evaluation.dense_eval import EmbeddingStore, collect_rows, owned_documents, score_task
from search_r3.evaluation.mlflow_runs import run_pointer
from search_r3.model.embedding_lm import EmbeddingLM, Mode
from search_r3.common.distributed import split_streams_by_rank
from search_r3.common.errors import ConfigError

log = logging.getLogger(__name__)


class AdapterTrainingModule(L.LightningModule):
    """Args:
        encoder: the shared wrapper, with ``lora`` set (only LoRA + the token row train).
        lr / weight_decay / warmup_steps: AdamW with linear warm-up, then linear decay to 0 where
            training ends (Lightning's ``estimated_stepping_batches``).
        gradient_clip: max global grad norm (manual optimisation clips here, not in the Trainer).
        adapter_dir: where ``best/`` and ``last/`` adapters are written.
        val_modes: query modes scored at validation; the first selects the best adapter and is
            logged as ``val/nDCG_at_10``.
        token_lr: learning rate of the embed-token row (``None``: ``lr``). The row is a new token that
            must become the argmax after "The embedding is" against the whole vocabulary; with Adam it
            moves about ``lr`` per coordinate per step, so at LoRA's rate a short run leaves it
            nearly where it started (60 CPU steps at 2e-4: p(token) = 2.5e-6, 12.9 nats).
    """

    def __init__(self, encoder: EmbeddingLM, lr: float, weight_decay: float, warmup_steps: int, gradient_clip: float,
                 adapter_dir: str, val_modes: Sequence[Mode] = ("direct",), token_lr: float | None = None) -> None:
        super().__init__()
        if encoder.lora is None:
            raise ValueError(f"{type(self).__name__} trains LoRA adapters: give the encoder `lora` settings "
                             "(or an `adapter` trained with LoRA)")
        if not val_modes:
            raise ValueError("val_modes needs at least one mode")
        self.encoder = encoder
        self.lr, self.weight_decay, self.warmup_steps, self.gradient_clip = lr, weight_decay, warmup_steps, gradient_clip
        self.adapter_dir = Path(adapter_dir)
        self.val_modes = list(val_modes)
        self.token_lr = token_lr
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the trainable parameters only
        self.store = EmbeddingStore()
        self.best_ndcg = -math.inf
        self._saved_rng: dict[str, Any] | None = None
        self._streams_ready = False  # random streams restored (resume) and split by rank, once per fit
        self.encoder.train()  # from_pretrained leaves the model in eval mode: LoRA dropout would be off

    def setup(self, stage: str) -> None:
        refuse_sharded_strategy(self.trainer.strategy)

    def on_fit_start(self) -> None:
        self._streams_ready = False

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        row = [p for n, p in named if "trainable_tokens" in n]
        rest = [p for n, p in named if "trainable_tokens" not in n]
        groups = [{"params": rest}]
        if row:
            groups.append({"params": row, "lr": self.lr if self.token_lr is None else self.token_lr,
                           "weight_decay": 0.0})
        opt = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
        # Lightning's own count (max_steps, or epochs x batches, over devices and accumulation): the linear
        # decay ends where training does.
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = self.warmup_steps

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(total - warmup, 1))

        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule)}

    def optimizer_step_now(self) -> None:
        """Clip, step and advance the schedule after the stage's own ``manual_backward`` calls.

        Logs the gradient norm before clipping (``train/grad_norm``): AdamW and clipping both hide a
        wrongly scaled gradient, this number does not (the DDP equivalence test compares it)."""
        opt, sched = self.optimizers(), self.lr_schedulers()
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", float(torch.nn.utils.get_total_norm(grads)))
        if self.gradient_clip:
            self.clip_gradients(opt, gradient_clip_val=self.gradient_clip, gradient_clip_algorithm="norm")
        opt.step()
        sched.step()
        self.log("train/lr", sched.get_last_lr()[0])

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self.store.clear()

    def validation_step(self, batch: dict[str, list[Any]], batch_idx: int, dataloader_idx: int = 0) -> None:
        task, kind, texts = batch["task"][0], batch["kind"][0], batch["text"]
        if kind == "document":
            self.store.add((task, kind, "direct"), batch["index"], self.encoder.encode(texts, "document"))
            return
        for mode in self.val_modes:
            self.store.add((task, kind, mode), batch["index"], self.encoder.encode_queries(texts, mode))

    def on_validation_epoch_end(self) -> None:
        tasks = self.trainer.datamodule.validation.tasks
        means: dict[str, float] = {}
        for mode in self.val_modes:
            scores = []
            for task in tasks:
                # Under DDP each rank keeps the shard of the corpus it encoded and the search is sharded;
                # the queries (few) are gathered.
                docs = owned_documents(self.store, (task.name, "document", "direct"), task.num_docs,
                                       f"{task.name} documents")
                queries = collect_rows(self.store, (task.name, "query", mode), len(task.queries),
                                       f"{task.name} queries", self.trainer.world_size, self.all_gather, self.device)
                metrics, _ = score_task(task, docs[1], queries, top_k=100, measures=["nDCG@10"], doc_indices=docs[0])
                self.log(f"val/{task.name}/{mode}/nDCG_at_10", metrics["nDCG@10"], add_dataloader_idx=False)
                if mode == self.val_modes[0]:
                    self.log(f"val/{task.name}/nDCG_at_10", metrics["nDCG@10"], add_dataloader_idx=False)
                scores.append(metrics["nDCG@10"])
            means[mode] = sum(scores) / len(scores)
            self.log(f"val/{mode}/nDCG_at_10", means[mode], add_dataloader_idx=False)
        mean = means[self.val_modes[0]]
        self.log("val/nDCG_at_10", mean, prog_bar=True, add_dataloader_idx=False)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self.encoder.save(self.adapter_dir / "last")
            if mean > self.best_ndcg:
                self.best_ndcg = mean
                self.encoder.save(self.adapter_dir / "best")
                log.info("new best validation nDCG@10 %.4f (%s): adapter saved to %s", mean, self.val_modes[0],
                         self.adapter_dir / "best")

    def on_fit_end(self) -> None:
        """Say where the results went: the adapters, their best validation score and the MLflow run."""
        if not self.trainer.is_global_zero:
            return
        best = (f"{self.adapter_dir / 'best'} (validation nDCG@10 {self.best_ndcg:.4f}, {self.val_modes[0]}) and "
                if self.best_ndcg > -math.inf else "")
        pointer = run_pointer(self.trainer.loggers)
        print(f"adapters: {best}{self.adapter_dir / 'last'}" + (f"; {pointer}" if pointer else ""))

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["best_ndcg"] = self.best_ndcg
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.best_ndcg = checkpoint.get("best_ndcg", -math.inf)
        self._saved_rng = checkpoint.get("rng_states")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Resume the random streams where the checkpoint left them, right before the first resumed step,
        then give every rank its own (:func:`~search_r3.common.distributed.split_streams_by_rank`).

        ``seed_everything`` restarts them at the seed, so a resumed run would draw other rollouts (RL)
        and other dropout masks than the uninterrupted one. Restoring here, after the data loaders
        have been rebuilt, leaves out what the rebuild draws; the loaders of both stages draw from
        their own generators, so nothing in between touches the global streams in either run.
        """
        if self._saved_rng is not None:
            set_rng_states(self._saved_rng)
            self._saved_rng = None
            self._streams_ready = False  # a checkpoint holds rank 0's streams: split them again
        if not self._streams_ready:
            split_streams_by_rank()
            self._streams_ready = True


def refuse_sharded_strategy(strategy: object) -> None:
    """Both stages run under DDP (or one device); sharded strategies are refused before any compute.

    FSDP and DeepSpeed (ZeRO-3) gather each layer's parameters collectively in every forward, so every
    rank must run the same number of forward calls. Ours do not: reasoning rollouts sample different
    lengths per rank (``generate`` takes one forward per new token), GradCache's chunk count follows the
    local batch, and the reference model is the same module with the adapter switched off. A sharded run
    would hang rather than fail. At the model sizes of the paper (1.5B) DDP fits in one GPU's memory
    (``docs/scale-out.md``)."""
    name = type(strategy).__name__
    if "FSDP" in name or "DeepSpeed" in name:
        raise ConfigError(f"trainer.strategy {name}: search-r3 trains with DDP (`trainer.strategy: ddp`), not FSDP "
                         "or DeepSpeed: reasoning generation and GradCache run different numbers of forward calls "
                         "per rank, which hangs a sharded model (docs/scale-out.md)")


def rng_states() -> dict[str, Any]:
    """The global random streams a training step draws from (Python's, torch's CPU and CUDA ones).

    Plain tensors and tuples only, so a checkpoint stays loadable with ``weights_only=True``.
    Under DDP the checkpoint holds rank 0's states and every rank restores them: exact on one device;
    across ranks the draws differ anyway (rollout lengths differ), so a resumed DDP run is not bit-exact.
    """
    states: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
