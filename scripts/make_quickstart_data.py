"""Make a small synthetic instruction dataset, offline and deterministic, for the quickstart.

Each record is in Alpaca format with a checkable numeric answer:
{"instruction": ..., "input": ..., "output": ..., "answer": ...}. Tasks:

    word_problems  one-step addition/subtraction stories with small numbers ("Mia has 7 shells and finds 5
                   more. How many shells does Mia have now?" -> "7 + 5 = 12"). The default: SmolLM2-135M-Instruct
                   mostly gets these wrong out of the box, and a short LoRA run teaches it the format and the sums.
    largest        the largest number of a short list ("12, 85, 33, 7" -> "85").
    count          how many items a comma-separated list holds ("fig, pear, plum" -> "3").

The same --seed gives the same files on every machine (Python's `random`); test records never repeat a
train record's instruction and input.

Example:
    python scripts/make_quickstart_data.py --out_dir data/quickstart --task word_problems --train_size 2000 --test_size 100
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lit_gpt.cli import run_cli

NAMES = ["Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max", "Eli", "Ada", "Ben", "Lily", "Noah", "Emma", "Omar"]
THINGS = ["apples", "marbles", "stickers", "shells", "pencils", "cookies", "stamps", "books", "coins", "cards",
          "balloons", "crayons", "toy cars", "flowers", "eggs"]
ITEMS = ["fig", "pear", "plum", "kiwi", "lime", "apple", "grape", "mango", "peach", "lemon", "melon", "cherry",
         "olive", "date", "berry"]

ADD = [
    "{name} has {a} {thing} and finds {b} more. How many {thing} does {name} have now?",
    "{name} had {a} {thing}. A friend gave {name} {b} more. How many {thing} does {name} have in total?",
    "There are {a} {thing} in a box. {name} puts {b} more {thing} in the box. How many {thing} are in the box now?",
]
SUB = [
    "{name} has {a} {thing} and gives {b} away. How many {thing} does {name} have left?",
    "There are {a} {thing} on the table. {name} takes {b} of them. How many {thing} are left on the table?",
    "{name} had {a} {thing} and lost {b}. How many {thing} does {name} have now?",
]


def word_problem(rng: random.Random) -> dict:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    if rng.random() < 0.5:
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        question, answer, work = rng.choice(ADD), a + b, f"{a} + {b} = {a + b}"
    else:
        a = rng.randint(5, 30)
        b = rng.randint(1, a - 1)
        question, answer, work = rng.choice(SUB), a - b, f"{a} - {b} = {a - b}"
    return {"instruction": question.format(name=name, thing=thing, a=a, b=b), "input": "", "output": work,
            "answer": answer}


def largest(rng: random.Random) -> dict:
    numbers = rng.sample(range(1, 100), rng.randint(3, 6))
    return {"instruction": "Which number in the list is the largest?", "input": ", ".join(map(str, numbers)),
            "output": str(max(numbers)), "answer": max(numbers)}


def count(rng: random.Random) -> dict:
    items = [rng.choice(ITEMS) for _ in range(rng.randint(2, 9))]
    return {"instruction": "How many items are in this list?", "input": ", ".join(items), "output": str(len(items)),
            "answer": len(items)}


TASKS = {"word_problems": word_problem, "largest": largest, "count": count}


def main(
    out_dir: Path = Path("data/quickstart"),
    task: str = "word_problems",
    train_size: int = 2000,
    test_size: int = 100,
    seed: int = 42,
) -> None:
    """Write <out_dir>/train.json and <out_dir>/test.json.

    Args:
        out_dir: destination folder.
        task: one of word_problems, largest, count.
        train_size: records in train.json (prepare it with scripts/prepare_json.py, finetune on it).
        test_size: records in test.json (evaluate with eval/accuracy.py); none repeats a train record.
        seed: random seed; the same seed gives the same files.
    """
    if task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {task!r}.")
    if train_size < 1 or test_size < 1:
        raise ValueError(f"--train_size and --test_size must be at least 1, got {train_size} and {test_size}.")
    rng, make = random.Random(f"{task}:{seed}"), TASKS[task]
    seen, train, test = set(), [], []
    for split, size in ((train, train_size), (test, test_size)):
        attempts = 0
        while len(split) < size:
            attempts += 1
            if attempts > 50 * size:
                raise ValueError(f"Could not make {size} distinct {task} records; ask for fewer.")
            record = make(rng)
            key = (record["instruction"], record["input"])
            if key in seen:
                continue
            seen.add(key)
            split.append(record)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, records in (("train.json", train), ("test.json", test)):
        (out_dir / name).write_text(json.dumps(records, indent=1) + "\n")
    print(f"Wrote {len(train)} {task} records to {out_dir / 'train.json'} and {len(test)} to {out_dir / 'test.json'}")
    print(f"e.g. {json.dumps(train[0])}")


if __name__ == "__main__":
    run_cli(main)
