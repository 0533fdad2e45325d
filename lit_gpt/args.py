"""Training and evaluation hyperparameters shared by every finetune script.

Every field is a command-line flag (`--train.learning_rate 1e-4`) through jsonargparse, and can come from
`--config file.yaml`. Derived values are computed here once, and invalid combinations fail before any
work starts, with the offending values in the message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass
class TrainArgs:
    """How to train.

    Args:
        micro_batch_size: samples per forward/backward pass on each device.
        global_batch_size: samples per optimizer step, over all devices (gradient accumulation fills the gap).
        learning_rate: peak learning rate, reached after warmup.
        min_learning_rate: the cosine decay ends here at the last step.
        warmup_steps: optimizer steps of linear warmup from 0.
        weight_decay: AdamW weight decay.
        grad_clip: clip the gradient norm to this value (0 disables clipping).
        epochs: passes over the training data; used when max_steps is not set.
        max_steps: optimizer steps to run; overrides epochs.
        log_interval: optimizer steps between progress-bar/CSV log updates.
        save_interval: optimizer steps between checkpoints (trainable weights + resume state).
        seed: seeds weight init of the PEFT layers, data order and dropout.
        group_by_length: batch samples of similar length together (seeded), which cuts padding.
        packing: fill each row with several samples back to back (each attends only to itself and restarts
            its positions), so almost no token is padding. Micro batches then hold more samples, so the
            training trajectory differs from an unpacked run; each sample's loss is unchanged.
        shared_prefix: when every sample of a micro batch begins with the same prompt tokens (an instruction
            template), compute them once for the batch instead of once per sample. Same loss; 8-12% more
            tokens/s on Alpaca-style data at micro batch 4 on CPU. Default (unset): on when training on the
            CPU, off on a GPU, where the masked attention it needs made an H100 step slower, not faster (469
            against 126 ms, Llama-2-7B width with 2 layers). Not used with --train.compile.
        activation_checkpointing: keep only each block's input and recompute the rest in backward: less
            memory for activations at ~30% more compute.
        compile: `torch.compile` the model for training (slow first steps while it compiles).
    """

    micro_batch_size: int = 4
    global_batch_size: int = 16
    learning_rate: float = 3e-4
    min_learning_rate: float = 0.0
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    epochs: int = 1
    max_steps: Optional[int] = None
    log_interval: int = 1
    save_interval: int = 1000
    seed: int = 1337
    group_by_length: bool = True
    packing: bool = False
    shared_prefix: Optional[bool] = None
    activation_checkpointing: bool = False
    compile: bool = False

    def validate(self, devices: int) -> None:
        """Fail early, naming the flags, for combinations that cannot work."""
        positive = {
            "micro_batch_size": self.micro_batch_size,
            "global_batch_size": self.global_batch_size,
            "epochs": self.epochs,
            "log_interval": self.log_interval,
            "save_interval": self.save_interval,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"--train.{name} must be at least 1, got {value}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--train.max_steps must be at least 1 (or unset to use --train.epochs), got {self.max_steps}.")
        if self.learning_rate <= 0 or self.min_learning_rate < 0 or self.min_learning_rate > self.learning_rate:
            raise ValueError(
                f"Need 0 <= --train.min_learning_rate ({self.min_learning_rate}) <= --train.learning_rate "
                f"({self.learning_rate}) and learning_rate > 0."
            )
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"--train.seed must be in [0, 2**32), got {self.seed}.")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("--train.warmup_steps, --train.weight_decay and --train.grad_clip must not be negative.")
        per_step = self.micro_batch_size * devices
        if self.global_batch_size % per_step:
            raise ValueError(
                f"--train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"--train.micro_batch_size ({self.micro_batch_size}) x --devices ({devices}) = {per_step}."
            )

    def total_steps(self, num_train_samples: int) -> int:
        """Optimizer steps of the whole run: max_steps, or enough steps for `epochs` passes over the data."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * num_train_samples / self.global_batch_size))


@dataclass
class EvalArgs:
    """When and how much to validate.

    Args:
        interval: optimizer steps between validation runs (validation also runs before training and at the end).
        max_iters: validation batches per run (the whole validation set if it is smaller).
        max_new_tokens: length of the sample generation printed at each validation.
    """

    interval: int = 100
    max_iters: int = 100
    max_new_tokens: int = 100

    def validate(self) -> None:
        for name in ("interval", "max_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"--eval.{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_new_tokens < 0:
            raise ValueError(f"--eval.max_new_tokens must not be negative, got {self.max_new_tokens}.")
