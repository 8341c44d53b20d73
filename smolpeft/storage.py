"""Writing outputs so that nothing is lost: atomic files, whole-directory commits, guarded output directories.

Every directory smolpeft writes (an adapter run, a checkpoint, a merged model, a sweep report) carries a manifest,
`smolpeft.json`, written last: its kind, the files it holds with their sizes, and for runs and checkpoints the
fingerprint of the run. A directory is built beside its final place in a temp dir and renamed over it, so a crash
leaves the old directory or the new one, never a mix. The manifest is what lets smolpeft recognise its own outputs:
with `overwrite` it replaces a directory only when every entry there is one it wrote.
"""

from __future__ import annotations

import ctypes
import fnmatch
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable

MANIFEST = "smolpeft.json"
LABELS_NAME = "labels.json"  # a classification adapter's label names in head order, beside it (PEFT ignores it)
# Temp dirs live beside their target: .<name>.smolpeft-<new|old>-<pid>-<random>. "new" is being built (never
# committed); "old" is a replaced directory on its way out (restored if the target went missing).
TMP_RE = re.compile(r"^\.(?P<name>.+)\.smolpeft-(?P<role>new|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


class OutputDirError(ValueError):
    """An output directory that smolpeft refuses to write. `overwritable`: overwrite would allow it."""

    def __init__(self, message: str, overwritable: bool = False) -> None:
        super().__init__(message)
        self.overwritable = overwritable


def umask() -> int:
    """The process umask, read without changing it (os.umask would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename: readers never see half a file.

    mkstemp creates files 0600; they get the mode a plain open() would give (0644 under umask 022), so a server
    running as another user can read them."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return exc[0] is not None and issubclass(exc[0], OSError)


def write_labels(directory: str | os.PathLike, names: list[str]) -> None:
    atomic_write(os.path.join(directory, LABELS_NAME), (json.dumps(list(names)) + "\n").encode())


def read_labels(directory: str | os.PathLike) -> list[str] | None:
    """The label names a classification run wrote beside its adapter, in head order (None if there are none)."""
    path = os.path.join(directory, LABELS_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        names = json.load(f)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ValueError(f"{path}: expected a list of distinct label names")
    return names


# --- manifests ---------------------------------------------------------------------------------------------------


def read_manifest(directory: str | os.PathLike) -> dict | None:
    try:
        with open(os.path.join(directory, MANIFEST), encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and "kind" in m else None


def write_manifest(directory: str, kind: str, patterns: Iterable[str] = (), **extra) -> None:
    """List every file in `directory` with its size; `patterns` name entries that may come and go (checkpoints)."""
    files = {}
    for name in sorted(os.listdir(directory)):
        p = os.path.join(directory, name)
        if name != MANIFEST and not TMP_RE.match(name) and not name.startswith(".tmp-"):
            files[name] = os.path.getsize(p) if os.path.isfile(p) else None
    manifest = {"smolpeft": 1, "kind": kind, "files": files, "patterns": list(patterns)} | extra
    atomic_write(os.path.join(directory, MANIFEST), (json.dumps(manifest, indent=2) + "\n").encode())


def verify(directory: str | os.PathLike, kind: str) -> dict:
    """The manifest of a complete `kind` directory; raises if it is missing, of another kind, or a file differs."""
    m = read_manifest(directory)
    if m is None:
        raise ValueError(f"{directory}: no {MANIFEST}; not a complete smolpeft {kind} (interrupted while written?)")
    if m["kind"] != kind:
        raise ValueError(f"{directory}: is a smolpeft {m['kind']}, expected a {kind}")
    for name, size in m.get("files", {}).items():
        p = os.path.join(directory, name)
        if not os.path.exists(p):
            raise ValueError(f"{directory}: {name} is listed in {MANIFEST} but missing")
        if size is not None and os.path.getsize(p) != size:
            raise ValueError(f"{directory}: {name} has {os.path.getsize(p)} bytes, {MANIFEST} says {size}")
    return m


def foreign_entries(directory: str | os.PathLike) -> list[str]:
    """Entries of `directory` that its manifest does not account for (all of them if there is no manifest)."""
    m = read_manifest(directory) or {"files": {}, "patterns": []}
    own = set(m["files"]) | {MANIFEST}
    return sorted(
        n
        for n in os.listdir(directory)
        if n not in own
        and not TMP_RE.match(n)
        and not n.startswith(".tmp-")
        and not any(fnmatch.fnmatchcase(n, p) for p in m.get("patterns", []))
    )


# --- output directories ------------------------------------------------------------------------------------------


def inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_output_dir(
    path: str | os.PathLike,
    overwrite: bool = False,
    protected: dict[str, str | None] | None = None,
    allow_nonempty: bool = False,
) -> None:
    """Refuse to write `path` when that could destroy something.

    Never (overwrite or not): the current directory, a directory holding it, or a `protected` directory (the
    adapter being merged, the base model) or one holding it. Without overwrite: a non-empty directory (unless
    `allow_nonempty`: a run resuming in its own directory). With overwrite: a directory smolpeft did not write, or
    one holding files that it did not write, which are named.
    """
    real = os.path.realpath(path)
    for what, p in {"the current directory": os.getcwd(), **(protected or {})}.items():
        if p and os.path.exists(p) and inside(os.path.realpath(p), real):
            same = os.path.realpath(p) == real
            raise OutputDirError(
                f"output directory {path} {'is' if same else 'holds'} {what} ({p}); choose another output directory"
            )
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise OutputDirError(f"output directory {path} exists and is not a directory")
    entries = [n for n in os.listdir(path) if not TMP_RE.match(n)]
    if entries in ([], [MANIFEST]) or allow_nonempty:  # a manifest alone: a run stopped before it wrote anything
        return
    if not overwrite:
        count = f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
        raise OutputDirError(
            f"output directory {path} is not empty ({count}, e.g. {sorted(entries)[0]!r}); "
            "choose a new directory, or overwrite it if it is a smolpeft output",
            overwritable=True,
        )
    if read_manifest(path) is None:
        raise OutputDirError(f"output directory {path} is not a smolpeft output (no {MANIFEST}); not replacing it")
    foreign = foreign_entries(path)
    if foreign:
        raise OutputDirError(
            f"output directory {path} holds files smolpeft did not write: {', '.join(foreign[:5])}; not replacing it"
        )


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(parent: str | os.PathLike) -> None:
    """Tidy temp dirs left in `parent` by crashed writers: an uncommitted "new" dir is removed; an "old" dir is put
    back if its target went missing (the crash hit between the two renames), else removed."""
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return
    for n in names:
        m = TMP_RE.match(n)
        if not m or _pid_alive(int(m["pid"])):
            continue
        p, target = os.path.join(parent, n), os.path.join(parent, m["name"])
        if m["role"] == "old" and not os.path.lexists(target):
            os.rename(p, target)
        else:
            shutil.rmtree(p, ignore_errors=True)
    for n in names:  # atomic_write's temp files of crashed writers
        if n.startswith(".tmp-") and os.path.isfile(os.path.join(parent, n)):
            with _suppress():
                os.unlink(os.path.join(parent, n))


_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where the platform or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _fsync_tree(directory: str) -> None:
    """Flush every file and folder of a tree built by other writers (transformers, tokenizers) before the rename
    that publishes it; and give them normal modes."""
    mask = umask()
    for root, _dirs, files in os.walk(directory):
        for f in files:
            p = os.path.join(root, f)
            if os.path.islink(p):
                continue
            os.chmod(p, 0o666 & ~mask)
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(root, 0o777 & ~mask)
        _fsync_dir(root)


def _fsync_dir(directory: str) -> None:
    with _suppress():
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _link_tree(src: str, dst: str) -> None:
    """Copy a tree by hard links (no data copied; a copy where links are not possible)."""
    shutil.copytree(src, dst, copy_function=_link_or_copy)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def commit_dir(
    path: str | os.PathLike,
    fill: Callable[[str], None],
    kind: str,
    patterns: Iterable[str] = (),
    keep: Iterable[str] = (),
    **manifest,
) -> None:
    """Build a directory with `fill(tmp)` beside `path`, write its manifest last, then put it in place of `path`.

    Entries of the existing `path` that match `keep` (a run's checkpoints) are carried into the new directory by
    hard links before the switch, so no moment exists at which they are in neither. The switch is one atomic
    exchange where Linux allows it, else two renames; a crash between them is undone by `clean_stale`.
    """
    path = os.path.abspath(path)
    parent, name = os.path.dirname(path), os.path.basename(path)
    os.makedirs(parent, exist_ok=True)
    clean_stale(parent)
    suffix = f"{os.getpid()}-{os.urandom(4).hex()}"
    tmp = os.path.join(parent, f".{name}.smolpeft-new-{suffix}")
    old = os.path.join(parent, f".{name}.smolpeft-old-{suffix}")
    os.mkdir(tmp)
    try:
        fill(tmp)
        keep = list(keep)
        if keep and os.path.isdir(path):
            for n in os.listdir(path):
                if any(fnmatch.fnmatchcase(n, k) for k in keep) and not os.path.exists(os.path.join(tmp, n)):
                    _link_tree(os.path.join(path, n), os.path.join(tmp, n))
        write_manifest(tmp, kind, patterns, **manifest)
        _fsync_tree(tmp)
        if not os.path.lexists(path):
            os.rename(tmp, path)
        elif _exchange(tmp, path):
            os.rename(tmp, old)  # tmp now holds the replaced directory
        else:
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
