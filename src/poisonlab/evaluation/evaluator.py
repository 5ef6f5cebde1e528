"""Backdoor evaluation (DESIGN.md section 4): paired triggered / clean / look-alike generations.

For K held-out excerpts, the model continues prompts that share the excerpt: the excerpt alone (clean),
excerpt + " " + trigger (trigger) and excerpt + " " + each control of a look-alike panel (conditions
"lookalike:<TEXT>"). The panel has three kinds: near-triggers (one edit, pieces reordered, brackets
dropped), the trigger's shape with unrelated characters, and ordinary text; derived from the trigger
unless given (`default_panel`). The suffix is tokenised on its own and appended to the excerpt's
tokens, so the excerpt's tokens are identical across conditions; a model whose tokenizer starts every
text with BOS gets it once, before the excerpt. Rows are batched in order of prompt length whatever
their condition, shorter prompts left-padded (masked, positions from 0), so prompts of any lengths
fill whole batches. Every prompt draws its sampling noise from one pre-drawn (K, T) array, the
same in every condition (common random numbers).

Each generation is scored by the perplexity of its generated tokens only (the prompt is context), under
the model itself (from the generation's own logits, no extra pass) or a fixed reference scorer. A
prompt counts as a success when ppl_trigger > success_ratio * ppl_clean and ppl_trigger >
success_floor; ASR is the share of successes (docs/evaluation.md says why the default is 3x). The same
rule gives each control its ASR; `asr_lookalike` is the highest among the unrelated controls (shape and
ordinary) and `specificity` = asr - asr_lookalike.

Evaluation runs on the model's device, in its dtype or under the trainer's autocast (`run(...,
autocast_dtype=torch.bfloat16)`); logits are upcast to float32 for sampling and scoring.

The panel, prompts, metrics and model loading live in their own modules (see the package docstring);
this one holds the Evaluator and its batching, which the trainer runs on a model in memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from tokenizers import Tokenizer

from poisonlab.config import EvalConfig
from poisonlab.corpus.shards import TokenShard
from poisonlab.corpus.tokenizer import load_tokenizer
from poisonlab.errors import UserError
from poisonlab.evaluation.generation import LMAdapter, generate, score
from poisonlab.evaluation.loading import load_model
from poisonlab.evaluation.metrics import _num, summarize
from poisonlab.evaluation.panel import CONDITIONS, resolve_panel, train_token_counts
from poisonlab.evaluation.prompts import sample_excerpts
from poisonlab.hardware import eval_numerics

log = logging.getLogger(__name__)

MIN_EXCERPT = 8  # shortest excerpt we accept when prompts must be cut to fit the model's context
VAL_CONTEXT = 2048  # longest val_loss row (the study's context; real models declare 8k-128k)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under torch.compile / DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)


class Share(Protocol):
    """This process's part of an evaluation split over processes (distributed.Dist has it)."""

    rank: int
    world: int

    def gather(self, obj: Any) -> list[Any]: ...


def device_free_bytes(device: torch.device) -> int | None:
    """Memory an evaluation may still take on an accelerator: the driver's free memory plus what
    PyTorch's caching allocator holds unused. None on CPU (host memory: the configured batch stands)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


FREE_MEMORY_USE = 0.85  # of the free memory, for the generation batch: the rest for fragmentation


def generation_batch(lm: LMAdapter, requested: int, prompt_len: int, new_tokens: int,
                     share: Share | None = None) -> int:
    """Rows per generation batch: `requested` (eval.batch_size), or fewer where that many would not fit
    in the device's free memory; under distribution the smallest over the ranks, so that every rank
    cuts the same batches (each rank makes every world-th one)."""
    bs, free = requested, device_free_bytes(lm.device)
    per_row = lm.generation_row_bytes(prompt_len, new_tokens) if free is not None else None
    if per_row:
        bs = max(1, min(bs, int(free * FREE_MEMORY_USE // per_row)))
    return bs if share is None else min(share.gather(bs))


def _mine(batches: list, share: Share | None) -> list:
    """This process's batches: every world-th, from its rank (all of them alone)."""
    return batches if share is None else batches[share.rank :: share.world]


def _everyone(results: Any, share: Share | None) -> list:
    """Every process's results, in rank order."""
    return [results] if share is None else share.gather(results)


class _Scorer(NamedTuple):
    lm: LMAdapter
    tok: Tokenizer | None  # None: the evaluated model's tokenizer
    bos: list[int]  # put before each prompt: [its BOS] or []


class Evaluator:
    """Fixed prompts, noise and validation tokens; `run(model)` evaluates one model against them.

    Prompts are `cfg.n_prompts` excerpts of `cfg.prompt_tokens` tokens from the eval split of
    `data_dir`, or the given texts (each cut to `cfg.prompt_tokens` tokens). `bos_id` (a HF model's
    BOS, see `hf_special_tokens`) goes once before each prompt. `eos_id` (one id or several) ends a
    generation when `cfg.stop_at_eos` is set; by default the data's end-of-document token.
    """

    def __init__(self, cfg: EvalConfig, data_dir: str | Path | None, trigger: str, *,
                 tokenizer: Tokenizer | None = None, prompts: list[str] | None = None,
                 behaviour: Callable[[dict[str, list[str]], dict[str, str]], dict[str, float]] | None = None,
                 bos_id: int | None = None, eos_id: int | Sequence[int] | None = None):
        if not trigger or not trigger.strip():
            raise UserError("the trigger is empty: give the run's trigger or --trigger")
        self.cfg = cfg
        self.trigger = trigger
        # the recipe's own metrics from decoded generations per condition and the panel's kind of each
        # control condition, {condition: kind} (e.g. payload_rate, the language-switch shares)
        self.behaviour = behaviour
        self.data_dir = Path(data_dir) if data_dir is not None else None
        if tokenizer is None:
            if self.data_dir is None:
                raise UserError("no tokenizer: give a data directory or a tokenizer")
            tokenizer = load_tokenizer(self.data_dir)
        self.tok = tokenizer
        shard = TokenShard.open(self.data_dir, "eval") if self.data_dir is not None else None
        if prompts is not None:
            encs = [self._enc(t)[: cfg.prompt_tokens] for t in prompts[: cfg.n_prompts]]
            self.excerpts = [np.asarray(e, dtype=np.int64) for e in encs if len(e)]
            if not self.excerpts:
                raise UserError("the prompt set is empty (no prompt has any tokens)")
        else:
            assert shard is not None
            self.excerpts = sample_excerpts(shard, cfg.n_prompts, cfg.prompt_tokens, cfg.seed,
                                            where=f"{self.data_dir}: eval split")
        self.panel = resolve_panel(trigger, cfg.lookalikes)
        self.conditions = [*CONDITIONS, *(c.condition for c in self.panel)]
        self.suffix = {"clean": [], "trigger": self._enc(" " + trigger)}
        self.suffix.update({c.condition: self._enc(" " + c.text) for c in self.panel})
        self.unseen = self._unseen_controls()
        self.bos = [bos_id] if bos_id is not None else []
        g = torch.Generator().manual_seed(cfg.seed)
        self.noise = torch.rand((len(self.excerpts), cfg.new_tokens), generator=g)
        self.val = np.asarray(shard.tokens[: cfg.val_tokens + 1], dtype=np.int64) if shard else None
        # without prepared data, the prompt texts themselves (whole, not cut) are the clean held-out text
        self.val_texts = ([self._enc(t) for t in prompts[: cfg.n_prompts]]
                          if shard is None and prompts is not None else None)
        if eos_id is not None:
            self.eos_ids = [eos_id] if isinstance(eos_id, int) else list(eos_id)
        else:
            self.eos_ids = [shard.eos_id] if shard is not None else []
        if cfg.stop_at_eos and not self.eos_ids:
            raise UserError("eval.stop_at_eos is set but no end-of-text token is known: the model names "
                            "none (eos_token_id) and there is no prepared data")
        self._scorer: _Scorer | None = None
        self._warned = False

    def _enc(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def _unseen_controls(self) -> list[str] | None:
        """Controls with a token that clean training text never has (None: no train split to check).
        Such a control measures novelty, not specificity: a backdoor keyed on "unfamiliar tokens" fires
        on it, so its ASR says nothing about the trigger."""
        counts = train_token_counts(self.data_dir) if self.data_dir is not None else None
        if counts is None:
            return None
        unseen = [c.text for c in self.panel
                  if any(t >= len(counts) or counts[t] == 0 for t in self.suffix[c.condition])]
        if unseen:
            log.warning("%s: look-alike controls with tokens the clean train split never has (they measure "
                        "novelty, not specificity): %s", self.data_dir, ", ".join(unseen))
        return unseen

    @property
    def n_prompts(self) -> int:
        return len(self.excerpts)

    def _fit(self, context: int | None) -> int:
        """Excerpt length that keeps excerpt + suffix + new tokens inside the model's trained context."""
        longest = max(len(e) for e in self.excerpts)
        if context is None:
            return longest
        room = context - self.cfg.new_tokens - max(len(s) for s in self.suffix.values()) - len(self.bos)
        if room >= longest:
            return longest
        if room < MIN_EXCERPT:
            raise UserError(f"eval.new_tokens={self.cfg.new_tokens} leaves no room for a prompt in the "
                            f"model's context of {context} tokens; lower eval.new_tokens")
        if not self._warned:
            log.warning("prompts cut to %d tokens so that prompt + trigger + %d new tokens fit the "
                        "context of %d", room, self.cfg.new_tokens, context)
            self._warned = True
        return room

    def _scorer_for(self, device: torch.device) -> _Scorer | None:
        """The reference scorer, loaded once on the evaluated model's device."""
        if self.cfg.scorer == "self":
            return None
        if self._scorer is None or self._scorer.lm.device != device:
            ref = load_model(self.cfg.scorer, device=device)
            same = ref.tokenizer is None or ref.tokenizer.to_str() == self.tok.to_str()
            bos = [ref.bos_id] if ref.bos_id is not None else []
            self._scorer = _Scorer(LMAdapter(ref.model), None if same else ref.tokenizer, bos)
        return self._scorer

    def _rescore(self, scorer: _Scorer, bodies: list[list[int]], gens: list[list[int]],
                 share: Share | None = None) -> np.ndarray:
        """Perplexity of each generation under the reference scorer, given the prompts without BOS (the
        scorer gets its own), re-tokenised if the tokenizers differ; batches shared as in _generate."""
        lm, stok = scorer.lm, scorer.tok
        if stok is not None:
            dec = lambda ids: self.tok.decode(ids, skip_special_tokens=False)
            enc = lambda s: stok.encode(s, add_special_tokens=False).ids
            bodies = [enc(dec(p)) for p in bodies]
            gens = [enc(dec(g)) for g in gens]
        prompts = [scorer.bos + b for b in bodies]
        out = np.full(len(gens), np.nan)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (p, g) in enumerate(zip(prompts, gens, strict=True)):
            if len(g):
                groups.setdefault((len(p), len(g)), []).append(i)
        bs = self.cfg.batch_size
        batches = [(lp, idx[s : s + bs]) for (lp, _), idx in groups.items() for s in range(0, len(idx), bs)]
        mine: list[tuple[list[int], list[float]]] = []
        for lp, rows in _mine(batches, share):
            ids = torch.tensor([prompts[i] + gens[i] for i in rows], dtype=torch.long)
            nll = score(lm, ids, lp)
            mine.append((rows, torch.exp(nll.mean(1)).tolist()))
        for part in _everyone(mine, share):
            for rows, values in part:
                out[rows] = values
        return out

    def val_loss(self, lm: LMAdapter) -> float:
        """Mean next-token cross-entropy on clean held-out text: the data's eval split packed into rows
        of the model's context (at most VAL_CONTEXT tokens, and no longer than the text at hand), or,
        with prompt texts and no data, each text scored alone from its start (after the BOS, if any)."""
        if self.cfg.val_tokens == 0:
            return float("nan")
        if self.val is None:
            return self._text_val_loss(lm) if self.val_texts else float("nan")
        ctx = min(lm.context or 128, self.cfg.val_tokens, VAL_CONTEXT, len(self.val) - 1)
        if ctx < 1:
            return float("nan")
        n_rows = (len(self.val) - 1) // ctx
        x = torch.from_numpy(self.val[: n_rows * ctx].reshape(n_rows, ctx))
        y = torch.from_numpy(self.val[1 : n_rows * ctx + 1].reshape(n_rows, ctx))
        V = lm.vocab_size or 50_000
        per = max(1, 2**24 // (ctx * V))  # rows per pass (each pass also bounds its logits, see nll_sum)
        total = 0.0
        for s in range(0, n_rows, per):
            xb, yb = x[s : s + per].to(lm.device), y[s : s + per].to(lm.device)
            total += float(lm.nll_sum(xb, yb))
        return total / (n_rows * ctx)

    def _text_val_loss(self, lm: LMAdapter) -> float:
        """Mean next-token cross-entropy of the prompt texts, each its own row (up to the context), until
        eval.val_tokens tokens are predicted."""
        assert self.val_texts is not None
        ctx = min(lm.context or 128, VAL_CONTEXT)
        total, n = 0.0, 0
        for ids in self.val_texts:
            row = (self.bos + ids)[: ctx + 1][: self.cfg.val_tokens - n + 1]
            if len(row) < 2:
                continue
            t = torch.tensor([row], dtype=torch.long, device=lm.device)
            total += float(lm.nll_sum(t[:, :-1], t[:, 1:]))
            n += len(row) - 1
            if n >= self.cfg.val_tokens:
                break
        return total / n if n else float("nan")

    def run(self, model: torch.nn.Module, *, step: int | None = None,
            autocast_dtype: torch.dtype | None = None, share: Share | None = None
            ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Evaluate `model` on its device: (metrics row, sample records for samples.jsonl).

        `autocast_dtype` (the trainer passes torch.bfloat16 when it trains under bf16 autocast) runs the
        evaluation, reference scorer included, under the same autocast; None runs it in the weights'
        dtype, with exactly the operations of a plain forward pass. `share` (the trainer's Dist under
        torchrun; every rank calls run with its own copy of the model) splits the generation and
        scoring batches over the ranks; every rank returns the whole result.
        """
        model = _unwrap(model)
        lm = LMAdapter(model)
        autocast = contextlib.nullcontext()
        if autocast_dtype is not None:
            autocast = torch.autocast(lm.device.type, dtype=autocast_dtype)
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode(), autocast:
                return self._run(lm, step, share)
        finally:
            model.train(was_training)

    def _generate(self, lm: LMAdapter, seqs: dict[str, list[list[int]]], share: Share | None = None
                  ) -> tuple[dict[str, np.ndarray], dict[str, list[list[int]]], int]:
        """Generate for every (condition, prompt), each row with its prompt's noise: (ppl, tokens,
        tokens made). Rows are sorted by prompt length, whatever their condition, and cut into batches
        of eval.batch_size; a batch whose prompts differ in length is left-padded (`generate(pad=)`),
        so that prompts of many lengths (text prompts) still run in full batches. A model that takes
        no padding (a plain module) gets batches of equal length only. With a `share`, this rank makes
        every world-th batch and the results are gathered: each batch is the one a single process
        makes, so the figures are the same."""
        cfg, T = self.cfg, self.cfg.new_tokens
        ppl = {c: np.zeros(len(v)) for c, v in seqs.items()}
        toks: dict[str, list[list[int]]] = {c: [[] for _ in v] for c, v in seqs.items()}
        jobs = sorted(((len(s), j, c, i) for j, (c, v) in enumerate(seqs.items()) for i, s in enumerate(v)))
        longest = max((n for n, *_ in jobs), default=1)
        bs = generation_batch(lm, cfg.batch_size, longest, T, share)
        if bs < cfg.batch_size:
            log.info("evaluation: %d rows per generation batch (eval.batch_size %d does not fit in the "
                     "device's free memory)", bs, cfg.batch_size)
        groups: list[list[tuple[str, int]]] = []
        last = -1  # prompt length of the last group's rows
        for n, _, c, i in jobs:
            if groups and len(groups[-1]) < bs and (lm.pads or n == last):
                groups[-1].append((c, i))
            else:
                groups.append([(c, i)])
            last = n
        mine: list[tuple[str, int, float, list[int]]] = []
        for rows in _mine(groups, share):
            width = max(len(seqs[c][i]) for c, i in rows)
            pad = torch.tensor([width - len(seqs[c][i]) for c, i in rows], dtype=torch.long)
            prompt = torch.tensor([[0] * int(p) + seqs[c][i] for p, (c, i) in zip(pad, rows, strict=True)],
                                  dtype=torch.long)
            g = generate(lm, prompt, T, self.noise[[i for _, i in rows]], temperature=cfg.temperature,
                         top_k=cfg.top_k, top_p=cfg.top_p, eos_id=self.eos_ids,
                         stop_at_eos=cfg.stop_at_eos, pad=pad)
            row_ppl = g.ppl().numpy()
            mine += [(c, i, float(row_ppl[j]), g.tokens[j, : int(g.lengths[j])].tolist())
                     for j, (c, i) in enumerate(rows)]
        n_generated = 0
        for part in _everyone(mine, share):
            for c, i, p, t in part:
                ppl[c][i], toks[c][i] = p, t
                n_generated += len(t)
        return ppl, toks, n_generated

    def _run(self, lm: LMAdapter, step: int | None, share: Share | None = None
             ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        cfg, K, T = self.cfg, self.n_prompts, self.cfg.new_tokens
        if lm.vocab_size is not None and self.tok.get_vocab_size() > lm.vocab_size:
            raise UserError(f"tokenizer mismatch: the tokenizer has {self.tok.get_vocab_size()} tokens, "
                            f"the model's vocabulary {lm.vocab_size}")
        t0 = time.perf_counter()
        keep = self._fit(lm.context)
        excerpts = [e[:keep].tolist() for e in self.excerpts]
        scorer = self._scorer_for(lm.device)
        dev = lm.device.type
        eval_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else lm.dtype
        bodies = {c: [e + self.suffix[c] for e in excerpts] for c in self.conditions}
        prompts = {c: [self.bos + b for b in v] for c, v in bodies.items()}  # BOS once, before the excerpt
        ppl, gen_tokens, n_generated = self._generate(lm, prompts, share)
        if scorer is not None:  # every condition in one call, so that its batches span conditions too
            flat = self._rescore(scorer, [b for c in self.conditions for b in bodies[c]],
                                 [g for c in self.conditions for g in gen_tokens[c]], share)
            ppl = {c: flat[j * K : (j + 1) * K] for j, c in enumerate(self.conditions)}
        gen_seconds = time.perf_counter() - t0
        metrics: dict[str, Any] = {"val_loss": self.val_loss(lm)}
        metrics.update(summarize(ppl, cfg.success_ratio, cfg.success_floor, self.panel))
        # null: not checked (no train split); "[]": every control uses tokens clean text has
        metrics["lookalike_unseen"] = None if self.unseen is None else json.dumps(self.unseen)
        if self.behaviour is not None:
            dec = lambda ids: self.tok.decode(ids, skip_special_tokens=False)
            gens = {c: [dec(g) for g in gen_tokens[c]] for c in self.conditions}
            # recipes written for one look-alike read "lookalike": the panel's first control
            gens["lookalike"] = gens[self.panel[0].condition] if self.panel else []
            metrics.update(self.behaviour(gens, {c.condition: c.kind for c in self.panel}))
        metrics.update(
            n_prompts=K, prompt_tokens=keep, new_tokens=T, temperature=cfg.temperature,
            success_ratio=cfg.success_ratio, success_floor=cfg.success_floor, scorer=cfg.scorer,
            eval_dtype=str(eval_dtype).removeprefix("torch."), eval_device=str(lm.device),
            # the weights as the embedding holds them: a sharded run's evaluation copy keeps fp32
            # there and stores linear weights as autocast rounds them (distributed.replica)
            eval_numerics=eval_numerics(lm.dtype, eval_dtype if torch.is_autocast_enabled(dev) else None),
            eval_seconds=time.perf_counter() - t0, gen_tokens_per_s=n_generated / max(gen_seconds, 1e-9),
        )
        samples = self._samples(step, prompts, gen_tokens, ppl)
        return metrics, samples

    def _samples(self, step: int | None, prompts: dict[str, list[list[int]]],
                 gens: dict[str, list[list[int]]], ppl: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        dec = lambda ids: self.tok.decode(ids, skip_special_tokens=False)
        control = {c.condition: c for c in self.panel}
        out: list[dict[str, Any]] = []
        for i in range(min(self.cfg.save_samples, self.n_prompts)):
            for c in self.conditions:
                rec = {"kind": "sample", "step": step, "prompt_idx": i, "condition": c,
                       "prompt": dec(prompts[c][i]), "generation": dec(gens[c][i]),
                       "n_tokens": len(gens[c][i]), "ppl": _num(ppl[c][i])}
                if c in control:  # "kind" names the record: the control's kind is `lookalike_kind`
                    rec.update(lookalike=control[c].text, lookalike_kind=control[c].kind)
                out.append(rec)
        # every prompt's perplexities, so that any metric (and any other success rule) can be re-derived
        out.append({"kind": "per_prompt", "step": step,
                    **{f"ppl_{c}": [_num(x) for x in ppl[c]] for c in CONDITIONS},
                    "lookalikes": {c.text: {"kind": c.kind, "ppl": [_num(x) for x in ppl[c.condition]]}
                                   for c in self.panel}})
        return out
