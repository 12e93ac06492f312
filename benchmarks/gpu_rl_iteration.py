"""One RL iteration of a real small architecture's shape, timed phase by phase: the GPU smoke check's figures.

    python -m benchmarks.gpu_rl_iteration --out DIR [--backend megatron|torch] [--dry-run]

A Qwen2.5-0.5B-shaped model (random weights, built from its config: no hub access) goes through the pipeline's own
pieces in the order the RL stage uses them: weight sync into the HF rollout engine, generation of
``prompts x samples`` responses (EOS ignored, so every response has exactly ``--new-tokens`` tokens and the token
count is known in advance), a synthetic reward, the trainer's old log-probs, LamPO advantages, and the clipped
policy update (bf16 on a GPU). It writes ``DIR/rl_iteration.json`` and prints it: seconds per phase, rollout and
training tokens per second, and model FLOPs utilisation (MFU) against the device's dense bf16 peak.

FLOPs are the usual dense-transformer estimate, 2 x parameters per token for a forward pass and 6 x for forward
plus backward (attention's quadratic term is left out, so MFU is slightly understated). Generation is memory-bound at
these batch sizes: its MFU is expected to be low, its tokens/s is the figure to watch.

``--dry-run`` runs the same path on the CPU with a small model of the same family in fp32, so the script itself is
tested where there is no GPU (tests/test_benchmarks.py).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

QWEN25_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True,
                  rms_norm_eps=1e-6, rope_theta=1000000.0)
SMALL = dict(QWEN25_05B, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=512)
# dense bf16 peak FLOP/s by device name (vendor data sheets, SXM parts); LAMPO_PEAK_TFLOPS overrides
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}


def peak_flops() -> float | None:
    import os

    if os.environ.get("LAMPO_PEAK_TFLOPS"):
        return float(os.environ["LAMPO_PEAK_TFLOPS"]) * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def build_model(folder: Path, shape: dict) -> int:
    """Save a random model of ``shape`` as an HF checkpoint; returns its parameter count."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**shape), dtype=torch.float32)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def make_config(model_path: Path, args: argparse.Namespace, gpu: bool):
    from pipeline.config import load_config
    from pipeline.validate import validate_names

    overrides = [f"model.path={model_path}", f"backend={args.backend}", f"backend.micro_batch_size={args.micro_batch}",
                 f"rollout.batch_size={args.prompts * args.samples}", f"rollout.max_new_tokens={args.new_tokens}",
                 f"rollout.n_samples={args.samples}", "rollout.colocate=false", "run.progress=false"]
    if gpu:
        overrides += ["model.dtype=bfloat16", "backend.bf16=true"]
    return validate_names(load_config(None, overrides))


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rl_iteration(args: argparse.Namespace) -> dict:
    from lampo.advantages import ADVANTAGE_ESTIMATORS, sequence_scores
    from lampo.record import TokenBatch
    from pipeline.backends import backend_class
    from pipeline.rollout import SamplingParams, engine_class

    gpu = torch.cuda.is_available() and not args.dry_run
    shape = SMALL if args.dry_run else QWEN25_05B
    out_dir = Path(args.out)
    model_path = out_dir / "model"
    n_params = build_model(model_path, shape)
    cfg = make_config(model_path, args, gpu)
    # the engine needs only the special-token ids; no tokenizer exists for a random model
    tokenizer = SimpleNamespace(eos_token_id=shape["vocab_size"] - 1, pad_token_id=0)
    backend = backend_class(cfg.backend.name).from_config(cfg, str(model_path), lr=1e-6, total_steps=10)
    engine = engine_class("hf")(str(model_path), tokenizer, cfg)
    engine.eos_id = None  # ignore EOS: every response is exactly new_tokens long
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, shape["vocab_size"] - 1, (args.prompt_tokens,), generator=g).tolist()
               for _ in range(args.prompts)]
    params = SamplingParams(n=args.samples, temperature=1.0, max_new_tokens=args.new_tokens, seed=0)

    times: dict[str, float] = {}

    def timed(name, fn):
        synchronize()
        t = time.perf_counter()
        result = fn()
        synchronize()
        times[name] = time.perf_counter() - t
        return result

    timed("sync_weights", lambda: engine.update_weights(backend.named_full_tensors()))
    gens = timed("rollout", lambda: engine.generate(prompts, params))
    responses = [x.token_ids for x in gens]
    batch = TokenBatch.from_sequences([prompts[x.prompt_index] for x in gens], responses, pad_id=0)
    group = torch.tensor([x.prompt_index for x in gens])
    rewards = torch.tensor([sum(t % 2 == 0 for t in r) / len(r) for r in responses])  # synthetic, varies per response
    batch.old_logprobs = timed("old_logprobs", lambda: backend.token_logprobs(batch))
    s = sequence_scores(batch.old_logprobs, batch.response_mask, length_normalized=True)
    batch.advantages = ADVANTAGE_ESTIMATORS["lampo"](rewards, group, seq_logprob=s, temperature=1.0)
    metrics = timed("train_step", lambda: backend.rl_step(batch))

    gen_tokens = sum(len(r) for r in responses)
    train_tokens = int(batch.attention_mask.sum())
    flops = {"rollout": 2 * n_params * gen_tokens, "old_logprobs": 2 * n_params * train_tokens,
             "train_step": 6 * n_params * train_tokens}
    peak = peak_flops()
    total = sum(times.values())
    result = {
        "device": torch.cuda.get_device_name() if gpu else "cpu (dry run)" if args.dry_run else "cpu",
        "torch": torch.__version__, "backend": args.backend, "dtype": "bfloat16" if gpu else "float32",
        "model": "Qwen2.5-0.5B shape, random weights" if not args.dry_run else "small Qwen2 shape (dry run)",
        "parameters": n_params, "sequences": len(gens), "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "generated_tokens": gen_tokens, "micro_batch": args.micro_batch,
        "seconds": {k: round(v, 4) for k, v in times.items()}, "seconds_per_iteration": round(total, 4),
        "rollout_tokens_per_s": round(gen_tokens / times["rollout"], 1),
        "train_tokens_per_s": round(train_tokens / times["train_step"], 1),
        "loss": metrics["loss"], "peak_bf16_tflops": peak / 1e12 if peak else None,
        "mfu": {k: round(flops[k] / times[k] / peak, 4) for k in flops} if peak else None,
        "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None,
    }
    engine.shutdown()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the model and rl_iteration.json")
    ap.add_argument("--backend", default="megatron", help="training backend: megatron | torch | deepspeed")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=384)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--dry-run", action="store_true", help="CPU, small shape, fp32: checks the script itself")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.prompts, args.samples, args.prompt_tokens, args.new_tokens = 2, 4, 8, 8
        args.micro_batch = 4
    Path(args.out).mkdir(parents=True, exist_ok=True)
    result = rl_iteration(args)
    text = json.dumps(result, indent=2)
    (Path(args.out) / "rl_iteration.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
