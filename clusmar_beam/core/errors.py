"""One error type for bad input, recognisable even after a runner wraps it.

Beam runners re-raise worker exceptions wrapped in their own types (and, across
processes, only as text), so the message carries a marker that the CLI finds in
whatever arrives and prints alone.
"""
import re

MARKER = "[clusmar input error] "
_STEP = " [while running"
_FIND = re.compile(re.escape(MARKER) + r"(.*?)(?:\n|$|" + re.escape(_STEP) + r"|\'\]|\")")


class InputError(ValueError):
    """Bad input or arguments: the message names the file, column and count."""

    def __init__(self, message: str):
        # Beam re-raises a DoFn's exception as type(exc)(its message + the step): the marker stays one.
        message = message[len(MARKER):] if message.startswith(MARKER) else message
        super().__init__(MARKER + message)
        self.message = message


def rows_text(count: int) -> str:
    """'1 row', '2 rows': the count an input error names."""
    return f"{count} row" if count == 1 else f"{count} rows"


def input_error_message(exc: BaseException) -> str | None:
    """The InputError message inside `exc` (or its wrapped causes), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, InputError):  # re-raised by the runner, the message ends with the step it ran
            return exc.message.split(_STEP)[0].strip()
        match = _FIND.search(str(exc))
        if match:
            return match.group(1).strip()
        exc = exc.__cause__ or exc.__context__
    return None
