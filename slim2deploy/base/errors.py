"""The one exception type for mistakes a user can make (bad file, bad flag, bad shape)."""

from __future__ import annotations

import os


class SlimError(Exception):
    """A user-facing error: the message says what is wrong and what to do about it.

    The CLI prints it as one line and exits with status 2; library callers can catch it. A setting the user
    can change is named by its Python parameter in backquotes (`batch_size`): that is what an API user
    passes, and the CLI prints the command's flag for it instead (``cli.as_flags``).
    """


class NeedsTrust(SlimError):
    """A file holds pickled Python objects, which run code when loaded; refused without an opt-in.

    A SlimError of its own so that a tool without a trust flag (bench/latency.py) can give
    other advice than the flag.
    """

    def __init__(self, path: str | os.PathLike[str], what: str = "pickled Python objects"):
        self.path = str(path)
        self.what = what
        super().__init__(
            f"{path} contains {what}; unpickling it can run arbitrary code, so it is refused. If you trust "
            "the file's origin, pass `trust_code`; better, save a state_dict and create "
            "a slim2deploy checkpoint from it"
        )


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of ``exc``'s message, cut to ``limit`` characters; its type name if the message is empty.

    Third-party code raises exceptions with empty or whitespace-only messages (``raise
    Exception()``): quoting those must not fail while reporting the real error.
    """
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


# every control character as an escape: a file name holding a newline must not split an error into two lines
_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(32), 127)} | {10: "\\n", 13: "\\r", 9: "\\t"}


def one_line(text: str) -> str:
    """``text`` as one line: control characters (a newline in a file name, say) are shown escaped."""
    return text.translate(_ESCAPES)
