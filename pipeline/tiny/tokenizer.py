"""The tiny model's tokenizer: one token per byte (so one per ASCII character), built locally, nothing downloaded.

Why it is a :class:`~transformers.Qwen2Tokenizer` with byte-level symbols rather than a bare character WordLevel
tokenizer: ``AutoTokenizer.from_pretrained`` on a folder whose config.json says ``model_type: qwen2`` always rebuilds
the tokenizer as a Qwen2Tokenizer (byte-level BPE pipeline, whatever tokenizer_config.json says), which would silently
drop spaces and newlines of a plain character vocabulary. A byte-level vocabulary with **no merges** is what that
pipeline expects, stays character-level for ASCII, and reloads identically from a checkpoint folder.

Vocabulary, in a fixed order so that every build gives the same ids: ``<pad>`` (0), ``<eos>`` (1), ``<bos>`` (2),
``<unk>`` (3); the multi-character token ``\\boxed{`` (4; the answer marker the reward looks for, one token so that
the model emits it in one step); then the 256 byte symbols in byte order. Every text therefore encodes (characters
outside ASCII take one token per UTF-8 byte) and ``decode(encode(x)) == x`` for any NFC-normalised text; ``<unk>``
exists for tools that expect one but is never produced. The literal special-token strings (``<eos>`` ...) in a text
encode to the special ids.

No special token is added when encoding: the pipeline appends ``<eos>`` to SFT responses itself, and prompts are
plain text.
"""
from __future__ import annotations

from tokenizers import AddedToken
from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK)
MULTI_CHAR_TOKENS = ("\\boxed{",)


def byte_symbols() -> list[str]:
    """The printable stand-in for each byte 0..255 used by byte-level BPE: printable Latin-1 bytes stand for
    themselves, the others are shifted to code points from 256 upwards (in byte order)."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    out, shift = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + shift))
            shift += 1
    return out


def vocabulary() -> dict[str, int]:
    """Token -> id, fixed by construction (no dependence on hashing or set order)."""
    tokens = [*SPECIAL_TOKENS, *MULTI_CHAR_TOKENS, *byte_symbols()]
    return {tok: i for i, tok in enumerate(tokens)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the byte/character tokenizer; deterministic (same ids every call), savable with ``save_pretrained``."""
    tok = Qwen2Tokenizer(
        vocab=vocabulary(),
        merges=[],
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
        padding_side="left",  # generation pads prompts on the left; training code may pad as it likes
    )
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MULTI_CHAR_TOKENS])
    return tok
