"""The tiny model's tokenizer: one token per character, built locally with ``tokenizers`` (no download, no training).

Vocabulary, in a fixed order so that every build gives the same ids: the special tokens ``<pad>`` (0), ``<eos>`` (1),
``<bos>`` (2), ``<unk>`` (3); the multi-character token ``\\boxed{`` (the answer marker the reward looks for, one token
so that the model emits it in one step); then newline and every printable ASCII character. Any other character encodes
to ``<unk>`` instead of failing. Decoding joins tokens with nothing in between, so ``decode(encode(x)) == x`` for any
printable-ASCII text.

No special token is added when encoding (``add_special_tokens`` has no effect): the pipeline appends ``<eos>`` to SFT
responses itself, and prompts are plain text.
"""
from __future__ import annotations

import string

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK)
MULTI_CHAR_TOKENS = ("\\boxed{",)
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))  # newline + printable ASCII, in code-point order


def vocabulary() -> dict[str, int]:
    """Token -> id, fixed by construction (no dependence on hashing or set order)."""
    tokens = [*SPECIAL_TOKENS, *MULTI_CHAR_TOKENS, *CHARACTERS]
    return {tok: i for i, tok in enumerate(tokens)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the character tokenizer; deterministic (same ids every call) and savable with ``save_pretrained``."""
    vocab = vocabulary()
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # every character is its own pre-token; added tokens (\boxed{ and the specials) are cut out before this runs
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    core.add_tokens([AddedToken(t, special=False, normalized=False, single_word=False) for t in MULTI_CHAR_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )
    tok.padding_side = "left"  # generation pads prompts on the left; training code may pad as it likes
    return tok


assert set(string.digits + "+-=?\\{}").issubset(CHARACTERS)
