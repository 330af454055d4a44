"""Cached stages: skip work whose inputs are unchanged and whose outputs are still intact.

A stage has a *key* (a hash of everything that changes its result: upstream file contents,
options, the data it is measured on) and *outputs* (files it writes). ``StageCache`` keeps, in
one JSON file, the key each stage last ran with, the sha256 of each output as that run wrote it,
and a small ``info`` dict (numbers the stage measured). A stage is fresh when its key is the
same and every output still hashes to what was recorded; a missing or damaged output redoes it.

The state file is only a cache: one that is unreadable or of the wrong shape (hand-edited,
``null``, a list, not UTF-8, nested a thousand deep) is ignored with a message, and every stage runs
again; so is an entry naming an output that is not a plain file name (``../x``, ``/etc/x``): the
names are used to find and delete earlier outputs, never outside the folder. A stage whose recorded
info lacks what its reader needs (a value of the wrong type, a missing key: ``fits``) runs again. A lock
(``exclusive_dir``) keeps two processes from writing one folder at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from slim2deploy.base.errors import SlimError
from slim2deploy.base.files import atomic_write_text, file_kind, plain_name, sha256_file
from slim2deploy.base.formats import read_json


def stage_key(*parts: Any) -> str:
    """A short, stable hash of ``parts`` (anything JSON can encode; other objects by ``str``)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


Shape = type | tuple["Shape", ...] | dict[str, "Shape"] | list["Shape"]
NUMBER = (int, float)


def fits(value: Any, shape: Shape) -> bool:
    """Whether JSON data ``value`` has ``shape``: a type (``bool`` is no ``int``), a tuple of
    alternatives, a dict of required keys and their shapes (other keys allowed), or ``[item]`` for a
    list of items of that shape. How a stage's recorded info is checked before it is reused."""
    if isinstance(shape, tuple):
        return any(fits(value, alternative) for alternative in shape)
    if isinstance(shape, dict):
        return isinstance(value, dict) and all(k in value and fits(value[k], s) for k, s in shape.items())
    if isinstance(shape, list):
        return isinstance(value, list) and all(fits(v, shape[0]) for v in value)
    return isinstance(value, shape) and (shape is bool or not isinstance(value, bool))


def _valid_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("key"), str)
        and isinstance(entry.get("outputs"), dict)
        and all(plain_name(k) and isinstance(v, str) for k, v in entry["outputs"].items())
        and isinstance(entry.get("info", {}), dict)
    )


class StageCache:
    """The state file of one output folder: per stage, its key, output hashes and info."""

    def __init__(self, path: str | os.PathLike[str], log: Callable[[str], None] = print):
        self.path = Path(path)
        self.log = log
        self.data: dict[str, dict[str, Any]] = {}
        self.used: set[str] = set()  # the stages this run reached, fresh or redone
        if not self.path.exists():
            return
        try:
            raw = read_json(self.path, "build record", advice="ignoring it, every stage runs again")
        except SlimError as exc:
            log(f"note: {exc}")
            return
        if not isinstance(raw, dict):
            log(f"note: {self.path} holds a JSON {type(raw).__name__}, not a stage record; every stage runs again")
            return
        bad = sorted(name for name, entry in raw.items() if not _valid_entry(entry))
        if bad:
            log(f"note: {self.path}: ignoring malformed entries {', '.join(bad)}; those stages run again")
        self.data = {name: entry for name, entry in raw.items() if name not in bad}

    def fresh(self, stage: str, key: str, outputs: Sequence[Path], shape: Shape = dict) -> bool:
        """Same key as last time, every output still exactly what that run wrote, and its info of
        ``shape`` (an edited value of the wrong type or a missing key redoes the stage, as a malformed
        entry does, instead of reaching the report)."""
        entry = self.data.get(stage)
        if entry is None or entry["key"] != key:
            return False
        if not fits(entry.get("info", {}), shape):
            self.log(f"note: {self.path}: the recorded results of {stage} are malformed; it runs again")
            return False
        recorded = entry["outputs"]
        return all(_regular(p) and recorded.get(p.name) == sha256_file(p) for p in outputs)

    def done(self, stage: str, key: str, outputs: Sequence[Path], info: dict[str, Any] | None = None) -> None:
        """Record a finished stage (written at once, so a later crash keeps it)."""
        self.used.add(stage)
        self.data[stage] = {
            "key": key,
            "outputs": {p.name: sha256_file(p) for p in outputs},
            "info": info or {},
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write_text(self.path, json.dumps(self.data, indent=2, default=str))

    def info(self, stage: str) -> dict[str, Any]:
        return dict(self.data.get(stage, {}).get("info", {}))

    def run(
        self,
        stage: str,
        key: str,
        outputs: Sequence[Path],
        work: Callable[[], dict[str, Any] | None],
        shape: Shape = dict,
    ) -> tuple[dict[str, Any], bool]:
        """``work()`` unless the stage is fresh; returns its info (recorded or new) and whether it ran."""
        if self.fresh(stage, key, outputs, shape):
            self.used.add(stage)
            return self.info(stage), False
        info = work() or {}
        self.done(stage, key, outputs, info)
        return info, True

    def drop_unused(self) -> tuple[list[str], list[str]]:
        """Forget the stages this run did not reach and delete the files only they wrote; returns the
        names deleted and the names kept because they changed since (edited or replaced by the user:
        their sha256 is no longer the one recorded, so they are no longer the build's to delete).

        Call it when a run has finished: an output of an earlier run's settings (an fp16 graph of
        another pruning ratio, say) would otherwise sit beside this run's outputs as if it were one.
        """
        kept = {name for stage in self.used for name in self.data[stage]["outputs"]}
        unused = [entry for stage, entry in self.data.items() if stage not in self.used]
        removed, changed = [], []
        for name in sorted({name for entry in unused for name in entry["outputs"]} - kept):
            path = self.path.parent / name  # a plain name (_valid_entry): inside the folder
            if not _regular(path):  # gone, or replaced by a link or a folder: not the file the build wrote
                continue
            if sha256_file(path) in {entry["outputs"].get(name) for entry in unused}:
                path.unlink()
                removed.append(name)
            else:
                changed.append(name)
        if unused:
            self.data = {stage: entry for stage, entry in self.data.items() if stage in self.used}
            atomic_write_text(self.path, json.dumps(self.data, indent=2, default=str))
        return removed, changed


def _regular(path: Path) -> bool:
    return path.is_file() and file_kind(path) is None


@contextlib.contextmanager
def exclusive_dir(folder: str | os.PathLike[str], what: str = "build") -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``folder/.lock``) for the block, or raise SlimError.

    ``flock`` locks belong to the open file: the kernel drops them when the process exits, however
    it exits, so a lock left by a killed process never blocks the next run. The lock file is
    removed on leaving the block, whatever ends it, so a finished or refused run leaves no trace.
    """
    path = Path(folder) / ".lock"
    fd = _lock(path, folder, what)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        # unlinked while still locked: a process that opened the old file meanwhile sees it gone (_lock)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def _lock(path: Path, folder: str | os.PathLike[str], what: str) -> int:
    """An open descriptor of ``path`` holding its flock; the file is the one at ``path`` now."""
    while True:
        try:  # never through a link: the pid written below would land in whatever file it names
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SlimError(f"{path} is {file_kind(path)}, not a lock file; remove it") from None
            raise SlimError(f"cannot create {path}: {exc.strerror}; choose an `out` folder you can write to") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise SlimError(f"{path} is {file_kind(path)}, not a lock file; remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise SlimError(
                f"another {what} is writing to {folder}{f' (pid {pid})' if pid else ''}; "
                "wait for it to finish or choose another `out`"
            ) from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            return fd
        os.close(fd)  # the holder removed this file as it finished: lock the one now at ``path``
