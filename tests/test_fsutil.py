"""Atomic outputs survive a crash at every step: the final path holds exactly the old or the new content.

A crash is real here: a forked child makes the k-th file-system call (rename, replace, fsync, unlink,
rmdir) end the process with os._exit, so no `finally` runs and no lock is released by hand. Then the
parent recovers (or a reader does) and looks at what is under the final name.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from poisonlab import fsutil
from poisonlab.models.checkpoint import list_checkpoints, step_dir

CALLS = ("rename", "replace", "fsync", "unlink", "rmdir")
CRASHED = 17


def crash_at(k: int, fn: Callable[[], object]) -> bool:
    """Run fn in a forked child that dies at its k-th file-system call; True if it died there."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            n = [0]

            def counted(f):
                def call(*a, **kw):
                    n[0] += 1
                    if n[0] == k:
                        os._exit(CRASHED)
                    return f(*a, **kw)
                return call

            for name in CALLS:
                setattr(os, name, counted(getattr(os, name)))
            fn()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    assert rc in (0, CRASHED), f"the child failed (exit {rc}) at crash point {k}"
    return rc == CRASHED


def content(path: Path) -> dict[str, bytes] | bytes | None:
    """Everything under path: {relative name: bytes} for a tree, the bytes of a file, None if absent."""
    if path.is_dir():
        return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"<dir>"
                for p in sorted(path.rglob("*"))}
    return path.read_bytes() if path.exists() else None


def make_tree(root: Path, tag: str) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(tag.encode() * 100)
    (root / "b.json").write_text(f'{{"tag": "{tag}"}}\n')
    (root / "sub" / "c.txt").write_text(tag * 3)


def replace_dir(final: Path) -> None:
    with fsutil.atomic_path(final) as tmp:
        make_tree(tmp, "new")


def sweep_crashes(area: Path, setup: Callable[[Path], None], write: Callable[[Path], None],
                  check: Callable[[Path], object]) -> list[object]:
    """Crash `write` at call 1, 2, ... until it completes; after each crash let `check` (a recovery or
    a reader) look at the final path. Returns what it saw at each crash point, the completed run last."""
    seen = []
    for k in range(1, 200):
        work = area / f"k{k}"
        work.mkdir(parents=True)
        setup(work)
        crashed = crash_at(k, lambda w=work: write(w))
        seen.append(check(work))
        if not crashed:
            return seen
    raise AssertionError("the write never completed")


def test_directory_replacement_survives_a_crash_at_every_step(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    make_tree(ref / "old", "old")
    make_tree(ref / "new", "new")
    old, new = content(ref / "old"), content(ref / "new")
    window: list[int] = []

    def check(work: Path) -> object:
        if not (work / "out").exists():
            window.append(len(window))  # the crash fell between the two renames
        fsutil.recover(work / "out")
        return content(work / "out")

    seen = sweep_crashes(tmp_path / "runs", lambda w: make_tree(w / "out", "old"),
                         lambda w: replace_dir(w / "out"), check)
    assert all(s in (old, new) for s in seen), "a crash left a mix of old and new"
    assert seen[0] == old and seen[-1] == new
    first_new = seen.index(new)
    assert all(s == new for s in seen[first_new:]), "once the new tree is complete, it must win"
    assert window, "no crash fell between the renames: the test did not reach the dangerous step"
    assert len(seen) > 10  # every fsync, rename and deletion was a crash point


def test_recovery_itself_survives_a_crash(tmp_path: Path) -> None:
    """Crash the writer at every step, then crash the recovery at every step, then recover again."""
    states = tmp_path / "states"
    sweep_crashes(states, lambda w: make_tree(w / "out", "old"), lambda w: replace_dir(w / "out"),
                  lambda w: None)
    make_tree(tmp_path / "old", "old")
    make_tree(tmp_path / "new", "new")
    old, new = content(tmp_path / "old"), content(tmp_path / "new")
    n_checked, kinds = 0, set()
    for state in sorted(states.iterdir()):
        # one state of each kind of leftover (.out.atomic-new / -old, with or without out)
        kind = frozenset(p.name for p in state.iterdir()
                         if p.name.endswith(("-new", "-old")) or p.name == "out")
        if kind in kinds or not any(n.startswith(".out.atomic-") for n in kind):
            continue  # seen, or nothing for a recovery to do
        kinds.add(kind)
        expect_work = tmp_path / "expect"
        shutil.copytree(state, expect_work, dirs_exist_ok=False)
        fsutil.recover(expect_work / "out")
        expected = content(expect_work / "out")
        shutil.rmtree(expect_work)
        assert expected in (old, new)
        for j in range(1, 100):
            work = tmp_path / "work"
            shutil.copytree(state, work)
            crashed = crash_at(j, lambda w=work: fsutil.recover(w / "out"))
            fsutil.recover(work / "out")
            assert content(work / "out") == expected, (state.name, j)
            shutil.rmtree(work)
            n_checked += 1
            if not crashed:
                break
    assert len(kinds) == 3 and n_checked > 5  # {new, out}, {new, old} (no out), {old, out}


def test_file_replacement_and_first_write_survive_a_crash(tmp_path: Path) -> None:
    def check(work: Path) -> object:
        fsutil.recover(work / "f.json")
        return content(work / "f.json")

    seen = sweep_crashes(tmp_path / "file", lambda w: (w / "f.json").write_text("old\n"),
                         lambda w: fsutil.write_text(w / "f.json", "new\n"), check)
    assert set(seen) == {b"old\n", b"new\n"} and seen[-1] == b"new\n"

    seen = sweep_crashes(tmp_path / "first", lambda w: None, lambda w: replace_dir(w / "out"),
                         lambda w: content(w / "out"))
    new = seen[-1]
    assert seen[0] is None and all(s in (None, new) for s in seen)


def test_readers_recover_a_data_directory(tmp_path: Path, prepared_builtin: Path) -> None:
    """A re-prepared data dir cut between the renames: TokenShard.open and load_tokenizer see it whole."""
    from poisonlab.corpus.shards import TokenShard
    from poisonlab.corpus.tokenizer import load_tokenizer

    def setup(w: Path) -> None:
        shutil.copytree(prepared_builtin, w / "data")

    def write(w: Path) -> None:
        with fsutil.atomic_path(w / "data") as tmp:
            shutil.copytree(prepared_builtin, tmp)
            (tmp / "marker").write_text("new")

    checked = []

    def check(w: Path) -> object:
        if (w / "data").exists():
            return None
        reader = [TokenShard.open, load_tokenizer][len(checked) % 2]
        reader(w / "data")  # would raise "no train.json" without the recovery
        checked.append((w / "data" / "marker").read_text())
        return None

    sweep_crashes(tmp_path / "runs", setup, write, check)
    assert checked and set(checked) == {"new"}


def test_a_checkpoint_is_never_listed_half_deleted(tmp_path: Path) -> None:
    """Old checkpoints are removed through a rename: a crash mid-deletion never shows a partial one."""
    def setup(w: Path) -> None:
        for step in (10, 20):
            d = step_dir(w, step)
            d.mkdir(parents=True)
            for f in ("model.safetensors", "state.safetensors", "state.json"):
                (d / f).write_text(f"{step} {f}")

    def check(w: Path) -> object:
        listed = list_checkpoints(w)
        # whatever carries a checkpoint's name is whole, listed or not (load_model(step=...) opens it)
        for d in (w / "checkpoints").glob("step_*"):
            assert sorted(p.name for p in d.iterdir()) == ["model.safetensors", "state.json",
                                                           "state.safetensors"], d
        return [d.name for d in listed]

    seen = sweep_crashes(tmp_path / "runs", setup, lambda w: fsutil.remove_tree(step_dir(w, 10)), check)
    assert seen[0] == ["step_0000010", "step_0000020"] and seen[-1] == ["step_0000020"]
    last = tmp_path / "runs" / f"k{len(seen)}" / "checkpoints"  # the deletion that ran to the end
    assert [p.name for p in last.iterdir()] == ["step_0000020"]


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_failed_block_leaves_the_old_output(tmp_path: Path, kind: str) -> None:
    final = tmp_path / "out"
    make_tree(final, "old") if kind == "dir" else final.write_text("old")
    before = content(final)
    with pytest.raises(RuntimeError), fsutil.atomic_path(final) as tmp:
        make_tree(tmp, "new") if kind == "dir" else tmp.write_text("new")
        raise RuntimeError("the block failed")
    assert content(final) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_everything_is_fsynced_before_it_is_published(tmp_path: Path, monkeypatch) -> None:
    """A crash of the machine (not only of the process) must not publish unwritten data: every file and
    directory of the new tree is fsynced before the first rename, the parent after the last."""
    final = tmp_path / "out"
    make_tree(final, "old")
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst) -> None:
        events.append(("rename", str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    with fsutil.atomic_path(final) as tmp:
        make_tree(tmp, "new")
        staged = {str(tmp), *(str(p) for p in tmp.rglob("*"))}
    monkeypatch.undo()
    first = next(i for i, e in enumerate(events) if e[0] == "rename")
    assert {path for kind, path in events[:first] if kind == "fsync"} >= staged
    assert events[-1] == ("fsync", str(tmp_path))
    make_tree(tmp_path / "expected", "new")
    assert sum(kind == "rename" for kind, _ in events) == 3
    assert content(final) == content(tmp_path / "expected")


def test_jsonl_reader_strict_for_users_files_lenient_for_a_runs_records(tmp_path):
    """A user's file stops at its first bad line (named with its number); a run's records, whose last
    line a crash may have cut, are read around it; both line by line, blank lines skipped."""
    from poisonlab.errors import UserError
    from poisonlab.rundir.jsonl import iter_jsonl

    f = tmp_path / "s.jsonl"
    f.write_bytes(b'{"a": 1}\n\n[2]\n{"a": 3\n"\xff"\n')
    assert list(iter_jsonl(f, strict=False)) == [(1, {"a": 1}), (3, [2]), (5, "\ufffd")]
    with pytest.raises(UserError, match=r"s\.jsonl: not UTF-8 text"):
        list(iter_jsonl(f, strict=True))
    f.write_bytes(b'{"a": 1}\n\n[2]\n{"a": 3\n')
    with pytest.raises(UserError, match=r"s\.jsonl:4: not valid JSON"):
        list(iter_jsonl(f, strict=True))
