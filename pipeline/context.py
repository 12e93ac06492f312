"""What every stage gets: the config, the run folder, the logger, the tokenizer, and checkpoint helpers."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from pipeline import dist
from pipeline.backends import TrainingBackend
from pipeline.config import Config
from pipeline.faults import fault_point
from pipeline.logger import Logger
from pipeline.models import load_tokenizer, resolve_model_path
from pipeline.state import RunDir, StageState, atomic_dir


@dataclass
class Context:
    cfg: Config
    rd: RunDir
    log: Logger

    @cached_property
    def base_model(self) -> Path:
        """The starting checkpoint: the built-in tiny model (created once in the run folder) or ``model.path``."""
        if self.cfg.model.path != "tiny":
            return Path(resolve_model_path(self.cfg.model.path))
        path = self.rd.path("base")
        if dist.is_main() and not (path / "config.json").exists():
            from pipeline.tiny.model import create_tiny_checkpoint

            create_tiny_checkpoint(path, self.cfg.model.tiny, seed=self.cfg.run.seed)
        dist.barrier()
        return path

    @cached_property
    def tokenizer(self) -> Any:
        return load_tokenizer(self.cfg.model.tokenizer or self.base_model, self.cfg)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def stage_input(self, stage: str) -> Path:
        """The checkpoint a stage starts from: the newest finished output of an earlier stage, else the base model."""
        order = ["sft", "rl"]
        for prev in reversed(order[: order.index(stage)] if stage in order else order):
            st = self.rd.state(prev)
            if st.status == "done" and st.output:
                return self.rd.path(st.output)
        return self.base_model

    def begin_stage(self, backend: TrainingBackend, st: StageState, unit: str) -> None:
        """Resume ``backend`` from the stage's last checkpoint, if any, and mark the stage running."""
        if st.checkpoint:
            backend.load(self.rd.path(st.checkpoint))
            self.log.print(f"[{st.name}] resumed from {st.checkpoint} ({unit} {st.step})")
        st.status = "running"
        if dist.is_main():
            self.rd.save_state(st)

    def save_checkpoint(self, backend: TrainingBackend, st: StageState, step: int, keep: int = 2) -> None:
        """Write ``<stage>/checkpoints/step_N`` atomically on every rank, then point the stage state at it."""
        folder = self.rd.path(st.name, "checkpoints")
        target = folder / f"step_{step:06d}"
        self._atomic_collective(target, backend.save)
        st.step, st.checkpoint = step, str(target.relative_to(self.rd.root))
        if dist.is_main():
            self.rd.save_state(st)
            self.rd.prune_checkpoints(folder, keep=keep, protect=st.checkpoint)
        dist.barrier()

    def export(self, backend: TrainingBackend, name: str) -> Path:
        """Export the current weights as a Hugging Face checkpoint (with the tokenizer) to ``<name>`` atomically."""
        target = self.rd.path(name)

        def write(d: Path) -> None:
            backend.export_hf(d)
            if dist.is_main():
                self.tokenizer.save_pretrained(d)

        self._atomic_collective(target, write)
        return target

    def _atomic_collective(self, target: Path, write: Any) -> None:
        tmp = target.with_name(target.name + ".tmp")
        if dist.world_size() == 1:
            with atomic_dir(target) as d:
                write(d)
                fault_point("checkpoint_write")
            return
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        write(tmp)  # every rank writes its part (shards) or takes part in gathers
        fault_point("checkpoint_write")
        dist.barrier()
        if dist.is_main():
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        dist.barrier()
