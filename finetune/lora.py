"""Finetune with LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

The base weights stay frozen; low-rank updates (alpha / r) * B A train next to the chosen projections, and
only they are saved (plus what describes them: hyperparameters.yaml, the model config, the tokenizer).

Example (CPU, the embedded model; see README for preparing the checkpoint and data):
    python finetune/lora.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct --data_dir data/alpaca \
        --out_dir out/lora --train.max_steps 100
Then:
    python generate/lora.py --finetuned_dir out/lora/final --prompt "What is 2 + 3?"
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lit_gpt import lora as method
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
    out_dir: Path = Path("out/lora"),
    precision: Optional[str] = None,
    devices: int = 1,
    strategy: str = "auto",
    resume: bool = False,
    quantize: Optional[str] = None,
    lora_r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.05,
    lora_query: bool = True,
    lora_key: bool = False,
    lora_value: bool = True,
    lora_projection: bool = False,
    lora_mlp: bool = False,
    lora_head: bool = False,
    train: TrainArgs = TrainArgs(learning_rate=3e-4, weight_decay=0.01),
    eval: EvalArgs = EvalArgs(),
) -> None:
    """Finetune a checkpoint with LoRA.

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
        lora_r: rank of the LoRA update.
        lora_alpha: the update is scaled by alpha / r.
        lora_dropout: dropout on the LoRA input path.
        lora_query: LoRA on the query projection (and so on for key, value, projection, mlp, head).
    """
    settings = method.LoRASettings(
        r=lora_r,
        alpha=lora_alpha,
        dropout=lora_dropout,
        query=lora_query,
        key=lora_key,
        value=lora_value,
        projection=lora_projection,
        mlp=lora_mlp,
        head=lora_head,
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
    """Save only the LoRA weights, with what describes them."""
    save_output_dir(fabric, directory, method.state_dict_to_save(model), method.WEIGHTS_FILE, hparams, checkpoint_dir)


if __name__ == "__main__":
    run_cli(setup)
