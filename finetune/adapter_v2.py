"""Finetune with LLaMA-Adapter V2 (Gao et al. 2023, https://arxiv.org/abs/2304.15010).

Adapter v1's gated adaption prompts, plus a trainable scale and bias on every linear layer and trainable
norm layers; the rest of the model stays frozen. Only those parameters are saved (plus
hyperparameters.yaml, the model config and the tokenizer).

Example (CPU, the embedded model; see README for preparing the checkpoint and data):
    python finetune/adapter_v2.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct --data_dir data/alpaca \
        --out_dir out/adapter_v2 --train.max_steps 100
Then:
    python generate/adapter_v2.py --finetuned_dir out/adapter_v2/final --prompt "What is 2 + 3?"
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lit_gpt import adapter_v2 as method
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
    out_dir: Path = Path("out/adapter_v2"),
    precision: Optional[str] = None,
    devices: int = 1,
    strategy: str = "auto",
    resume: bool = False,
    quantize: Optional[str] = None,
    adapter_prompt_length: int = 10,
    adapter_start_layer: int = 2,
    train: TrainArgs = TrainArgs(learning_rate=9e-3, weight_decay=0.02),
    eval: EvalArgs = EvalArgs(),
) -> None:
    """Finetune a checkpoint with Adapter-v2.

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
        adapter_prompt_length: length of the learned adaption prompt in each adapted layer.
        adapter_start_layer: the first layer (from 0) that gets an adaption prompt.
    """
    settings = method.AdapterV2Settings(prompt_length=adapter_prompt_length, start_layer=adapter_start_layer)
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
    """Save only the Adapter-v2 weights, with what describes them."""
    save_output_dir(fabric, directory, method.state_dict_to_save(model), method.WEIGHTS_FILE, hparams, checkpoint_dir)


if __name__ == "__main__":
    run_cli(setup)
