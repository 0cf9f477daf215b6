"""One exception type for every user-facing failure: the CLI prints its message, without a traceback."""


class GramvlError(Exception):
    """A problem with the user's input or environment, with a message that names it and says what to do."""
