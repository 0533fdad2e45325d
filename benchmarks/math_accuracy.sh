#!/usr/bin/env bash
# The PEFT methods on SmolLM2-135M-Instruct with the LLM-Adapters math data, on CPU, for one fixed budget each;
# every model (base included) evaluated on AddSub and MultiArith before and after: by default on their *_unseen
# records, the ones no training sample contains (../shared/data/README.md on contamination).
#
#   bash benchmarks/math_accuracy.sh       # from the repository root; needs ../shared/data
#
# Writes out/math/results.md (method, trainable params, steps, wall time, peak memory, correct/total before -> after).
# Budget knobs from the environment: STEPS (default 150), GLOBAL (batch, default 16), LIMIT (records per eval
# set; default: all), METHODS (default: lora adapter adapter_v2 bottleneck), SETS (default: AddSub_unseen
# MultiArith_unseen).
set -euo pipefail
cd "$(dirname "$0")/.."

CHECKPOINT=${CHECKPOINT:-checkpoints/SmolLM2-135M-Instruct}
DATA=../shared/data
OUT=${OUT:-out/math}
STEPS=${STEPS:-150}
GLOBAL=${GLOBAL:-16}   # samples per optimizer step
LIMIT=${LIMIT:-}
METHODS=${METHODS:-lora adapter adapter_v2 bottleneck}
SETS=${SETS:-AddSub_unseen MultiArith_unseen}
[ -f "$DATA/math_data.json" ] || { echo "$DATA/math_data.json is absent: nothing to do"; exit 0; }
mkdir -p "$OUT"

run() { echo "+ $*"; "$@"; }
[ -f "$CHECKPOINT/lit_model.safetensors" ] || run python scripts/convert_gguf_checkpoint.py --checkpoint_dir "$CHECKPOINT"
[ -f "$OUT/data/train.safetensors" ] || run python scripts/prepare_json.py --checkpoint_dir "$CHECKPOINT" \
  --data_file "$DATA/math_data.json" --destination_path "$OUT/data" --max_seq_length 512

evaluate() {  # evaluate LABEL [--finetuned_dir DIR]
  local label=$1; shift
  for set in $SETS; do
    run python eval/accuracy.py --checkpoint_dir "$CHECKPOINT" "$@" --data_file "$DATA/math_eval/$set.json" \
      --out_dir "$OUT/eval/$label-$set" --max_new_tokens 160 --batch_size 32 --show 0 \
      ${LIMIT:+--limit "$LIMIT"} --table "$OUT/accuracy.md" --label "$label $set"
  done
}

evaluate base
for method in $METHODS; do
  case $method in
    lora) flags=(--lora_r 8 --lora_alpha 16 --lora_query true --lora_value true --train.learning_rate 3e-4) ;;
    bottleneck) flags=(--bottleneck_preset adapterh --bottleneck_size 64 --train.learning_rate 3e-4) ;;
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
python - "$OUT" "$SETS" "$METHODS" <<'EOF'
"""Assemble out/math/results.md from the runs' logs, time -v reports and eval summaries."""
import json, re, sys
from pathlib import Path
out, sets, methods = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split()
def acc(label, data):
    s = json.loads((out / "eval" / f"{label}-{data}" / "summary.json").read_text())
    return f"{s['correct']}/{s['total']}"
rows = ["| method | trainable params | steps | wall time | peak memory | " + " | ".join(f"{s} before → after" for s in sets) + " |",
        "| --- " * (5 + len(sets)) + "|"]
walls = dict(line.split(": ") for line in (out / "walltime.txt").read_text().splitlines())
for m in methods:
    log = (out / f"{m}.log").read_text()
    trainable = re.search(r"Trainable parameters: ([\d,]+)", log).group(1)
    steps = re.findall(r"^(\d+),train_loss", (out / m / "metrics.csv").read_text(), re.M)[-1]
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", (out / f"{m}.time").read_text()).group(1))
    rows.append(f"| {m} | {trainable} | {steps} | {walls[m]} | {rss / 1e6:.2f} GB | "
                + " | ".join(f"{acc('base', s)} → {acc(m, s)}" for s in sets) + " |")
(out / "results.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
EOF
