"""Task accuracy of a base or finetuned model on an Alpaca-format JSON/JSONL file with an `answer` per record.

Each record is prompted with the Alpaca template, answered by greedy KV-cached batched generation, and the
prediction is extracted from the response: the LAST number for numeric answers (LLM-Adapters convention),
a letter A-E (or the option text) for multiple choice. Writes one JSON line per record (instruction,
response, extracted, answer, correct) and a summary JSON, and prints e.g. "accuracy 41.3% (163/395)".

Examples:
    python eval/accuracy.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct \\
        --data_file ../shared/data/math_eval/AddSub.json --out_dir out/eval/base-addsub
    python eval/accuracy.py --finetuned_dir out/lora/final --data_file data/quickstart/test.json --limit 100
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

from lit_gpt.cli import run_cli
from lit_gpt.evaluation import (
    ANSWER_TYPES,
    answer_type_of,
    evaluate,
    format_accuracy,
    load_eval_model,
    load_eval_records,
    summarize,
)
from lit_gpt.loading import start_inference


def main(
    data_file: Path,
    checkpoint_dir: Optional[Path] = None,
    finetuned_dir: Optional[Path] = None,
    method: Optional[str] = None,
    out_dir: Optional[Path] = None,
    answer_type: Optional[str] = None,
    answer_field: str = "answer",
    limit: Optional[int] = None,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    precision: Optional[str] = None,
    show: int = 1,
    table: Optional[Path] = None,
    label: Optional[str] = None,
) -> dict:
    """Evaluate task accuracy.

    Args:
        data_file: Alpaca-format JSON (list) or JSONL; every record needs `instruction` and an answer.
        checkpoint_dir: the base checkpoint; with --finetuned_dir, overrides the base the run recorded.
        finetuned_dir: a finetune output directory (e.g. out/lora/final); its method comes from hyperparameters.yaml.
        method: optional check: fail unless --finetuned_dir holds this method's weights.
        out_dir: where predictions.jsonl and summary.json go; default out/eval/<model>-<data file stem>.
        answer_type: "number" or "choice"; default: detected from the answers.
        answer_field: the key holding the reference answer.
        limit: evaluate only the first N records.
        batch_size: prompts generated together (sorted by length, left-padded).
        max_new_tokens: most tokens per response (generation also stops at EOS).
        precision: e.g. 32-true or bf16-true; default: the best the device runs.
        show: print this many (prompt, response, verdict) examples at the end.
        table: append this result as a row of a markdown table (created with its header if missing).
        label: the row's name in --table (default: the model description).
    """
    if answer_type is not None and answer_type not in ANSWER_TYPES:
        raise ValueError(f"--answer_type must be one of {', '.join(ANSWER_TYPES)} (or unset to detect it), got {answer_type!r}.")
    records = load_eval_records(data_file, answer_field=answer_field, limit=limit)
    answer_type = answer_type or answer_type_of([r.answer for r in records], source=str(data_file))
    runtime = start_inference(precision)
    model, tokenizer, what = load_eval_model(checkpoint_dir, finetuned_dir, method, runtime.device, runtime.dtype)
    if out_dir is None:
        name = (finetuned_dir.parent.name if finetuned_dir.name == "final" else finetuned_dir.name) if finetuned_dir else checkpoint_dir.name
        out_dir = Path("out/eval") / f"{name}-{Path(data_file).stem}"
    out_dir.mkdir(parents=True, exist_ok=True)

    print(f"Evaluating {what} on {len(records)} records of {data_file} ({answer_type} answers), batch size {batch_size}")
    start = time.perf_counter()
    predictions = evaluate(model, tokenizer, records, max_new_tokens, batch_size, answer_type)
    seconds = time.perf_counter() - start
    summary = {
        **summarize(predictions),
        "model": what,
        "data_file": str(data_file),
        "answer_type": answer_type,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "precision": runtime.precision,
        "seconds": round(seconds, 2),
    }
    with open(out_dir / "predictions.jsonl", "w") as f:
        for p in predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    if table is not None:
        append_table_row(table, label or what, summary)

    for p in predictions[:show]:
        verdict = "correct" if p["correct"] else "wrong"
        print(f"\n--- example ---\n{p['instruction']}\n{p['input']}\n>>> {p['response']}\n"
              f"extracted {p['extracted']!r}, answer {p['answer']!r}: {verdict}".replace("\n\n>>>", "\n>>>"))
    print(f"\n{format_accuracy(summary)} in {seconds:.1f} s ({summary['no_answer']} responses without an answer)")
    print(f"Predictions: {out_dir / 'predictions.jsonl'}\nSummary: {out_dir / 'summary.json'}")
    if table is not None:
        print(f"Results table: {table}")
    sys.stdout.flush()
    return summary


def append_table_row(path: Path, label: str, summary: dict) -> None:
    """Append `| label | accuracy | correct/total | data | seconds |` to a markdown table file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file() or not path.read_text().strip()
    with open(path, "a") as f:
        if new:
            f.write("| model | accuracy | correct / total | data | eval seconds |\n|---|---|---|---|---|\n")
        f.write(
            f"| {label} | {100 * summary['accuracy']:.1f}% | {summary['correct']} / {summary['total']} | "
            f"{summary['data_file']} | {summary['seconds']:.0f} |\n"
        )


if __name__ == "__main__":
    run_cli(main)
