"""A sweep's exit status, a full disk, and the dry run. `sweep` exits non-zero when a run did not end
finished, naming each with its reason; a full disk is one line naming the path, the bytes needed where
known and the space free (reproduced on a real, small tmpfs where the machine lets a test mount one);
`sweep` and `plan` weigh the disk the runs will fill before they start."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_train import real_cfg, write_cfg

from poisonlab.cli import main
from poisonlab.diskspace import DiskFull, is_disk_full
from poisonlab.errors import UserError
from poisonlab.fsutil import atomic_path
from poisonlab.study.spec import load_spec
from poisonlab.study.sweep import run_sweep
from poisonlab.training.resolve import resolve_run_config
from poisonlab.training.schedule import run_bytes
from poisonlab.training.trainer import train

FINDINGS = Path(__file__).parents[1] / "docs" / "findings"


def cli_error(capsys, argv: list[str], code: int) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    captured = capsys.readouterr()
    assert e.value.code == code, captured.err
    assert "Traceback" not in captured.out + captured.err
    return captured.err


def tiny_spec(tmp: Path, data: Path, **base) -> Path:
    spec = {"name": "t", "base": {
        "data": str(data), "model": {"d_model": 16, "n_layers": 1, "n_heads": 1, "seq_len": 32},
        "attack": {"n_poison": 2, "gibberish_tokens": [10, 20], "prefix_chars": [0, 50]},
        "train": {"max_steps": 20, "batch_size": 4},
        "eval": {"n_evals": 1, "n_prompts": 2, "prompt_tokens": 8, "new_tokens": 4, "val_tokens": 64}},
        "grid": {"seed": [0, 1]}}
    for k, v in base.items():
        spec["base"][k] = {**spec["base"].get(k, {}), **v}
    path = tmp / "t.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_sweep_whose_runs_fail_exits_1_naming_each(tmp_path, prepared_builtin, capsys):
    spec = tiny_spec(tmp_path, prepared_builtin, attack={"n_poison": 100_000})
    err = cli_error(capsys, ["sweep", str(spec), "--out", str(tmp_path / "s"), "--executor", "inline",
                             "--no-report"], 1)
    assert "2 runs: 0 done, 0 skipped (finished before), 2 failed" in err
    for s in (0, 1):
        assert f"failed d16l1_n100000_x1.0_s{s}: attack.n_poison" in err


def test_a_data_path_that_is_not_data_is_refused_up_front(tmp_path, prepared_builtin, capsys):
    spec = tiny_spec(tmp_path, prepared_builtin)
    err = cli_error(capsys, ["sweep", str(spec), "--out", str(tmp_path / "s"), "--set",
                             f"base.data={spec}"], 2)
    assert f"{spec}: not a prepared data directory" in err and not (tmp_path / "s" / "runs").exists()


def test_dry_run_counts_max_steps_and_refuses_what_the_sweep_refuses(tmp_path, prepared_builtin, capsys):
    spec = tiny_spec(tmp_path, prepared_builtin)
    main(["sweep", str(spec), "--out", str(tmp_path / "s"), "--dry-run"])
    out = capsys.readouterr().out
    assert "2560" in out  # 20 steps x 4 sequences x 32 tokens, not the 20-tokens-per-parameter budget
    err = cli_error(capsys, ["sweep", str(spec), "--out", str(tmp_path / "s"), "--dry-run", "--set",
                             "model.preset=tiny-999k"], 2)
    assert "unknown preset 'tiny-999k'" in err


def test_the_disk_estimate_bounds_what_a_run_writes(tmp_path, prepared_builtin):
    """run_bytes against a real run: its checkpoints (the kept ones and one being written), samples and
    records (metrics, log, ledger) each at least what the run wrote, and not ten times more."""
    cfg = real_cfg(tmp_path, prepared_builtin, max_steps=16, checkpoint_every=4, log_every=4)
    cfg.eval.every_steps, cfg.eval.poison_milestones = 8, []
    train(cfg, progress=False)
    run = cfg.run_dir
    est = run_bytes(resolve_run_config(cfg))
    size = lambda paths: sum(p.stat().st_size for p in paths)  # noqa: E731
    ckpts = size(p for p in (run / "checkpoints").rglob("*") if p.is_file())
    got = {"checkpoints": ckpts * (cfg.train.keep_checkpoints + 1) // cfg.train.keep_checkpoints,
           "samples": size([run / "samples.jsonl"]),
           "records": size([run / n for n in ("metrics.parquet", "log.jsonl", "ledger.parquet")])}
    for part, n in got.items():
        assert n <= est[part] <= 10 * n, (part, n, est[part])


def test_a_sweep_refuses_to_start_on_a_disk_too_small(tmp_path, prepared_builtin, capsys, monkeypatch):
    import poisonlab.diskspace as ds

    monkeypatch.setattr(ds, "free_bytes", lambda path: 10_000)
    err = cli_error(capsys, ["sweep", str(tiny_spec(tmp_path, prepared_builtin)), "--out",
                             str(tmp_path / "s")], 2)
    assert "not enough disk for the 2 run(s) to do" in err and "needs" in err and "10.0 kB free" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "s" / "runs").exists()
    main(["plan", str(tiny_spec(tmp_path, prepared_builtin)), "--out", str(tmp_path / "s"),
          "--gpus-per-node", "1"])
    assert "does not fit the disk: " in capsys.readouterr().err  # plan says it; the sweep refuses


def test_disk_full_errors_are_recognised_and_named():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    # how safetensors (Rust) and pyarrow say it
    assert is_disk_full(RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull })'))
    assert is_disk_full(OSError("error writing to file: No space left on device"))


def test_atomic_write_on_a_full_disk_names_the_output(tmp_path):
    with pytest.raises(DiskFull) as e, atomic_path(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(e.value).startswith(f"{tmp_path / 'out.bin'}: no space left on the device;")
    assert "free there" in str(e.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left
    with pytest.raises(UserError, match=r"needs 1\.0 TB; .* free there"), atomic_path(tmp_path / "x",
                                                                                      size_hint=10**12):
        pass


# --- a real full disk: a tmpfs of a few hundred kB, in a user namespace ----------------------------


def _can_mount() -> bool:
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                       capture_output=True)
    return r.returncode == 0


needs_tmpfs = pytest.mark.skipif(not _can_mount(), reason="cannot mount a tmpfs in a user namespace here")


def on_small_disk(mount: Path, size: str, argv: list[str], copy: Path | None = None
                  ) -> tuple[int, str, list[str]]:
    """Run `poisonlab ARGV` with a tmpfs of `size` at `mount` (holding a copy of `copy` at mount/a):
    (exit code, stderr, temporary files left on the tmpfs). The tmpfs goes with the namespace."""
    mount.mkdir(parents=True, exist_ok=True)
    err, left = mount.parent / "err.txt", mount.parent / "left.txt"
    left.write_text("")
    script = ('mount -t tmpfs -o size="$1" tmpfs "$MNT" && { [ -z "$COPY" ] || cp -r "$COPY" "$MNT/a"; } '
              f'&& shift && "{sys.executable}" -m poisonlab.cli "$@" 2>"$ERR"; rc=$?; '
              'find "$MNT" -name "*.tmp" >> "$LEFT"; exit $rc')
    env = {"ERR": str(err), "LEFT": str(left), "MNT": str(mount), "COPY": str(copy or ""),
           "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "MPLCONFIGDIR": str(mount.parent / "mpl"),
           "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", size, *argv], env=env, timeout=300)
    return r.returncode, err.read_text(), left.read_text().split()


@needs_tmpfs
def test_a_full_disk_is_one_line_in_train_prepare_and_report(tmp_path, prepared_builtin):
    mount = tmp_path / "full"
    # train: the run directory on a disk with room for the first records, not the first checkpoint
    cfg = real_cfg(mount / "runs", prepared_builtin, max_steps=8, checkpoint_every=4)
    path = write_cfg(cfg, tmp_path / "run.yaml")
    code, err, left = on_small_disk(mount, "96k", ["train", str(path), "--no-progress"])
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err and last.startswith("error: "), err
    assert str(mount) in last and "free there" in last and left == []
    # prepare: tokens written into a disk too small for them
    code, err, left = on_small_disk(mount, "64k", ["prepare", "--out", str(mount / "data"), "--vocab-size",
                                                   "300", "--max-tokens", "200000", "--no-progress"])
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"{mount / 'data'}: no space left on the device" in err and left == []
    # report: the figures of an archive, written beside it on a disk with room for little more
    archive = FINDINGS / "language-first"
    used = sum(p.stat().st_size for p in archive.rglob("*") if p.is_file())
    code, err, left = on_small_disk(mount, f"{used // 1024 + 48}k",
                                    ["report", str(mount / "a"), "--n-boot", "0"], copy=archive)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "no space left on the device" in err and str(mount / "a") in err and left == []


def test_last_sweep_lists_every_outcome(tmp_path, prepared_builtin):
    spec = load_spec(tiny_spec(tmp_path, prepared_builtin, attack={"n_poison": 100_000}))
    res = run_sweep(spec, tmp_path / "s", executor="inline", progress=False, report=False)
    assert not res.ok and [o.status for o in res.not_done] == ["failed", "failed"]
    last = json.loads((tmp_path / "s" / "last_sweep.json").read_text())
    assert [o["status"] for o in last["outcomes"]] == ["failed", "failed"]


def test_runs_on_data_prepared_again_are_refused_not_mixed(tmp_path, capsys):
    """A data directory prepared again (a newer corpus version, other settings) under runs that trained
    on its old content: the sweep stops, naming the run and both hashes, rather than report the old runs
    under the new data's name or resume them on data they never saw."""
    from poisonlab.config import CorpusConfig
    from poisonlab.corpus.prepare import prepare

    data = tmp_path / "data"
    cfg = CorpusConfig(source="builtin", vocab_size=300, max_tokens=20_000, eval_docs=8, seed=0)
    prepare(cfg, data, progress=False)
    spec = tiny_spec(tmp_path, data, train={"max_steps": 4})
    args = ["sweep", str(spec), "--out", str(tmp_path / "s"), "--executor", "inline", "--no-report"]
    first = run_sweep(load_spec(str(spec)), tmp_path / "s", executor="inline", progress=False, report=False)
    assert first.count("done") == 2
    again = run_sweep(load_spec(str(spec)), tmp_path / "s", executor="inline", progress=False, report=False)
    assert again.count("skipped") == 2  # the same data: finished runs count
    prepare(cfg.model_copy(update={"seed": 1}), data, progress=False)  # other documents, same place
    err = cli_error(capsys, args, 2)
    assert "d16l1_n002_x1.0_s0: trained on data" in err and f"but {data} now holds" in err, err
