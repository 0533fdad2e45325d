"""Prepare any local JSON (list of records) or JSONL file of instruction data for finetuning.

Name the keys that hold the instruction, the optional input and the output; records that nest their
samples in a list (e.g. Stanford Alpaca's seed_tasks.jsonl: {"instruction", "instances": [{"input",
"output"}]}) are expanded with --instances_field.

Examples:
    python scripts/prepare_json.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \\
        --data_file my_data.jsonl --instruction_field prompt --input_field context --output_field response \\
        --destination_path data/mine
    python scripts/prepare_json.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \\
        --data_file seed_tasks.jsonl --instances_field instances --destination_path data/seed_tasks
"""

from pathlib import Path
from typing import Optional

from lit_gpt.cli import run_cli
from lit_gpt.prepare import check_prepare_settings, load_examples, prepare_instruction_data


def prepare(
    checkpoint_dir: Path,
    data_file: Path,
    destination_path: Path = Path("data/custom"),
    instruction_field: str = "instruction",
    input_field: str = "input",
    output_field: str = "output",
    instances_field: Optional[str] = None,
    val_split_fraction: float = 0.05,
    seed: int = 42,
    mask_prompt: bool = True,
    max_seq_length: Optional[int] = None,
    skip_long_prompts: bool = False,
) -> None:
    """Prepare a local JSON/JSONL file for finetuning.

    Args:
        checkpoint_dir: the model's directory (its tokenizer and block_size are used).
        data_file: a JSON file holding a list of records, or a JSONL file (one record per line).
        destination_path: where train.safetensors, val.safetensors and metadata.json go.
        instruction_field: the key holding the instruction (required in every record).
        input_field: the key holding the optional input/context (missing or empty = none).
        output_field: the key holding the response to learn (required in every record).
        instances_field: records hold a list of samples under this key (each inherits its parent's keys).
        val_split_fraction: fraction of samples held out for validation.
        seed: seed of the train/val split.
        mask_prompt: train only on the response (prompt tokens get no loss).
        max_seq_length: most tokens per sample (longer ones are truncated); default: the model's block_size.
        skip_long_prompts: leave out samples whose prompt alone reaches max_seq_length (default: error).
    """
    check_prepare_settings(checkpoint_dir, destination_path, val_split_fraction, max_seq_length)  # fail fast
    fields = {"instruction": instruction_field, "input": input_field, "output": output_field}
    examples = load_examples(data_file, fields=fields, instances_field=instances_field)
    prepare_instruction_data(
        examples, checkpoint_dir, destination_path, source=str(data_file), val_split_fraction=val_split_fraction,
        seed=seed, mask_prompt=mask_prompt, max_seq_length=max_seq_length, skip_long_prompts=skip_long_prompts,
    )


if __name__ == "__main__":
    run_cli(prepare)
