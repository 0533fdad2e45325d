"""Token counts of the batches `litgpt finetune_*` trains on, for `benchmarks/finetune.py`.

litgpt's CSV log has its step times but no count of loss-carrying tokens, so this rebuilds its training
batches the way its finetune scripts do (`litgpt.data.JSON` with the same path, split, seed, prompt masking
and max_seq_length, its DataLoader shuffled by a generator seeded with the data seed) and counts, per batch,
the non-padding input positions (sample length - 1, as ours counts them) and the targets that carry loss
(labels shifted by one, != -100). It runs in the litgpt peer environment. Example:
    benchmarks/.venv-peers/litgpt/bin/python benchmarks/litgpt_batches.py --checkpoint_dir <litgpt checkpoint> \
        --json_path ../shared/data/math_data.json --batches 23 --out_file /tmp/litgpt_batches.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> list[dict]:
    from litgpt.data import JSON
    from litgpt.tokenizer import Tokenizer
    from litgpt.utils import CycleIterator

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint_dir", type=Path, required=True)
    p.add_argument("--json_path", type=Path, required=True)
    p.add_argument("--val_split_fraction", type=float, default=0.05)
    p.add_argument("--mask_prompt", default="true", choices=["true", "false"])
    p.add_argument("--seed", type=int, default=42, help="litgpt's data seed (--data.seed)")
    p.add_argument("--micro_batch_size", type=int, default=4)
    p.add_argument("--max_seq_length", type=int, default=512)
    p.add_argument("--batches", type=int, required=True, help="micro-batches to count")
    p.add_argument("--out_file", type=Path, required=True)
    args = p.parse_args(argv)

    data = JSON(
        json_path=args.json_path,
        mask_prompt=args.mask_prompt == "true",
        val_split_fraction=args.val_split_fraction,
        seed=args.seed,
        num_workers=0,
    )
    data.connect(Tokenizer(args.checkpoint_dir), batch_size=args.micro_batch_size, max_seq_length=args.max_seq_length)
    data.setup()
    iterator = CycleIterator(data.train_dataloader())
    counts = []
    for _ in range(args.batches):
        batch = next(iterator)
        lengths = batch["token_counts"]["raw_plus_prompt_template"].flatten().clamp(max=args.max_seq_length)
        counts.append(
            {
                "tokens": int((lengths - 1).clamp(min=0).sum()),
                "supervised": int((batch["labels"][:, 1:] != data.ignore_index).sum()),
                "padded_positions": int(batch["input_ids"].numel()),
            }
        )
    args.out_file.write_text(json.dumps(counts))
    return counts


if __name__ == "__main__":
    main()
