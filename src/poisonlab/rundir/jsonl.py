"""Reading JSON Lines files: a run's own records (samples.jsonl) and files users give (prompts).

One reader, line by line, so memory stays bounded on a file of any size. Two policies, because the
files differ in who wrote them: a user's file is `strict` (a line that is not JSON, or bytes that are
not UTF-8, stop with one line naming the file and line); a run's own record file is read leniently (a
line cut by a crash, or damaged, is skipped, so that a report can still be made from the rest).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from poisonlab.errors import UserError


def iter_jsonl(path: str | Path, *, strict: bool) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line of `path`."""
    p = Path(path)
    with open(p, encoding="utf-8", errors="strict" if strict else "replace") as f:
        try:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    if strict:
                        raise UserError(f"{p}:{i}: not valid JSON ({e.msg})") from None
                    continue
                yield i, value
        except UnicodeDecodeError:
            raise UserError(f"{p}: not UTF-8 text") from None  # decoded in chunks: no line number
