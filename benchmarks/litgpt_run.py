"""`litgpt <command> ...` without the merged full-model copy that `litgpt finetune_lora` writes when it ends.

That copy (base + LoRA, the size of the whole model: 13.5 GB for a 7B in bf16) is written after the last
step, so it is no part of the measured steps; skipping it only saves the benchmark's wall time and disk.
Everything else is litgpt's own CLI, unchanged. Run in litgpt's environment:
    python benchmarks/litgpt_run.py finetune_lora <checkpoint_dir> --out_dir ...
"""

import litgpt.finetune.lora
from litgpt.__main__ import main

litgpt.finetune.lora.merge_lora = lambda **kwargs: None

if __name__ == "__main__":
    main()
