"""Prepare databricks-dolly-15k (15K records: instruction/context/response) for finetuning.

A copy of scripts/prepare_alpaca.py in which only `load_dolly` differs: Dolly's `context` is the
Alpaca `input` and its `response` the `output`.

Example:
    python scripts/prepare_dolly.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
"""

from pathlib import Path
from typing import Optional

from lit_gpt.cli import run_cli
from lit_gpt.prepare import check_prepare_settings, download, load_examples, prepare_instruction_data

URL = "https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl"
SHA256: Optional[str] = None  # not verified when this was written: the download's checksum is printed
FIELDS = {"instruction": "instruction", "input": "context", "output": "response"}


def load_dolly(destination_path: Path, data_file: Optional[Path], sha256: Optional[str]):
    """The dataset-specific part: where the records come from and which fields they use."""
    if data_file is None:
        data_file = download(URL, destination_path / "databricks-dolly-15k.jsonl", sha256=sha256)
    return load_examples(data_file, fields=FIELDS), str(data_file)


def prepare(
    checkpoint_dir: Path,
    destination_path: Path = Path("data/dolly"),
    data_file: Optional[Path] = None,
    sha256: Optional[str] = SHA256,
    val_split_fraction: float = 0.05,
    seed: int = 42,
    mask_prompt: bool = True,
    max_seq_length: Optional[int] = None,
    skip_long_prompts: bool = False,
) -> None:
    """Prepare Dolly for finetuning.

    Args:
        checkpoint_dir: the model's directory (its tokenizer and block_size are used).
        destination_path: where train.safetensors, val.safetensors and metadata.json go.
        data_file: a local copy of databricks-dolly-15k.jsonl; when not given it is downloaded.
        sha256: the expected checksum of the download (checked when given).
        val_split_fraction: fraction of samples held out for validation.
        seed: seed of the train/val split.
        mask_prompt: train only on the response (prompt tokens get no loss).
        max_seq_length: most tokens per sample (longer ones are truncated); default: the model's block_size.
        skip_long_prompts: leave out samples whose prompt alone reaches max_seq_length (default: error).
    """
    check_prepare_settings(checkpoint_dir, destination_path, val_split_fraction, max_seq_length)  # fail fast
    examples, source = load_dolly(destination_path, data_file, sha256)
    prepare_instruction_data(
        examples, checkpoint_dir, destination_path, source=source, val_split_fraction=val_split_fraction,
        seed=seed, mask_prompt=mask_prompt, max_seq_length=max_seq_length, skip_long_prompts=skip_long_prompts,
    )


if __name__ == "__main__":
    run_cli(prepare)
