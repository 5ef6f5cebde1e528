"""Import a local GGUF file (llama.cpp's format) as a HF model directory: config.json, safetensors, tokenizer.

transformers reads GGUF through the `gguf` package and dequantizes every tensor to float32, but refuses to
save a model loaded that way ("not serializable"). So the model is rebuilt from its config without the
GGUF quantization settings, the dequantized weights are copied in, and that model is saved; the output is
then reloaded from disk and its logits compared with the GGUF-loaded model's on a fixed input. Nothing
is downloaded: the file is read where it lies. A `poisonlab_import.json` beside the weights records the
source file (name, size, SHA-256), its architecture and tensor types, and the check.

The result is an ordinary local HF directory: `poisonlab eval DIR`, `poisonlab finetune` and continued
pretraining (`init.run: DIR`, Llama layout) read it like any other.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from poisonlab.errors import UserError
from poisonlab.fsutil import atomic_path

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
CHECK_TOLERANCE = 1e-4  # max |logit difference| between the saved directory and the GGUF-loaded model
_CHECK_TOKENS = 16


@dataclass(frozen=True)
class ImportResult:
    out: Path
    architecture: str  # the GGUF's general.architecture
    model_type: str  # the HF config's
    params: int
    vocab_size: int
    tensor_types: dict[str, int]  # ggml type name -> number of tensors stored in it
    sha256: str
    max_logit_diff: float | None  # saved directory vs GGUF-loaded model; None when not checked


def _need_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise UserError("reading GGUF files needs the gguf package: pip install 'poisonlab[gguf]' "
                        "(or pip install gguf)") from None
    return gguf


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def read_header(path: Path) -> tuple[str, dict[str, int]]:
    """(architecture, {ggml type name: tensor count}) of a GGUF file; a UserError naming the file when
    it is missing, not GGUF, or truncated."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    gguf = _need_gguf()
    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode("utf-8")
        types = Counter(gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors)
        last = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except KeyError:
        raise UserError(f"{path}: corrupt GGUF file (no general.architecture)") from None
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on damaged files
        raise UserError(f"{path}: corrupt GGUF file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if last > path.stat().st_size:
        raise UserError(f"{path}: corrupt GGUF file (truncated: tensor data ends at byte {last}, "
                        f"the file has {path.stat().st_size})")
    return arch, dict(types)


def _load(path: Path) -> tuple[torch.nn.Module, Any]:
    """(model in float32, tokenizer) as transformers reads the GGUF file."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise UserError("importing a GGUF file needs transformers: pip install 'poisonlab[gguf]'") from None
    where, name = str(path.parent), path.name
    try:
        tok = AutoTokenizer.from_pretrained(where, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, local_files_only=True,
                                                     dtype=torch.float32)
    except Exception as e:  # unsupported architecture, tokenizer type, or tensor type
        raise UserError(f"{path}: transformers cannot load it ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no message'})") from None
    return model.eval(), tok


def _rebuild(model: torch.nn.Module) -> torch.nn.Module:
    """The same architecture built from its config without the GGUF quantization settings (a model
    transformers can save), holding the GGUF model's dequantized weights."""
    from transformers import AutoModelForCausalLM

    config = type(model.config).from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # not on "meta": rotary buffers
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    if fresh.config.tie_word_embeddings:  # the output layer is the embedding: load_state_dict kept two
        fresh.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise UserError(f"GGUF import: the rebuilt model does not match the loaded one (missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]})")
    return fresh.eval()


def _check_ids(vocab_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (2, _CHECK_TOKENS), generator=g)


@torch.inference_mode()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


def import_gguf(path: str | Path, out: str | Path, *, check: bool = True) -> ImportResult:
    """Convert the GGUF file `path` into the HF model directory `out` (written atomically: a failed
    import leaves nothing at `out`). With `check`, the saved directory is reloaded and its logits on a
    fixed input must equal the GGUF-loaded model's within CHECK_TOLERANCE."""
    path, out = Path(path), Path(out)
    if out.resolve() == path.resolve().parent:
        raise UserError(f"{out}: the output must be a new directory, not the one holding {path.name}")
    arch, types = read_header(path)
    model, tok = _load(path)
    fresh = _rebuild(model)
    ids = _check_ids(fresh.config.vocab_size)
    diff = None
    with atomic_path(out) as tmp:
        fresh.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        if check:
            from transformers import AutoModelForCausalLM

            saved = AutoModelForCausalLM.from_pretrained(str(tmp), local_files_only=True,
                                                         use_safetensors=True, dtype=torch.float32).eval()
            diff = float((_logits(saved, ids) - _logits(model, ids)).abs().max())
            del saved
            if not diff <= CHECK_TOLERANCE:
                raise UserError(f"{path}: the saved model's logits differ from the GGUF model's by "
                                f"{diff:.3g} (tolerance {CHECK_TOLERANCE}); nothing written to {out}")
        result = ImportResult(out=out, architecture=arch, model_type=fresh.config.model_type,
                              params=sum(p.numel() for p in fresh.parameters()),
                              vocab_size=int(fresh.config.vocab_size), tensor_types=types,
                              sha256=_sha256(path), max_logit_diff=diff)
        record = {k: v for k, v in asdict(result).items() if k != "out"}
        record.update(source=path.name, source_bytes=path.stat().st_size, dtype="float32 (dequantized)")
        (tmp / "poisonlab_import.json").write_text(json.dumps(record, indent=2) + "\n")
    return result
