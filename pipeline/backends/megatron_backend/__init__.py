"""Megatron-core training backend (tensor, pipeline and data parallelism), registered as ``backend=megatron``.

Layout of this package - the model is separate from how it is parallelised:

* :mod:`.model` - :class:`Arch` read from a Hugging Face config (Qwen2/2.5, Qwen3, Llama 3, Phi-3) and the megatron-core
  ``GPTModel`` built from it (local layer spec, SDPA core attention from :mod:`.attention`, HF's RoPE frequencies);
* :mod:`.convert` - HF <-> megatron tensors for any TP x PP (fused QKV per query group, per-rank gate/up, padded and
  split vocabulary); bit-exact both ways. :mod:`.weights` loads a checkpoint into a built model and streams full HF
  tensors back to rank 0;
* :mod:`.parallel` - the TP x PP x DP :class:`Layout`, its checks, and bringing up megatron-core's process groups;
* :mod:`.schedule` - micro-batches through megatron-core's forward-backward schedules;
* :mod:`.logprobs` - log-probs and entropy from vocabulary-parallel logits without gathering the vocabulary;
* :mod:`.grads`, :mod:`.optim` - gradient reductions and clipping, fp32 master weights for bf16;
* :mod:`.reshard` - resuming a checkpoint under another TP x PP layout (weights and AdamW moments);
* :mod:`.backend` - :class:`MegatronBackend`, the :class:`~pipeline.backends.base.TrainingBackend`;
* :mod:`.cpu_compat` - the narrow, version-pinned redirection of megatron-core's CUDA assumptions that lets all of
  this run on CPU over gloo (tests and the tiny run); enabled automatically when CUDA is absent.

Launch with ``torchrun --nproc_per_node N -m pipeline run CONFIG backend=megatron backend.tensor_parallel=T
pipeline_parallel=P``; N must be T x P x DP.
"""
