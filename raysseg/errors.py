"""The one base class of the errors a user fixes in their input (config, data, weights files,
checkpoints, cluster resources): the CLI prints them as one line and exits 2, without a traceback.

Everything else is a bug or an outage, and keeps its traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input; the message names the file, key or value to fix."""


def find_input_error(error: BaseException) -> InputError | None:
    """`error` or the InputError it wraps: Ray re-raises a worker's exception wrapped (its
    `cause`), and code that adds context chains the original (`__cause__`)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, InputError) and getattr(current, "cause", None) is None:
            return current
        current = getattr(current, "cause", None) or current.__cause__
    return None
