"""Sampling continuations from a causal LM with its KV cache, for on-policy refresh (the student
continues corpus prompts). Teacher generation passes (`generate_pass.py`) call HF `generate()`
instead: left-padded batches of variable-length prompts, greedy or nucleus sampling, EOS stops.
"""
from __future__ import annotations


def sample(model, prompts, n_new: int, generator, *, temperature: float = 1.0, top_p: float = 1.0,
           vocab_size: int | None = None):
    """prompts [B, P] (int64, on the model's device) → [B, P + n_new], drawing each new token from
    the model's distribution at `temperature` (nucleus `top_p` < 1 keeps the smallest set of ids
    whose mass reaches top_p). One forward over the prompts, then one per token on the cache.
    `vocab_size` (the run's W, models.ModelInfo): draw from logits[..., :W] only — the rows of a
    wider head are padding that no teacher (or tokenizer) can take as input; None: the whole head."""
    import torch

    cut = slice(None, vocab_size)
    with torch.inference_mode():
        out = model(input_ids=prompts, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1, cut].float()
        toks = [prompts]
        for i in range(n_new):
            nxt = torch.multinomial(_probs(logits, temperature, top_p), 1, generator=generator)
            toks.append(nxt)
            if i + 1 < n_new:
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past, logits = out.past_key_values, out.logits[:, -1, cut].float()
        return torch.cat(toks, dim=1)


def _probs(logits, temperature: float, top_p: float):
    import torch

    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    # keep an id while the mass before it is < top_p (the most likely id is always kept)
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return kept / kept.sum(-1, keepdim=True)
