"""Generate with a base checkpoint plus bottleneck adapter weights from finetune/bottleneck.py (Alpaca prompt).

A thin entry point: `lit_gpt.generation.answer_instruction` does the work for every finetuned model (see
generate/finetuned.py), with `--method bottleneck` and `--finetuned_dir out/bottleneck/final` as defaults here, so that a directory
of another method is refused with the script to use instead. The settings and the base checkpoint are read
from the hyperparameters.yaml the finetune run saved beside the weights; nothing is declared again here.

Example:
    python generate/bottleneck.py --finetuned_dir out/bottleneck/final --prompt "What is 12 + 30?"
"""

from pathlib import Path

from lit_gpt.cli import run_cli
from lit_gpt.generation import answer_instruction

METHOD = "bottleneck"

if __name__ == "__main__":
    run_cli(answer_instruction, defaults={"method": METHOD, "finetuned_dir": Path(f"out/{METHOD}/final")})
