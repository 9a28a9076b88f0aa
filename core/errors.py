"""Errors meant for the user: scripts print their message on one line and exit non-zero."""


class UserError(Exception):
    """A problem with the user's input or environment, with a one-line message that names
    the problem and, where there is one, the fix. Scripts catch it, print ``error: <msg>``
    to stderr and exit with status 2; no traceback is shown."""
