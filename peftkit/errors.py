"""The one exception family peftkit raises for problems a user can fix."""


class PeftkitError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it.

    The CLI prints it on one line without a traceback and exits with status 2.
    """


class RunAborted(PeftkitError):
    """A run that cannot go on (another process of a multi-process run died or stalled): nothing the
    user typed was wrong, so the CLI exits with status 1, still on one line."""

    exit_code = 1
