"""Model folders: where the default model lives, opening one, and the data files a folder may carry.

A model folder is what ``save_model`` writes (config.json + model.safetensors + tokenizer.json),
or what transformers' ``save_pretrained`` writes (one or several safetensors shards, the model's own
tokenizer files), plus optional data files that evaluation and some methods read. The shipped base
carries all of them (see ``CARRY_FILES``). For any other model, the model-independent ones (held-out
text, held-out topics, background text, the probe facts) come from the shipped base's copies
(``eval_file``); what depends on the model itself (background slot statistics, which probe facts it
knows) is computed for it (``forgetless graft``, ``evaluate.known``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import CheckpointError, DataSourceError
from .checkpoint import load_model
from .tokenizer import load_tokenizer

# data files a model folder may carry; a model trained from it (``forgetless learn --out``) carries them on
CARRY_FILES = ("memory_stats.safetensors", "facts_known.jsonl", "facts_new.jsonl", "probe_templates.json",
               "data_split.json", "heldout_text.jsonl", "heldout_domains.jsonl", "background_text.jsonl")


def default_model_dir() -> Path:
    """The shipped base (``FORGETLESS_MODEL`` overrides it)."""
    env = os.environ.get("FORGETLESS_MODEL")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "assets" / "forgetless-tiny"


# data files that do not depend on the model (text and facts): any model may use the shipped base's copies
MODEL_INDEPENDENT = ("heldout_text.jsonl", "heldout_domains.jsonl", "background_text.jsonl", "facts_known.jsonl",
                     "facts_new.jsonl", "probe_templates.json")


def shipped_dir() -> Path:
    """The shipped base's folder (not overridden by ``FORGETLESS_MODEL``): the source of shared evaluation data."""
    return Path(__file__).resolve().parent.parent / "assets" / "forgetless-tiny"


def eval_file(model_dir: str | os.PathLike | None, name: str, what: str = "this evaluation") -> Path:
    """The model folder's own copy of a data file, else (for model-independent data) the shipped base's copy."""
    if model_dir is not None and (Path(model_dir) / name).is_file():
        return Path(model_dir) / name
    shipped = shipped_dir() / name
    if name in MODEL_INDEPENDENT and shipped.is_file():
        return shipped
    raise DataSourceError(f"{what} needs {name}, which neither {model_dir} nor the shipped data provides.")


def open_model(model_dir: str | os.PathLike, device: str = "cpu", chat: bool = True):
    """Model (in eval mode, on ``device``) and tokenizer of a model folder, checked to fit each other.
    ``chat=False``: question probes do not go through the tokenizer's chat template."""
    model = load_model(model_dir).to(device)
    tok = load_tokenizer(model_dir, chat=chat)
    check_tokenizer_fits(model, tok, model_dir)
    return model, tok


def check_tokenizer_fits(model, tok, model_dir) -> None:
    """A tokenizer with ids beyond the model's embedding belongs to another model."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tok) > rows:
        raise CheckpointError(f"{model_dir}: the tokenizer has {len(tok)} tokens but the model's embedding has "
                              f"{rows} rows; the tokenizer belongs to another model.")


def encode_texts(tok, texts: list[str]) -> torch.Tensor:
    """One token stream of ``texts``, each followed by the end-of-sequence token."""
    ids: list[int] = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def read_jsonl_texts(path: Path, what: str) -> list[dict]:
    """The JSON objects of a JSONL file (one per non-empty line), with a one-sentence error naming the line."""
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataSourceError(f"{path}, line {i + 1}: not valid JSON ({what}).") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataSourceError(f"{path}, line {i + 1}: expected a JSON object with a 'text' field ({what}).")
        rows.append(row)
    return rows


def load_heldout_ids(model_dir: str | os.PathLike, tok, max_tokens: int) -> torch.Tensor:
    """The first ``max_tokens + 1`` tokens of the held-out text (``heldout_text.jsonl``: the folder's, else the
    shipped slice), tokenised with ``tok``."""
    path = eval_file(model_dir, "heldout_text.jsonl", "held-out NLL")
    ids: list[int] = []
    for line in path.read_text().splitlines():
        ids += tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(ids) > max_tokens + 1:
            break
    return torch.tensor(ids[: max_tokens + 1])


def load_topics(model_dir: str | os.PathLike) -> dict[str, list[dict]]:
    """Held-out topic documents (``heldout_domains.jsonl``: the folder's, else the shipped ones) by topic name."""
    path = eval_file(model_dir, "heldout_domains.jsonl", "the domain and topic streams")
    by_topic: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        d = json.loads(line)
        by_topic.setdefault(d["topic"], []).append(d)
    return by_topic


def load_background_ids(path: Path, tokenizer) -> torch.Tensor:
    """One token stream of background (pretraining) documents, separated by end-of-sequence tokens."""
    path = Path(path)
    if not path.is_file():
        raise DataSourceError(f"background replay needs {path} (a JSONL of {{\"text\": ...}} pretraining text); "
                              f"write one with scripts/sample_background.py or pass background_file.")
    ids = encode_texts(tokenizer, [r["text"] for r in read_jsonl_texts(path, "background text")])
    if ids.numel() < 64:
        raise DataSourceError(f"{path} holds too little text for background replay ({ids.numel()} tokens).")
    return ids
