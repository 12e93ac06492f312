"""The embedded offline default: a synthetic arithmetic task, a character tokenizer and a tiny Qwen2 model."""
from evaluation.tiny_task import make_split
from pipeline.tiny.model import build_tiny_model, create_tiny_checkpoint, tiny_qwen2_config
from pipeline.tiny.tokenizer import build_tokenizer

__all__ = ["build_tiny_model", "build_tokenizer", "create_tiny_checkpoint", "make_split", "tiny_qwen2_config"]
