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

import torch

from lit_gpt import adapter_v2 as method
from lit_gpt.cli import run_cli
from lit_gpt.args import EvalArgs, TrainArgs
from lit_gpt.config import Config
from lit_gpt.data import load_prepared_dir
from lit_gpt.quantize import build_base_for_training, check_quantize
from lit_gpt.tokenizer import Tokenizer
from lit_gpt import training
from lit_gpt.training import BatchStream, DataPosition, ProgressLog
from lit_gpt.utils import choose_precision


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
        resume: continue the run in out_dir from its last saved state (same flags as the original run).
        quantize: hold the frozen base weights in 4 or 8 bits with bitsandbytes (QLoRA): bnb.nf4, bnb.nf4-dq,
            bnb.fp4, bnb.fp4-dq or bnb.int8; works on CUDA and CPU (not MPS), with a '-true' precision.
        adapter_prompt_length: length of the learned adaption prompt in each adapted layer.
        adapter_start_layer: the first layer (from 0) that gets an adaption prompt.
    """
    settings = method.AdapterV2Settings(prompt_length=adapter_prompt_length, start_layer=adapter_start_layer)
    hparams = training.run_hyperparameters(
        "adapter_v2", settings, checkpoint_dir=checkpoint_dir, data_dir=data_dir, devices=devices, train=train, eval=eval
    )
    training.check_run_args(checkpoint_dir, data_dir, out_dir, devices, train, eval, resume)
    hparams["precision"] = precision = choose_precision(precision, training.accelerator())
    hparams["quantize"] = check_quantize(quantize, training.accelerator(), precision, strategy)
    fabric = training.setup_fabric(devices, precision, strategy)
    fabric.launch(main, checkpoint_dir, data_dir, out_dir, resume, settings, train, eval, hparams)


def main(fabric, checkpoint_dir, data_dir, out_dir, resume, settings, train, eval, hparams) -> None:
    fabric.seed_everything(train.seed)
    config = Config.from_checkpoint(checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)
    train_data, val_data = load_prepared_dir(data_dir, tokenizer=tokenizer, block_size=config.block_size)

    model = build_base_for_training(fabric, checkpoint_dir, hparams["precision"], hparams.get("quantize"))
    method.apply(model, settings)
    method.mark_trainable(model)
    training.report_parameters(fabric, model)

    optimizer = training.adamw(model, train, fabric)
    raw_model = model
    model, optimizer = fabric.setup(training.prepare_model_for_training(model, train), optimizer)

    step, position = 0, DataPosition()
    if resume:
        step, position = training.load_resume_state(fabric, out_dir, raw_model, optimizer)
        fabric.print(f"Resuming from step {step} (epoch {position.epoch}, sample {position.index}).")
    fit(fabric, model, raw_model, optimizer, tokenizer, train_data, val_data, out_dir, train, eval, step, position,
        save=lambda directory: save(fabric, raw_model, directory, hparams, checkpoint_dir))
    save(fabric, raw_model, out_dir / "final", hparams, checkpoint_dir)
    training.finish(fabric, out_dir)


def fit(fabric, model, raw_model, optimizer, tokenizer, train_data, val_data, out_dir, train, eval, step, position,
        save) -> None:
    """The training loop. Identical in every finetune script (tests/test_script_hygiene.py checks)."""
    total_steps = train.total_steps(len(train_data))
    stream = BatchStream(train_data, train, fabric.global_rank, fabric.world_size)
    stream.position = position
    progress = ProgressLog(fabric, out_dir, total_steps, start_step=step)
    if step == 0:
        with progress.paused():  # time outside the training steps stays out of the reported speed
            val_loss = training.validate(fabric, model, val_data, eval, train.micro_batch_size, stream.share_prefix)
        progress.log(0, {"val_loss": val_loss})
        progress.write(f"step 0: val loss {val_loss:.4f}")
    running_loss = torch.zeros((), device=fabric.device)
    while step < total_steps:
        training.set_lr(optimizer, training.lr_at(step, train, total_steps))
        micro_batches = stream.next_step()
        # Weight each micro-batch by its share of the step's loss-carrying tokens (over all devices), so the
        # loss is the same token mean whatever the micro batch size, accumulation or device count.
        step_supervised = training.global_sum(fabric, sum(b.supervised for b in micro_batches))
        for i, batch in enumerate(micro_batches):
            weight = batch.supervised * fabric.world_size / max(step_supervised, 1)
            with fabric.no_backward_sync(model, enabled=i < len(micro_batches) - 1):
                loss = model(**batch.model_inputs(fabric.device)) * weight
                fabric.backward(loss)
            running_loss += loss.detach()
        if train.grad_clip > 0:
            fabric.clip_gradients(model, optimizer, max_norm=train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        progress.update(1, sum(b.tokens for b in micro_batches), sum(b.supervised for b in micro_batches))
        if step % train.log_interval == 0 or step == total_steps:
            steps_logged = step % train.log_interval or train.log_interval
            train_loss = float(fabric.all_reduce(running_loss, reduce_op="sum")) / fabric.world_size / steps_logged
            running_loss.zero_()
            progress.log(step, {"train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"], **progress.throughput()},
                         show=True)
        if step % eval.interval == 0 or step == total_steps:
            with progress.paused():
                val_loss = training.validate(fabric, model, val_data, eval, train.micro_batch_size,
                                             stream.share_prefix)
                prompt, response = training.sample_response(raw_model, tokenizer, val_data, eval.max_new_tokens,
                                                            fabric.device)
            progress.log(step, {"val_loss": val_loss}, show=True)
            progress.write(f"step {step}: val loss {val_loss:.4f}\n{prompt}{response}")
        if step % train.save_interval == 0 and step < total_steps:
            with progress.paused():
                save(out_dir / f"step-{step:06d}")
                training.save_resume_state(fabric, out_dir, raw_model, optimizer, step, stream.position)
    progress.close()


def save(fabric, model, directory: Path, hparams: dict, checkpoint_dir: Path) -> None:
    """Save only the Adapter-v2 weights, with what describes them."""
    training.save_output_dir(
        fabric, directory, method.state_dict_to_save(model), "adapter_v2.safetensors",
        {**hparams, "base_fingerprint": training.base_fingerprint(checkpoint_dir)}, checkpoint_dir,
    )


if __name__ == "__main__":
    run_cli(setup)
