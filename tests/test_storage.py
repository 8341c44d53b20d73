"""Writing outputs: file modes, whole-directory commits, stale temp dirs, which output directories are refused."""

import os
import stat

import pytest

from smolpeft import checkpoint, storage


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_files_and_dirs_get_umask_modes(tmp_path, umask022):
    storage.atomic_write(tmp_path / "a.json", b"{}")
    assert _mode(tmp_path / "a.json") == 0o644

    def fill(d):
        checkpoint.atomic_write(os.path.join(d, "w.bin"), b"x")  # mkstemp: 0600 until the commit fixes it
        os.mkdir(os.path.join(d, "sub"), 0o700)
        with open(os.path.join(d, "sub", "f"), "wb") as f:
            f.write(b"y")

    storage.commit_dir(tmp_path / "out", fill, "test")
    assert _mode(tmp_path / "out") == 0o755 and _mode(tmp_path / "out/sub") == 0o755
    assert {_mode(tmp_path / "out" / f) for f in ("w.bin", "sub/f", storage.MANIFEST)} == {0o644}


def test_commit_replaces_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    storage.commit_dir(out, lambda d: open(os.path.join(d, "v1"), "w").close(), "test")
    assert sorted(os.listdir(out)) == [storage.MANIFEST, "v1"]

    def crash(d):
        open(os.path.join(d, "v2"), "w").close()
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        storage.commit_dir(out, crash, "test")
    assert sorted(os.listdir(out)) == [storage.MANIFEST, "v1"] and os.listdir(tmp_path) == ["out"]
    storage.commit_dir(out, lambda d: open(os.path.join(d, "v2"), "w").close(), "test")
    assert sorted(os.listdir(out)) == [storage.MANIFEST, "v2"] and os.listdir(tmp_path) == ["out"]
    assert storage.verify(out, "test")["files"] == {"v2": 0}


def test_commit_keeps_checkpoints_by_link(tmp_path):
    out = tmp_path / "run"
    storage.commit_dir(out / "checkpoint-1", lambda d: open(os.path.join(d, "w"), "w").write("1"), "checkpoint")
    storage.commit_dir(out, lambda d: open(os.path.join(d, "adapter"), "w").close(), "run", keep=["checkpoint-*"])
    storage.verify(out / "checkpoint-1", "checkpoint")
    assert (out / "checkpoint-1/w").read_text() == "1" and (out / "adapter").exists()


def test_stale_temp_dirs_are_cleaned_or_restored(tmp_path):
    dead = 2**22 + 12345  # above pid_max's default: no such process
    new = tmp_path / f".run.smolpeft-new-{dead}-ab"
    old = tmp_path / f".gone.smolpeft-old-{dead}-cd"
    other = tmp_path / f".kept.smolpeft-old-{dead}-ef"
    for d in (new, old, other, tmp_path / "kept"):
        d.mkdir()
    (old / "adapter").write_text("the only copy")
    (tmp_path / f".tmp-x-{dead}").write_text("half")
    storage.clean_stale(tmp_path)
    # a crash between the two renames left "gone" missing: its old version is put back, the rest is removed
    assert sorted(os.listdir(tmp_path)) == ["gone", "kept"]
    assert (tmp_path / "gone/adapter").read_text() == "the only copy"


def test_output_dir_guards(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter/adapter_config.json").write_text("{}")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep me")
    for path, overwrite, msg in [
        (".", True, "is the current directory"),
        (str(tmp_path.parent), True, "holds the current directory"),
        ("adapter", True, "is the adapter"),
        ("mine", False, "is not empty"),
        ("mine", True, "is not a smolpeft output"),
    ]:
        with pytest.raises(storage.OutputDirError, match=msg):
            storage.check_output_dir(path, overwrite, {"the adapter": "adapter"})
    storage.check_output_dir("new", False)  # missing or empty is fine
    storage.commit_dir("stopped", lambda d: None, "run")  # a run stopped before writing anything
    storage.check_output_dir("stopped", False)
    storage.commit_dir("out", lambda d: open(os.path.join(d, "model.safetensors"), "w").close(), "merged")
    storage.check_output_dir("out", True)
    (tmp_path / "out/notes.txt").write_text("a user's file")
    with pytest.raises(storage.OutputDirError, match="holds files smolpeft did not write: notes.txt"):
        storage.check_output_dir("out", True)


def test_verify_refuses_incomplete_directories(tmp_path):
    with pytest.raises(ValueError, match="no smolpeft.json"):
        storage.verify(tmp_path, "checkpoint")
    storage.commit_dir(tmp_path / "c", lambda d: open(os.path.join(d, "w"), "w").write("1234"), "checkpoint")
    with open(tmp_path / "c/w", "w") as f:
        f.write("12")
    with pytest.raises(ValueError, match="w has 2 bytes, smolpeft.json says 4"):
        storage.verify(tmp_path / "c", "checkpoint")
    with pytest.raises(ValueError, match="is a smolpeft checkpoint, expected a run"):
        storage.verify(tmp_path / "c", "run")
