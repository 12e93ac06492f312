"""What every stage gets: the config, the run folder, the logger, the tokenizer, and checkpoint helpers."""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from lampo.seeds import derive_seed
from pipeline import dist, preempt
from pipeline.backends import TrainingBackend
from pipeline.backends.base import NonFiniteSteps
from pipeline.checks import PipelineError
from pipeline.config import Config
from pipeline.faults import fault_point
from pipeline.logger import Logger
from pipeline.models import load_tokenizer, resolve_model_path
from pipeline.stages import STAGES, TRAINING_STAGES
from pipeline.state import (
    RunDir,
    StageState,
    atomic_dir,
    checkpoint_step,
    folder_bytes,
    verify_manifest,
    write_manifest,
)

# The backend's non-finite step counters, saved beside its own files in every checkpoint (covered by the manifest), so
# that a resumed run neither forgets skips in a row (run.max_nonfinite_in_a_row could be evaded by preemption) nor
# restarts the stage's count of skipped updates. A checkpoint without it (older code) resumes with both at 0.
SKIP_COUNTERS = "skip_counters.json"

# Estimated bytes per model parameter of a training checkpoint, for the free-space check before the first one (later
# ones are sized by the previous checkpoint): fp32 weights and AdamW's two fp32 moments (12), plus room for the
# training-dtype copy and the small files.
CHECKPOINT_BYTES_PER_PARAMETER = 16


def parameter_count(model_dir: Path) -> int:
    """Parameters of the Hugging Face checkpoint in ``model_dir``, from its safetensors headers (no tensor is read);
    for ``*.bin`` weights, their size over 2 bytes (16-bit storage: an over-estimate for fp32 files)."""
    from safetensors import safe_open

    n = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            # safe_open has keys() but is not iterable
            n += sum(math.prod(sf.get_slice(k).get_shape()) for k in sf.keys())  # noqa: SIM118
    return n or sum(f.stat().st_size for f in model_dir.glob("*.bin")) // 2


def human_bytes(n: int) -> str:
    """``"1,234,567 bytes (1.2 MiB)"``."""
    v, unit = float(n), ""
    for u in ("KiB", "MiB", "GiB", "TiB"):
        if v < 1024:
            break
        v, unit = v / 1024, u
    return f"{n:,} bytes" + (f" ({v:.1f} {unit})" if unit else "")


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

            create_tiny_checkpoint(path, self.cfg.model.tiny, seed=derive_seed(self.cfg.run.seed, "init"))
        dist.barrier()
        return path

    @cached_property
    def tokenizer(self) -> Any:
        return load_tokenizer(self.cfg.model.tokenizer or self.base_model, self.cfg)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def stage_input(self, stage: str) -> Path:
        """The checkpoint a stage starts from: the newest finished output of an earlier training stage, else the base
        model."""
        order = list(TRAINING_STAGES)
        for prev in reversed(order[: order.index(stage)] if stage in order else order):
            st = self.rd.state(prev)
            if st.status == "done" and st.output:
                return self.rd.path(st.output)
        return self.base_model

    def begin_stage(self, backend: TrainingBackend, st: StageState) -> None:
        """Resume ``backend`` from the stage's newest good checkpoint, if any, and mark the stage running.

        The checkpoint the stage state points at, then the older ones beside it, are checked against their manifests
        (by the main rank, whose choice every rank follows): one that is missing, has no manifest or does not match it
        is reported (naming the file and what is wrong) and skipped for the previous one, and the stage resumes from
        that one's step. With none good, the stage starts over from its input."""
        unit = STAGES[st.name].unit
        if st.checkpoint:
            good = dist.broadcast(self._newest_good_checkpoint(st) if dist.is_main() else None)
            if good is None:
                self.log.print(f"[{st.name}] no usable checkpoint left (see above): the stage starts over from its "
                               f"input {self.stage_input(st.name)} ({unit} 0)")
                st.step, st.checkpoint = 0, None
            else:
                st.step, st.checkpoint = good
                backend.load(self.rd.path(st.checkpoint))
                self._load_skip_counters(backend, self.rd.path(st.checkpoint))
                self.log.print(f"[{st.name}] resumed from {st.checkpoint} ({unit} {st.step})")
        st.status = "running"
        if dist.is_main():
            self.rd.save_state(st)

    def preemption_point(self, backend: TrainingBackend, st: StageState, step: int) -> None:
        """A safe point of a training stage, every rank, once ``step`` steps (its unit: step, iteration) are complete
        and before the next one starts. Returns at once unless a stop was requested on some rank
        (:func:`pipeline.preempt.agreed`: one small collective, none in one process); then writes a checkpoint at
        ``step`` (unless the stage has just written it), records the preemption in the stage state and raises
        :class:`~pipeline.preempt.Preempted`."""
        if not preempt.agreed():
            return
        if not (st.checkpoint and checkpoint_step(st.checkpoint) == step):
            self.save_checkpoint(backend, st, step)
        where = f"at {STAGES[st.name].unit} {step}"
        self.record_preemption(st, where)
        raise preempt.Preempted(st.name, where, st.checkpoint)

    def finish_stage(self, st: StageState, output: Path, step: int | None = None) -> None:
        """Mark the stage done (every rank) with its product ``output`` (a path in the run folder) and, for a training
        stage, its final ``step``; the main rank writes the state file. Later stages and reruns read it from there."""
        st.status, st.output = "done", str(Path(output).relative_to(self.rd.root))
        if step is not None:
            st.step = step
        if dist.is_main():
            self.rd.save_state(st)

    def record_preemption(self, st: StageState, where: str) -> None:
        """Mark the stage preempted in its state file (main rank): the signal, where, when."""
        st.status = "preempted"
        st.extra["preempted"] = {"signal": preempt.signal_name(), "where": where,
                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if dist.is_main():
            self.rd.save_state(st)

    def note_skipped_step(self, backend: TrainingBackend, stage: str, m: dict[str, float], where: str) -> None:
        """Log one line for an optimizer step that was skipped for a non-finite loss or gradient (``m``: its
        metrics, ``skipped_updates`` 1); nothing for an applied one."""
        if m.get("skipped_updates"):
            self.log.print(f"[{stage}] {where}: non-finite loss or gradient (loss {m.get('loss')}, gradient norm "
                           f"{m.get('grad_norm')}): update skipped ({backend.nonfinite_in_a_row} in a row; "
                           f"run.max_nonfinite_in_a_row={self.cfg.run.max_nonfinite_in_a_row} stops the run)")

    def nonfinite_stop(self, stage: str, e: NonFiniteSteps, where: str) -> NonFiniteSteps:
        """The error that stops a stage after too many non-finite steps in a row (``e``, from the backend): where,
        and the checkpoint to resume from (every checkpoint is good: a skipped step changes no weight)."""
        st = self.rd.state(stage)
        unit = STAGES[stage].unit
        resume = (f"The last good checkpoint is {st.checkpoint} ({unit} {st.step}): the same command resumes from it"
                  if st.checkpoint else f"There is no {stage} checkpoint yet: the same command starts the stage over "
                  f"from {self.stage_input(stage)}")
        return NonFiniteSteps(f"[{stage}] stopped at {where}: {e}. {resume}, and would likely meet the same steps "
                              f"again: first lower {stage}.lr (a config change: add --force) or check the data, or "
                              "raise run.max_nonfinite_in_a_row to skip more such steps in a row")

    def _newest_good_checkpoint(self, st: StageState) -> tuple[int, str] | None:
        """``(step, folder relative to the run folder)`` of the newest checkpoint at or before ``st.checkpoint`` that
        matches its manifest; each bad one on the way is logged. Later folders than the stage state's are ignored:
        the state file, written after a checkpoint's rename, is the commit point."""
        current = self.rd.path(st.checkpoint)
        last = checkpoint_step(current)
        candidates = {p.name: p for p in self.rd.checkpoints(current.parent) if checkpoint_step(p) <= last}
        candidates.setdefault(current.name, current)  # a missing folder is reported, not silently passed over
        for p in sorted(candidates.values(), key=checkpoint_step, reverse=True):
            problem = verify_manifest(p)
            rel = str(p.relative_to(self.rd.root))
            if problem is None:
                return checkpoint_step(p), rel
            self.log.print(f"[{st.name}] WARNING: checkpoint {rel} is damaged, skipping it: {problem}")
        return None

    def save_checkpoint(self, backend: TrainingBackend, st: StageState, step: int, keep: int | None = None) -> None:
        """Write ``<stage>/checkpoints/step_N`` atomically on every rank with its manifest (last, by the main rank),
        verify it, point the stage state at it, then remove all but the ``keep`` newest checkpoints (default
        ``run.keep_last_checkpoints``). A checkpoint that does not verify is reported and neither becomes the resume
        point nor lets anything be pruned. Refuses to start (nothing written) without the free disk space it needs."""
        keep = self.cfg.run.keep_last_checkpoints if keep is None else keep
        folder = self.rd.path(st.name, "checkpoints")
        target = folder / f"step_{step:06d}"
        self._check_disk_space(target, st)

        def write(d: Path) -> None:
            backend.save(d)
            if dist.is_main():
                (d / SKIP_COUNTERS).write_text(json.dumps({"nonfinite_in_a_row": backend.nonfinite_in_a_row,
                                                           "skipped_updates": backend.skipped_updates}) + "\n")

        self._atomic_collective(target, write, manifest=True)
        rel = str(target.relative_to(self.rd.root))
        # the file list and sizes: the sha256s were just computed from these very files (re-reading them now would
        # only re-read the page cache, at the cost of hashing the whole checkpoint twice); a resume checks them
        problem = dist.broadcast(verify_manifest(target, full=False) if dist.is_main() else None)
        if problem is not None:
            self.log.print(f"[{st.name}] WARNING: checkpoint {rel} does not match its manifest right after it was "
                           f"written ({problem}); is the storage failing? The stage still resumes from "
                           f"{st.checkpoint or 'its input'}, and no checkpoint is pruned")
            return
        st.step, st.checkpoint = step, rel
        if dist.is_main():
            self.rd.save_state(st)
            self.rd.prune_checkpoints(folder, keep=keep, protect=st.checkpoint)
        dist.barrier()

    @staticmethod
    def _load_skip_counters(backend: TrainingBackend, checkpoint: Path) -> None:
        """Restore the counters :meth:`save_checkpoint` stored (every rank reads the same file)."""
        f = checkpoint / SKIP_COUNTERS
        saved = json.loads(f.read_text()) if f.is_file() else {}
        backend.nonfinite_in_a_row = int(saved.get("nonfinite_in_a_row", 0))
        backend.skipped_updates = int(saved.get("skipped_updates", 0))

    def _check_disk_space(self, target: Path, st: StageState) -> None:
        """Collective: raise :class:`PipelineError` on every rank, before anything is written, when the file system of
        checkpoint folder ``target`` has less free space than the checkpoint is estimated to take: the size of the
        stage's previous checkpoint, or :data:`CHECKPOINT_BYTES_PER_PARAMETER` per model parameter for its first."""
        msg = None
        prev = self.rd.path(st.checkpoint) if st.checkpoint else None
        if prev is not None and not prev.is_dir():
            prev = None
        # on every rank: resolving the stage input may be collective (the tiny base model is created once)
        source = self.stage_input(st.name) if prev is None else None
        if dist.is_main():
            if prev is not None:
                need, basis = folder_bytes(prev), f"the size of the previous checkpoint {prev.name}"
            else:
                n = parameter_count(source)
                need, basis = n * CHECKPOINT_BYTES_PER_PARAMETER, (f"{n:,} parameters x "
                                                                   f"{CHECKPOINT_BYTES_PER_PARAMETER} bytes")
            where = target
            while not where.exists() and where != where.parent:
                where = where.parent
            free = shutil.disk_usage(where).free
            if free < need:
                msg = (f"not enough free disk space to write checkpoint {target.relative_to(self.rd.root)}: it needs "
                       f"about {human_bytes(need)}, {basis}, and only {human_bytes(free)} are free on the file system "
                       f"of {where}; free some space there (a lower run.keep_last_checkpoints keeps fewer "
                       "checkpoints) and run the same command again to resume")
        msg = dist.broadcast(msg)
        if msg is not None:
            raise PipelineError(msg)

    def export(self, backend: TrainingBackend, name: str) -> Path:
        """Export the current weights as a Hugging Face checkpoint (with the tokenizer) to ``<name>`` atomically."""
        target = self.rd.path(name)

        def write(d: Path) -> None:
            backend.export_hf(d)
            if dist.is_main():
                self.tokenizer.save_pretrained(d)

        self._atomic_collective(target, write)
        return target

    def _atomic_collective(self, target: Path, write: Any, manifest: bool = False) -> None:
        """Every rank runs ``write(folder)`` into ``target.tmp``, which the main rank renames to ``target`` once all
        are done; with ``manifest``, the main rank first adds ``MANIFEST.json``, last, after every rank's files."""
        tmp = target.with_name(target.name + ".tmp")
        if dist.world_size() == 1:
            with atomic_dir(target) as d:
                write(d)
                fault_point("checkpoint_write")
                if manifest:
                    write_manifest(d)
            return
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        write(tmp)  # every rank writes its part (shards) or takes part in gathers
        fault_point("checkpoint_write")
        dist.barrier()  # every rank's files are complete
        if dist.is_main():
            if manifest:
                write_manifest(tmp)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        dist.barrier()
