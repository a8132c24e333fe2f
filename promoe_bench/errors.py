"""The one exception type a user's mistake becomes; the CLI prints its message as a single line."""


class UsageError(Exception):
    """Bad input from the user: a path, a checkpoint, a flag value. The message says how to fix it."""
