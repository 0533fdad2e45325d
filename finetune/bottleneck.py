"""Finetune with bottleneck adapters: series (AdapterH, Houlsby et al. 2019; AdapterP, Pfeiffer et al. 2020) or
parallel (He et al. 2022), placed as the LLM-Adapters project does (Hu et al. 2023, https://arxiv.org/abs/2304.01933).

The base weights stay frozen; small down/up projections train around the chosen linear layers, and only they are
saved (plus what describes them: hyperparameters.yaml, the model config, the tokenizer). They cannot be merged into
the base weights (they are non-linear).

Example (CPU, the embedded model; see README for preparing the checkpoint and data):
    python finetune/bottleneck.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct --data_dir data/alpaca \
        --out_dir out/bottleneck --bottleneck_preset adapterh --bottleneck_size 64 --train.max_steps 100
Then:
    python generate/bottleneck.py --finetuned_dir out/bottleneck/final --prompt "What is 2 + 3?"
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lit_gpt import bottleneck as method
from lit_gpt import training
from lit_gpt.args import EvalArgs, TrainArgs
from lit_gpt.cli import run_cli
from lit_gpt.config import Config
from lit_gpt.data import load_prepared_dir
from lit_gpt.loading import load_base_model
from lit_gpt.outputs import save_output_dir
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import precision_to_dtype


def setup(
    checkpoint_dir: Path = Path("checkpoints/SmolLM2-135M-Instruct"),
    data_dir: Path = Path("data/alpaca"),
    out_dir: Path = Path("out/bottleneck"),
    precision: Optional[str] = None,
    devices: int = 1,
    strategy: str = "auto",
    resume: bool = False,
    quantize: Optional[str] = None,
    bottleneck_preset: str = "adapterh",
    bottleneck_targets: str = "",
    bottleneck_size: int = 256,
    bottleneck_activation: str = "tanh",
    bottleneck_dropout: float = 0.0,
    bottleneck_scaling: float = 1.0,
    bottleneck_learned_scaling: bool = False,
    bottleneck_init: str = "zero-up",
    train: TrainArgs = TrainArgs(learning_rate=3e-4, weight_decay=0.01),
    eval: EvalArgs = EvalArgs(),
) -> None:
    """Finetune a checkpoint with bottleneck adapters.

    Args:
        checkpoint_dir: the base model (a converted checkpoint directory).
        data_dir: prepared data (train.safetensors, val.safetensors) from scripts/prepare_*.py.
        out_dir: where checkpoints, logs and the final weights go.
        precision: "32-true", "bf16-true", "bf16-mixed", "16-mixed", ...; default: the best the device runs.
        devices: number of devices (GPUs, or CPU processes) to train on.
        strategy: "auto" (DDP for several devices), "ddp" or "fsdp".
        resume: continue the run in out_dir from its last saved state, with the same flags; more steps or other
            eval/log/save intervals are allowed and recorded, a change to what the run trains is refused.
        quantize: hold the frozen base weights in 4 or 8 bits with bitsandbytes (QLoRA): bnb.nf4, bnb.nf4-dq,
            bnb.fp4, bnb.fp4-dq or bnb.int8; works on CUDA and CPU (not MPS), with a '-true' precision.
        bottleneck_preset: adapterh (series before the MLP inputs and after its output), adapterp (series after
            the MLP output) or parallel (beside query, key and value).
        bottleneck_targets: overrides the preset: "layer:placement" pairs, e.g. "fc_2:parallel,mlp_proj:parallel"
            (layers query, key, value, projection, fc, fc_1, fc_2, mlp_proj; placements before, after, parallel).
        bottleneck_size: the bottleneck width (LLM-Adapters: 256).
        bottleneck_activation: tanh, relu, silu or gelu.
        bottleneck_dropout: dropout on the adapter input.
        bottleneck_scaling: the adapter output is multiplied by this.
        bottleneck_learned_scaling: make the scaling a trainable scalar (starting at --bottleneck_scaling).
        bottleneck_init: zero-up (the model starts as the base model) or bert (N(0, 0.02), as LLM-Adapters).
    """
    settings = method.BottleneckSettings(
        preset=bottleneck_preset,
        targets=bottleneck_targets,
        size=bottleneck_size,
        activation=bottleneck_activation,
        dropout=bottleneck_dropout,
        scaling=bottleneck_scaling,
        learned_scaling=bottleneck_learned_scaling,
        init=bottleneck_init,
    )
    fabric, hparams = training.start_run(method.NAME, settings, checkpoint_dir, data_dir, out_dir, precision,
                                         devices, strategy, resume, quantize, train, eval)
    fabric.launch(main, checkpoint_dir, data_dir, out_dir, resume, settings, train, eval, hparams)


def main(fabric, checkpoint_dir, data_dir, out_dir, resume, settings, train, eval, hparams) -> None:
    fabric.seed_everything(train.seed)
    tokenizer = Tokenizer(checkpoint_dir)
    block_size = Config.from_checkpoint(checkpoint_dir).block_size
    train_data, val_data = load_prepared_dir(data_dir, tokenizer=tokenizer, block_size=block_size)

    model, _ = load_base_model(checkpoint_dir, dtype=precision_to_dtype(hparams["precision"]),
                               quantize=hparams["quantize"], fabric=fabric)
    method.apply(model, settings)
    method.mark_trainable(model)

    training.fit(fabric, model, tokenizer, train_data, val_data, out_dir, train, eval, resume, hparams,
                 save=lambda directory: save(fabric, model, directory, hparams, checkpoint_dir))
    save(fabric, model, out_dir / "final", hparams, checkpoint_dir)
    training.finish(fabric, out_dir)


def save(fabric, model, directory: Path, hparams: dict, checkpoint_dir: Path) -> None:
    """Save only the adapter weights, with what describes them."""
    save_output_dir(fabric, directory, method.state_dict_to_save(model), method.WEIGHTS_FILE, hparams, checkpoint_dir)


if __name__ == "__main__":
    run_cli(setup)
