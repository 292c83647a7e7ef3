"""A byte-level BPE tokenizer trained with the `tokenizers` library, wrapped for transformers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ..errors import CheckpointError
from ..files import verify_checksums

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2):
    """Train a byte-level BPE (exact round trip for any text) and return a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return wrap(tok)


def wrap(tok):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                   unk_token=None)
    fast.padding_side = "left"  # batched generation
    return fast


def load_tokenizer(model_dir: str | os.PathLike):
    """Load the tokenizer saved next to a model (tokenizer.json), offline."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir} has no tokenizer.json.")
    verify_checksums(model_dir, ["tokenizer.json"])  # a tokenizer.json swapped in from another model is refused
    try:
        return wrap(Tokenizer.from_file(str(path)))
    except Exception as e:  # tokenizers raises plain Exception subclasses
        raise CheckpointError(f"{path} cannot be read ({e}); the tokenizer file is corrupt.") from None
