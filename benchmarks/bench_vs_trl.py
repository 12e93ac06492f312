"""Seconds per RL iteration on CPU: our pipeline's RL stage against TRL's GRPOTrainer, same tiny model and task.

Usage (from the repository root; TRL pins in benchmarks/requirements-bench.txt)::

    python benchmarks/bench_vs_trl.py [--iterations 10] [--warmup 2] [--repeats 2] [--threads 1] [--sides ours,trl]
                                      [--eos] [--token-tolerance 0.03]

One iteration = 16 tiny-task prompts x 8 sampled responses (128 completions of 48 new tokens, temperature 1.0; EOS is
suppressed on both sides, HF's ``min_new_tokens``, so both generate exactly the same number of tokens; ``--eos`` lets
responses end at EOS, and then the sides' token counts usually differ), scored by the project's reward
(``configs/tiny.yaml``'s ``rl.reward``, through ``lampo.rewards.build_reward``), then one pass of optimizer steps over
mini-batches of 64 sequences (micro-batch 64). These shape settings are pinned here, the rest comes from tiny.yaml.

* ours: the functions of the RL stage (``generate`` -> ``score`` -> ``advantages`` -> ``update`` ->
  ``sync_weights``) on the HF rollout engine and the torch backend, configured from ``configs/tiny.yaml``, built as
  ``pipeline.stages.rl.run`` builds them (the engine samples from the trainer's model: ``make_engine``).
* TRL: ``GRPOTrainer`` on the same checkpoint and the same prompts in the same order, configured to do the same work:
  ``per_device_train_batch_size=64`` and ``steps_per_generation=2`` (one generation of 128 completions feeds two
  optimizer steps of 64, as ours; TRL then recomputes old log-probs with an extra forward pass, as ours does),
  ``beta=0`` (no reference model), fp32, no gradient checkpointing (TRL's defaults are bf16 and checkpointing on),
  no vLLM, no logging or saving. One iteration = two trainer steps.

Each side runs in its own child process (so peak RSS is its own), ``--repeats`` times, interleaved
(ours, TRL, ours, TRL, ...); the table gives the median over repeats of each run's mean seconds per timed iteration,
split into rollout (generation + decoding), scoring (reward), training (everything else: old log-probs, advantages,
optimizer steps, and for ours the weight sync into the rollout engine), plus each run's fastest iteration and its CPU
seconds per iteration (``time.process_time`` of the run's own process; the math reward's checker subprocess is not
counted on either side).

Equal work is checked, not assumed: every timed iteration of each run records its sequences, generated tokens and
optimizer steps (a global ``torch.optim`` step hook counts the steps on both sides); the TRL / ours ratios are printed
only if both sides generated the same number of sequences, the same number of tokens within ``--token-tolerance``
(default 3%) and took the same number of optimizer steps per iteration; otherwise the table is printed without them,
with what differs, and the exit status is 1.

On a shared machine the CPU seconds are the steadier figure: wall time stretches with other people's load, CPU time
much less. The load average is printed before every child, so compare sides run close together, not across sessions.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY_YAML = ROOT / "configs" / "tiny.yaml"
PROMPTS, SAMPLES, MAX_NEW_TOKENS = 16, 8, 48
MINI_BATCH, TEMPERATURE = 64, 1.0  # 2 optimizer steps of 64 sequences per iteration
# what each run records per timed iteration: wall seconds, CPU seconds (suffix _cpu), generated tokens
PHASES = ("rollout", "scoring", "training", "total", "rollout_cpu", "scoring_cpu", "training_cpu", "cpu", "tokens",
          "sequences", "opt_steps")


def count_optimizer_steps() -> list[int]:
    """A one-element counter of every ``torch.optim`` optimizer step taken in this process from now on."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    box = [0]

    def hook(*_):
        box[0] += 1

    register_optimizer_step_post_hook(hook)
    return box


def bench_config(model_dir: str, run_dir: str):
    """The tiny pipeline's config with the benchmark's shape pinned (so a later edit of tiny.yaml cannot skew it)."""
    from pipeline.config import load_config
    from pipeline.validate import validate_names

    return validate_names(load_config(
        TINY_YAML, [f"model.path={model_dir}", f"run.dir={run_dir}", "run.progress=false",
                    f"rl.prompts_per_iteration={PROMPTS}", f"rollout.n_samples={SAMPLES}",
                    f"rollout.max_new_tokens={MAX_NEW_TOKENS}", f"rollout.batch_size={PROMPTS * SAMPLES}",
                    f"rollout.temperature={TEMPERATURE}", f"rl.mini_batch_size={MINI_BATCH}",
                    f"backend.micro_batch_size={MINI_BATCH}"]))


def iteration_rows(cfg, total: int) -> list[list[dict]]:
    """The prompts of iterations 0..total-1, chosen exactly as ``pipeline.stages.rl.run`` chooses them."""
    from evaluation.tiny_task import make_split
    from pipeline.data import batch_indices

    rows = make_split("train", cfg.data.tiny_train_size, seed=cfg.run.seed)
    return [[rows[i] for i in batch_indices(len(rows), cfg.rl.prompts_per_iteration, it, cfg.run.seed)]
            for it in range(total)]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def rss_mib() -> float:
    """This process's resident memory now (Linux ``/proc/self/status``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --------------------------------------------------------------------------------------------------------------------
# ours


def run_ours(model_dir: str, work: str, warmup: int, iterations: int, min_new_tokens: int) -> dict:
    import dataclasses

    import torch

    from lampo.rewards import build_reward
    from pipeline.backends import backend_class
    from pipeline.context import Context
    from pipeline.logger import Logger
    from pipeline.rollout import collect
    from pipeline.rollout.groups import RolloutGroups
    from pipeline.stages import rl as rl_stage
    from pipeline.state import RunDir

    cfg = bench_config(model_dir, work)
    ctx = Context(cfg, RunDir(work), Logger(Path(work) / "tensorboard"))
    rl = cfg.rl
    steps_per_iter = rl.algorithm.ppo_epochs * -(-rl.prompts_per_iteration * cfg.rollout.n_samples
                                                 // rl.mini_batch_size)
    total = warmup + iterations
    backend = backend_class(cfg.backend.name)(
        cfg, model_dir, lr=rl.lr, total_steps=total * steps_per_iter, warmup_steps=rl.warmup_steps,
        min_lr_ratio=rl.min_lr_ratio, weight_decay=rl.weight_decay, reference=rl.algorithm.kl_coef > 0)
    engine = rl_stage.make_engine(cfg, model_dir, ctx.tokenizer, backend)
    if min_new_tokens:  # the RL stage's SamplingParams, with EOS suppressed until min_new_tokens
        sample = engine.generate
        engine.generate = lambda p, params: sample(p, dataclasses.replace(params, min_new_tokens=min_new_tokens))
    steps = count_optimizer_steps()
    reward_fn = build_reward(rl.reward.outcome, rl.reward.dense, rl.reward.alpha, timeout_s=rl.reward.timeout_s,
                             model_path=rl.reward.embedding_model)
    prompts = iteration_rows(cfg, total)
    rec: dict[str, list[float]] = {k: [] for k in PHASES}
    setup_rss = rss_mib()
    for it in range(total):
        c0, t0, s0 = time.process_time(), time.perf_counter(), steps[0]
        batch = collect.generate(ctx, engine, prompts[it], it)
        t1, c1 = time.perf_counter(), time.process_time()
        collect.score(reward_fn, batch)
        t2, c2 = time.perf_counter(), time.process_time()
        tokens, _ = rl_stage.advantages(ctx, backend, batch)
        rl_stage.update(ctx, backend, tokens, it)
        rl_stage.sync_weights(backend, engine, RolloutGroups(world_size=1, rank=0, size=1))
        t3, c3 = time.perf_counter(), time.process_time()
        if it >= warmup:
            for k, v in (("rollout", t1 - t0), ("scoring", t2 - t1), ("training", t3 - t2), ("total", t3 - t0),
                         ("rollout_cpu", c1 - c0), ("scoring_cpu", c2 - c1), ("training_cpu", c3 - c2),
                         ("cpu", c3 - c0), ("tokens", sum(len(s.response_ids) for s in batch.samples)),
                         ("sequences", len(batch)), ("opt_steps", steps[0] - s0)):
                rec[k].append(v)
    ctx.log.close()
    return {"side": "ours", "threads": torch.get_num_threads(), "completions": len(batch), "setup_rss_mib": setup_rss,
            **rec}


# --------------------------------------------------------------------------------------------------------------------
# TRL


def run_trl(model_dir: str, work: str, warmup: int, iterations: int, min_new_tokens: int) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lampo.rewards import build_reward
    from pipeline.models import load_hf_model, load_tokenizer

    cfg = bench_config(model_dir, work)
    rl, algo = cfg.rl, cfg.rl.algorithm
    total = warmup + iterations
    steps_per_gen = -(-PROMPTS * SAMPLES // rl.mini_batch_size)  # optimizer steps per generation, as ours
    rows = [r for batch in iteration_rows(cfg, total) for r in batch]  # ours' prompts, in ours' order
    dataset = Dataset.from_list([{"prompt": cfg.data.prompt_template.format(problem=r["problem"]),
                                  "answer": r["answer"], "solution": r["solution"]} for r in rows])
    composite = build_reward(rl.reward.outcome, rl.reward.dense, rl.reward.alpha, timeout_s=rl.reward.timeout_s,
                             model_path=rl.reward.embedding_model)

    def lampo_reward(completions, answer, solution, **_):
        return composite(list(completions), answers=list(answer), references=list(solution)).total

    args = GRPOConfig(
        output_dir=str(Path(work) / "trl"), use_cpu=True, use_vllm=False, report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, log_completions=False, seed=cfg.run.seed,
        max_steps=total * steps_per_gen, per_device_train_batch_size=rl.mini_batch_size, gradient_accumulation_steps=1,
        steps_per_generation=steps_per_gen, num_generations=SAMPLES, num_iterations=algo.ppo_epochs,
        shuffle_dataset=False, max_completion_length=MAX_NEW_TOKENS, temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p, top_k=0, beta=0.0, epsilon=algo.clip_low, epsilon_high=algo.clip_high,
        loss_type="dapo",  # token-mean over the optimizer step's batch, as our loss_agg=token-mean
        learning_rate=rl.lr, lr_scheduler_type="constant", weight_decay=rl.weight_decay,
        max_grad_norm=cfg.backend.grad_clip, bf16=False, gradient_checkpointing=False, dataloader_num_workers=0,
        generation_kwargs={"min_new_tokens": min_new_tokens} if min_new_tokens else None)

    class Timed(GRPOTrainer):
        """GRPOTrainer with the generation and the reward timed (one entry per generation, i.e. per iteration)."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.gen_s: list[tuple[float, float]] = []  # (wall s, CPU s) per call
            self.reward_s: list[tuple[float, float]] = []
            self.tokens: list[int] = []
            self.sequences: list[int] = []

        def _generate(self, prompts):
            t, c = time.perf_counter(), time.process_time()
            out = super()._generate(prompts)
            self.gen_s.append((time.perf_counter() - t, time.process_time() - c))
            self.tokens.append(sum(len(ids) for ids in out[1]))  # out[1]: completion ids, one list per completion
            self.sequences.append(len(out[1]))
            return out

        def _calculate_rewards(self, *a, **kw):
            t, c = time.perf_counter(), time.process_time()
            out = super()._calculate_rewards(*a, **kw)
            self.reward_s.append((time.perf_counter() - t, time.process_time() - c))
            return out

    class StepClock(TrainerCallback):
        """Wall time, CPU time and optimizer steps so far at the start of training and at the end of every trainer
        step; RSS at the start."""

        def __init__(self):
            self.ends: list[tuple[float, float, int]] = []
            self.setup_rss = float("nan")

        def on_train_begin(self, *_, **__):
            self.setup_rss = rss_mib()
            self.ends.append((time.perf_counter(), time.process_time(), steps[0]))

        def on_step_end(self, *_, **__):
            self.ends.append((time.perf_counter(), time.process_time(), steps[0]))

    steps = count_optimizer_steps()
    clock = StepClock()
    tok = load_tokenizer(model_dir, cfg)
    model = load_hf_model(model_dir, cfg, torch.device("cpu"))
    trainer = Timed(model=model, reward_funcs=lampo_reward, args=args, train_dataset=dataset, processing_class=tok,
                    callbacks=[clock])
    trainer.train()
    ends = clock.ends[::steps_per_gen]  # start, then the end of every iteration
    per_iter = [b[0] - a[0] for a, b in zip(ends, ends[1:])]
    cpu = [b[1] - a[1] for a, b in zip(ends, ends[1:])]
    opt_steps = [b[2] - a[2] for a, b in zip(ends, ends[1:])]
    if len(per_iter) != total or len(trainer.gen_s) != total:
        raise RuntimeError(f"TRL ran {len(per_iter)} iterations with {len(trainer.gen_s)} generations; expected "
                           f"{total} of each (check steps_per_generation and max_steps)")
    sl = slice(warmup, total)
    gen, rew = trainer.gen_s, trainer.reward_s
    return {"side": "trl", "threads": torch.get_num_threads(), "completions": PROMPTS * SAMPLES,
            "trl_version": trl.__version__, "total": per_iter[sl], "cpu": cpu[sl], "tokens": trainer.tokens[sl],
            "sequences": trainer.sequences[sl], "opt_steps": opt_steps[sl],
            "rollout": [g[0] for g in gen[sl]], "scoring": [r[0] for r in rew[sl]],
            "training": [t - g[0] - r[0] for t, g, r in zip(per_iter[sl], gen[sl], rew[sl])],
            "rollout_cpu": [g[1] for g in gen[sl]], "scoring_cpu": [r[1] for r in rew[sl]],
            "training_cpu": [t - g[1] - r[1] for t, g, r in zip(cpu[sl], gen[sl], rew[sl])],
            "setup_rss_mib": clock.setup_rss}


# --------------------------------------------------------------------------------------------------------------------
# driver


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix=f"bench_{args.side}_") as work:
        fn = run_ours if args.side == "ours" else run_trl
        res = fn(args.model_dir, work, args.warmup, args.iterations, 0 if args.eos else MAX_NEW_TOKENS)
    res["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(res), flush=True)


def summarise(res: dict) -> dict:
    n = len(res["total"])
    mean = {k: sum(res[k]) / n for k in PHASES}
    return {**mean, "fastest": min(res["total"]), "completions_per_s": res["completions"] / mean["total"],
            "tokens_per_s": mean["tokens"] / mean["rollout"], "peak_rss_mib": res["peak_rss_mib"],
            "setup_rss_mib": res["setup_rss_mib"], "threads": res["threads"],
            "work": sorted({(q, s) for q, s in zip(res["sequences"], res["opt_steps"])})}


def work_differences(med: dict[str, dict], runs: dict[str, list[dict]], tolerance: float) -> list[str]:
    """What differs between the two sides' work per iteration (empty: equal work)."""
    out = []
    for what, i in (("sequences", 0), ("optimizer steps", 1)):
        got = {side: sorted({w[i] for r in rs for w in r["work"]}) for side, rs in runs.items()}
        if len(got["ours"]) != 1 or got["ours"] != got["trl"]:
            out.append(f"{what} per iteration: ours {got['ours']}, TRL {got['trl']}")
    ours, trl = med["ours"]["tokens"], med["trl"]["tokens"]
    if abs(trl - ours) > tolerance * max(ours, trl):
        out.append(f"generated tokens per iteration: ours {ours:,.0f}, TRL {trl:,.0f} (TRL / ours = {trl / ours:.2f}, "
                   f"more than {tolerance:.0%} apart)")
    return out


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min) / {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=10, help="timed iterations per run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    ap.add_argument("--repeats", type=int, default=2, help="runs per side, interleaved; the table shows the median")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads in each run")
    ap.add_argument("--sides", default="ours,trl", help="comma-separated: ours, trl")
    ap.add_argument("--eos", action="store_true",
                    help="let EOS end responses (natural lengths; the sides then usually generate different token "
                         "counts and no ratio is printed); default: EOS suppressed, every response 48 tokens")
    ap.add_argument("--token-tolerance", type=float, default=0.03,
                    help="largest relative difference in generated tokens per iteration that still counts as "
                         "equal work")
    ap.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)  # internal: one child run
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.iterations < 1 or args.warmup < 0 or args.repeats < 1 or args.threads < 1:
        ap.error("--iterations, --repeats and --threads must be >= 1 and --warmup >= 0")
    if args.side:
        return child(args)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not sides or set(sides) - {"ours", "trl"}:
        ap.error(f"--sides {args.sides!r}: use a comma-separated subset of ours,trl")

    import torch
    import transformers

    from pipeline.config import TinyModelConfig
    from pipeline.tiny.model import create_tiny_checkpoint

    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = None
        if "trl" in sides:
            print("TRL is not installed (pip install -r benchmarks/requirements-bench.txt --no-deps); "
                  "running ours only", flush=True)
            sides.remove("trl")
    print(f"{PROMPTS} prompts x {SAMPLES} samples, max_new_tokens {MAX_NEW_TOKENS} "
          f"({'EOS ends responses' if args.eos else 'EOS suppressed: full length'}); {args.warmup} warm-up + "
          f"{args.iterations} timed iterations per run, {args.repeats} run(s) per side interleaved, "
          f"{args.threads} torch thread(s); torch {torch.__version__}, transformers {transformers.__version__}, "
          f"trl {trl_version}; {platform.processor() or platform.machine()}", flush=True)

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory(prefix="bench_vs_trl_") as tmp:
        model_dir = str(create_tiny_checkpoint(Path(tmp) / "tiny", TinyModelConfig(), seed=1234))
        for rep in range(args.repeats):
            for side in sides:
                print(f"[run {rep + 1}/{args.repeats} {side}] load average {load()}", flush=True)
                cmd = [sys.executable, __file__, "--side", side, "--model-dir", model_dir, "--iterations",
                       str(args.iterations), "--warmup", str(args.warmup), "--threads", str(args.threads)]
                cmd += ["--eos"] if args.eos else []
                t = time.perf_counter()
                proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not lines:
                    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
                    raise SystemExit(f"the {side} run failed (exit {proc.returncode}); its output is above")
                s = summarise(json.loads(lines[-1][len("RESULT "):]))
                runs[side].append(s)
                print(f"    {side}: {s['total']:.2f} s/iteration, CPU {s['cpu']:.2f} s (rollout {s['rollout']:.2f}, "
                      f"scoring {s['scoring']:.2f}, training {s['training']:.2f}), peak RSS "
                      f"{s['peak_rss_mib']:.0f} MiB, {s['threads']} thread(s), child wall "
                      f"{time.perf_counter() - t:.0f} s", flush=True)
    print(f"load average at the end {load()}")

    med = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "work"} for side, rs in runs.items()}
    differs = work_differences(med, runs, args.token_tolerance) if len(sides) == 2 else []
    ratio = len(sides) == 2 and not differs
    rows = [("s / iteration (wall, mean)", "total", 2), ("  rollout s", "rollout", 2), ("  scoring s", "scoring", 3),
            ("  training s", "training", 2), ("fastest iteration s (wall)", "fastest", 2),
            ("CPU s / iteration (this process)", "cpu", 2), ("  rollout CPU s", "rollout_cpu", 2),
            ("  scoring CPU s", "scoring_cpu", 3), ("  training CPU s", "training_cpu", 2),
            ("completions / s", "completions_per_s", 1),
            ("sequences / iteration", "sequences", 0), ("optimizer steps / iteration", "opt_steps", 0),
            ("generated tokens / iteration", "tokens", 0), ("rollout tokens / s", "tokens_per_s", 0),
            ("RSS after setup MiB", "setup_rss_mib", 0), ("peak RSS MiB", "peak_rss_mib", 0)]
    head = "| metric (median of runs) | " + " | ".join(sides) + (" | TRL / ours |" if ratio else " |")
    print("\n" + head + "\n|" + " --- |" + " ---: |" * (len(sides) + ratio))
    for label, key, digits in rows:
        cells = [f"{med[s][key]:,.{digits}f}" for s in sides]
        if ratio:
            cells.append(f"{med['trl'][key] / med['ours'][key]:.2f}x" if med["ours"][key] else "n/a")
        print(f"| {label} | " + " | ".join(cells) + " |")
    if differs:
        raise SystemExit("\nNo ratio: the two sides did not do the same work per iteration:\n  " + "\n  ".join(differs))
    if ratio:
        print(f"\nSame work per iteration (sequences, optimizer steps, tokens within {args.token_tolerance:.0%}). "
              f"TRL takes {med['trl']['total'] / med['ours']['total']:.2f}x our wall time and "
              f"{med['trl']['cpu'] / med['ours']['cpu']:.2f}x our CPU time per iteration "
              f"(ours {med['ours']['cpu']:.2f} CPU s, TRL {med['trl']['cpu']:.2f} CPU s).")


if __name__ == "__main__":
    main()
