"""The one exception family peftkit raises for problems a user can fix."""


class PeftkitError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it.

    The CLI prints it on one line without a traceback and exits with status 2.
    """
