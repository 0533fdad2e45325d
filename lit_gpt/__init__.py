"""lit_gpt: one readable GPT for open model families, with LoRA, LLaMA-Adapter and Adapter-v2."""

from lit_gpt.config import Config
from lit_gpt.model import GPT

__all__ = ["GPT", "Config", "Tokenizer"]


def __getattr__(name):
    # Tokenizer pulls in tokenizers/sentencepiece; import it only when asked for.
    if name == "Tokenizer":
        from lit_gpt.tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(name)
