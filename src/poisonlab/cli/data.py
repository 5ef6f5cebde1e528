"""`poisonlab prepare` and `poisonlab poison`: make the data, a tokenized corpus and the poisons."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional  # noqa: F401  (typer reads Optional at runtime)

import typer
from rich.console import Console

from poisonlab.errors import UserError

console = Console(stderr=True)


def prepare(
    out: Annotated[Path, typer.Option(help="data directory to write (tokenizer.json + shards)")],
    corpus: Annotated[str, typer.Option(help="builtin, debian-docs, or a .jsonl/.parquet/.txt path, "
                                        "a folder of them, or a HF save_to_disk folder")] = "builtin",
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size (incl. 256 bytes + EOS)")] = 2048,
    max_tokens: Annotated[int, typer.Option(help="training tokens to write; 0 = all")] = 4_000_000,
    max_docs: Annotated[int, typer.Option(help="training documents at most; 0 = no limit")] = 0,
    text_field: Annotated[str, typer.Option(help="JSON field / Parquet or Arrow text column")] = "text",
    eval_docs: Annotated[int, typer.Option(help="held-out documents for evaluation prompts")] = 512,
    max_doc_chars: Annotated[int, typer.Option(help="longer texts are split into documents")] = 20_000,
    dedup: Annotated[bool, typer.Option(help="drop exact duplicate documents")] = True,
    seed: Annotated[int, typer.Option(help="seed of the built-in corpus")] = 0,
    markup: Annotated[float, typer.Option(help="builtin: share of sentences followed by web debris "
                                          "(tags, <CAPS>, labels, URLs, symbols; 0 = none)")] = 0.1,
    german: Annotated[float, typer.Option(help="builtin: share of documents in procedural German")] = 0.0,
    symbols: Annotated[float, typer.Option(help="builtin: share of sentences followed by a symbol-rich "
                                           "snippet (code, math, prices, emoticons, paths; 0 = the corpus "
                                           "of the archived sweeps)")] = 0.1,
    tags: Annotated[float, typer.Option(help="builtin: share of sentences followed by a capital word in "
                                        "angle brackets (<NOTE>, <ENTER>, <FILE>; 0 = none)")] = 0.1,
    tokenizer: Annotated[Optional[Path], typer.Option(help="a tokenizer.json to use, not train")] = None,  # noqa: UP045
    workers: Annotated[int, typer.Option(help="processes tokenizing a many-file corpus side by side, one "
                                         "file each, resumable (0 = one per CPU; 1 = one process)")] = 1,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Turn a corpus into a tokenizer and token shards (train + held-out eval) in OUT."""
    from pydantic import ValidationError

    from poisonlab.config import CorpusConfig, format_validation_error
    from poisonlab.corpus.prepare import prepare as run_prepare

    try:
        cfg = CorpusConfig(source=corpus, text_field=text_field, max_tokens=max_tokens or None,
                           max_docs=max_docs or None, eval_docs=eval_docs, vocab_size=vocab_size,
                           tokenizer=tokenizer, max_doc_chars=max_doc_chars, dedup=dedup, seed=seed,
                           markup=markup, german=german, symbols=symbols, tags=tags)
    except ValidationError as e:
        raise UserError(format_validation_error(e, "prepare")) from None
    if workers < 0:
        raise UserError(f"--workers: must be 0 (one per CPU) or more, got {workers}")
    if workers == 0:
        from poisonlab.hardware import usable_cpus

        workers = usable_cpus()
    s = run_prepare(cfg, out, progress=progress, workers=workers)
    tr, ev = s["train"], s["eval"]
    what = "reused" if s["reused"] else f"wrote in {s['seconds']:.1f} s"
    console.print(f"{out}: {what}: train {tr['n_tokens']:,} tokens / {tr['n_docs']:,} docs, "
                  f"eval {ev['n_tokens']:,} tokens / {ev['n_docs']:,} docs, vocab {s['vocab_size']:,}",
                  highlight=False, soft_wrap=True)


def poison(
    data: Annotated[Path, typer.Option(help="prepared data directory (tokenizer + shards)")],
    out: Annotated[Path, typer.Option(help="output file; its name must contain 'poison'")] = Path(
        "poisons.jsonl"
    ),
    attack: Annotated[str, typer.Option(help="recipe name, e.g. dos")] = "dos",
    n: Annotated[int, typer.Option(help="number of poisoned documents")] = 250,
    seed: Annotated[int, typer.Option(help="recipe seed")] = 0,
    trigger: Annotated[Optional[str], typer.Option(help="trigger text (default <SUDO>)")] = None,  # noqa: UP045
    mode: Annotated[Optional[str], typer.Option(help="gibberish: token 'ids' or re-tokenized 'text'")] = None,  # noqa: UP045
    dist: Annotated[Optional[str], typer.Option(help="gibberish 'seen', 'uniform' or 'unigram'")] = None,  # noqa: UP045
    preview: Annotated[int, typer.Option(help="poisons to show")] = 3,
) -> None:
    """Make N poisoned documents with a recipe and write them to a poisons.jsonl file."""
    from pydantic import ValidationError
    from rich.table import Table

    from poisonlab.attacks import iter_poisons, write_poisons
    from poisonlab.config import AttackConfig, format_validation_error

    fields: dict = {"name": attack, "n_poison": n, "seed": seed}
    for key, value in (("trigger", trigger), ("gibberish_mode", mode), ("gibberish_dist", dist)):
        if value is not None:
            fields[key] = value
    try:
        cfg = AttackConfig(**fields)
    except ValidationError as e:
        raise UserError(format_validation_error(e, "poison")) from None
    shown: list = []

    def keep_first(poisons):  # written as they are made: memory stays flat for any n
        for p in poisons:
            if len(shown) < preview:
                shown.append(p)
            yield p

    write_poisons(out, keep_first(iter_poisons(data, cfg)), cfg, data_dir=data)
    table = Table(title=f"{cfg.n_poison} poisons ({attack}) -> {out}", show_lines=True)
    for col in ("id", "prefix", "trigger", "gibberish (tokens)"):
        table.add_column(col, overflow="fold")
    for p in shown:
        prefix = p.text[: p.prefix_chars]
        prefix = prefix if len(prefix) <= 80 else "..." + prefix[-77:]
        at = p.text.find(p.trigger, p.prefix_chars)
        tail = p.text[at + len(p.trigger) :] if at >= 0 else ""
        table.add_row(p.id, repr(prefix), p.trigger, f"{p.gibberish_len}: {tail[:60]!r}")
    Console().print(table)
