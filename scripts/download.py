"""Download a model from the Hugging Face hub and convert it into a checkpoint directory of this project.

Fetches only what is needed: config.json, the tokenizer files and the weights (safetensors when the repo
has them, otherwise PyTorch .bin files), into checkpoints/<org>/<name>, then writes model_config.yaml and
lit_model.safetensors next to them (lit_gpt/convert.py). Gated models (Llama, Gemma, ...) need their
licence accepted on the model page and an access token (--access_token, or the HF_TOKEN variable).

Example:
    python scripts/download.py                                   # lists the supported repo ids
    python scripts/download.py --repo_id HuggingFaceTB/SmolLM2-135M-Instruct
    python generate/chat.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
    python scripts/download.py --repo_id meta-llama/Llama-3.2-1B --access_token hf_...
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from lit_gpt.cli import run_cli
from lit_gpt.config import configs
from lit_gpt.convert import convert_hf_checkpoint

CONFIG_AND_TOKENIZER = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
]
# Only the transformers weight files: some repos also hold other copies (Mistral's consolidated.safetensors).
SAFETENSORS_WEIGHTS = ["model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json"]
BIN_WEIGHTS = ["pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OFFLINE_HINT = (
    "Without network access, use the model embedded in this environment instead: "
    "`python scripts/convert_gguf_checkpoint.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct`, then "
    "`python generate/chat.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct`."
)


def main(
    repo_id: Optional[str] = None,
    access_token: Optional[str] = None,
    checkpoint_dir: Optional[Path] = None,
    from_safetensors: bool = True,
    dtype: Optional[str] = None,
) -> None:
    """Download `repo_id` and convert it; without `repo_id`, list the supported repo ids.

    Args:
        repo_id: "org/name" on the Hugging Face hub, e.g. HuggingFaceTB/SmolLM2-135M-Instruct.
        access_token: a Hugging Face token for gated or private repos (default: HF_TOKEN or `hf auth login`).
        checkpoint_dir: where to put the files; default checkpoints/<org>/<name>.
        from_safetensors: download the safetensors weights (True) or the PyTorch .bin weights (False). When
            the repo has no safetensors, the .bin weights are downloaded anyway.
        dtype: cast the converted weights to float32, float16 or bfloat16 (default: keep the repo's dtype).
    """
    if repo_id is None:
        print("Supported models (pass one as --repo_id; other repos of the same architectures also work):")
        print("\n".join(f"  {c['hf_repo']}" for c in configs if c.get("hf_repo")))
        return
    if repo_id.count("/") != 1:
        raise ValueError(f"--repo_id must look like 'org/name' (e.g. HuggingFaceTB/SmolLM2-135M), got {repo_id!r}.")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    checkpoint_dir = Path("checkpoints") / repo_id if checkpoint_dir is None else Path(checkpoint_dir)

    download(repo_id, checkpoint_dir, CONFIG_AND_TOKENIZER + (SAFETENSORS_WEIGHTS if from_safetensors else BIN_WEIGHTS),
             access_token)
    if not has_weights(checkpoint_dir):
        if from_safetensors:
            print(f"{repo_id} has no safetensors weights; downloading its PyTorch .bin weights instead.",
                  file=sys.stderr)
            download(repo_id, checkpoint_dir, BIN_WEIGHTS, access_token)
    present = sorted(p.name for p in checkpoint_dir.iterdir() if not p.name.startswith("."))
    if not (checkpoint_dir / "config.json").is_file() or not has_weights(checkpoint_dir):
        raise ValueError(
            f"{repo_id} has no transformers weights and config.json that this project can convert (downloaded: "
            f"{present or 'nothing'}). It may hold only GGUF, ONNX or adapter files: pick the repo of the base "
            "transformers model instead (`python scripts/download.py` lists supported ones)."
        )

    print(f"Converting {checkpoint_dir} ...", file=sys.stderr)
    config = convert_hf_checkpoint(checkpoint_dir, dtype=DTYPES.get(dtype))
    print(f"Done: {config.name} is ready in {checkpoint_dir}. Try it:\n"
          f"  python generate/base.py --checkpoint_dir {checkpoint_dir} --prompt \"Hello, my name is\"")


def download(repo_id: str, checkpoint_dir: Path, allow_patterns: list[str], token: Optional[str]) -> None:
    """`snapshot_download` the files matching `allow_patterns`; hub failures become one clear ValueError."""
    try:
        snapshot_download(repo_id, local_dir=checkpoint_dir, allow_patterns=allow_patterns, token=token)
    except Exception as error:
        message = explain_hub_error(error, repo_id, token)
        if message is None:
            raise
        raise ValueError(message) from None


def explain_hub_error(error: Exception, repo_id: str, token: Optional[str]) -> Optional[str]:
    """One paragraph saying what went wrong and what to do, or None for an error this does not know."""
    url = f"https://huggingface.co/{repo_id}"
    if isinstance(error, GatedRepoError):  # before RepositoryNotFoundError: it is a subclass
        given = (
            "The token you gave has no access yet: your licence request may still be pending, or the token belongs "
            "to another account. "
            if token
            else "No access token was given. "
        )
        return (
            f"{repo_id} is a gated model: its files are served only to logged-in users who accepted its licence. "
            f"{given}Open {url}, accept the licence (log in first), create a read token at "
            "https://huggingface.co/settings/tokens, then pass it with --access_token hf_... or set the HF_TOKEN "
            "environment variable, and run this command again."
        )
    if isinstance(error, RepositoryNotFoundError):
        return (
            f"{repo_id} was not found on the Hugging Face hub ({url}), or it is private and "
            f"{'the token you gave cannot see it' if token else 'no access token was given'}. Check the spelling "
            "(org/name, case-sensitive; `python scripts/download.py` lists the supported repo ids), and pass "
            "--access_token hf_... for a private repo."
        )
    if isinstance(error, RevisionNotFoundError):
        return f"{repo_id} has no 'main' branch on the hub ({url}); check the repo id."
    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)) or _is_network_error(error):
        return (
            f"Could not download {repo_id}: the Hugging Face hub is unreachable (no network, a proxy or firewall in "
            f"the way, or HF_HUB_OFFLINE=1 is set; {str(error).splitlines()[0][:200]}). Check the "
            f"connection (or HTTPS_PROXY) and run this command again. {OFFLINE_HINT}"
        )
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            return (
                f"The Hugging Face hub refused access to {repo_id} (HTTP {status}): the access token is invalid, "
                "expired or lacks read permission. Create a read token at https://huggingface.co/settings/tokens and "
                "pass it with --access_token hf_... (or set HF_TOKEN)."
            )
        return f"The Hugging Face hub answered with an error for {repo_id}: {error}. Try again later."
    return None


def has_weights(checkpoint_dir: Path) -> bool:
    """Whether `checkpoint_dir` holds transformers weight files (safetensors or .bin, single or sharded)."""
    patterns = SAFETENSORS_WEIGHTS + BIN_WEIGHTS
    return any(Path(p.name).match(pattern) for p in checkpoint_dir.iterdir() for pattern in patterns)


def _is_network_error(error: BaseException) -> bool:
    """Connection failures and timeouts, whichever HTTP library the installed huggingface_hub uses."""
    while error is not None:
        if isinstance(error, (ConnectionError, TimeoutError)):
            return True
        names = {cls.__name__ for cls in type(error).__mro__}
        if names & {"ConnectError", "ConnectTimeout", "NetworkError", "TimeoutException", "ProxyError"}:
            return True
        error = error.__cause__ or error.__context__
    return False


if __name__ == "__main__":
    run_cli(main)
