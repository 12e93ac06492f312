"""SFT warm-up: masked next-token loss on reference solutions, resumable at checkpoint granularity.

The data order is a function of ``(seed, step)`` alone, so a resumed run sees exactly the batches it would have seen.
A step with a non-finite loss or gradient is skipped and logged (``sft/skipped_updates``); too many in a row stop the
stage (``run.max_nonfinite_in_a_row``). A SIGTERM stops it after the step under way, which is checkpointed.
"""
from __future__ import annotations

import time

from tqdm import tqdm

from lampo.record import TokenBatch
from pipeline import dist
from pipeline.backends import backend_class
from pipeline.backends.base import NonFiniteSteps
from pipeline.checks import PipelineError
from pipeline.context import Context
from pipeline.data import batch_indices, format_prompt, load_rows
from pipeline.faults import fault_point


def build_examples(ctx: Context) -> tuple[list[list[int]], list[list[int]]]:
    tok, cfg = ctx.tokenizer, ctx.cfg
    prompts, responses = [], []
    for row in load_rows(cfg, "train"):
        if not row["solution"]:
            continue
        p = format_prompt(row, cfg, tok)
        r = tok(row["solution"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        room = max(1, cfg.sft.max_seq_len - len(p))
        prompts.append(p)
        responses.append(r[:room])
    if not prompts:
        raise PipelineError(f"no training row of {cfg.data.train!r} has a reference solution "
                            f"(field {cfg.data.solution_field!r}); SFT needs them - set data.solution_field or drop "
                            "the sft stage from run.stages")
    return prompts, responses


def run(ctx: Context) -> None:
    cfg, rd, sft = ctx.cfg, ctx.rd, ctx.cfg.sft
    st = rd.state("sft")
    backend = backend_class(cfg.backend.name).from_config(
        cfg, ctx.stage_input("sft"), lr=sft.lr, total_steps=sft.steps, warmup_steps=sft.warmup_steps,
        min_lr_ratio=sft.min_lr_ratio, weight_decay=sft.weight_decay)
    ctx.begin_stage(backend, st)
    prompts, responses = build_examples(ctx)
    bar = tqdm(range(st.step, sft.steps), desc="sft", initial=st.step, total=sft.steps,
               disable=not (cfg.run.progress and dist.is_main()))
    t0 = time.perf_counter()
    skipped = 0  # steps skipped for a non-finite loss or gradient since the last log line
    for step in bar:
        idx = batch_indices(len(prompts), sft.batch_size, step, cfg.run.seed)
        batch = TokenBatch.from_sequences([prompts[i] for i in idx], [responses[i] for i in idx], ctx.pad_id)
        fault_point("sft_step")
        try:
            m = backend.sft_step(batch)
        except NonFiniteSteps as e:
            raise ctx.nonfinite_stop("sft", e, f"step {step + 1}") from None
        ctx.note_skipped_step(backend, "sft", m, f"step {step + 1}")
        skipped += int(m["skipped_updates"])
        bar.set_postfix(loss=f"{m['loss']:.3f}")
        if (step + 1) % sft.log_every == 0 or step + 1 == sft.steps:
            m["seconds_per_step"] = (time.perf_counter() - t0) / (step + 1 - st.step)
            m["skipped_updates"], skipped = skipped, 0
            ctx.log.scalars("sft", m, step + 1)
        if (step + 1) % sft.checkpoint_every == 0 and step + 1 < sft.steps:
            ctx.save_checkpoint(backend, st, step + 1)
        ctx.preemption_point(backend, st, step + 1)  # a SIGTERM stops here, with a checkpoint
    ctx.finish_stage(st, ctx.export(backend, "sft/final"), step=sft.steps)
    ctx.log.print(f"[sft] done: {st.output}")
