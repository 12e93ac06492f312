"""TensorBoard (under the run folder) plus short console lines; only the main rank writes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import dist


class Logger:
    def __init__(self, tb_dir: str | Path):
        self.writer: Any = None
        if dist.is_main():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(tb_dir))

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)
        self.writer.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def print(self, msg: str) -> None:
        if dist.is_main():
            print(msg, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
