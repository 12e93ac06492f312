"""Evaluate any checkpoint from the command line.

    python -m evaluation --model PATH --benchmarks math500,aime24 --samples 16 --temperature 0.6 \\
        [--data-dir ../shared/data] [--limit N] [--out DIR] [--engine hf|sglang] [--max-new-tokens N]

A benchmark may name its own source: ``--benchmarks gpqa_diamond=/data/gpqa_diamond.csv,aime24=hub:ORG/NAME@train``.
Run the same command again to resume an interrupted run. Engine settings not given here (dtype, SGLang memory
fraction, ...) come from ``--config`` (a pipeline YAML) and ``key=value`` overrides, as for the pipeline.
"""
# This module is an entry point: it sits on top of every package and may import the pipeline (its config, model loading
# and rollout engines), which the rest of the evaluation package must not (tests/test_layering.py).
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from evaluation.benchmarks import BENCHMARKS, parse_spec
from evaluation.data import BenchmarkDataError
from evaluation.prompts import PROMPT_STYLES
from evaluation.report import render_report
from evaluation.run import ResumeMismatch, evaluate
from pipeline.checks import PipelineError
from pipeline.config import EvalConfig, RewardConfig, RolloutConfig, load_config
from pipeline.models import load_tokenizer, resolve_model_path
from pipeline.rollout import engine_class
from pipeline.validate import validate_names

# Defaults: the pipeline's evaluate stage's (pipeline/config.py: eval.*, rollout.engine, rl.reward.timeout_s), read from
# its config classes, except where this command deliberately differs (these three keep the values the command always
# had: max_new_tokens and seed are recorded in an output folder and checked on resume, and the batch size decides the
# batches whose sampling seeds are drawn, so new defaults would refuse or resample the folders written before):
# * --max-new-tokens 1024 (eval.max_new_tokens is 64, sized for the tiny model's short answers): this command
#   evaluates any checkpoint, and reasoning models need room for a worked solution;
# * --seed 0 (the stage samples with run.seed, 1234 by default);
# * --batch-size 32 (the stage sends rollout.batch_size // eval.samples problems per engine call).
_EVAL, _ROLLOUT, _REWARD = EvalConfig(), RolloutConfig(), RewardConfig()
MAX_NEW_TOKENS = 1024
SEED = 0
BATCH_SIZE = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder (Hugging Face format) or hub id")
    p.add_argument("--benchmarks", required=True,
                   help=f"comma-separated NAME or NAME=SOURCE; names: {', '.join(sorted(BENCHMARKS))}")
    p.add_argument("--samples", type=int, default=_EVAL.samples, help="responses per problem (k)")
    p.add_argument("--temperature", type=float, default=_EVAL.temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=_EVAL.top_p)
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    p.add_argument("--data-dir", default=_EVAL.data_dir, help="folder of local benchmark files (math500.jsonl, ...)")
    p.add_argument("--limit", type=int, default=_EVAL.limit, help="only the first N problems of each benchmark")
    p.add_argument("--out", default=None, help="output folder (default: eval_out/<model folder name>)")
    p.add_argument("--engine", default=_ROLLOUT.engine, help="rollout engine: hf (CPU or one GPU) or sglang (GPU)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                   help="problems per engine call (and per checkpoint write)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--timeout", type=float, default=_REWARD.timeout_s, help="seconds allowed to check one answer")
    p.add_argument("--prompt-style", default="auto", choices=PROMPT_STYLES)
    p.add_argument("--config", default=None, help="pipeline YAML for engine settings (model.dtype, rollout.*)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="pipeline config overrides key=value (e.g. model.dtype=bfloat16)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    specs = [s.strip() for s in args.benchmarks.split(",") if s.strip()]
    try:
        for s in specs:
            parse_spec(s)  # unknown names fail before a model is loaded
        cfg = validate_names(load_config(args.config, args.overrides))
        cfg.rollout.engine = args.engine
        cfg.rollout.max_new_tokens = args.max_new_tokens
        model = resolve_model_path(args.model)
        cfg.model.path = model
        tokenizer = load_tokenizer(model, cfg)
        engine = engine_class(args.engine)(model, tokenizer, cfg)
        out = args.out or str(Path("eval_out") / Path(model.rstrip("/")).name)
        try:
            results = evaluate(
                engine, tokenizer, specs, samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                max_new_tokens=args.max_new_tokens, out_dir=out, data_dir=args.data_dir, limit=args.limit,
                seed=args.seed, batch_size=args.batch_size, timeout_s=args.timeout,
                progress=not args.no_progress, prompt_style=args.prompt_style, model_id=args.model)
        finally:
            engine.shutdown()
    except (KeyError, ValueError, BenchmarkDataError, ResumeMismatch, OSError, PipelineError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    print(render_report(results))
    print(f"results in {out}/results.json, responses in {out}/<benchmark>/responses.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
