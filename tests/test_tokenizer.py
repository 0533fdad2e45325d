"""lit_gpt.tokenizer against transformers.AutoTokenizer on tiny tokenizers built here (no network)."""

import json
from pathlib import Path

import pytest
import torch

from lit_gpt.tokenizer import Tokenizer

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Numbers 12345 and 67890, punctuation: (a), [b], {c}; 'quotes' and \"double\".",
    "Unicode: café, naïve, Ünïcödé, 東京タワー, 中文字符, Привет мир, emoji 😀🚀👍🏽.",
    "  multiple   spaces\tand\nnewlines\n\nend",
] * 20

TEXTS = [
    "Hello world",
    "hello   world  ",
    " leading space",
    "12345 apples",
    "line one\nline two\n\n",
    "café 東京 😀 👍🏽",
    "unseen words: zyxwvut qqq",
    "",
]

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA_LIKE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}<<SYS>>{{ message['content'] | trim }}<</SYS>>"
    "{% elif message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
MESSAGES = [
    {"role": "system", "content": "You are terse. "},
    {"role": "user", "content": "What is 2+2? 😀"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 東京?"},
]


def _bpe_tokenizer(post_processor: str):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if post_processor == "bytelevel":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    elif post_processor == "bos":
        tok.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A", pair="<|im_start|> $A <|im_start|> $B", special_tokens=[("<|im_start|>", 1)]
        )
    return tok


def _write_bpe_dir(path: Path, post_processor: str, add_bos_token=None, chat_template=CHATML, gen_eos=None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    _bpe_tokenizer(post_processor).save(str(path / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template,
    }
    if add_bos_token is not None:
        cfg["add_bos_token"] = add_bos_token
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    if gen_eos is not None:
        (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": gen_eos}))
    return path


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    import sentencepiece as spm

    path = tmp_path_factory.mktemp("sp")
    (path / "corpus.txt").write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(
        input=str(path / "corpus.txt"),
        model_prefix=str(path / "tokenizer"),
        vocab_size=500,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.98,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        normalization_rule_name="identity",  # like Llama's tokenizer.model
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    (path / "tokenizer.vocab").unlink()
    (path / "corpus.txt").unlink()
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "legacy": True,
                "chat_template": LLAMA_LIKE,
            }
        )
    )
    return path


# (post-processor in tokenizer.json, tokenizer_config add_bos_token, expected use_bos). transformers 5 ignores
# tokenizer_config.json `add_bos_token` when there is a tokenizer.json: the post-processor decides.
BPE_CASES = [("bytelevel", None, False), ("bos", None, True), ("bytelevel", True, False), ("bos", False, True)]


@pytest.mark.parametrize("post_processor, add_bos_token, use_bos", BPE_CASES)
def test_bpe_encode_matches_transformers(tmp_path, post_processor, add_bos_token, use_bos):
    from transformers import AutoTokenizer

    d = _write_bpe_dir(tmp_path, post_processor, add_bos_token)
    ours, theirs = Tokenizer(d), AutoTokenizer.from_pretrained(d)
    assert ours.backend == "huggingface"
    assert ours.use_bos is use_bos
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (1, 2, len(theirs))
    for text in TEXTS + ["user <|im_start|>user\nhi<|im_end|>\n"]:
        ids = ours.encode(text)
        assert ids.dtype == torch.int64 and ids.ndim == 1
        assert ids.tolist() == theirs(text)["input_ids"], text
        assert ours.encode(text, bos=False).tolist() == theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ours.encode(text, bos=False)) == text
    # the one deliberate difference: no second BOS when the text starts with it (HF would add one)
    chat = "<|im_start|>user\nhi<|im_end|>"
    assert ours.encode(chat, bos=True).tolist() == theirs(chat, add_special_tokens=False)["input_ids"]
    with_both = ours.encode("Hello", bos=True, eos=True).tolist()
    assert (with_both[0], with_both[-1]) == (1, 2)
    assert len(ours.encode("Hello world hello world", max_length=3)) == 3


def test_sentencepiece_encode_matches_transformers(sp_dir):
    ours = Tokenizer(sp_dir)
    assert ours.backend == "sentencepiece"
    assert (ours.bos_id, ours.eos_id, ours.use_bos, ours.vocab_size) == (1, 2, True, 500)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids[0].item() == 1
        assert ours.decode(ids, skip_special=True) == text
    try:
        from transformers import AutoTokenizer

        theirs = AutoTokenizer.from_pretrained(sp_dir)
    except Exception as e:  # converting sentencepiece needs protobuf in some transformers versions
        pytest.skip(f"transformers cannot load the sentencepiece tokenizer here: {e}")
    # transformers 5 converts tokenizer.model to a Metaspace tokenizer that does not add the dummy prefix "▁" before
    # a text that starts with a space (" a" -> "▁a"); sentencepiece itself does ("▁▁a"). We follow sentencepiece,
    # the tokenizer the model was trained with, so those texts are left out here.
    for text in [t for t in TEXTS if not t.startswith(" ")]:
        assert ours.encode(text).tolist() == theirs(text)["input_ids"], text
    assert ours.apply_chat_template(MESSAGES) == theirs.apply_chat_template(MESSAGES, tokenize=False)


def test_sentencepiece_round_trip_and_bytes(sp_dir):
    tok = Tokenizer(sp_dir)
    text = "café 東京 😀 zzz"  # 😀 and 東京 are not pieces: byte fallback
    ids = tok.encode(text, bos=False)
    assert tok.decode(ids) == text
    stream = tok.decoder()
    assert "".join(stream.step(i) for i in ids) + stream.flush() == text


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tmp_path, add_generation_prompt):
    from transformers import AutoTokenizer

    for name, template in [("chatml", CHATML), ("llama", LLAMA_LIKE)]:
        d = _write_bpe_dir(tmp_path / name, "bytelevel", chat_template=template)
        ours, theirs = Tokenizer(d), AutoTokenizer.from_pretrained(d)
        expected = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_missing_and_sandboxed(tmp_path):
    d = _write_bpe_dir(tmp_path / "none", "bytelevel", chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(d).apply_chat_template(MESSAGES)
    import jinja2

    d = _write_bpe_dir(tmp_path / "evil", "bytelevel", chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        Tokenizer(d).apply_chat_template(MESSAGES)
    d = _write_bpe_dir(tmp_path / "raise", "bytelevel", chat_template="{{ raise_exception('only user turns') }}")
    with pytest.raises(jinja2.exceptions.TemplateError, match="only user turns"):
        Tokenizer(d).apply_chat_template(MESSAGES)


def test_stop_ids_from_generation_config(tmp_path):
    assert Tokenizer(_write_bpe_dir(tmp_path / "a", "bytelevel")).stop_ids == {2}
    assert Tokenizer(_write_bpe_dir(tmp_path / "b", "bytelevel", gen_eos=[2, 0])).stop_ids == {0, 2}
    assert Tokenizer(_write_bpe_dir(tmp_path / "c", "bytelevel", gen_eos=0)).stop_ids == {0, 2}


def test_streaming_decode_equals_full_decode(tmp_path):
    tok = Tokenizer(_write_bpe_dir(tmp_path, "bytelevel"))
    text = "Emoji 😀🚀👍🏽 and CJK 中文字符 東京タワー, unseen 🦀 ok"
    ids = tok.encode(text, bos=False).tolist()
    stream = tok.decoder()
    pieces = [stream.step(i) for i in ids]
    assert "".join(pieces) + stream.flush() == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    assert any(p == "" for p in pieces)  # a multi-byte character split over byte tokens was held back
    # skip_special drops the chat markers in the stream as in decode
    ids = tok.encode("<|im_start|>assistant\n東京<|im_end|>", bos=False).tolist()
    stream = tok.decoder(skip_special=True)
    assert "".join(stream.step(torch.tensor(i)) for i in ids) + stream.flush() == "assistant\n東京"


def test_missing_tokenizer_names_the_dir(tmp_path):
    (tmp_path / "lit_model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Tokenizer(tmp_path)
