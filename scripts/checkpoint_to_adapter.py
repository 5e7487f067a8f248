"""Write the adapter a training checkpoint holds, built from the recipe that trained it.

    python scripts/checkpoint_to_adapter.py runs/rl-default/checkpoints/last.ckpt runs/rl-default/adapter/from-ckpt \
        --config configs/rl.yaml --config configs/rl-claim.yaml --config configs/ablations/rl-default.yaml

For a run stopped before it wrote ``adapter_dir/last`` (a killed session, a crash): the module is built
from the same ``--config`` files as the ``fit`` command (so its LoRA layout, base adapter and encoder
settings are the recipe's, not guessed), the checkpoint's weights are loaded into it, and the encoder
saves what ``fit`` would have saved at that step. Every trainable weight must be in the checkpoint.
Then ``scripts/export_adapter.py`` makes the bf16 copy that gets committed.
"""

from __future__ import annotations

import argparse

import torch

from search_r3.cli import run_cli


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--config", action="append", required=True, help="the fit command's config files, in order")
    args = parser.parse_args(argv)
    cli_args = [x for c in args.config for x in ("--config", c)] + ["--trainer.logger", "false"]  # no MLflow run
    module = run_cli(cli_args, run=False).model
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    weights = {k.removeprefix("encoder."): v for k, v in state["state_dict"].items() if k.startswith("encoder.")}
    trainable = {n for n, p in module.encoder.named_parameters() if p.requires_grad}
    if not trainable <= set(weights):
        raise SystemExit(f"{args.checkpoint} lacks trainable weights of this recipe, e.g. {sorted(trainable - set(weights))[:3]}: "
                         "pass the --config files of the fit command that wrote it")
    _, unexpected = module.encoder.load_state_dict(weights, strict=False)
    if unexpected:
        raise SystemExit(f"{args.checkpoint} holds weights this recipe does not have, e.g. {unexpected[:3]}")
    module.encoder.save(args.out)
    print(f"wrote {args.out} (step {state.get('global_step')})")


if __name__ == "__main__":
    main()
