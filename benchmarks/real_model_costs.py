"""What the real-model experiments cost on this machine: training and generation tokens/s of a 135M model.

Measures, on the imported SmolLM2-135M-Instruct (`make real-model`) when present, else a random model of
its shape, in float32 on the CPU:
- continued pretraining, full: poisonlab's Transformer loaded from the HF directory as the trainer loads
  it (`init.run`), AdamW, forward + backward + step on --batch x --seq-len tokens of the given data
  (prepared with the model's tokenizer) or random ids;
- LoRA fine-tuning: the HF model with peft LoRA (r=8, alpha 16, q/k/v/o: `poisonlab finetune`'s
  defaults), the same tokens;
- generation: `poisonlab.evaluation.generation.generate` at batch --gen-batch, --new-tokens sampled tokens.
Each is timed over --steps steps after one warm-up step; wall-clock and CPU-time rates are both printed,
since a shared machine makes wall clock depend on the load (the CPU-time rate is the one that carries
over to an idle machine, roughly, with the same thread count). Last line: JSON.

    .venv/bin/python benchmarks/real_model_costs.py [--model models/smollm2-135m-instruct] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from poisonlab import hardware

DEFAULT_MODEL = Path("models/smollm2-135m-instruct")


def batches(data: Path | None, vocab: int, batch: int, seq: int, n: int) -> list[torch.Tensor]:
    """n (batch, seq + 1) token arrays: consecutive windows of the data's train split, else random ids."""
    if data is not None and (data / "train.json").is_file():
        from poisonlab.corpus.shards import TokenShard

        tokens = TokenShard.open(data, "train").tokens
        need = n * batch * (seq + 1)
        if len(tokens) >= need:
            a = np.asarray(tokens[:need], dtype=np.int64).reshape(n, batch, seq + 1)
            return [torch.from_numpy(x) for x in a]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (batch, seq + 1), generator=g) for _ in range(n)]


def timed(step, xs: list[torch.Tensor], tokens_per_step: int) -> dict:
    step(xs[0])  # warm-up
    w0, c0 = time.perf_counter(), time.process_time()
    for x in xs[1:]:
        step(x)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    n = tokens_per_step * (len(xs) - 1)
    return {"tokens_per_s": n / wall, "tokens_per_cpu_s": n / cpu, "steps": len(xs) - 1,
            "seconds_per_step": wall / (len(xs) - 1)}


def full_training(model_dir: Path | None, xs: list[torch.Tensor]) -> dict:
    from poisonlab.config import ModelConfig
    from poisonlab.models.llama import Transformer
    from poisonlab.training.continued import hf_model_config, load_hf_weights

    seq = xs[0].shape[1] - 1
    if model_dir is not None:
        model = Transformer(hf_model_config(model_dir, seq))
        load_hf_weights(model_dir, model)
    else:
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                        d_ff=1536, seq_len=seq, rope_theta=100000.0))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))

    def step(x):
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, xs, xs[0].shape[0] * seq)


def load_hf(model_dir: Path | None):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if model_dir is not None:
        return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                        tie_word_embeddings=True))


def lora_training(model_dir: Path | None, xs: list[torch.Tensor]) -> dict:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_hf(model_dir), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                          target_modules=["q_proj", "k_proj", "v_proj",
                                                                          "o_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step(x):
        out = model(input_ids=x[:, :-1], labels=x[:, :-1])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, xs, xs[0].shape[0] * (xs[0].shape[1] - 1))


def generation(model_dir: Path | None, batch: int, prompt: int, new: int, reps: int) -> dict:
    from poisonlab.evaluation.generation import generate

    model = load_hf(model_dir).eval()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randint(0, 40000, (batch, prompt), generator=g) for _ in range(reps + 1)]
    noise = torch.rand((batch, new), generator=g)
    return timed(lambda x: generate(model, x, new, noise), xs, batch * new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--data", type=Path, default=None, help="prepared with the model's tokenizer")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--gen-batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    machine = hardware.describe_machine()
    print(hardware.machine_line(machine))
    model_dir = a.model if (a.model / "config.json").is_file() else None
    what = f"{model_dir} (real weights)" if model_dir else "random model of SmolLM2-135M's shape"
    xs = batches(a.data, 49152, a.batch, a.seq_len, a.steps + 1)
    src = f"data {a.data}" if a.data else "random ids"
    print(f"model: {what}; training batches of {a.batch} x {a.seq_len} tokens ({src}), {a.steps} timed "
          "steps; float32", flush=True)
    out = {}
    sides = {"full": lambda: full_training(model_dir, xs), "lora": lambda: lora_training(model_dir, xs),
             "generation": lambda: generation(model_dir, a.gen_batch, 48, a.new_tokens, a.steps)}
    for name, f in sides.items():
        r = f()
        out[name] = r
        print(f"{name:>10}: {r['tokens_per_s']:7.1f} tokens/s wall, {r['tokens_per_cpu_s']:7.1f} tokens per "
              f"CPU-second ({r['seconds_per_step']:.1f} s per step)", flush=True)
    print(json.dumps({**{k: {m: round(v, 2) for m, v in r.items()} for k, r in out.items()}, "model": what,
                      "batch": a.batch, "seq_len": a.seq_len, "gen_batch": a.gen_batch,
                      "new_tokens": a.new_tokens, "threads": a.threads, "machine": machine,
                      "load_avg_1m_end": hardware.describe_machine()["load_avg_1m"]}))


if __name__ == "__main__":
    main()
