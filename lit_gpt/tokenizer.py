"""Tokenizer over a checkpoint directory: Hugging Face `tokenizer.json` or sentencepiece `tokenizer.model`.

Encoding follows Hugging Face semantics, so that for the same directory

    Tokenizer(d).encode(text).tolist() == transformers.AutoTokenizer.from_pretrained(d)(text)["input_ids"]

What is read from where:
    tokenizer.json / tokenizer.model   the vocabulary and the splitting rules
    tokenizer_config.json              bos/eos tokens, `add_bos_token`, the jinja `chat_template`
    generation_config.json             extra stop ids (`eos_token_id` may be a list, e.g. Llama-3-Instruct)

Example::

    tok = Tokenizer("checkpoints/SmolLM2-135M-Instruct")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi!"}])
    ids = tok.encode(prompt)                      # (T,) int64
    stream = tok.decoder()                        # streaming detokenizer for generation
    for t in generated_ids:                       # one id at a time
        print(stream.step(t), end="", flush=True)
    print(stream.flush())
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch

from lit_gpt.files import file_problem, first_line, read_json

# What to do about a broken tokenizer file: get the base model's files again.
TOKENIZER_REMEDY = (
    "Copy the tokenizer files of the base model into this directory again (scripts/download.py and "
    "scripts/convert_*_checkpoint.py write them)."
)


class Tokenizer:
    """Text <-> token ids for one checkpoint directory.

    Attributes:
        vocab_size: number of ids the tokenizer can produce (added/special tokens included).
        bos_id / eos_id: the beginning / main end-of-sequence token ids, or None when the checkpoint has none.
        stop_ids: every id that ends generation (eos plus the ids of generation_config.json `eos_token_id`).
        use_bos: whether :meth:`encode` prepends BOS when `bos` is not given (per checkpoint, HF semantics).
        chat_template: the jinja chat template of tokenizer_config.json, or None.
        backend: "huggingface" or "sentencepiece".
    """

    def __init__(self, checkpoint_dir: Union[str, Path]) -> None:
        checkpoint_dir = Path(checkpoint_dir)
        self.checkpoint_dir = checkpoint_dir
        if not checkpoint_dir.is_dir():
            raise FileNotFoundError(f"Tokenizer directory {str(checkpoint_dir)!r} does not exist.")
        tok_config = _read_json(checkpoint_dir / "tokenizer_config.json")
        gen_config = _read_json(checkpoint_dir / "generation_config.json")
        self.special_tokens: dict[str, str] = {}  # bos_token, eos_token, ... as strings (for chat templates)
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = _token_content(tok_config.get(key))
            if value is not None:
                self.special_tokens[key] = value

        if (checkpoint_dir / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            self.backend = "huggingface"
            path = checkpoint_dir / "tokenizer.json"
            try:
                self.processor = HFTokenizer.from_file(str(path))
            except Exception as e:  # the Rust library raises a bare Exception for every parse error
                raise file_problem(path, f"is not a readable tokenizer ({first_line(e)}); it is truncated or corrupt",
                                   TOKENIZER_REMEDY) from None
            self.vocab_size = self.processor.get_vocab_size(with_added_tokens=True)
        elif (checkpoint_dir / "tokenizer.model").is_file():
            from sentencepiece import SentencePieceProcessor

            self.backend = "sentencepiece"
            path = checkpoint_dir / "tokenizer.model"
            try:
                self.processor = SentencePieceProcessor(model_file=str(path))
            except (RuntimeError, OSError) as e:
                raise file_problem(path, f"is not a readable sentencepiece model ({first_line(e)}); it is truncated "
                                   "or corrupt", TOKENIZER_REMEDY) from None
            self.vocab_size = self.processor.vocab_size()
        else:
            present = sorted(p.name for p in checkpoint_dir.iterdir())
            raise FileNotFoundError(
                f"No tokenizer in {str(checkpoint_dir)!r}: expected tokenizer.json (Hugging Face tokenizers) or "
                f"tokenizer.model (sentencepiece). It contains: {present or 'nothing'}. Copy the tokenizer files of "
                "the base model into it (scripts/download.py and scripts/convert_*_checkpoint.py write them)."
            )

        # BOS/EOS: tokenizer_config.json names them; otherwise generation_config.json ids; otherwise the model's own.
        self.bos_id = self._lookup(self.special_tokens.get("bos_token"))
        self.eos_id = self._lookup(self.special_tokens.get("eos_token"))
        gen_eos = gen_config.get("eos_token_id")
        gen_eos = [] if gen_eos is None else [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
        if self.bos_id is None and isinstance(gen_config.get("bos_token_id"), int):
            self.bos_id = gen_config["bos_token_id"]
        if self.eos_id is None and gen_eos:
            self.eos_id = gen_eos[0]
        if self.backend == "sentencepiece":
            if self.bos_id is None and self.processor.bos_id() >= 0:
                self.bos_id = self.processor.bos_id()
            if self.eos_id is None and self.processor.eos_id() >= 0:
                self.eos_id = self.processor.eos_id()
        self.stop_ids: set[int] = {i for i in [self.eos_id, *gen_eos] if i is not None}

        # Does encode() add BOS by default? As transformers 5 decides it: with a tokenizer.json, its post-processor
        # alone decides (transformers drops tokenizer_config.json `add_bos_token` then); with a sentencepiece model,
        # tokenizer_config.json `add_bos_token` when present, else yes (Llama/Gemma tokenizer classes default to it).
        if self.backend == "huggingface":
            self.use_bos = self._post_processor_adds_bos()
        else:
            self.use_bos = bool(tok_config.get("add_bos_token", True)) and self.bos_id is not None

        self.chat_template: Optional[str] = tok_config.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            by_name = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = by_name.get("default", next(iter(by_name.values()), None))
        if self.chat_template is None and (checkpoint_dir / "chat_template.jinja").is_file():
            self.chat_template = (checkpoint_dir / "chat_template.jinja").read_text()

    # --- ids of tokens ----------------------------------------------------------------------------------
    def token_to_id(self, token: str) -> Optional[int]:
        """The id of a single vocabulary token (e.g. "<|im_end|>"), or None when it is not one."""
        if self.backend == "huggingface":
            return self.processor.token_to_id(token)
        i = self.processor.piece_to_id(token)
        return None if i == self.processor.unk_id() and token != self.processor.id_to_piece(i) else i

    def _lookup(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self.token_to_id(token)

    def _post_processor_adds_bos(self) -> bool:
        if self.bos_id is None:
            return False
        with_special = self.processor.encode("a", add_special_tokens=True).ids
        without = self.processor.encode("a", add_special_tokens=False).ids
        return len(with_special) > len(without) and with_special[0] == self.bos_id

    # --- encode / decode --------------------------------------------------------------------------------
    def encode(self, text: str, bos: Optional[bool] = None, eos: bool = False, max_length: int = -1) -> torch.Tensor:
        """Token ids of `text`, shape (T,), int64.

        Args:
            bos: prepend BOS; None uses the checkpoint's default (`use_bos`).
            eos: append the main EOS.
            max_length: keep only the first `max_length` ids when > 0 (after BOS/EOS are added).
        Special-token strings in `text` (e.g. "<|im_start|>") become their ids, as in HF tokenizers.
        The one deliberate difference from HF: BOS (EOS) is not added a second time when `text` already starts
        (ends) with it, so `encode(tokenizer.apply_chat_template(...))` is right for templates that write BOS.
        Text that is not valid Unicode (see `check_text`) raises a ValueError that says where.
        """
        check_text(text)
        if self.backend == "huggingface":
            ids = self.processor.encode(text, add_special_tokens=False).ids
        else:
            ids = self.processor.encode(text)
        if bos if bos is not None else self.use_bos:
            if self.bos_id is None:
                raise ValueError(f"BOS was requested but the tokenizer in {str(self.checkpoint_dir)!r} has none.")
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id] + ids
        if eos:
            if self.eos_id is None:
                raise ValueError(f"EOS was requested but the tokenizer in {str(self.checkpoint_dir)!r} has none.")
            if not ids or ids[-1] != self.eos_id:
                ids = ids + [self.eos_id]
        if max_length > 0:
            ids = ids[:max_length]
        return torch.tensor(ids, dtype=torch.int64)

    def decode(self, ids: Union[torch.Tensor, Iterable[int]], skip_special: bool = False) -> str:
        """Text of a sequence of ids (a 1-D tensor, or a list). `skip_special` drops BOS/EOS/control tokens."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
        if isinstance(ids, int):  # a 0-d tensor
            ids = [ids]
        if self.backend == "huggingface":
            return self.processor.decode(ids, skip_special_tokens=skip_special)
        if skip_special:
            ids = [i for i in ids if not self.processor.is_control(i)]
        return self.processor.decode(ids)

    def decoder(self, skip_special: bool = False) -> "StreamingDecoder":
        """A streaming detokenizer for generation: feed ids one at a time, get the new text (see StreamingDecoder)."""
        return StreamingDecoder(self, skip_special=skip_special)

    # --- chat -----------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render `messages` ([{"role": "user", "content": "..."}, ...]) with the checkpoint's jinja chat template.

        Equals `AutoTokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`. The
        result already holds any BOS the template writes, so encode it with `bos=False` if the template does.
        Extra keyword arguments are passed to the template (e.g. `tools=`).
        """
        if self.chat_template is None:
            raise ValueError(
                f"The tokenizer in {str(self.checkpoint_dir)!r} has no chat template (no `chat_template` in "
                "tokenizer_config.json): this is a base model. Format the prompt yourself, e.g. with lit_gpt.prompts."
            )
        template = _compile_chat_template(self.chat_template)
        variables = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)

    def __repr__(self) -> str:
        return (
            f"Tokenizer({str(self.checkpoint_dir)!r}, backend={self.backend}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, stop_ids={sorted(self.stop_ids)}, use_bos={self.use_bos})"
        )


class StreamingDecoder:
    """Incremental detokenizer: `step(id)` returns the text that id adds, so generated text can be printed live.

    Decoding tokens one by one and concatenating is wrong in two ways: a character whose UTF-8 bytes are split
    over several tokens (emoji, CJK with byte-level BPE or sentencepiece byte fallback) would print as "\\ufffd",
    and sentencepiece drops the leading space of the first token of a sequence. This decodes a small window
    (the previous token(s) plus the new one), returns only the text past the previous window, and holds text back
    while it ends in an incomplete character. `"".join(steps) + flush()` equals `tokenizer.decode(all_ids)`.

    Example::

        stream = tokenizer.decoder()
        for token_id in generated:
            print(stream.step(token_id), end="", flush=True)
        print(stream.flush())
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: context decoded again so that spacing comes out right
        self.read_offset = 0  # text of ids[:read_offset] has been returned

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=self.skip_special)

    def step(self, token_id: Union[int, torch.Tensor]) -> str:
        """Add one id; return the new text it completes (may be "" while a multi-byte character is incomplete)."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            piece = new_text[len(prefix_text) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character decodes as "\\ufffd") and reset."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        self.ids, self.prefix_offset, self.read_offset = [], 0, 0
        return new_text[len(prefix_text) :]


# --- helpers -----------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    """tokenizer_config.json or generation_config.json: optional, but when present a JSON object."""
    return read_json(path, TOKENIZER_REMEDY) if path.exists() else {}


def _token_content(value: Any) -> Optional[str]:
    """tokenizer_config.json stores special tokens as strings or as {"content": ..., ...} dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


_TEMPLATE_CACHE: dict[str, Any] = {}


def _compile_chat_template(source: str):
    """Compile a chat template in a sandboxed jinja environment with the same settings and helpers as HF."""
    if source in _TEMPLATE_CACHE:
        return _TEMPLATE_CACHE[source]
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for HF's masks; here it just renders."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    template = env.from_string(source)
    _TEMPLATE_CACHE[source] = template
    return template


def check_text(text: str, what: str = "The text") -> None:
    """Raise a ValueError unless `text` is a str of valid Unicode, which every tokenizer can encode.

    Lone surrogates are not: they come from JSON escapes such as "\\ud800" and from bytes that were not UTF-8
    (Python keeps those of a command-line argument as surrogates). The message gives the character's position
    and the text around it, so the input can be fixed (saved as UTF-8)."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, got {type(text).__name__}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{what} is not valid Unicode at character {e.start} (after {text[max(0, e.start - 30):e.start]!r}): "
            f"{text[e.start]!r} is a lone surrogate, left by bytes that were not UTF-8 or by a JSON escape such as "
            "\\ud800. Save the input as UTF-8 (or remove that character) and try again."
        ) from None
