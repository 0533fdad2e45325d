"""lit_gpt: one readable GPT for open model families, with LoRA, LLaMA-Adapter and Adapter-v2."""

from lit_gpt.config import Config
from lit_gpt.model import GPT
from lit_gpt.tokenizer import Tokenizer

__all__ = ["GPT", "Config", "Tokenizer"]
