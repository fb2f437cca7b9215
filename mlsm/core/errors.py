"""One error type for everything the user can fix: the CLI prints its message, no traceback."""


class MLSMError(Exception):
    """A problem with the user's input or setup; the message says what is wrong and how to fix it."""
