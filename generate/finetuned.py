"""Answer an instruction with any finetuned model: the output directory of any finetune/*.py run.

The method (LoRA, LLaMA-Adapter, Adapter-v2, a full finetune), its settings and the base checkpoint are read
from the hyperparameters.yaml the run saved beside the weights, and the instruction goes through the Alpaca
prompt the model was trained on. The response streams to stdout; tokens/s and peak memory go to stderr.
generate/lora.py, adapter.py and adapter_v2.py are this script with their method checked.

Example:
    python generate/finetuned.py --finetuned_dir out/lora/final --prompt "What is 12 + 30?"
"""

from lit_gpt.cli import run_cli
from lit_gpt.generation import answer_instruction

if __name__ == "__main__":
    run_cli(answer_instruction)
