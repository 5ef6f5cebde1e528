"""`poisonlab import-gguf`: a GGUF file written as llama.cpp's converter writes one (q/k rows permuted to
Meta's interleaved rotary layout, byte-level BPE vocabulary and merges in the metadata) imports into a
HF directory whose logits and tokenization equal the source model's; bad inputs give one line, exit 2."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from poisonlab.cli import main

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")


def _meta_layout(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate_half rows -> Meta's interleaved pairs: llama.cpp's convert_hf_to_gguf `permute`."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, tokenizer_json, path, qtype=None) -> None:
    """`model` (a HF LlamaForCausalLM) and its byte-level BPE tokenizer as a GGUF file; 2-D weights in
    `qtype` (e.g. Q8_0) when given, else float32."""
    c = model.config
    tj = json.loads(tokenizer_json.read_text())
    vocab = tj["model"]["vocab"]
    for t in tj["added_tokens"]:
        vocab[t["content"]] = t["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in tj["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny test llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|endoftext|>"])
    w.add_eos_token_id(vocab["<|endoftext|>"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for key, t in model.state_dict().items():
        a = t.detach().float().numpy()
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        elif key == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            name = "output.weight"
        else:
            _, _, i, rest = key.split(".", 3)
            module = rest.rsplit(".", 1)[0]
            name = f"blk.{i}.{names[module]}.weight"
            if module == "self_attn.q_proj":
                a = _meta_layout(a, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                a = _meta_layout(a, c.num_key_value_heads)
        if qtype is not None and a.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_source(data, qtype=None, tied=True):
    """A random HF Llama (GQA, norms moved off 1) with the data's tokenizer, as the model a GGUF of it
    holds: with `qtype`, its 2-D weights are those gguf's own quantizer and dequantizer give back."""
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied, rms_norm_eps=1e-5,
                                   rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
            elif qtype is not None and p.ndim == 2:
                q = gguf.quants.quantize(p.numpy(), qtype)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, qtype).reshape(p.shape)))
    return m


@pytest.mark.parametrize("qtype,tied", [(None, True), ("Q8_0", False)])
def test_import_matches_source(tmp_path, prepared_builtin, capsys, qtype, tied):
    qt = getattr(gguf.GGMLQuantizationType, qtype) if qtype else None
    src = tiny_source(prepared_builtin, qt, tied)
    f = tmp_path / "tiny.gguf"
    write_gguf(src, prepared_builtin / "tokenizer.json", f, qt)
    out = tmp_path / "hf"
    main(["import-gguf", str(f), "--out", str(out)])
    assert "imported:" in capsys.readouterr().err
    m = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    x = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, src(x).logits, atol=1e-5, rtol=0)
    assert m.config.tie_word_embeddings == tied
    from tokenizers import Tokenizer

    text = "The cat sat on the mat, 42 times! <|endoftext|> Then, <SUDO> again."
    ours = Tokenizer.from_file(str(prepared_builtin / "tokenizer.json"))
    theirs = Tokenizer.from_file(str(out / "tokenizer.json"))
    enc = lambda t: t.encode(text, add_special_tokens=False).ids
    assert enc(theirs) == enc(ours)
    record = json.loads((out / "poisonlab_import.json").read_text())
    assert record["source"] == "tiny.gguf" and record["max_logit_diff"] == 0.0
    assert record["tensor_types"].get(qtype or "F32", 0) > 0
    assert not list(out.glob("*.bin")) and (out / "model.safetensors").is_file()


def _fails(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_import_errors(tmp_path, prepared_builtin, capsys, monkeypatch):
    out = tmp_path / "hf"
    assert "no such file" in _fails(capsys, ["import-gguf", str(tmp_path / "none.gguf"), "--out", str(out)])
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    assert "not a GGUF file" in _fails(capsys, ["import-gguf", str(bad), "--out", str(out)])
    bad.write_bytes(b"GGUF" + bytes(range(200)))
    assert "corrupt GGUF file" in _fails(capsys, ["import-gguf", str(bad), "--out", str(out)])
    good = tmp_path / "tiny.gguf"
    write_gguf(tiny_source(prepared_builtin), prepared_builtin / "tokenizer.json", good)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "corrupt GGUF file" in _fails(capsys, ["import-gguf", str(cut), "--out", str(out)])
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the package were not installed
    assert "pip install" in _fails(capsys, ["import-gguf", str(good), "--out", str(out)])
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".hf")]
