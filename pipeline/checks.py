"""Input checks that turn a confusing library traceback into a one-line message saying what to fix."""
from __future__ import annotations

from pathlib import Path


class PipelineError(RuntimeError):
    """A problem with the user's input (paths, data, run folder); the message says what to change."""


def require_model_dir(path: str | Path) -> Path:
    """A local Hugging Face checkpoint folder: it must exist and hold config.json and weights."""
    p = Path(path)
    if not p.exists():
        raise PipelineError(f"model path {str(p)!r} does not exist; set model.path to a Hugging Face checkpoint "
                            "folder, a hub id (downloaded on first use), or 'tiny'")
    if not (p / "config.json").is_file():
        raise PipelineError(f"model path {str(p)!r} has no config.json; is it a Hugging Face checkpoint folder?")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise PipelineError(f"model path {str(p)!r} has no weights (*.safetensors or *.bin)")
    return p
