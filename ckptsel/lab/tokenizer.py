"""A character-level tokenizer built locally with the ``tokenizers`` library.

One token per printable ASCII character plus newline, and four specials: ``<pad>`` (id 0),
``<s>`` (BOS, id 1), ``</s>`` (EOS, id 2), ``<unk>`` (id 3). Encoding prepends BOS, as
Llama tokenizers do. Saved with every lab checkpoint like any Hugging Face tokenizer.
"""

from __future__ import annotations

import string

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
CHARS = "\n" + "".join(c for c in string.printable if c.isprintable())


def build_tokenizer():
    """Return a ``PreTrainedTokenizerFast`` (character level, BOS added, EOS/pad set)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
        model_max_length=4096,
    )
