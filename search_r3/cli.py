"""``search-r3``: the LightningCLI entry point (``fit`` / ``validate`` / ``test``), and ``export`` (an adapter
as a plain Hugging Face model folder, :mod:`search_r3.export`).

Model and data are chosen in YAML by ``class_path`` (subclass mode), so the evaluation module, the
SFT module and the RL module all run through the same command.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

from search_r3.evaluation.mlflow_runs import log_fit_inputs, mark_model_training
from search_r3.common.progress import TrainingProgress
from search_r3.common.errors import report_user_errors
from search_r3.preflight import preflight

log = logging.getLogger(__name__)
CHECKPOINT_RUN_KEY = "mlflow_run_id"  # where a checkpoint keeps the MLflow run it was logged to


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list | tuple):
        out[prefix] = ",".join(map(str, value))[:500]
    else:
        out[prefix] = value


class MLflowSaveConfig(SaveConfigCallback):
    """Saves the resolved config into every MLflow run (as ``config_<stage>.yaml`` and as params),
    marks the experiment as model training so MLflow's UI opens on its runs, not its GenAI overview,
    and writes the run's id into every checkpoint, so ``fit --ckpt_path`` continues the same run
    (:meth:`SearchR3CLI.before_instantiate_classes`) instead of scattering one training over several.

    Lightning's default callback writes to ``trainer.log_dir``, which an MLFlowLogger with a SQLite
    or HTTP tracking URI does not have (it asserts). Other loggers keep the default behaviour.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if not trainer.loggers:  # `logger: false`: no run to keep it in; do not litter the working folder
            self.already_saved = True
            return
        if trainer.log_dir is not None and not any(isinstance(lg, MLFlowLogger) for lg in trainer.loggers):
            super().setup(trainer, pl_module, stage)
            return
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
            if getattr(stage, "value", stage) == "fit" and trainer.datamodule is not None:
                for logger in trainer.loggers:
                    if isinstance(logger, MLFlowLogger):
                        log_fit_inputs(logger.experiment, logger.run_id, trainer.datamodule)
        self.already_saved = True

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                checkpoint[CHECKPOINT_RUN_KEY] = logger.run_id
                return

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        flat: dict[str, Any] = {}
        _flatten("", json.loads(self.parser.dump(self.config, skip_none=False, format="json")), flat)
        stage = getattr(stage, "value", stage)
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                client = logger.experiment
                mark_model_training(client, logger.experiment_id)
                params = {k: v for k, v in flat.items() if v is not None}
                before = client.get_run(logger.run_id).data.params
                if before:
                    # A resumed run (see SearchR3CLI.before_instantiate_classes): MLflow params cannot
                    # change, so the first part's values stay; the resumed config is kept beside them.
                    changed = sorted(k for k, v in params.items() if k in before and before[k] != str(v))
                    if changed:
                        log.warning("resumed MLflow run %s keeps its first values of %s; this part's config is "
                                    "config_%s_resumed.yaml", logger.run_id, ", ".join(changed), stage)
                    params = {k: v for k, v in params.items() if k not in before}
                    stage = f"{stage}_resumed"
                client.log_text(logger.run_id, text, f"config_{stage}.yaml")
                logger.log_hyperparams(params)


class SearchR3CLI(LightningCLI):
    """LightningCLI with the MLflow-aware config saving and without ``predict``: no module of ours
    implements a predict step, so the subcommand would only fail after loading the model."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: args for name, args in LightningCLI.subcommands().items() if name != "predict"}

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse, then check, before anything loads (Lightning reads a ``--ckpt_path`` right after parsing,
        and weights load after that): every output is writable and a resume checkpoint is readable."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else self.config
        preflight(config.as_dict())

    def before_instantiate_classes(self) -> None:
        """Resuming ``fit`` from a checkpoint of ours continues its MLflow run (one run, one curve) when
        the config names no ``run_id`` and the run is in the configured store; otherwise a new run starts."""
        if self.config.get("subcommand") != "fit":
            return
        config = self.config["fit"]
        ckpt_path = config.get("ckpt_path")
        logger = config.get("trainer", {}).get("logger")
        if not ckpt_path or not Path(ckpt_path).is_file() or not hasattr(logger, "class_path"):
            return
        if not logger.class_path.endswith("MLFlowLogger") or logger.init_args.get("run_id"):
            return
        import torch

        # mmap: only the small dict entry is read, however large the optimizer state beside it
        run_id = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True).get(CHECKPOINT_RUN_KEY)
        if run_id is None:
            return
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            MlflowClient(tracking_uri=logger.init_args.get("tracking_uri")).get_run(run_id)
        except MlflowException:
            log.warning("the checkpoint's MLflow run %s is not in %s: logging to a new run", run_id,
                        logger.init_args.get("tracking_uri"))
            return
        logger.init_args.run_id = run_id
        log.info("resuming MLflow run %s (from %s)", run_id, ckpt_path)


# Every run is tracked in MLflow unless its config says otherwise: a recipe names its run
# (``trainer.logger.init_args.run_name``) and inherits the rest; ``trainer.logger: false`` turns it off.
DEFAULT_LOGGER = {"class_path": "lightning.pytorch.loggers.MLFlowLogger",
                  "init_args": {"experiment_name": "search-r3", "tracking_uri": "sqlite:///mlflow.db",
                                "log_model": False}}


def run_cli(args: list[str] | None = None, run: bool = True) -> SearchR3CLI:
    """Build and run the CLI; returns it so tests can inspect the trainer and model. ``run=False``
    builds trainer, model and data from a config without a subcommand (benchmarks drive the trainer)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Lightning advertises its cloud products ("💡 Tip: ...") on every run: nothing a user of ours needs
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda record: "Tip:" not in record.getMessage())
    # Lightning 2.6 warns about its own use of torch's LeafSpec on every run; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # CorpusStream shards by rank and worker itself, so its length (for progress bars) is right
    warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")
    # Both stages step their optimizers by hand; a checkpoint holds the state after the step, which is
    # exactly what a resume must continue from. Lightning's warning (with a code listing) says otherwise.
    warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
    return SearchR3CLI(
        model_class=L.LightningModule,
        datamodule_class=L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=MLflowSaveConfig,
        save_config_kwargs={"overwrite": True},
        # always on, whatever the YAML's callbacks: progress lines with an ETA when the log is a file
        trainer_defaults={"callbacks": [TrainingProgress()], "logger": DEFAULT_LOGGER},
        # a config error raises (and main() prints it as one line) instead of printing the whole usage
        parser_kwargs={"exit_on_error": False, **{name: {"exit_on_error": False} for name in SearchR3CLI.subcommands()}},
        args=args,
        run=run,
    )


def main() -> None:
    """Console-script entry: returns nothing, so the exit status is 0 on success; a user error (bad
    data, config, path, model or adapter) is one line on stderr and status 2 (``--debug``: traceback)."""
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "export":  # not a Lightning stage: its own small parser
        from search_r3.export import main as export_main

        export_main(sys.argv[2:])
        return
    report_user_errors(lambda: run_cli(None))  # LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
