"""The HF engine's memory does not grow with (new tokens x vocabulary): a random Qwen2-shaped model with Qwen's
151,936-token vocabulary (2 layers x 64 wide), 16 sequences x 256 new tokens, greedy (EOS never chosen by this model).

Stacking every step's logits, as the engine once did, would hold 16 x 256 x 151,936 x 4 B = 2.5 GB (twice that with
``generate``'s own tuple of them). Each mode runs in its own child process, which reports its peak resident memory
during ``generate`` above its resident memory just before (Linux: VmHWM after resetting it through
``/proc/self/clear_refs``; torch's CPU allocations are invisible to tracemalloc). Figures: ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VOCAB, SEQS, NEW_TOKENS = 151_936, 16, 256
STACKED = SEQS * NEW_TOKENS * VOCAB * 4  # bytes of one (B, S, V) fp32 tensor


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(mode: str, model_dir: str, decode: str) -> None:
    """One measured ``generate`` call (``mode``: on | off, the log-probs option; ``decode``: the engine's
    ``rollout.hf_decode``); prints a JSON line."""
    import hashlib

    import torch

    from pipeline.config import Config
    from pipeline.rollout import SamplingParams, engine_class

    torch.set_num_threads(1)

    class Tok:  # all the engine needs of a tokenizer
        pad_token_id, eos_token_id = 0, 1

    eng = engine_class("hf")(model_dir, Tok(), Config(), decode=decode)
    prompts = [[(7 * i + j) % 1000 + 2 for j in range(8 + i % 5)] for i in range(SEQS)]
    # greedy: CPU multinomial over 151,936 entries costs ~0.1 s a step; memory is the same either way
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=NEW_TOKENS, logprobs=mode == "on")
    eng.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=4))  # warm up lazy allocations
    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    t = time.perf_counter()
    gens = eng.generate(prompts, params)
    seconds = time.perf_counter() - t
    peak = _status_kib("VmHWM")
    ids = [g.token_ids for g in gens]
    print("RESULT " + json.dumps({
        "peak_above_base_mib": (peak - base) / 1024, "seconds": seconds, "tokens": sum(map(len, ids)),
        "lengths": sorted({len(x) for x in ids}), "logprobs": [g.logprobs is not None for g in gens],
        "ids_sha": hashlib.sha256(json.dumps(ids).encode()).hexdigest()}), flush=True)


def measure(mode: str, model_dir: Path, decode: str) -> dict:
    # blocks of 1 MiB and more are mmap'ed and unmapped when freed, so the resident size follows what is alive rather
    # than how glibc's heap happens to fragment (without this, peaks vary by several hundred MiB from run to run)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    proc = subprocess.run([sys.executable, __file__, mode, str(model_dir), decode], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
@pytest.mark.parametrize("decode", ["loop", "generate"])
def test_memory_is_bounded_with_a_large_vocabulary(tmp_path, decode):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "qwen2_random")
    off, on = (measure(m, tmp_path / "qwen2_random", decode) for m in ("off", "on"))
    print(f"\n{decode}: log-probs off: peak +{off['peak_above_base_mib']:.0f} MiB, "
          f"{off['tokens'] / off['seconds']:.0f} tok/s; "
          f"on: peak +{on['peak_above_base_mib']:.0f} MiB, {on['tokens'] / on['seconds']:.0f} tok/s; "
          f"stacked logits would be {STACKED / 2**20:,.0f} MiB")
    for r in (off, on):
        assert r["lengths"] == [NEW_TOKENS]  # every sequence ran its full length: the measured work is the full one
    limit = STACKED / 20 / 2**20  # 125 MiB, about 13 steps' worth of (16, 151936) fp32 logits
    assert on["peak_above_base_mib"] < limit, on
    assert on["peak_above_base_mib"] - off["peak_above_base_mib"] < limit, (on, off)
    assert on["ids_sha"] == off["ids_sha"]  # asking for log-probs does not change what is sampled
    assert all(on["logprobs"]) and not any(off["logprobs"])


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2], sys.argv[3])
