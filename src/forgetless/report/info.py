"""`forgetless info`: what a model folder holds."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import CheckpointError


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} is not valid JSON; the model folder is corrupt.") from None


def model_info(model_dir: str | os.PathLike) -> dict:
    from ..models.checkpoint import load_model
    from ..models.memory import named_memory_layers
    from ..models.tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    model = load_model(model_dir)
    tok = load_tokenizer(model_dir)
    mems = named_memory_layers(model)
    mem_params = sum(p.numel() for m in mems.values() for p in m.parameters())
    total = sum(p.numel() for p in model.parameters())
    cfg = model.config
    info: dict = {
        "model_dir": str(model_dir),
        "architecture": type(model).__name__,
        "parameters": {"total": total, "dense": total - mem_params, "memory": mem_params,
                       "memory_values": sum(m.values.numel() for m in mems.values())},
        "shape": {"hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers,
                  "attention_heads": cfg.num_attention_heads, "context": cfg.max_position_embeddings},
        "memory_layers": [{"module": n, "slots": m.n_slots, **m.config.to_dict()} for n, m in mems.items()],
        "tokenizer": {"type": "byte-level BPE" if type(tok).__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast")
                      else type(tok).__name__, "vocab_size": len(tok), "eos": tok.eos_token, "pad": tok.pad_token,
                      "chat_template": bool(getattr(tok, "chat_template", None))},
    }
    split = _read_json(model_dir / "data_split.json")
    if split:
        info["data"] = {
            "sources": split.get("sources"),
            "tokens": split.get("tokens"),
            "heldout_topics": {t: v["docs"] for t, v in split.get("heldout_topics", {}).items()},
            "facts": {k: v for k, v in split.get("facts", {}).items() if not k.endswith("countries")},
        }
    ev = _read_json(model_dir / "evaluation.json")
    if ev:
        h = ev.get("memory_health", {})
        info["memory_health"] = {k: v for k, v in h.items() if k != "layers"}
        info["evaluation"] = {
            "heldout_ppl": ev["heldout"]["ppl"],
            "known_fact_probe_em": ev["known_probes"]["exact_match"],
            "new_fact_probe_em": ev["new_probes"]["exact_match"],
            "train_tokens": ev.get("train_tokens"), "train_minutes": ev.get("train_seconds", 0) / 60,
            "trained_on": ev.get("device_name"),
        }
    info["background_statistics"] = (model_dir / "memory_stats.safetensors").is_file()
    return info


def format_info(info: dict) -> str:
    p = info["parameters"]
    s = info["shape"]
    lines = [
        f"model          {info['model_dir']}",
        f"architecture   {info['architecture']}: hidden {s['hidden_size']}, {s['layers']} layers, "
        f"{s['attention_heads']} heads, context {s['context']}",
        f"parameters     {p['total']:,} total = {p['dense']:,} dense + {p['memory']:,} memory "
        f"({p['memory_values']:,} values)",
        f"tokenizer      {info['tokenizer']['type']}, {info['tokenizer']['vocab_size']:,} tokens, eos "
        f"{info['tokenizer'].get('eos')!r}, pad {info['tokenizer'].get('pad')!r}"
        + (", chat template" if info["tokenizer"].get("chat_template") else ""),
    ]
    for m in info["memory_layers"]:
        lines.append(f"memory layer   {m['module']}: {m['slots']:,} slots ({m['n_keys']}x{m['n_keys']} product keys), "
                     f"{m['heads']} heads, k={m['knn']}, query norm {m['query_norm']}")
    if not info["memory_layers"]:
        lines.append("memory layer   none")
    d = info.get("data")
    if d:
        src = ", ".join(f"{k} {v['train_docs']:,} docs" for k, v in (d.get("sources") or {}).items())
        lines.append(f"data           {src}; tokens {d.get('tokens')}")
        lines.append(f"held-out topics {', '.join(f'{t} ({n})' for t, n in d['heldout_topics'].items())}")
        f = d["facts"]
        lines.append(f"facts          {f.get('known')} known ({f.get('known_with_qa_lines')} with QA lines), "
                     f"{f.get('new')} new")
    h = info.get("memory_health")
    if h:
        lines.append(f"slot usage     {h['read_share']:.1%} of slots read over {h['background_batches']:,} background "
                     f"batches; entropy {h['usage_entropy_ratio']:.3f} of max ({h['effective_slots']:,.0f} effective slots)")
        lines.append(f"fact lookups   {h['fact_token_specific_share']:.1%} of the lookup weight on fact tokens falls on "
                     f"slots read in < half of background sequences (uniform memory: each slot in "
                     f"{h['uniform_doc_rate']:.1%} of them)")
    e = info.get("evaluation")
    if e:
        lines.append(f"evaluation     held-out ppl {e['heldout_ppl']:.2f}; known-fact probes {e['known_fact_probe_em']:.1%}; "
                     f"new-fact probes {e['new_fact_probe_em']:.1%}")
        lines.append(f"pretraining    {e['train_tokens']:,} tokens, {e['train_minutes']:.1f} min on {e['trained_on']}")
    lines.append(f"background statistics {'present' if info['background_statistics'] else 'missing'}")
    return "\n".join(lines)
