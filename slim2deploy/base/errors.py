"""The one exception type for mistakes a user can make (bad file, bad flag, bad shape)."""

from __future__ import annotations

import os


class SlimError(Exception):
    """A user-facing error: the message says what is wrong and what to do about it.

    The CLI prints it as one line and exits with status 2; library callers can catch it.
    """


class NeedsTrust(SlimError):
    """A file holds pickled Python objects, which run code when loaded; refused without an opt-in.

    A SlimError of its own so that a tool without ``--trust-pickle`` (bench/latency.py) can give
    other advice than the flag.
    """

    def __init__(self, path: str | os.PathLike[str], what: str = "pickled Python objects"):
        self.path = str(path)
        self.what = what
        super().__init__(
            f"{path} contains {what}; unpickling it can run arbitrary code, so it is refused. If you trust "
            "the file's origin, pass --trust-pickle (trust_pickle=True); better, save a state_dict and create "
            "a slim2deploy checkpoint from it"
        )


# every control character as an escape: a file name holding a newline must not split an error into two lines
_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(32), 127)} | {10: "\\n", 13: "\\r", 9: "\\t"}


def one_line(text: str) -> str:
    """``text`` as one line: control characters (a newline in a file name, say) are shown escaped."""
    return text.translate(_ESCAPES)
