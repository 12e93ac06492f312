"""HF rollout engine throughput: its own decode loop (``rollout.hf_decode=loop``) against transformers' ``generate``
(``rollout.hf_decode=generate``), side by side in one process on the same weights and prompts.

Usage (from the repository root)::

    python benchmarks/bench_engine.py [--models tiny,large[,NAME=CHECKPOINT]] [--shapes rl,bench] [--repeats 3]
                                      [--threads 1]

Models: ``tiny`` is the tiny pipeline's model (``TinyModelConfig()``, seed 1234, as ``configs/tiny.yaml`` builds it,
untrained); ``large`` a random Qwen2-shaped model, 8 layers x 512 wide (8 heads, 4 KV heads, MLP 1,408), vocabulary
32,000, untied embeddings, fp32; ``NAME=CHECKPOINT`` any HF checkpoint folder that uses the tiny tokenizer, e.g.
``sft=runs/tiny/sft/final`` after the tiny pipeline's SFT stage (a trained model ends its responses at EOS, so rows
finish early there; the random models rarely or never produce EOS). Shapes (tiny-task prompts, tokenised by the tiny
tokenizer, which all the models share):

* ``rl``: the tiny config's RL call: 32 prompts x 8 samples = 256 sequences in one generation batch
  (``rollout.batch_size`` 256), 48 new tokens, temperature 0.7, responses end at EOS;
* ``bench``: ``bench_vs_trl.py``'s call: 16 prompts x 8 samples, 48 new tokens, temperature 1.0, EOS suppressed
  (``min_new_tokens`` 48), so every sequence has 48 tokens.

Both ask for no log-probs (as the RL stage does when the trainer recomputes them). Each repeat calls both modes with
the same seed, in alternating order (generate first on even repeats, loop first on odd ones), after one warm-up call
each; the table gives the median over repeats of tokens per CPU second (``time.process_time``, this process) and per
wall second, and loop / generate ratios of those medians. The two modes must return the same tokens (they draw the
same random numbers); the benchmark says whether they did for every call.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("generate", "loop")
SHAPES = {  # prompts, samples, new tokens, temperature, min_new_tokens
    "rl": (32, 8, 48, 0.7, 0),
    "bench": (16, 8, 48, 1.0, 48),
}


def build_models(work: Path, names: list[str]) -> dict[str, Path]:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from pipeline.config import TinyModelConfig
    from pipeline.tiny.model import create_tiny_checkpoint
    from pipeline.tiny.tokenizer import build_tokenizer

    out = {"tiny": create_tiny_checkpoint(work / "tiny", TinyModelConfig(), seed=1234)}
    for name in names:
        if "=" in name:
            label, path = name.split("=", 1)
            out[label] = Path(path)
    if "large" in names:
        tok = build_tokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = Qwen2ForCausalLM(Qwen2Config(
                vocab_size=32_000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False,
                use_sliding_window=False, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, dtype="float32"))
        model.save_pretrained(work / "large")
        out["large"] = work / "large"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,large")
    ap.add_argument("--shapes", default="rl,bench")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    models, shapes = args.models.split(","), args.shapes.split(",")
    for name in models:
        if name not in ("tiny", "large") and not ("=" in name and Path(name.split("=", 1)[1], "config.json").is_file()):
            ap.error(f"--models: {name!r} is neither tiny, large nor NAME=CHECKPOINT with a config.json in CHECKPOINT")
    for name in shapes:
        if name not in SHAPES:
            ap.error(f"--shapes: unknown shape {name!r} ({', '.join(SHAPES)})")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    import torch

    torch.set_num_threads(args.threads)
    from evaluation.tiny_task import make_split
    from pipeline.config import load_config
    from pipeline.models import load_tokenizer
    from pipeline.rollout import SamplingParams, engine_class

    print(f"# {platform.node()} {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, torch {torch.__version__}, "
          f"{args.threads} thread(s), load average {os.getloadavg()[0]:.1f}", flush=True)
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_models(Path(tmp), models)
        cfg = load_config(None, ["rollout.batch_size=256"])
        tok = load_tokenizer(paths["tiny"], cfg)
        problems = make_split("train", 1000, seed=cfg.run.seed)
        for model_name in (m.split("=", 1)[0] for m in models):
            engines = {m: engine_class("hf")(paths[model_name], tok, cfg, decode=m) for m in MODES}
            for shape in shapes:
                n_prompts, n, new, temp, min_new = SHAPES[shape]
                prompts = [tok(cfg.data.prompt_template.format(problem=r["problem"]))["input_ids"]
                           for r in problems[:n_prompts]]
                params = SamplingParams(n=n, temperature=temp, max_new_tokens=new, min_new_tokens=min_new, seed=17,
                                        logprobs=False)
                for m in MODES:  # warm-up
                    engines[m].generate(prompts, params)
                rec: dict[str, dict[str, list[float]]] = {m: {"cpu": [], "wall": [], "tokens": []} for m in MODES}
                same = []
                for rep in range(args.repeats):
                    outs = {}
                    for m in (MODES if rep % 2 == 0 else MODES[::-1]):
                        c0, t0 = time.process_time(), time.perf_counter()
                        gens = engines[m].generate(prompts, params)
                        t1, c1 = time.perf_counter(), time.process_time()
                        outs[m] = [(g.token_ids, g.finished) for g in gens]
                        rec[m]["cpu"].append(c1 - c0)
                        rec[m]["wall"].append(t1 - t0)
                        rec[m]["tokens"].append(sum(len(g.token_ids) for g in gens))
                    same.append(outs["loop"] == outs["generate"])
                row = {"model": model_name, "shape": shape, "sequences": n_prompts * n, "same_tokens": all(same)}
                for m in MODES:
                    toks = statistics.median(rec[m]["tokens"])
                    row[m] = {"tokens": toks, "cpu_s": rec[m]["cpu"], "wall_s": rec[m]["wall"],
                              "tok_per_cpu_s": toks / statistics.median(rec[m]["cpu"]),
                              "tok_per_wall_s": toks / statistics.median(rec[m]["wall"])}
                rows_out.append(row)
                print(f"{model_name} {shape}: generate cpu {[round(x, 2) for x in rec['generate']['cpu']]} s, "
                      f"loop cpu {[round(x, 2) for x in rec['loop']['cpu']]} s, same tokens: {all(same)}, "
                      f"load average {os.getloadavg()[0]:.1f}", flush=True)
            del engines

    print()
    print("| model | shape | sequences x tokens | generate tok / CPU-s | loop tok / CPU-s | **loop / generate (CPU)** "
          "| generate tok / s wall | loop tok / s wall | loop / generate (wall) | same tokens |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows_out:
        g, lo = r["generate"], r["loop"]
        print(f"| {r['model']} | {r['shape']} | {r['sequences']} / {g['tokens']:,.0f} | {g['tok_per_cpu_s']:,.0f} "
              f"| {lo['tok_per_cpu_s']:,.0f} | **{lo['tok_per_cpu_s'] / g['tok_per_cpu_s']:.2f}x** "
              f"| {g['tok_per_wall_s']:,.0f} | {lo['tok_per_wall_s']:,.0f} "
              f"| {lo['tok_per_wall_s'] / g['tok_per_wall_s']:.2f}x | {'yes' if r['same_tokens'] else 'NO'} |")
    print("RESULT " + json.dumps(rows_out))
    return 0 if all(r["same_tokens"] for r in rows_out) else 1


if __name__ == "__main__":
    sys.exit(main())
