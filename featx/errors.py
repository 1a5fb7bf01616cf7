"""The one exception type featx raises for expected mistakes.

The library raises it with one sentence that names the bad value and what is allowed; the
CLI (:mod:`featx.cli`) prints that sentence and exits with status 1, without a traceback.
It is a plain ``Exception``, so the library does not depend on click.
"""


class FeatxError(Exception):
    """A user-facing error: bad input, a mismatch, a missing file."""


class EveryRankError(FeatxError):
    """Under torchrun: an error every rank knows (one of them says it)."""


def root_cause(e: BaseException, limit: int = 200) -> str:
    """``"Type: message"`` of the innermost cause of ``e`` (its first line that says
    something), for one-line warnings: compilers wrap the real reason in layers such as
    ``backend='inductor' raised:``."""
    seen = {id(e)}
    while True:
        inner = e.__cause__ or getattr(e, "inner_exception", None)
        if not isinstance(inner, BaseException) or id(inner) in seen:
            break
        seen.add(id(inner))
        e = inner
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and not line.strip().endswith(":")]
    text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
