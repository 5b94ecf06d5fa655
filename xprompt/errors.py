"""The one exception type that the CLI turns into a one-line message."""


class XPromptError(Exception):
    """A domain error: bad input, a missing file, an unknown name.

    The message must say what is wrong, where (file, line, field) and how to fix it.
    The CLI prints it on one line and exits with status 1; anything else is a bug.
    """
