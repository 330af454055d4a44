"""Files in and out: outputs checked before any work, written atomically, never left half-written; inputs
read only when they are regular files; names read back from the tool's own records used only when plain.

An output is always a regular file inside a folder the user named: an existing path that is anything
else (a symbolic link, a FIFO, a socket, a device) is refused, because the final rename would replace
it with a file (a link's target is not written; as root, ``--json /dev/null`` would replace
``/dev/null``). A folder output (``build --out``, ``--cache``) may be a link to a folder: the user
named it, and every file the tool writes inside it is checked as above.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from slim2deploy.base.errors import SlimError
from slim2deploy.base.interrupts import held

PathLike = str | os.PathLike[str]


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (atomic_path creates the missing folders)."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        return False
    return a.resolve() == b.resolve()


def file_kind(path: PathLike) -> str | None:
    """What ``path`` is when it exists and is not a regular file (``"a FIFO (named pipe)"``, ``"a symbolic link
    to X"``, ...); None for a regular file or a missing path. The path itself is looked at, not a link's target."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return f"a symbolic link to {os.readlink(path)}"
    kinds = (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((text for test, text in kinds if test(mode)), "not a regular file")


def check_input_file(path: PathLike, what: str) -> Path:
    """``path`` as a Path when it is a regular file (a link to one is fine); else one SlimError naming it.

    Checked before a reader opens it: a FIFO named like an image or a data file would block the reader
    forever, a device would feed it endless bytes.
    """
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        raise SlimError(f"no such {what}: {p}") from None
    except OSError as exc:
        raise SlimError(f"the {what} {p} cannot be read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise SlimError(f"{p} is a folder, not a {what}")
    if not stat.S_ISREG(mode):
        kind = file_kind(p) if not p.is_symlink() else "a link to " + (file_kind(p.resolve()) or "a special file")
        raise SlimError(f"{p} is {kind}, not a regular file; give the {what} file itself")
    return p


def plain_name(name: object) -> bool:
    """Whether ``name`` is a file name on its own: no folder part, not ``.``/``..``, no NUL, not absolute.

    Names read back from a file the tool wrote (a build's output names) are used only when plain: an
    edited record must not make the tool touch a file outside the folder it belongs to.
    """
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "\x00" not in name
        and "/" not in name
        and (os.altsep is None or os.altsep not in name)
    )


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def check_output(
    path: PathLike, what: str = "`out`", *, inputs: Iterable[PathLike | None] = (), folder: bool = False
) -> Path:
    """Refuse an output path that cannot be written, before any work is done.

    ``what`` names the flag in the message. A file output must not be a folder and must not be
    one of ``inputs``; a folder output (``folder=True``) must not be a file. Missing parent
    folders are fine when the nearest existing one is a writable folder (they are created).
    A path the system cannot resolve (a name too long, a symlink loop) is refused here too.
    """
    if str(path) == "":
        raise SlimError(f"{what} is empty; name the output {'folder' if folder else 'file'}")
    if not folder and str(path).endswith(tuple(sep for sep in (os.sep, os.altsep) if sep)):
        # Path() drops the separator, so x.pt/ would be written as a file although it names a folder
        raise SlimError(
            f"{what} {path} ends in a path separator, so it names a folder, but a file is wanted; "
            f"drop the trailing {str(path)[-1]} or name a file inside the folder"
        )
    try:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):  # new, or under a file: named below
            os.stat(path)  # a name too long or a symlink loop fails here, whatever else is checked
        return _check_output(Path(path), what, inputs, folder)
    except (OSError, RuntimeError) as exc:  # pathlib's resolve() reports a symlink loop as RuntimeError
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SlimError(f"{what} {path} cannot be used: {reason}; choose another path") from exc


def _check_output(out: Path, what: str, inputs: Iterable[PathLike | None], folder: bool) -> Path:
    kind = file_kind(out)
    if folder:
        if out.exists() and not out.is_dir():
            raise SlimError(f"{what} {out} is a file, but a folder is wanted; name a new or existing folder")
        if kind is not None and not out.exists():
            raise SlimError(f"{what} {out} is {kind}, which does not exist; remove the link or name a folder")
    elif out.is_dir():
        raise SlimError(f"{what} {out} is a folder; name a file inside it, e.g. {out / 'out'}")
    elif kind is not None:
        raise SlimError(f"{what} {out} is {kind}, not a regular file; {_why_not_replaced(kind)}")
    base = _nearest_existing(out if folder else out.parent)
    if not base.is_dir():
        raise SlimError(f"{what} {out}: {base} is a file, not a folder, so nothing can be written under it")
    if not os.access(base, os.W_OK | os.X_OK):
        raise SlimError(f"{what} {out}: the folder {base} is not writable; choose another location")
    if not folder and out.is_file():
        _check_replaceable(out, what)
    for src in inputs:
        if src is None:
            continue
        if not folder and _same_file(out, Path(src)):
            raise SlimError(f"{what} {out} is also an input; writing it would replace the input, choose another name")
        if folder and Path(src).exists() and out.exists() and _inside(Path(src), out):
            raise SlimError(
                f"the input {src} lies inside the output folder {what} {out}, whose files are written over; "
                "move the input out of it or choose another folder"
            )
    return out


def _why_not_replaced(kind: str) -> str:
    if kind.startswith("a symbolic link"):
        return "the output would replace the link with a file, not write where it points: name the target or a new file"
    return "the output would replace it with a regular file: choose another name"


def _check_replaceable(out: Path, what: str) -> None:
    """Refuse an existing file that the final rename could not replace (immutable, chattr +i).

    Opening for append writes nothing and leaves the times alone. EACCES (a read-only file) is fine:
    the rename replaces the file through its writable folder; EPERM means the file itself is locked.
    """
    try:
        with open(out, "ab"):
            pass
    except PermissionError as exc:
        if exc.errno == errno.EPERM:
            raise SlimError(
                f"{what} {out} exists and cannot be replaced ({exc.strerror}; is it immutable, chattr +i?); "
                "unlock it or choose another name"
            ) from exc


def check_outputs(
    outputs: Mapping[str, PathLike | None], *, inputs: Iterable[PathLike | None] = (), folders: Iterable[str] = ()
) -> None:
    """``check_output`` for every flag given (None: not asked for), and no two flags on one file."""
    inputs, folders = list(inputs), set(folders)
    seen: dict[Path, str] = {}
    for what, path in outputs.items():
        if path is None:
            continue
        out = check_output(path, what, inputs=inputs, folder=what in folders).absolute()
        for other, other_what in seen.items():
            if _same_file(out, other):
                raise SlimError(f"{what} and {other_what} name the same file {path}; give each its own name")
        seen[out] = what


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only on success.

    Write the whole file to the yielded path. If the block raises, the temporary file is
    removed and ``path`` is left exactly as it was; an OSError (full disk, no permission,
    a folder in the way) becomes one SlimError naming the file.
    """
    final = Path(path)
    tmp: Path | None = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with held():  # a signal between making the file and naming it here would leave it behind
            fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
            os.close(fd)
            tmp = Path(tmp_name)
        umask = os.umask(0)
        os.umask(umask)
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
        kind = file_kind(final)  # checked before the work, but a link or FIFO may have been put there since
        if kind is not None:
            raise SlimError(f"could not write {final}: it is {kind}, not a regular file; {_why_not_replaced(kind)}")
        os.replace(tmp, final)
    except OSError as exc:
        raise SlimError(f"could not write {final}: {exc.strerror or exc}; nothing was changed there") from exc
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def created_folder(path: PathLike, what: str = "`out`") -> Iterator[Path]:
    """Create the folder ``path`` (and missing parents) for the block; if the block fails, remove again
    the folders it created that are still empty, so a failed run leaves no empty output folder behind."""
    folder = Path(path)
    made = []
    probe = folder.absolute()
    while not probe.exists() and probe != probe.parent:
        made.append(probe)
        probe = probe.parent
    try:
        with held():  # a signal between mkdir and the try would leave the new folder behind
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SlimError(f"cannot create the output folder {what} {folder}: {exc.strerror or exc}") from None
        yield folder
    except BaseException:
        for created in made:  # deepest first
            with contextlib.suppress(OSError):  # not empty (an output the failed run kept), or gone
                created.rmdir()
        raise


@contextlib.contextmanager
def temporary_folder(prefix: str) -> Iterator[Path]:
    """A new folder under the system's temporary folder for the block, removed after it whatever happens
    (``tempfile.TemporaryDirectory``, but a signal cannot land between making it and owning it)."""
    folder: Path | None = None
    try:
        with held():
            folder = Path(tempfile.mkdtemp(prefix=prefix))
        yield folder
    finally:
        if folder is not None:
            with held():
                shutil.rmtree(folder, ignore_errors=True)


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
