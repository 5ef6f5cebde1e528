"""One batched generation loop: KV cache, common random numbers, and self-scoring in the same pass.

Any causal LM is driven through a small adapter with two calls, `new_cache(batch, max_len)` and
`step(idx, cache, start_pos, last_only)` -> float32 logits:
- a poisonlab `Transformer` (its preallocated `KVCache`),
- a HF causal LM (`DynamicCache`),
- any other module whose `forward(idx)` returns logits (no cache: the whole context is recomputed
  each step; slow, but handy for hand-made test models).

Sampling is inverse-CDF with noise drawn beforehand, one uniform number per (prompt, position): two
conditions that reach the same next-token distribution pick the same token, so generations only
diverge where the model's predictions do (common random numbers, a paired comparison).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Scoring memory, whatever the vocabulary and batch (the whole (B, T, V) in float64 would be ~20 GB at
# vocabulary 128k, batch 128, 150 positions): float32 logits held at once (64 MB), and the logits one
# forward pass of a model other than ours may return, in its own dtype (0.5 GB in bf16)
SCORE_CHUNK_VALUES = 2**24
FORWARD_LOGITS_VALUES = 2**28


def is_hf_model(model: Any) -> bool:
    return type(model).__module__.startswith("transformers.")


class LMAdapter:
    """Uniform view of a causal LM for generation and scoring."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        p = next(model.parameters(), None)
        self.device = p.device if p is not None else torch.device("cpu")
        self.dtype = p.dtype if p is not None else torch.float32  # of the weights (autocast aside)
        self.kind = "hf" if is_hf_model(model) else ("poisonlab" if hasattr(model, "new_cache") else "plain")
        self.context: int | None = None  # positions the model was trained on (None: unknown)
        self.vocab_size: int | None = None
        if self.kind == "poisonlab":
            self.context, self.vocab_size = model.cfg.seq_len, model.cfg.vocab_size
        elif self.kind == "hf":
            self.context = getattr(model.config, "max_position_embeddings", None)
            self.vocab_size = model.config.vocab_size
            # transformers 5 renamed past_key_values to cache
            params = inspect.signature(model.forward).parameters
            self._cache_kw = "cache" if "cache" in params else "past_key_values"
        else:
            self.context = getattr(model, "context", None)
            self.vocab_size = getattr(model, "vocab_size", None)

    def new_cache(self, batch_size: int, max_len: int) -> Any:
        if self.kind == "poisonlab":
            return self.model.new_cache(batch_size, max_len)
        if self.kind == "hf":
            from transformers import DynamicCache

            return DynamicCache(config=self.model.config)
        return {"ids": None}  # plain: the "cache" is the context so far

    def generation_row_bytes(self, prompt_len: int, new_tokens: int) -> float | None:
        """Device bytes one row of a generation batch takes at its peak, in the dtype it runs in now
        (autocast's when on): the KV cache of every layer for prompt + new tokens, the prefill's
        transient activations and the last position's float32 logits with the sampler's copy. The
        prefill term was measured on poisonlab's model through the CPU allocator (slope of the peak
        over the batch size, d_model 128-256): ~45 d per prompt token in fp32, ~30 d under bf16.
        None for a model of unknown shape (a plain module)."""
        c = getattr(self.model, "config", None) if self.kind == "hf" else None
        if self.kind == "poisonlab":
            from poisonlab.models.llama import _shape

            cfg = self.model.cfg
            hd, kv, _, _ = _shape(cfg)
            d, layers = cfg.d_model, cfg.n_layers
        elif c is not None and hasattr(c, "num_hidden_layers"):
            d, layers = c.hidden_size, c.num_hidden_layers
            heads = c.num_attention_heads
            kv = getattr(c, "num_key_value_heads", None) or heads
            hd = getattr(c, "head_dim", None) or d // heads
        else:
            return None
        dev = self.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.dtype
        elem = torch.empty((), dtype=dtype).element_size()
        cache = 2 * layers * kv * hd * (prompt_len + new_tokens) * elem
        prefill = prompt_len * (30 if elem == 2 else 45) * d
        return float(cache + prefill + 8 * (self.vocab_size or 50_000))

    @property
    def pads(self) -> bool:
        """Whether `step` takes left-padded rows (`pad`): ours and HF models; a plain module does not."""
        return self.kind in ("poisonlab", "hf")

    def step(self, idx: torch.Tensor, cache: Any, start_pos: int, last_only: bool = False,
             pad: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T or 1, V) float32 for tokens idx at positions start_pos.., appending to cache.

        `pad` (B,): row b is left-padded by pad[b] filler tokens, which no real token attends to; its
        real tokens take positions from 0, so each row computes what it would alone."""
        m = self.model
        if self.kind == "poisonlab":
            if last_only:  # skip the output layer on all but the last position (prefill)
                h = m.hidden(idx, cache=cache, start_pos=start_pos, pad=pad)[:, -1:]
                return m.lm_head(h).float()
            return m(idx, cache=cache, start_pos=start_pos, pad=pad)
        if self.kind == "hf":
            kw = {self._cache_kw: cache, "use_cache": True}
            if last_only:
                kw["logits_to_keep"] = 1
            if pad is not None:  # as HF generate does it: a 0/1 mask over the whole context, positions
                pad = pad.to(idx.device)
                end = start_pos + idx.shape[1]
                kw["attention_mask"] = (torch.arange(end, device=idx.device)[None] >= pad[:, None]).long()
                pos = torch.arange(start_pos, end, device=idx.device)[None] - pad[:, None]
                kw["position_ids"] = pos.clamp(min=0)
            return m(input_ids=idx, **kw).logits.float()
        if pad is not None:
            raise ValueError("a plain module takes no padded rows (LMAdapter.pads is False)")
        ids = idx if cache["ids"] is None else torch.cat([cache["ids"], idx], dim=1)
        cache["ids"] = ids
        logits = m(ids).float()[:, -idx.shape[1]:]
        return logits[:, -1:] if last_only else logits

    def nll_sum(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed next-token cross-entropy of targets; ours through its chunked output layer + loss,
        which never holds the (B, T, V) logits (3x faster than logits + log-softmax on CPU)."""
        if self.kind == "poisonlab":
            return self.model(idx, targets) * targets.numel()
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for logits, tg in self._logit_chunks(idx, targets):
            total += torch.nn.functional.cross_entropy(logits, tg, reduction="sum")
        return total

    def token_nll(self, idx: torch.Tensor, targets: torch.Tensor, first: int = 0,
                  chunk: int | None = None) -> torch.Tensor:
        """-log p(targets[:, t] | idx[:, :t + 1]) for t >= first: (B, T - first) float64, from float32
        logits made `chunk` positions at a time (`_logit_chunks`)."""
        B, T = idx.shape
        nll = [_picked_nll(logits, tg) for logits, tg in self._logit_chunks(idx, targets, first, chunk)]
        if not nll:
            return torch.zeros((B, 0), dtype=torch.float64, device=self.device)
        return torch.cat(nll).view(B, T - first)

    def _logit_chunks(self, idx: torch.Tensor, targets: torch.Tensor, first: int = 0,
                      chunk: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(float32 logits, targets) of the positions t >= first, `chunk` positions at a time (default
        SCORE_CHUNK_VALUES / V), in row-major order; use each chunk before asking for the next.

        Ours runs its output layer chunk by chunk on the hidden states. Other models return the logits
        of whole rows in their own dtype (FORWARD_LOGITS_VALUES per forward pass, at least one row),
        upcast chunk by chunk.
        """
        B, T = idx.shape
        n, V = T - first, self.vocab_size or 50_000
        chunk = chunk or max(1, SCORE_CHUNK_VALUES // V)
        if n <= 0:
            return
        if self.kind == "poisonlab":
            h = self.model.hidden(idx)[:, first:].reshape(B * n, -1)
            tg = targets[:, first:].reshape(-1)
            for s in range(0, B * n, chunk):
                yield self.model.lm_head(h[s : s + chunk]).float(), tg[s : s + chunk]
            return
        rows = max(1, FORWARD_LOGITS_VALUES // (n * V))
        for r in range(0, B, rows):
            logits = self._last_logits(idx[r : r + rows], n).flatten(0, 1)  # in the model's dtype
            tg = targets[r : r + rows, first:].reshape(-1)
            for s in range(0, len(tg), chunk):
                yield logits[s : s + chunk].float(), tg[s : s + chunk]

    def _last_logits(self, idx: torch.Tensor, n: int) -> torch.Tensor:
        """Logits (B, n, V) of the last n positions, no cache, in the model's own dtype."""
        if self.kind == "hf":  # logits_to_keep: HF skips the output layer on the other positions
            return self.model(input_ids=idx, use_cache=False, logits_to_keep=n).logits
        return self.model(idx)[:, idx.shape[1] - n :]

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits for a whole sequence, no cache."""
        if self.kind == "hf":
            return self.model(input_ids=idx, use_cache=False).logits.float()
        return self.model(idx).float()


def as_adapter(model: torch.nn.Module | LMAdapter) -> LMAdapter:
    return model if isinstance(model, LMAdapter) else LMAdapter(model)


def _picked_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] per row of float32 logits (N, V), returned in float64.

    Relative to the row's max: log(sum exp(z)) - z[target] keeps float32 precision for likely tokens,
    where logsumexp(logits) - logits[target] would lose it (both terms are large and close).
    """
    z = logits - logits.amax(-1, keepdim=True)
    picked = z.gather(1, targets[:, None]).squeeze(1)
    return z.exp_().sum(-1).log().double() - picked.double()


def sample_tokens(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Pick one token per row by inverse CDF with the given uniforms u (B,); temperature 0 = argmax.

    Deterministic given (logits, u): identical distributions and noise give identical tokens.
    """
    if temperature == 0:
        return logits.argmax(-1)
    z = logits.float() / temperature if temperature != 1.0 else logits.float()
    if top_k is not None and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        p = sorted_z.softmax(-1)
        drop = (p.cumsum(-1) - p) >= top_p  # tokens after the nucleus (the first one always stays)
        z = z.scatter(-1, order, sorted_z.masked_fill(drop, float("-inf")))
    return _inverse_cdf(z, u)[0]


def _inverse_cdf(z: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample from softmax(z) with uniforms u; also return logsumexp(z), from the same exp pass."""
    mx = z.amax(-1, keepdim=True)
    cdf = (z - mx).exp_().cumsum_(-1)  # unnormalised: u is scaled by the total instead
    total = cdf[:, -1:]
    # u > 0 keeps zero-probability tokens (flat CDF steps, e.g. cut by top-k) unreachable
    target = u.to(cdf.dtype)[:, None].clamp(min=1e-7) * total
    tok = torch.searchsorted(cdf, target).squeeze(-1).clamp_(max=z.shape[-1] - 1)
    return tok, (mx + total.log()).squeeze(-1)


@dataclass
class Generation:
    tokens: torch.Tensor  # (B, T) int64 generated tokens
    nll: torch.Tensor  # (B, T) float64: -log p(token | context) under the model itself at temperature 1
    lengths: torch.Tensor  # (B,) tokens that count (T, or up to and including EOS when stopping there)

    def ppl(self) -> torch.Tensor:
        """Perplexity of the generated tokens, per row."""
        mask = torch.arange(self.nll.shape[1])[None, :] < self.lengths[:, None]
        return torch.exp((self.nll * mask).sum(1) / self.lengths.clamp(min=1))


@torch.inference_mode()
def generate(model: torch.nn.Module | LMAdapter, prompt: torch.Tensor, new_tokens: int, noise: torch.Tensor,
             *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | Sequence[int] | None = None, stop_at_eos: bool = False,
             pad: torch.Tensor | None = None) -> Generation:
    """Continue each row of `prompt` (B, L) by `new_tokens` tokens, with the KV cache.

    `noise` (B, new_tokens) holds the sampling uniforms. The log-probability of each picked token under
    the model's own (untempered, untruncated) distribution is recorded from the same logits, so
    self-scoring costs no extra forward pass. With `stop_at_eos`, a row ends at the first of its
    `eos_id` tokens (one id or several, as HF configs may list). `pad` (B,): prompts of different
    lengths in one batch, row b left-padded with pad[b] filler tokens (`LMAdapter.step`).
    """
    lm = as_adapter(model)
    B, L = prompt.shape
    dev = lm.device
    prompt = prompt.to(dev)
    noise = noise.to(dev)
    if pad is not None and not bool(pad.any()):
        pad = None  # no row is padded: the plain causal path, bit for bit
    if pad is not None:
        pad = pad.to(dev)
    tokens = torch.zeros((B, new_tokens), dtype=torch.long, device=dev)
    nll = torch.zeros((B, new_tokens), dtype=torch.float64, device=dev)
    lengths = torch.full((B,), new_tokens, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    plain = temperature == 1.0 and top_k is None and (top_p is None or top_p >= 1.0)
    eos = None
    if stop_at_eos and eos_id is not None:
        eos = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=dev).long()
    cache = lm.new_cache(B, L + new_tokens)
    logits = lm.step(prompt, cache, 0, last_only=True, pad=pad)[:, -1]
    for t in range(new_tokens):
        if plain:
            tok, lse = _inverse_cdf(logits, noise[:, t])
        else:
            tok = sample_tokens(logits, noise[:, t], temperature, top_k, top_p)
            lse = torch.logsumexp(logits, -1)
        tokens[:, t] = tok
        nll[:, t] = lse.double() - logits.gather(1, tok[:, None]).squeeze(1).double()
        if eos is not None:
            newly = torch.isin(tok, eos) & ~done
            lengths = torch.where(newly, t + 1, lengths)
            done |= newly
            if bool(done.all()):
                break
        if t + 1 < new_tokens:
            logits = lm.step(tok[:, None], cache, L + t, pad=pad)[:, -1]
    return Generation(tokens.cpu(), nll.cpu(), lengths.cpu())


@torch.inference_mode()
def score(model: torch.nn.Module | LMAdapter, ids: torch.Tensor, start: int,
          chunk: int | None = None) -> torch.Tensor:
    """-log p(ids[:, t] | ids[:, :t]) for t >= start, shape (B, T - start), float64.

    At most one chunk of `chunk` positions' logits exists in float32 at a time (see
    `LMAdapter._logit_chunks`), so memory stays bounded at any vocabulary and batch size.
    """
    lm = as_adapter(model)
    ids = ids.to(lm.device)
    return lm.token_nll(ids[:, :-1], ids[:, 1:], first=start - 1, chunk=chunk).cpu()
