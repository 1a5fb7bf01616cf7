"""The one exception type featx raises for expected mistakes.

The CLI prints its message as a single sentence and exits with status 1, without a
traceback; library users can catch it like any other exception.
"""

import click


class FeatxError(click.ClickException):
    """A user-facing error: bad input, a mismatch, a missing file."""

    exit_code = 1
