"""Two exception types: bad input (the CLI prints its message as a single line and exits 2), and a failed hard
check (one line, exit 1)."""


class UserError(Exception):
    """Bad input from the user. The message names the problem and how to fix it."""


class CheckFailed(Exception):
    """A hard check failed (dq-verify's gate). The message is one line naming the check; the CLI exits 1."""
