"""A megatron-core ``GPTModel`` built from a Hugging Face decoder config (the model, not how it is parallelised).

:class:`Arch` is the small, framework-neutral description of a decoder that both sides of the weight conversion
share; :func:`arch_from_hf` reads it from a Hugging Face config (Qwen2/2.5, Qwen3, Llama 3, Phi-3 without sliding
window or partial rotary; other families are refused with a message). :func:`build_model` turns it into
megatron-core's ``GPTModel`` with the local layer spec (RMSNorm, SwiGLU, RoPE, optional QKV bias and QK-norm) and
:class:`~pipeline.backends.megatron_backend.attention.SDPAttention` as core attention, for the pipeline stage and
tensor-parallel rank of the calling process (parallel state must be initialised; degree 1 is the same code).

RoPE frequencies are taken from Hugging Face's own RoPE initialisation for the config (default, ``linear`` and
``llama3`` scaling), then written into megatron's rotary module, so scaled RoPE matches HF exactly instead of
relying on megatron's fixed llama3 constants.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FAMILIES = ("qwen2", "qwen3", "llama", "phi3")  # HF model_type values this backend maps
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class Arch:
    """Shape of a decoder-only transformer, as the weight conversion and model builder need it."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    qkv_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    max_position_embeddings: int

    def padded_vocab(self, tp: int) -> int:
        """Vocabulary rows after padding to a multiple of the tensor-parallel degree (padding rows are zero and their
        logits are masked to -inf by the log-prob functions)."""
        return -(-self.vocab_size // tp) * tp


def arch_from_hf(hf_config) -> Arch:
    """Read an :class:`Arch` from a ``transformers`` config; refuse families or options this backend cannot map."""
    mt = hf_config.model_type
    if mt not in FAMILIES:
        raise ValueError(f"the megatron backend maps model_type {sorted(FAMILIES)}, not {mt!r}; "
                         "use backend=torch or backend=deepspeed for this model")
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{mt}: hidden_act={act!r}; only SwiGLU (silu) MLPs are mapped")
    window = getattr(hf_config, "sliding_window", None)
    if getattr(hf_config, "use_sliding_window", mt == "phi3") and window and window < hf_config.max_position_embeddings:
        raise ValueError(f"{mt}: sliding-window attention (sliding_window={window}) is not mapped by the megatron "
                         "backend (it attends causally over the whole sequence)")
    partial = _rope_params(hf_config).get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise ValueError(f"{mt}: partial rotary embeddings (partial_rotary_factor={partial}) are not mapped")
    if getattr(hf_config, "mlp_bias", False):
        raise ValueError(f"{mt}: mlp_bias=True is not mapped")
    rope_type = _rope_params(hf_config).get("rope_type", "default")
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"{mt}: RoPE type {rope_type!r} is not supported (supported: {', '.join(_ROPE_TYPES)})")
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    qkv_bias = True if mt == "qwen2" else bool(getattr(hf_config, "attention_bias", False))
    return Arch(
        model_type=mt, vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers, num_heads=heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads, head_dim=head_dim,
        intermediate_size=hf_config.intermediate_size, norm_eps=hf_config.rms_norm_eps, qkv_bias=qkv_bias,
        qk_norm=mt == "qwen3", tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        max_position_embeddings=hf_config.max_position_embeddings,
    )


def _rope_params(hf_config) -> dict:
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    return dict(params)


def hf_inv_freq(hf_config) -> torch.Tensor:
    """RoPE inverse frequencies ``(head_dim // 2,)`` exactly as Hugging Face computes them for this config."""
    params = _rope_params(hf_config)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config)
    if scaling != 1.0:
        raise ValueError(f"RoPE type {rope_type!r} scales attention by {scaling}; not mapped")
    return inv_freq.float()


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with megatron-core's norm-spec constructor. Unlike megatron's ``WrappedTorchNorm`` it
    allows sequence parallelism: the weight is then marked ``sequence_parallel`` so that its gradient, computed from
    this rank's part of the sequence, is summed over the TP group (:mod:`.grads`)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = bool(config.sequence_parallel)


@dataclass(frozen=True)
class Precision:
    """Numerics options that change how the model is built: the parameter (and pipeline activation) dtype, e.g.
    ``torch.bfloat16`` with fp32 master weights kept by
    :class:`~pipeline.backends.megatron_backend.optim.MasterWeights`."""

    params_dtype: torch.dtype = torch.float32
    recompute_activations: bool = False
    sequence_parallel: bool = False  # only takes effect with tp > 1


def transformer_config(arch: Arch, tp: int, pp: int, precision: Precision):
    """megatron-core ``TransformerConfig`` for ``arch``: no dropout, no biases outside QKV, unfused kernels on CPU."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads, kv_channels=arch.head_dim, ffn_hidden_size=arch.intermediate_size,
        normalization="RMSNorm", layernorm_epsilon=arch.norm_eps, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=arch.qkv_bias, qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        sequence_parallel=precision.sequence_parallel and tp > 1,
        params_dtype=precision.params_dtype, pipeline_dtype=precision.params_dtype,
        bf16=precision.params_dtype == torch.bfloat16,
        use_cpu_initialization=True, perform_initialization=False,  # weights always come from a checkpoint
        variable_seq_lengths=True,  # batches are padded per step, not to a fixed length
        moe_token_dispatcher_type="alltoall",  # dense model; the default "allgather" refuses variable_seq_lengths
        recompute_granularity="full" if precision.recompute_activations else None,
        recompute_method="uniform" if precision.recompute_activations else None,
        recompute_num_layers=1 if precision.recompute_activations else None,
        gradient_accumulation_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, bias_dropout_fusion=False,
        cross_entropy_loss_fusion=False, attention_softmax_in_fp32=True,
    )


def block_spec(arch: Arch, config):
    """megatron-core's local GPT layer spec, through its own spec mechanism, with two modules swapped: SDPA as the
    core attention and :class:`RMSNorm` for every norm (layer, QK and final), for this stage's layers."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    from pipeline.backends.megatron_backend.attention import SDPAttention

    spec = get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")
    layer, attn = spec.submodules, spec.submodules.self_attention.submodules
    attn.core_attention = SDPAttention
    layer.input_layernorm = layer.pre_mlp_layernorm = RMSNorm
    if arch.qk_norm:
        attn.q_layernorm = attn.k_layernorm = RMSNorm
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=RMSNorm)


def build_model(arch: Arch, hf_config, tp: int, pp: int, precision: Precision = Precision()):
    """This rank's ``GPTModel`` stage: the embedding on the first stage, final norm and output layer on the last.

    Tied embeddings with ``pp > 1``: megatron-core's own tying (``share_embeddings_and_output_weights``) syncs the
    last stage's copy in its constructor with a hard ``.cuda()`` call, so the last stage instead gets an untied
    ``output_layer`` that the weight loader fills with the embedding and the backend keeps equal by summing the two
    copies' gradients over megatron's embedding group (what megatron-core itself does at each step).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(arch, tp, pp, precision)
    model = GPTModel(
        config=config, transformer_layer_spec=block_spec(arch, config), vocab_size=arch.padded_vocab(tp),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        parallel_output=True, share_embeddings_and_output_weights=arch.tie_word_embeddings and pp == 1,
        position_embedding_type="rope",
    )
    inv_freq = hf_inv_freq(hf_config)
    rope = model.rotary_pos_emb
    if rope.inv_freq.shape != inv_freq.shape:
        raise ValueError(f"RoPE: megatron expects {tuple(rope.inv_freq.shape)} frequencies, HF gives "
                         f"{tuple(inv_freq.shape)} (partial rotary is not mapped)")
    rope.inv_freq = inv_freq.to(rope.inv_freq.device)
    return model
