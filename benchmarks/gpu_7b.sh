#!/usr/bin/env bash
# Finetuning on a CUDA GPU, ours vs litgpt 0.5.13: LoRA, Adapter, Adapter-v2 and QLoRA (bnb.nf4-dq) on a
# Llama-2-7B-shaped model with random weights (no download), bf16-true, through benchmarks/finetune.py.
# The model has Llama-2-7b-hf's config with SmolLM2's 49,152-token vocabulary (its tokenizer prepares
# math_data.json), so 6.88B parameters instead of 6.74B.
#
#   bash benchmarks/gpu_7b.sh RESULTS_DIR [TOKENIZER_DIR] [DATA_FILE]
#
# Needs: a CUDA GPU with ~40 GB free, this python able to import lit_gpt, litgpt==0.5.13 and bitsandbytes,
# and ~30 GB of disk for the two random checkpoints. Environment knobs: METHODS (default
# "lora adapter adapter_v2 qlora"), STEPS (20), WARMUP (5), REPEATS (1), MICRO_BATCH (4), LAYERS (the
# config's 32; fewer for a quick smoke test), PER_METHOD_TIMEOUT (seconds, default 900), WORK (the work
# directory, default /tmp/gpu_7b_work: /dev/shm is faster where it has ~30 GB), EXTRA (more flags
# for benchmarks/finetune.py, e.g. "--random_override n_embd=256" to try the script on a CPU).
set -uo pipefail
results=${1:?usage: gpu_7b.sh RESULTS_DIR [TOKENIZER_DIR] [DATA_FILE]}
tokenizer=${2:-checkpoints/SmolLM2-135M-Instruct}
data=${3:-../shared/data/math_data.json}
mkdir -p "$results"
layers=()
[ -n "${LAYERS:-}" ] && layers=(--random_override "n_layer=$LAYERS")
for method in ${METHODS:-lora adapter adapter_v2 qlora}; do
  flags=(--method "$method")
  if [ "$method" = qlora ]; then
    flags=(--method lora --extra_ours="--quantize bnb.nf4-dq" --extra_litgpt="--quantize bnb.nf4-dq")
  fi
  echo "=== $method ($(date +%T))"
  timeout "${PER_METHOD_TIMEOUT:-900}" python3 benchmarks/finetune.py "${flags[@]}" --tools ours,litgpt \
    --peer_python python3 --precision bf16-true --random_init Llama-2-7b-hf "${layers[@]}" \
    --checkpoint_dir "$tokenizer" --data_file "$data" --steps "${STEPS:-20}" --warmup "${WARMUP:-5}" \
    --repeats "${REPEATS:-1}" --micro_batch_size "${MICRO_BATCH:-4}" --work_dir "${WORK:-/tmp/gpu_7b_work}" \
    --out_file "$results/finetune_${method}_7b.json" ${EXTRA:-} 2>&1 | tee "$results/finetune_${method}_7b.log" \
    | grep -v "^\[" || true
done
