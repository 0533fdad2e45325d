"""The Alpaca prompt template (Stanford Alpaca wording), shared by data preparation, training samples,
generation and evaluation, so that a model is always prompted exactly as it was finetuned.

    >>> print(alpaca_prompt("Add the numbers.", "2 and 3"))
    Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.
    <BLANKLINE>
    ### Instruction:
    Add the numbers.
    <BLANKLINE>
    ### Input:
    2 and 3
    <BLANKLINE>
    ### Response:
    <BLANKLINE>

The model is trained to continue the prompt with the response text followed by EOS.
"""

from __future__ import annotations

RESPONSE_MARKER = "### Response:"  # the line after which the model writes its answer

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n" + RESPONSE_MARKER + "\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n" + RESPONSE_MARKER + "\n"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for `instruction` (and `input`, when it is not empty or only whitespace).

    The prompt ends with "### Response:\\n"; the response text follows it directly.
    """
    if input and input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)
