"""Tokenizers: forgetless's own byte-level BPE, and any Hugging Face tokenizer exactly as its model ships it.

A folder written by forgetless (its tokenizer.json holds forgetless's two special tokens and its
tokenizer_config.json names them) is wrapped as it always was. Any other folder is loaded with
``AutoTokenizer.from_pretrained(dir, local_files_only=True)`` and left unchanged: no token is added;
the pad token is one it already has (pad, else eos, else unk); padding is on the left for batched
generation. A tokenizer with a chat template is used through it for question probes unless
``chat=False`` (see ``uses_chat``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from ..errors import CheckpointError
from ..files import verify_checksums

EOS = "<|endoftext|>"
PAD = "<|pad|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")


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
    fast.forgetless_chat = False
    return fast


def _is_forgetless_tokenizer(model_dir: Path, tok) -> bool:
    """forgetless's own tokenizer: both special tokens in its vocabulary, and no other eos/pad named."""
    vocab = tok.get_vocab()
    if EOS not in vocab or PAD not in vocab:
        return False
    cfg_path = model_dir / "tokenizer_config.json"
    if not cfg_path.is_file():
        return True
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return cfg.get("eos_token") in (EOS, None) and cfg.get("pad_token") in (PAD, None)


def load_tokenizer(model_dir: str | os.PathLike, chat: bool = True):
    """The tokenizer saved next to a model, offline: forgetless's own wrapped as always, any other unchanged."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        verify_checksums(model_dir, ["tokenizer.json"])  # a tokenizer.json swapped in from another model is refused
        try:
            raw = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise CheckpointError(f"{path} cannot be read ({e}); the tokenizer file is corrupt.") from None
        if _is_forgetless_tokenizer(model_dir, raw):
            return wrap(raw)
    elif not any((model_dir / n).is_file() for n in TOKENIZER_FILES):
        raise CheckpointError(f"{model_dir} has no tokenizer.json (nor any other tokenizer file).")
    return load_hf_tokenizer(model_dir, chat=chat)


def load_hf_tokenizer(model_dir: str | os.PathLike, chat: bool = True):
    """``AutoTokenizer`` of a folder, unchanged except for which existing token pads."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... for unreadable files
        raise CheckpointError(f"{model_dir}: its tokenizer cannot be loaded ({str(e).splitlines()[0][:160]}).") from None
    n = len(tok)
    if tok.pad_token is None:
        for name in ("eos_token", "unk_token"):
            if getattr(tok, name) is not None:
                tok.pad_token = getattr(tok, name)
                break
        else:
            raise CheckpointError(f"{model_dir}: the tokenizer has no pad, eos or unk token to pad batches with.")
    if tok.eos_token is None:
        raise CheckpointError(f"{model_dir}: the tokenizer has no end-of-sequence token.")
    assert len(tok) == n, "choosing a pad token must not add one"
    tok.padding_side = "left"  # batched generation (training batches ask for right padding themselves)
    tok.forgetless_chat = bool(chat and getattr(tok, "chat_template", None))
    return tok


def uses_chat(tok) -> bool:
    """Whether question probes go through the tokenizer's chat template."""
    return bool(getattr(tok, "forgetless_chat", False))
