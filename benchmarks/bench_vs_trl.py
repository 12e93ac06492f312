"""Seconds per RL iteration on CPU: our pipeline's RL stage against TRL's GRPOTrainer, same model and task.

Usage (from the repository root; TRL pins in benchmarks/requirements-bench.txt)::

    python benchmarks/bench_vs_trl.py [--model tiny|large] [--iterations N] [--warmup N] [--repeats 2] [--threads 1]
                                      [--sides ours,trl[,ours-separate]] [--eos] [--token-tolerance 0.03]

Models (both sides load the same checkpoint, written once per benchmark run):

* ``tiny`` (default): the pipeline's tiny checkpoint (``create_tiny_checkpoint``, default ``TinyModelConfig``, seed
  1234: 4 layers x 128, vocabulary 261, 0.8M parameters). One iteration is the shape of ``configs/tiny.yaml``: 32
  prompts x 8 samples (256 completions), one optimizer step on all 256 (``rl.mini_batch_size=256``) in two
  micro-batches of 128 (``backend.micro_batch_size=128``). Default 2 warm-up + 10 timed iterations per run.
* ``large``: a random Qwen2-shaped model built from a config (8 layers x 512, 8 query / 2 key-value heads of 64, SwiGLU
  2,816 wide, vocabulary 32,768, tied embeddings, RoPE theta 1e6: 57M parameters; the tiny tokenizer, whose 261 ids
  are its first ones: sampled ids past them decode to nothing, the same on both sides). 8 prompts x 8 samples (64
  completions), one optimizer step in two micro-batches of 32. Default 1 warm-up + 3 timed iterations per run.

Both: at most 48 new tokens, temperature 1.0, top-p 1, no top-k; EOS suppressed on both sides (HF's
``min_new_tokens``), so both generate exactly the same number of tokens (``--eos`` lets responses end at EOS, and then
the sides' token counts usually differ); the project's reward (``configs/tiny.yaml``'s ``rl.reward``, through
``lampo.rewards.build_reward``); AdamW, constant LR, grad clip 1, clip 0.2/0.28, token-mean loss, no KL. The shape is
pinned here, the rest comes from tiny.yaml.

* ours: the functions of the RL stage (``generate`` -> ``score`` -> ``advantages`` -> ``update`` ->
  ``sync_weights``) on the HF rollout engine and the torch backend, configured from ``configs/tiny.yaml``, built as
  ``pipeline.stages.rl.run`` builds them (the engine samples from the trainer's model: ``make_engine``). One
  optimizer step per iteration: the old log-probs come from that step's own forward
  (``backend.old_logprobs_from_step=auto``); ``ours-separate`` is the same with ``never`` (a separate no-grad forward
  first, as before issue 13), for a side-by-side measure of that change.
* TRL: ``GRPOTrainer`` on the same checkpoint and the same prompts in the same order, configured to do the same work:
  ``per_device_train_batch_size`` = our micro-batch, ``gradient_accumulation_steps`` = micro-batches per optimizer
  step, ``steps_per_generation`` = micro-batches per generation, so one generation feeds one optimizer step, as ours.
  TRL 1.16.0 then skips its own old-log-prob forward: ``GRPOTrainer._generate_and_score_completions`` runs it only
  when ``gradient_accumulation_steps % (steps_per_generation * num_iterations) != 0`` (or with vLLM importance
  sampling), and here that is ``2 % (2 * 1) == 0``: it uses the detached current log-probs, as ours does.
  ``beta=0`` (no reference model), fp32, no gradient checkpointing (TRL's defaults are bf16 and checkpointing on),
  no vLLM, no logging or saving. One iteration = one trainer step.

Each side runs in its own child process (so peak RSS is its own), ``--repeats`` times, interleaved
(ours, TRL, ours, TRL, ...); the table gives the median over repeats of each run's mean seconds per timed iteration,
split into rollout (generation + decoding), scoring (reward), training (everything else: for ours ``advantages``
(old log-probs when separate, scores, advantages) and ``update`` (forward, backward, optimizer step; with the fused
old log-probs also the scores and advantages) and the weight sync into the rollout engine, a no-op here; for TRL the
rest of its trainer step), plus each run's fastest iteration and its CPU seconds per iteration
(``time.process_time`` of the run's own process; the math reward's checker subprocess is not counted on either side).

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
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY_YAML = ROOT / "configs" / "tiny.yaml"
SAMPLES, MAX_NEW_TOKENS, TEMPERATURE = 8, 48, 1.0


class Shape(NamedTuple):
    """One iteration: ``prompts`` x SAMPLES completions, one optimizer step on all of them in micro-batches of
    ``micro``; ``warmup`` / ``iterations``: the defaults of a run."""
    prompts: int
    micro: int
    warmup: int
    iterations: int


SHAPES = {"tiny": Shape(32, 128, 2, 10), "large": Shape(8, 32, 1, 3)}  # tiny: configs/tiny.yaml's shape
# the large model: Qwen2-shaped, 8 layers x 512, vocabulary 32k
LARGE = dict(vocab_size=32_768, hidden_size=512, intermediate_size=2_816, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=4_096, rope_theta=1e6, tie_word_embeddings=True)
# what each run records per timed iteration: wall seconds, CPU seconds (suffix _cpu), generated tokens; ours also
# splits training into advantages() and update() (CPU seconds)
PHASES = ("rollout", "scoring", "training", "total", "rollout_cpu", "scoring_cpu", "training_cpu", "cpu", "tokens",
          "sequences", "opt_steps")
OURS_PHASES = ("advantages_cpu", "update_cpu")


def count_optimizer_steps() -> list[int]:
    """A one-element counter of every ``torch.optim`` optimizer step taken in this process from now on."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    box = [0]

    def hook(*_):
        box[0] += 1

    register_optimizer_step_post_hook(hook)
    return box


def bench_config(model_dir: str, run_dir: str, shape: Shape, extra: tuple[str, ...] = ()):
    """The tiny pipeline's config with the benchmark's shape pinned (so a later edit of tiny.yaml cannot skew it)."""
    from pipeline.config import load_config
    from pipeline.validate import validate_names

    n = shape.prompts * SAMPLES
    return validate_names(load_config(
        TINY_YAML, [f"model.path={model_dir}", f"run.dir={run_dir}", "run.progress=false",
                    f"rl.prompts_per_iteration={shape.prompts}", f"rollout.n_samples={SAMPLES}",
                    f"rollout.max_new_tokens={MAX_NEW_TOKENS}", f"rollout.batch_size={n}",
                    f"rollout.temperature={TEMPERATURE}", f"rl.mini_batch_size={n}", "rl.algorithm.ppo_epochs=1",
                    "rl.algorithm.kl_coef=0", "rl.algorithm.dynamic_sampling=false",
                    f"backend.micro_batch_size={shape.micro}", *extra]))


def create_large_checkpoint(path: Path) -> Path:
    """A random Qwen2-shaped model (:data:`LARGE`) with the tiny tokenizer, written as a Hugging Face checkpoint."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from pipeline.tiny.tokenizer import build_tokenizer

    tok = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = Qwen2ForCausalLM(Qwen2Config(**LARGE, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                             eos_token_id=tok.eos_token_id, use_sliding_window=False))
    model.to(torch.float32).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


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


def run_ours(model_dir: str, work: str, shape: Shape, warmup: int, iterations: int, min_new_tokens: int,
             separate: bool = False) -> dict:
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

    cfg = bench_config(model_dir, work, shape, ("backend.old_logprobs_from_step=never",) if separate else ())
    ctx = Context(cfg, RunDir(work), Logger(Path(work) / "tensorboard"))
    rl = cfg.rl
    steps_per_iter = rl.algorithm.ppo_epochs * -(-rl.prompts_per_iteration * cfg.rollout.n_samples
                                                 // rl.mini_batch_size)
    total = warmup + iterations
    backend = backend_class(cfg.backend.name).from_config(
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
    rec: dict[str, list[float]] = {k: [] for k in PHASES + OURS_PHASES}
    setup_rss = rss_mib()
    for it in range(total):
        c0, t0, s0 = time.process_time(), time.perf_counter(), steps[0]
        batch = collect.generate(ctx, engine, prompts[it], it)
        t1, c1 = time.perf_counter(), time.process_time()
        collect.score(reward_fn, batch)
        t2, c2 = time.perf_counter(), time.process_time()
        tokens, _ = rl_stage.advantages(ctx, backend, batch)
        ca = time.process_time()
        m = rl_stage.update(ctx, backend, tokens, it)
        cu = time.process_time()
        rl_stage.sync_weights(backend, engine, RolloutGroups(world_size=1, rank=0, size=1))
        t3, c3 = time.perf_counter(), time.process_time()
        if m.get("skipped_updates"):
            raise RuntimeError(f"iteration {it}: the optimizer step was skipped (non-finite): {m}")
        if it >= warmup:
            for k, v in (("rollout", t1 - t0), ("scoring", t2 - t1), ("training", t3 - t2), ("total", t3 - t0),
                         ("rollout_cpu", c1 - c0), ("scoring_cpu", c2 - c1), ("training_cpu", c3 - c2),
                         ("cpu", c3 - c0), ("tokens", sum(len(s.response_ids) for s in batch.samples)),
                         ("sequences", len(batch)), ("opt_steps", steps[0] - s0), ("advantages_cpu", ca - c2),
                         ("update_cpu", cu - ca)):
                rec[k].append(v)
    ctx.log.close()
    return {"side": "ours-separate" if separate else "ours", "threads": torch.get_num_threads(),
            "completions": len(batch), "setup_rss_mib": setup_rss,
            **rec}


# --------------------------------------------------------------------------------------------------------------------
# TRL


def run_trl(model_dir: str, work: str, shape: Shape, warmup: int, iterations: int, min_new_tokens: int) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lampo.rewards import build_reward
    from pipeline.models import load_hf_model, load_tokenizer

    cfg = bench_config(model_dir, work, shape)
    rl, algo = cfg.rl, cfg.rl.algorithm
    total = warmup + iterations
    n = shape.prompts * SAMPLES
    # micro-batches per optimizer step and per generation (one optimizer step per generation, as ours)
    accumulate = generation = -(-n // shape.micro)
    if rl.mini_batch_size != n or n % shape.micro:
        raise ValueError(f"the benchmark's shape is one optimizer step of {n} in micro-batches of {shape.micro}")
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
        max_steps=total, per_device_train_batch_size=shape.micro, gradient_accumulation_steps=accumulate,
        steps_per_generation=generation, num_generations=SAMPLES, num_iterations=algo.ppo_epochs,
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

        old_logprob_forwards = 0  # no-grad forwards of the policy outside the training step (old log-probs)

        def _get_per_token_logps_and_entropies(self, *a, **kw):
            if not torch.is_grad_enabled():
                self.old_logprob_forwards += 1
            return super()._get_per_token_logps_and_entropies(*a, **kw)

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
    model = load_hf_model(model_dir, cfg.model, torch.device("cpu"))
    trainer = Timed(model=model, reward_funcs=lampo_reward, args=args, train_dataset=dataset, processing_class=tok,
                    callbacks=[clock])
    trainer.train()
    ends = clock.ends  # start, then the end of every trainer step (= optimizer step = iteration)
    per_iter = [b[0] - a[0] for a, b in zip(ends, ends[1:])]
    cpu = [b[1] - a[1] for a, b in zip(ends, ends[1:])]
    opt_steps = [b[2] - a[2] for a, b in zip(ends, ends[1:])]
    if len(per_iter) != total or len(trainer.gen_s) != total:
        raise RuntimeError(f"TRL ran {len(per_iter)} iterations with {len(trainer.gen_s)} generations; expected "
                           f"{total} of each (check steps_per_generation and max_steps)")
    sl = slice(warmup, total)
    gen, rew = trainer.gen_s, trainer.reward_s
    return {"side": "trl", "threads": torch.get_num_threads(), "completions": n,
            "trl_version": trl.__version__, "total": per_iter[sl], "cpu": cpu[sl], "tokens": trainer.tokens[sl],
            "sequences": trainer.sequences[sl], "opt_steps": opt_steps[sl],
            "rollout": [g[0] for g in gen[sl]], "scoring": [r[0] for r in rew[sl]],
            "training": [t - g[0] - r[0] for t, g, r in zip(per_iter[sl], gen[sl], rew[sl])],
            "rollout_cpu": [g[1] for g in gen[sl]], "scoring_cpu": [r[1] for r in rew[sl]],
            "training_cpu": [t - g[1] - r[1] for t, g, r in zip(cpu[sl], gen[sl], rew[sl])],
            "setup_rss_mib": clock.setup_rss, "old_logprob_forwards": trainer.old_logprob_forwards / total}


# --------------------------------------------------------------------------------------------------------------------
# driver


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    shape = SHAPES[args.model]
    with tempfile.TemporaryDirectory(prefix=f"bench_{args.side}_") as work:
        run = (run_trl if args.side == "trl" else
               lambda *a: run_ours(*a, separate=args.side == "ours-separate"))
        res = run(args.model_dir, work, shape, args.warmup, args.iterations, 0 if args.eos else MAX_NEW_TOKENS)
    res["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(res), flush=True)


def summarise(res: dict) -> dict:
    n = len(res["total"])
    mean = {k: sum(res[k]) / n for k in PHASES + OURS_PHASES if k in res}
    return {**mean, "fastest": min(res["total"]), "completions_per_s": res["completions"] / mean["total"],
            "tokens_per_s": mean["tokens"] / mean["rollout"], "peak_rss_mib": res["peak_rss_mib"],
            "setup_rss_mib": res["setup_rss_mib"], "threads": res["threads"],
            "work": sorted({(q, s) for q, s in zip(res["sequences"], res["opt_steps"])}),
            **({"old_logprob_forwards": res["old_logprob_forwards"]} if "old_logprob_forwards" in res else {})}


def work_differences(med: dict[str, dict], runs: dict[str, list[dict]], tolerance: float,
                     other: str = "trl") -> list[str]:
    """What differs between ours' and ``other``'s work per iteration (empty: equal work)."""
    out = []
    for what, i in (("sequences", 0), ("optimizer steps", 1)):
        got = {side: sorted({w[i] for r in runs[side] for w in r["work"]}) for side in ("ours", other)}
        if len(got["ours"]) != 1 or got["ours"] != got[other]:
            out.append(f"{what} per iteration: ours {got['ours']}, {other} {got[other]}")
    ours, them = med["ours"]["tokens"], med[other]["tokens"]
    if abs(them - ours) > tolerance * max(ours, them):
        out.append(f"generated tokens per iteration: ours {ours:,.0f}, {other} {them:,.0f} ({other} / ours = "
                   f"{them / ours:.2f}, more than {tolerance:.0%} apart)")
    return out


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min) / {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="tiny",
                    help="tiny: the pipeline's tiny checkpoint, tiny.yaml's shape; large: a random Qwen2-shaped 8 x "
                         "512 model with a 32k vocabulary, 8 prompts x 8 samples")
    ap.add_argument("--iterations", type=int, help="timed iterations per run (default: tiny 10, large 3)")
    ap.add_argument("--warmup", type=int, help="untimed iterations first (default: tiny 2, large 1)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per side, interleaved; the table shows the median")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads in each run")
    ap.add_argument("--sides", default="ours,trl",
                    help="comma-separated: ours, trl, ours-separate (ours with a separate old-log-prob forward)")
    ap.add_argument("--eos", action="store_true",
                    help="let EOS end responses (natural lengths; the sides then usually generate different token "
                         "counts and no ratio is printed); default: EOS suppressed, every response 48 tokens")
    ap.add_argument("--token-tolerance", type=float, default=0.03,
                    help="largest relative difference in generated tokens per iteration that still counts as "
                         "equal work")
    ap.add_argument("--side", choices=["ours", "trl", "ours-separate"], help=argparse.SUPPRESS)  # one child run
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = SHAPES[args.model]
    args.iterations = shape.iterations if args.iterations is None else args.iterations
    args.warmup = shape.warmup if args.warmup is None else args.warmup
    if args.iterations < 1 or args.warmup < 0 or args.repeats < 1 or args.threads < 1:
        ap.error("--iterations, --repeats and --threads must be >= 1 and --warmup >= 0")
    if args.side:
        return child(args)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not sides or set(sides) - {"ours", "trl", "ours-separate"} or len(set(sides)) != len(sides):
        ap.error(f"--sides {args.sides!r}: use a comma-separated subset of ours,trl,ours-separate")

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
    n = shape.prompts * SAMPLES
    print(f"model {args.model}; {shape.prompts} prompts x {SAMPLES} samples, max_new_tokens {MAX_NEW_TOKENS} "
          f"({'EOS ends responses' if args.eos else 'EOS suppressed: full length'}), one optimizer step of {n} in "
          f"micro-batches of {shape.micro}; {args.warmup} warm-up + {args.iterations} timed iterations per run, "
          f"{args.repeats} run(s) per side interleaved, {args.threads} torch thread(s); torch {torch.__version__}, "
          f"transformers {transformers.__version__}, trl {trl_version}; {platform.processor() or platform.machine()}",
          flush=True)

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory(prefix="bench_vs_trl_") as tmp:
        if args.model == "large":
            model_dir = str(create_large_checkpoint(Path(tmp) / "large"))
        else:
            model_dir = str(create_tiny_checkpoint(Path(tmp) / "tiny", TinyModelConfig(), seed=1234))
        for rep in range(args.repeats):
            for side in sides:
                print(f"[run {rep + 1}/{args.repeats} {side}] load average {load()}", flush=True)
                cmd = [sys.executable, __file__, "--side", side, "--model-dir", model_dir, "--model", args.model,
                       "--iterations", str(args.iterations), "--warmup", str(args.warmup), "--threads",
                       str(args.threads)]
                cmd += ["--eos"] if args.eos else []
                t = time.perf_counter()
                proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not lines:
                    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
                    raise SystemExit(f"the {side} run failed (exit {proc.returncode}); its output is above")
                s = summarise(json.loads(lines[-1][len("RESULT "):]))
                runs[side].append(s)
                print(f"    {side}: {s['total']:.2f} s/iteration, CPU {s['cpu']:.2f} s (rollout "
                      f"{s['rollout_cpu']:.2f}, "
                      f"scoring {s['scoring_cpu']:.3f}, training {s['training_cpu']:.2f}), peak RSS "
                      f"{s['peak_rss_mib']:.0f} MiB, {s['threads']} thread(s), child wall "
                      f"{time.perf_counter() - t:.0f} s", flush=True)
    print(f"load average at the end {load()}")
    report(runs, sides, args.token_tolerance)


def report(runs: dict[str, list[dict]], sides: list[str], tolerance: float) -> None:
    """The side-by-side table (medians over runs), with a ``side / ours`` ratio column for every other side whose
    work equals ours'; exits with status 1 when some side's does not."""
    med = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "work"} for side, rs in runs.items()}
    others = [s for s in sides if s != "ours"] if "ours" in sides else []
    differs = {o: work_differences(med, runs, tolerance, o) for o in others}
    ratios = [o for o in others if not differs[o]]
    rows = [("s / iteration (wall, mean)", "total", 2), ("  rollout s", "rollout", 2), ("  scoring s", "scoring", 3),
            ("  training s", "training", 2), ("fastest iteration s (wall)", "fastest", 2),
            ("CPU s / iteration (this process)", "cpu", 2), ("  rollout CPU s", "rollout_cpu", 2),
            ("  scoring CPU s", "scoring_cpu", 3), ("  training CPU s", "training_cpu", 2),
            ("    ours: advantages() CPU s", "advantages_cpu", 3), ("    ours: update() CPU s", "update_cpu", 2),
            ("    TRL: no-grad old-log-prob forwards / iteration", "old_logprob_forwards", 0),
            ("completions / s", "completions_per_s", 1),
            ("sequences / iteration", "sequences", 0), ("optimizer steps / iteration", "opt_steps", 0),
            ("generated tokens / iteration", "tokens", 0), ("rollout tokens / s", "tokens_per_s", 0),
            ("RSS after setup MiB", "setup_rss_mib", 0), ("peak RSS MiB", "peak_rss_mib", 0)]
    name = {"trl": "TRL", "ours": "ours", "ours-separate": "ours-separate"}
    head = ("| metric (median of runs) | " + " | ".join(name[s] for s in sides) + " |"
            + "".join(f" {name[o]} / ours |" for o in ratios))
    print("\n" + head + "\n|" + " --- |" + " ---: |" * (len(sides) + len(ratios)))
    for label, key, digits in rows:
        cells = [f"{med[s][key]:,.{digits}f}" if key in med[s] else "-" for s in sides]
        for o in ratios:
            both = key in med[o] and key in med["ours"] and med["ours"][key]
            cells.append(f"{med[o][key] / med['ours'][key]:.2f}x" if both else "-")
        print(f"| {label} | " + " | ".join(cells) + " |")
    bad = [f"{name[o]}: {d}" for o in others for d in differs[o]]
    if bad:
        raise SystemExit("\nNo ratio for a side that did not do ours' work per iteration:\n  " + "\n  ".join(bad))
    for o in ratios:
        print(f"\nSame work per iteration (sequences, optimizer steps, tokens within {tolerance:.0%}). "
              f"{name[o]} takes {med[o]['total'] / med['ours']['total']:.2f}x our wall time and "
              f"{med[o]['cpu'] / med['ours']['cpu']:.2f}x our CPU time per iteration "
              f"(ours {med['ours']['cpu']:.2f} CPU s, {name[o]} {med[o]['cpu']:.2f} CPU s).")


if __name__ == "__main__":
    main()
