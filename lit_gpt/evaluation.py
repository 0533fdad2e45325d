"""Task accuracy: prompt a model with Alpaca prompts, extract the answer from each response, compare.

Used by eval/accuracy.py (and reusable from a notebook)::

    records = load_eval_records("data/quickstart/test.json")            # each needs an `answer` field
    model, tokenizer, what = load_eval_model("checkpoints/SmolLM2-135M-Instruct", finetuned_dir="out/lora/final")
    predictions = evaluate(model, tokenizer, records, batch_size=16, max_new_tokens=64)
    print(format_accuracy(summarize(predictions)))                      # accuracy 41.3% (163/395)

Answer extraction follows the LLM-Adapters convention for math word problems: the LAST number in the
response is the prediction ("... 3 + 4 = 7. The answer is 7." -> 7), compared numerically with a small
tolerance. Thousands separators ("1,000"), signs ("-3") and decimals ("2.50") are understood. For
multiple choice the prediction is the last standalone letter A-E in the response, or else the option
whose text the response contains.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn
from tqdm import tqdm

from lit_gpt.data import DataError
from lit_gpt.generation import generate_batch
from lit_gpt.loading import COMPLETE_CHECKPOINT_METHODS, load_base_model, load_finetuned
from lit_gpt.peft import FULL
from lit_gpt.prepare import read_records_with_locations
from lit_gpt.prompts import alpaca_prompt
from lit_gpt.tokenizer import Tokenizer

PathLike = Union[str, Path]
ANSWER_TYPES = ("number", "choice")
CHOICES = "ABCDE"
NUMBER_TOLERANCE = 1e-3  # |prediction - answer| below this counts as correct (LLM-Adapters uses 0.001)

# A number: optional minus (not when glued to a word or digit, as in "3-5" or "x-2"), then either
# thousands groups ("12,345") or plain digits, then optional decimals. "12,34" is two numbers.
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+(?![\d])|\d+)(?:\.\d+)?|(?:(?<![\w.])-)?\.\d+")
_CHOICE = re.compile(r"(?<![A-Za-z])\(?([A-E])\)?(?![A-Za-z])")
_OPTION = re.compile(r"(?:^|\s|\()([A-E])\s*[\).:]\s*(.+?)(?=\s+\(?[A-E]\s*[\).:]|\s*$)", re.MULTILINE)


# --- answer extraction ---------------------------------------------------------------------------------
def parse_number(text: str) -> Optional[float]:
    """The number written in `text` ("1,000" -> 1000.0, "-2.5" -> -2.5), its last one if several; None if none."""
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    value = float(numbers[-1].replace(",", ""))
    return value


def extract_number(response: str) -> Optional[float]:
    """The LAST number in a model's response (LLM-Adapters convention); None when it holds no number."""
    return parse_number(response)


def parse_options(text: str) -> dict[str, str]:
    """Multiple-choice options written in `text` as "A) ...", "(B) ...", "C. ..." or "D: ...": {letter: text}."""
    return {letter: option.strip().rstrip(",;") for letter, option in _OPTION.findall(text)}


def extract_choice(response: str, options: Optional[dict[str, str]] = None) -> Optional[str]:
    """The chosen letter A-E: the last standalone capital letter A-E in `response` ("(C)", "answer is B.").

    When the response holds no such letter, the option (from `options`, {letter: text}) whose text it
    contains, the last-mentioned one if several. None when neither is found. A sentence-initial "A" ("A
    train leaves...") is a known ambiguity of this convention; answers usually end the response.
    """
    letters = _CHOICE.findall(response)
    if letters:
        return letters[-1]
    if options:
        lowered = response.lower()
        found = [(lowered.rfind(text.lower()), letter) for letter, text in options.items() if text.strip()]
        found = [(pos, letter) for pos, letter in found if pos >= 0]
        if found:
            return max(found)[1]
    return None


def answer_type_of(answers: Sequence[Any], source: str = "data") -> str:
    """"number" when every answer is a number (or numeric text), "choice" when every one is a letter A-E."""
    if all(_as_number(a) is not None for a in answers):
        return "number"
    if all(isinstance(a, str) and a.strip().strip("()").upper() in CHOICES for a in answers):
        return "choice"
    example = next(a for a in answers if _as_number(a) is None)
    raise DataError(
        f"{source}: cannot tell the answer type: answers are neither all numbers nor all letters A-E "
        f"(e.g. {example!r}). Pass --answer_type number or --answer_type choice."
    )


def _as_number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip().lstrip("$").rstrip("%").strip()):
        return parse_number(value)
    return None


def is_correct(extracted: Any, answer: Any, answer_type: str, options: Optional[dict[str, str]] = None) -> bool:
    """Whether an extracted prediction matches the reference answer.

    number: |extracted - answer| < NUMBER_TOLERANCE (also relative 1e-6 for large values).
    choice: same letter; an answer given as option text is first mapped to its letter through `options`.
    """
    if extracted is None:
        return False
    if answer_type == "number":
        reference = answer if isinstance(answer, (int, float)) else parse_number(str(answer))
        if reference is None:
            return False
        return math.isclose(float(extracted), float(reference), rel_tol=1e-6, abs_tol=NUMBER_TOLERANCE)
    reference = str(answer).strip().strip("()").upper()
    if reference not in CHOICES and options:
        matches = [letter for letter, text in options.items() if text.strip().lower() == str(answer).strip().lower()]
        reference = matches[0] if matches else reference
    return extracted == reference


# --- data ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalRecord:
    """One evaluation sample: the Alpaca fields and the reference answer; `where` locates it in its file."""

    instruction: str
    input: str
    answer: Any
    where: str = ""

    @property
    def prompt(self) -> str:
        return alpaca_prompt(self.instruction, self.input)


def load_eval_records(path: PathLike, answer_field: str = "answer", limit: Optional[int] = None) -> list[EvalRecord]:
    """Read an Alpaca-format JSON/JSONL file whose records also hold a reference answer.

    Every record needs a text `instruction` (an `input` is optional) and an `answer` (a number, numeric
    text, or a letter A-E). Raises DataError naming the file and the record otherwise. `limit` keeps the
    first N records (checked first, so a bad record beyond them does not matter).
    """
    records, where = read_records_with_locations(path)
    if limit is not None:
        if limit < 1:
            raise DataError(f"--limit must be at least 1, got {limit}.")
        records, where = records[:limit], where[:limit]
    if not records:
        raise DataError(f"{path}: the dataset is empty (no records). Check that you passed the right file.")
    out = []
    for record, loc in zip(records, where):
        if not isinstance(record, dict):
            raise DataError(f"{path}, {loc}: expected a JSON object, got {type(record).__name__}.")
        if answer_field not in record or record[answer_field] is None:
            raise DataError(
                f"{path}, {loc}: no {answer_field!r} field (keys present: {sorted(record)}). Task accuracy needs the "
                f"reference answer of every record; name its key with --answer_field, or use eval/loss.py for a "
                "dataset without answers."
            )
        instruction = record.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise DataError(f"{path}, {loc}: missing or empty 'instruction' text (keys present: {sorted(record)}).")
        input_text = record.get("input") or ""
        if not isinstance(input_text, str):
            raise DataError(f"{path}, {loc}: the 'input' field must be text, got {type(input_text).__name__}.")
        out.append(EvalRecord(instruction, input_text, record[answer_field], loc))
    return out


# --- models ----------------------------------------------------------------------------------------------
def load_eval_model(
    checkpoint_dir: Optional[PathLike] = None,
    finetuned_dir: Optional[PathLike] = None,
    method: Optional[str] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
):
    """(model in eval mode, Tokenizer, a one-line description) for a base checkpoint or a finetune output dir.

    With `finetuned_dir`, the method is read from its hyperparameters.yaml (see `lit_gpt.loading.load_finetuned`);
    `method`, when given, must agree (a clear error otherwise). `checkpoint_dir` then overrides the base checkpoint
    recorded by the run. Without `finetuned_dir`, `checkpoint_dir` is evaluated as is.
    """
    if finetuned_dir is None:
        if checkpoint_dir is None:
            raise ValueError("Pass --checkpoint_dir (a base checkpoint) or --finetuned_dir (a finetune output dir).")
        if method is not None:
            raise ValueError(f"--method {method} needs --finetuned_dir (the output directory of that finetune run).")
        model, _ = load_base_model(checkpoint_dir, device, dtype)
        return model, Tokenizer(checkpoint_dir), f"base checkpoint {checkpoint_dir}"
    model, hparams = load_finetuned(finetuned_dir, checkpoint_dir, device, dtype, method=method)
    saved = hparams["method"]
    if saved in COMPLETE_CHECKPOINT_METHODS:
        return model, Tokenizer(finetuned_dir), f"{'full finetune' if saved == FULL else saved} {finetuned_dir}"
    base = checkpoint_dir or hparams["checkpoint_dir"]
    return model, Tokenizer(base), f"{saved} weights {finetuned_dir} on {base}"


# --- generation and scoring ------------------------------------------------------------------------------
def generate_responses(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "eval",
) -> list[str]:
    """Greedy responses to `prompts`, in their order, by KV-cached batched generation.

    Prompts are sorted by token length (longest first) so that each batch holds similar lengths and little
    padding; a long prompt alone also shows the peak memory first. batch_size 1 = one prompt at a time.
    """
    if batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {batch_size}.")
    if max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be at least 1, got {max_new_tokens}.")
    device = next(model.parameters()).device
    encoded = [tokenizer.encode(p).to(device) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    responses: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", dynamic_ncols=True, disable=not progress)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        outputs = generate_batch(model, [encoded[i] for i in rows], max_new_tokens, stop_ids=tokenizer.stop_ids)
        for i, tokens in zip(rows, outputs):
            responses[i] = tokenizer.decode(tokens, skip_special=True).strip()
        bar.update(len(rows))
    bar.close()
    return responses


def score(records: Sequence[EvalRecord], responses: Sequence[str], answer_type: str) -> list[dict[str, Any]]:
    """One prediction dict per record: instruction, input, response, extracted, answer, correct."""
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {answer_type!r}.")
    out = []
    for record, response in zip(records, responses):
        options = parse_options(f"{record.instruction}\n{record.input}") if answer_type == "choice" else None
        extracted = extract_number(response) if answer_type == "number" else extract_choice(response, options)
        if isinstance(extracted, float) and extracted.is_integer():
            extracted = int(extracted)
        out.append(
            {
                "instruction": record.instruction,
                "input": record.input,
                "response": response,
                "extracted": extracted,
                "answer": record.answer,
                "correct": is_correct(extracted, record.answer, answer_type, options),
            }
        )
    return out


def evaluate(
    model: nn.Module,
    tokenizer,
    records: Sequence[EvalRecord],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    answer_type: Optional[str] = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Generate a greedy response to every record's Alpaca prompt and score it (see :func:`score`).

    answer_type None: detected from the answers (:func:`answer_type_of`).
    """
    answer_type = answer_type or answer_type_of([r.answer for r in records])
    responses = generate_responses(model, tokenizer, [r.prompt for r in records], max_new_tokens, batch_size, progress)
    return score(records, responses, answer_type)


def summarize(predictions: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """{"accuracy": fraction, "correct": n, "total": n, "no_answer": n} over scored predictions."""
    predictions = list(predictions)
    correct = sum(bool(p["correct"]) for p in predictions)
    total = len(predictions)
    no_answer = sum(p["extracted"] is None for p in predictions)
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total, "no_answer": no_answer}


def format_accuracy(summary: dict[str, Any]) -> str:
    """ "accuracy 41.3% (163/395)" """
    return f"accuracy {100 * summary['accuracy']:.1f}% ({summary['correct']}/{summary['total']})"
