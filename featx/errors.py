"""The one exception type featx raises for expected mistakes.

The library raises it with one sentence that names the bad value and what is allowed; the
CLI (:mod:`featx.cli`) prints that sentence and exits with status 1, without a traceback.
It is a plain ``Exception``, so the library does not depend on click.
"""


class FeatxError(Exception):
    """A user-facing error: bad input, a mismatch, a missing file."""
