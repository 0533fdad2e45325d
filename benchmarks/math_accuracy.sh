#!/usr/bin/env bash
# LoRA, LLaMA-Adapter and Adapter-v2 on SmolLM2-135M-Instruct with the LLM-Adapters math data, on CPU, for one
# fixed budget each; every model (base included) evaluated on AddSub and MultiArith before and after.
#
#   bash benchmarks/math_accuracy.sh       # from the repository root; needs ../shared/data
#
# Writes out/math/results.md (method, trainable params, steps, wall time, peak memory, accuracy before -> after).
# Budget knobs from the environment: STEPS (default 150), GLOBAL (batch, default 16), LIMIT (records per eval
# set; default: all).
set -euo pipefail
cd "$(dirname "$0")/.."

CHECKPOINT=${CHECKPOINT:-checkpoints/SmolLM2-135M-Instruct}
DATA=../shared/data
OUT=${OUT:-out/math}
STEPS=${STEPS:-150}
GLOBAL=${GLOBAL:-16}   # samples per optimizer step
LIMIT=${LIMIT:-}
[ -f "$DATA/math_data.json" ] || { echo "$DATA/math_data.json is absent: nothing to do"; exit 0; }
mkdir -p "$OUT"

run() { echo "+ $*"; "$@"; }
[ -f "$CHECKPOINT/lit_model.safetensors" ] || run python scripts/convert_gguf_checkpoint.py --checkpoint_dir "$CHECKPOINT"
[ -f "$OUT/data/train.safetensors" ] || run python scripts/prepare_json.py --checkpoint_dir "$CHECKPOINT" \
  --data_file "$DATA/math_data.json" --destination_path "$OUT/data" --max_seq_length 512

evaluate() {  # evaluate LABEL [--finetuned_dir DIR]
  local label=$1; shift
  for set in AddSub MultiArith; do
    run python eval/accuracy.py --checkpoint_dir "$CHECKPOINT" "$@" --data_file "$DATA/math_eval/$set.json" \
      --out_dir "$OUT/eval/$label-$set" --max_new_tokens 160 --batch_size 32 --show 0 \
      ${LIMIT:+--limit "$LIMIT"} --table "$OUT/accuracy.md" --label "$label $set"
  done
}

evaluate base
for method in lora adapter adapter_v2; do
  case $method in
    lora) flags=(--lora_r 8 --lora_alpha 16 --lora_query true --lora_value true --train.learning_rate 3e-4) ;;
    *) flags=(--adapter_start_layer 2 --train.learning_rate 9e-3) ;;
  esac
  start=$(date +%s)
  run /usr/bin/time -v -o "$OUT/$method.time" python finetune/$method.py --checkpoint_dir "$CHECKPOINT" \
    --data_dir "$OUT/data" --out_dir "$OUT/$method" "${flags[@]}" --precision 32-true \
    --train.micro_batch_size 4 --train.global_batch_size "$GLOBAL" --train.max_steps "$STEPS" --train.warmup_steps 10 \
    --train.log_interval 5 --eval.interval "$STEPS" --eval.max_iters 20 --eval.max_new_tokens 64 \
    > "$OUT/$method.log" 2>&1
  echo "$method: $(( $(date +%s) - start )) s" | tee -a "$OUT/walltime.txt"
  evaluate "$method" --finetuned_dir "$OUT/$method/final"
done
python - "$OUT" <<'EOF'
"""Assemble out/math/results.md from the runs' logs, time -v reports and eval summaries."""
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
def acc(label, data):
    s = json.loads((out / "eval" / f"{label}-{data}" / "summary.json").read_text())
    return f"{100 * s['accuracy']:.1f}"
rows = ["| method | trainable params | steps | wall time | peak memory | AddSub before → after | MultiArith before → after |",
        "| --- | --- | --- | --- | --- | --- | --- |"]
walls = dict(line.split(": ") for line in (out / "walltime.txt").read_text().splitlines())
for m in ("lora", "adapter", "adapter_v2"):
    log = (out / f"{m}.log").read_text()
    trainable = re.search(r"Trainable parameters: ([\d,]+)", log).group(1)
    steps = re.findall(r"^(\d+),train_loss", (out / m / "metrics.csv").read_text(), re.M)[-1]
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", (out / f"{m}.time").read_text()).group(1))
    rows.append(f"| {m} | {trainable} | {steps} | {walls[m]} | {rss / 1e6:.2f} GB | "
                f"{acc('base', 'AddSub')} → {acc(m, 'AddSub')} | {acc('base', 'MultiArith')} → {acc(m, 'MultiArith')} |")
(out / "results.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
EOF
