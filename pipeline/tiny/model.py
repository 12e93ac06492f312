"""The tiny Qwen2-style model: built from a :class:`~pipeline.config.TinyModelConfig`, written as a Hugging Face
checkpoint (config.json + model.safetensors + tokenizer files) that ``AutoModelForCausalLM``/``AutoTokenizer`` load.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from pipeline.config import TinyModelConfig
from pipeline.tiny.tokenizer import build_tokenizer


def tiny_qwen2_config(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase) -> Qwen2Config:
    """The Qwen2Config for ``cfg``, with the vocabulary and special-token ids of ``tokenizer``."""
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"model.tiny.hidden_size={cfg.hidden_size} is not divisible by num_heads={cfg.num_heads}")
    if cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(f"model.tiny.num_heads={cfg.num_heads} is not divisible by num_kv_heads={cfg.num_kv_heads}")
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_sliding_window=False,
        dtype="float32",
    )


def build_tiny_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> Qwen2ForCausalLM:
    """A freshly initialised fp32 Qwen2ForCausalLM; the same ``seed`` gives the same weights. The global torch RNG
    is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(tiny_qwen2_config(cfg, tokenizer))
    return model.to(torch.float32).eval()


def create_tiny_checkpoint(path: str | os.PathLike[str], cfg: TinyModelConfig, seed: int) -> Path:
    """Write a fresh tiny model and its tokenizer to folder ``path`` (HF format) and return it.

    Written atomically: everything goes to a temporary sibling folder that is renamed to ``path`` at the end, so an
    interrupted call leaves either no folder or a complete one. An existing ``path`` is refused, not overwritten.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; remove it or choose another folder for the tiny checkpoint")
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_tiny_model(cfg, tokenizer, seed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
