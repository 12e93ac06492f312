"""Loading Hugging Face models and tokenizers from a checkpoint folder (or the hub, where one is reachable)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.checks import PipelineError, require_model_dir

if TYPE_CHECKING:
    from pipeline.config import Config, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_hf_model(path: str | Path, options: ModelConfig, device: torch.device) -> torch.nn.Module:
    """A causal LM from a local checkpoint folder: fp32 master weights on CPU, ``model.dtype`` on an accelerator
    (``options``: the ``model.*`` section)."""
    from transformers import AutoModelForCausalLM

    require_model_dir(path)
    dtype = DTYPES[options.dtype] if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=options.trust_remote_code)
    return model.to(device)


def load_tokenizer(path: str | Path, cfg: Config) -> Any:
    """The tokenizer at ``path`` (a folder or a hub id); it must have an EOS token, and gets PAD = EOS if it has
    none."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise PipelineError(f"cannot load a tokenizer from {str(path)!r}: {str(e).splitlines()[0]}") from None
    if tok.eos_token_id is None:
        raise PipelineError(f"the tokenizer at {str(path)!r} has no EOS token; responses could never end")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def resolve_model_path(path: str) -> str:
    """A local folder as is; a hub id is downloaded (or read from the local cache) to a folder."""
    if Path(path).exists():
        return path
    if path.count("/") == 1 and not path.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py"])
        except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear line
            raise PipelineError(f"model {path!r} is neither a local folder nor downloadable from the hub "
                                f"({type(e).__name__}); pass a checkpoint folder in model.path") from None
    require_model_dir(path)  # raises with the message for a missing folder
    return path
