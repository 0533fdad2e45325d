"""Full finetuning: every weight of the model trains.

Needs the most memory (weights, gradients and two AdamW moments for every parameter); the result is a
normal checkpoint directory (lit_model.safetensors, model_config.yaml, tokenizer, hyperparameters.yaml)
that generate/base.py and scripts/convert_lit_checkpoint.py take as they are.

There is no --quantize here: bitsandbytes' 4- and 8-bit weights are frozen (they have no gradient and no
optimizer update), while full finetuning trains every weight. To finetune with a quantized base, use
finetune/lora.py, adapter.py or adapter_v2.py with --quantize bnb.nf4 (QLoRA).

Example (CPU, the embedded model; see README for preparing the checkpoint and data):
    python finetune/full.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct --data_dir data/alpaca \
        --out_dir out/full --train.max_steps 100
Then:
    python generate/base.py --checkpoint_dir out/full/final --prompt "What is 2 + 3?"
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lit_gpt import training
from lit_gpt.args import EvalArgs, TrainArgs
from lit_gpt.checkpoint import WEIGHTS_FILE, model_state_dict
from lit_gpt.cli import run_cli
from lit_gpt.config import Config
from lit_gpt.data import load_prepared_dir
from lit_gpt.loading import load_base_model
from lit_gpt.outputs import save_output_dir
from lit_gpt.peft import FULL
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import precision_to_dtype


def setup(
    checkpoint_dir: Path = Path("checkpoints/SmolLM2-135M-Instruct"),
    data_dir: Path = Path("data/alpaca"),
    out_dir: Path = Path("out/full"),
    precision: Optional[str] = None,
    devices: int = 1,
    strategy: str = "auto",
    resume: bool = False,
    train: TrainArgs = TrainArgs(learning_rate=2e-5, weight_decay=0.01),
    eval: EvalArgs = EvalArgs(),
) -> None:
    """Finetune every weight of a checkpoint.

    Args:
        checkpoint_dir: the base model (a converted checkpoint directory).
        data_dir: prepared data (train.safetensors, val.safetensors) from scripts/prepare_*.py.
        out_dir: where checkpoints, logs and the final weights go.
        precision: "32-true", "bf16-true", "bf16-mixed", "16-mixed", ...; default: the best the device runs.
        devices: number of devices (GPUs, or CPU processes) to train on.
        strategy: "auto" (DDP for several devices), "ddp" or "fsdp".
        resume: continue the run in out_dir from its last saved state, with the same flags; more steps or other
            eval/log/save intervals are allowed and recorded, a change to what the run trains is refused.
    """
    settings = None  # every weight trains: nothing to configure
    fabric, hparams = training.start_run(FULL, settings, checkpoint_dir, data_dir, out_dir, precision,
                                         devices, strategy, resume, None, train, eval)
    fabric.launch(main, checkpoint_dir, data_dir, out_dir, resume, settings, train, eval, hparams)


def main(fabric, checkpoint_dir, data_dir, out_dir, resume, settings, train, eval, hparams) -> None:
    fabric.seed_everything(train.seed)
    tokenizer = Tokenizer(checkpoint_dir)
    block_size = Config.from_checkpoint(checkpoint_dir).block_size
    train_data, val_data = load_prepared_dir(data_dir, tokenizer=tokenizer, block_size=block_size)

    model, _ = load_base_model(checkpoint_dir, dtype=precision_to_dtype(hparams["precision"]),
                               quantize=hparams["quantize"], fabric=fabric)

    training.fit(fabric, model, tokenizer, train_data, val_data, out_dir, train, eval, resume, hparams,
                 save=lambda directory: save(fabric, model, directory, hparams, checkpoint_dir))
    save(fabric, model, out_dir / "final", hparams, checkpoint_dir)
    training.finish(fabric, out_dir)


def save(fabric, model, directory: Path, hparams: dict, checkpoint_dir: Path) -> None:
    """Save all weights as a normal checkpoint directory, with what describes them."""
    save_output_dir(fabric, directory, model_state_dict(model), WEIGHTS_FILE, hparams, checkpoint_dir)


if __name__ == "__main__":
    run_cli(setup)
