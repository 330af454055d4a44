"""The one exception type for mistakes a user can make (bad file, bad flag, bad shape)."""


class SlimError(Exception):
    """A user-facing error: the message says what is wrong and what to do about it.

    The CLI prints it as one line and exits with status 2; library callers can catch it.
    """
