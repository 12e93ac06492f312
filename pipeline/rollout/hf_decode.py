"""The HF engine's own decode loop (``rollout.hf_decode: loop``): what ``generate`` samples, with less work.

Where ``generate``'s time goes, and what was tried (one CPU thread; figures in ``benchmarks/RESULTS.md``, issue 13):
on the tiny model about 87% of a call is the model's forward, and on an 8 x 512 model with a 32k vocabulary 67%, the
rest mostly ``torch.multinomial``'s one Exp(1) draw per (row, vocabulary entry). transformers' static cache
(``cache_implementation="static"``) was no faster, ``torch.compile`` of the forward on CPU (``CompileConfig``) slower
after a minute of compiling, and a KV buffer preallocated for the whole call (attention given views of it, no
``torch.cat`` per step) no faster either: CPU attention on those strided views costs what the copy saved. So this loop
keeps transformers' ``DynamicCache`` and the model's own forward, and removes work instead:

* the prompt pass runs once per distinct prompt, not once per sample: its keys and values are repeated to the ``n``
  rows of the prompt's samples (on the RL shape, 32 prompts x 8 samples, that is 1/8 of the prompt tokens);
* rows that produced EOS leave the batch (with their cache rows) once they are a quarter of it;
* the sampling transforms skip ``generate``'s per-step (rows, vocabulary) copies where the result is the same (EOS
  suppression for ``min_new_tokens`` writes one column), and use HF's own warpers for top-k and top-p.

It draws random numbers exactly as ``generate`` does: ``torch.multinomial(probs, 1)`` (PyTorch's one-sample path)
divides the probabilities by one Exp(1) draw per (row, token) of the whole batch and takes the argmax; the loop makes
that same draw for all the batch's rows every step, finished ones included, so rows dropped from the batch do not
shift the stream, and with the engine's per-batch seeds it samples the same tokens as ``generate`` does
(``tests/pipeline/test_hf_engine_decode.py``) as long as the model's arithmetic gives the same logits on the smaller
batches (it did on every comparison run on CPU; a kernel that rounds differently by batch size could flip a near tie).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from evaluation.engine import SamplingParams

COMPACT_FRACTION = 0.25  # drop finished rows once they are this share of the rows still in the batch


@dataclass
class Decoded:
    """Per row (prompt-major, ``n`` samples per prompt): the new tokens up to and including EOS, their log-probs
    (None if not asked for) and whether EOS ended the row."""

    token_ids: list[list[int]]
    logprobs: list[list[float]] | None
    finished: list[bool]


def _warpers(params: SamplingParams) -> list:
    """HF's own top-k / top-p warpers, built as ``generate`` builds them for these parameters."""
    out = []
    if params.top_k > 0:
        out.append(TopKLogitsWarper(top_k=params.top_k))
    if params.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=params.top_p))
    return out


def processed_scores(logits: Tensor, params: SamplingParams, step: int, eos_id: int | None) -> Tensor:
    """The scores ``generate`` samples from (greedy: takes the argmax of) for fp32 ``logits`` (rows, vocabulary) of
    new-token index ``step``: EOS at -inf before ``min_new_tokens``, then (sampling only) temperature, top-k, top-p.
    ``logits`` is left unchanged."""
    scores = logits
    if params.temperature > 0 and params.temperature != 1.0:
        scores = logits / params.temperature  # TemperatureLogitsWarper's arithmetic
    if eos_id is not None and step < params.min_new_tokens:
        if scores is logits:
            scores = logits.clone()
        scores[:, eos_id] = -float("inf")
    if params.temperature > 0:
        for warp in _warpers(params):
            scores = warp(None, scores)
    return scores


def choose(scores: Tensor, params: SamplingParams, draw_rows: int, rows: Tensor | None) -> Tensor:
    """Next tokens (rows,) from processed ``scores``: argmax when greedy, else ``torch.multinomial(softmax(scores),
    1)``'s own computation, argmax(probs / q) with q ~ Exp(1), q drawn for all ``draw_rows`` rows of the batch as
    ``generate`` draws it and ``rows`` (None: all) the batch rows ``scores`` belongs to."""
    if params.temperature <= 0:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores, dim=-1)
    q = torch.empty((draw_rows, scores.shape[-1]), dtype=probs.dtype, device=probs.device).exponential_(1)
    if rows is not None:
        q = q[rows]
    return probs.div_(q).argmax(dim=-1)


@torch.no_grad()
def decode(model: torch.nn.Module, prompts: list[list[int]], params: SamplingParams, *, eos_id: int | None,
           pad_id: int, device: torch.device) -> Decoded:
    """Sample ``params.n`` responses for each of ``prompts`` as one batch (rows prompt-major), drawing from the
    current default random stream exactly as ``model.generate`` would for the same left-padded batch."""
    n, steps = params.n, params.max_new_tokens
    width = max(len(p) for p in prompts)
    rows = len(prompts) * n
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for r, p in enumerate(prompts):  # left padding, as the engine's generate path
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
    ids = ids.to(device)
    attention = torch.zeros((len(prompts), width + steps), dtype=torch.long, device=device)
    attention[:, :width] = (torch.arange(width, device=device)[None] >= (width - lengths)[:, None]).long()
    attention[:, width:] = 1
    positions = (attention[:, :width].cumsum(-1) - 1).masked_fill(attention[:, :width] == 0, 0)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=attention[:, :width], position_ids=positions, cache=cache,
                use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1].to(dtype=torch.float32)
    del out
    if n > 1:  # the prompt pass ran once per prompt: every sample's row starts from its prompt's keys and values
        cache.batch_repeat_interleave(n)
    attention = attention.repeat_interleave(n, dim=0)
    next_pos = lengths.repeat_interleave(n)  # position of the first new token, per row
    logits = logits.repeat_interleave(n, dim=0)

    tokens = torch.full((rows, steps), pad_id, dtype=torch.long, device=device)
    lps = torch.zeros((rows, steps), dtype=torch.float32, device=device) if params.logprobs else None
    live = torch.arange(rows, device=device)  # original row of each batch row
    ended = torch.zeros(rows, dtype=torch.bool, device=device)  # per batch row: produced EOS
    done = 0
    for step in range(steps):
        scores = processed_scores(logits, params, step, eos_id)
        tok = choose(scores, params, rows, live if len(live) < rows else None)
        tokens[live, step] = tok
        if lps is not None:
            lps[live, step] = logits.gather(-1, tok[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
        done = step + 1
        if eos_id is not None:
            ended |= tok == eos_id
        if step + 1 == steps:
            break
        n_ended = int(ended.sum())  # the loop's one host sync per step
        if n_ended == len(live):
            break
        if n_ended and n_ended >= COMPACT_FRACTION * len(live):
            keep = (~ended).nonzero()[:, 0]
            cache.batch_select_indices(keep)
            live, tok, attention, next_pos = live[keep], tok[keep], attention[keep], next_pos[keep]
            ended = ended[keep]
        out = model(input_ids=tok[:, None], attention_mask=attention[:, :width + step + 1],
                    position_ids=(next_pos + step)[:, None], cache=cache, use_cache=True)
        logits = out.logits[:, -1].to(dtype=torch.float32)
        del out
    tokens = tokens[:, :done].cpu()
    lp_rows = lps[:, :done].cpu().tolist() if lps is not None else None
    ids_out, lp_out, finished = [], [] if lp_rows is not None else None, []
    for r, row in enumerate(tokens.tolist()):
        ended_here = eos_id is not None and eos_id in row
        end = row.index(eos_id) + 1 if ended_here else len(row)  # tokens after EOS (unused rows) are cut
        ids_out.append(row[:end])
        finished.append(ended_here)
        if lp_out is not None:
            lp_out.append(lp_rows[r][:end])
    return Decoded(ids_out, lp_out, finished)
