"""tinymoe.atomic: the one atomic write behind checkpoints, golden files and lesson outputs."""
import os
import subprocess

import pytest

from tinymoe.atomic import write_atomic

pytestmark = pytest.mark.checkpoint


def test_write_atomic_replaces_whole_and_cleans_only_its_own_dead_temporaries(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = os.getppid()
    ours_dead = [f".tmp-{dead.pid}-ab12_x", f".tmp-{dead.pid}-cd34.npz"]
    kept = [".tmp-notes", f".tmp-{live}-ef56", "keep.txt"]   # a user's file, a live writer's
    for n in ours_dead + kept:
        (tmp_path / n).write_text("x")
    target = tmp_path / "metrics.json"
    target.write_text("old")
    write_atomic(str(target), b"new")
    assert target.read_bytes() == b"new"
    # only the dead writer's temporary of the same kind (no suffix) goes; the .npz one waits for
    # a checkpoint save, the user's and the live writer's files stay
    assert sorted(os.listdir(tmp_path)) == sorted(kept + [ours_dead[1], "metrics.json"])
    write_atomic(str(tmp_path / "c.npz"), lambda f: f.write(b"npz"), suffix=".npz")
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["metrics.json", "c.npz"])


def test_write_atomic_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"good")

    def boom(f):
        f.write(b"half")
        raise RuntimeError("killed mid-write")
    with pytest.raises(RuntimeError):
        write_atomic(str(target), boom)
    assert target.read_bytes() == b"good" and os.listdir(tmp_path) == ["a.bin"]


def test_write_atomic_names_the_target_on_an_os_error_without_a_file_name(tmp_path):
    def full(f):
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space left") as e:
        write_atomic(str(tmp_path / "x.npz"), full)
    assert e.value.filename == str(tmp_path / "x.npz")
