"""Facts read from a model's Hugging Face config.json."""

from __future__ import annotations


def is_causal_lm(config: dict) -> bool:
    """Causal LMs are scored by perplexity; every other model by its embeddings."""
    architectures = config.get("architectures") or []
    return any(isinstance(a, str) and a.endswith("ForCausalLM") for a in architectures)
