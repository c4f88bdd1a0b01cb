"""The error raised for mistakes a user can fix: bad config values, missing files, wrong checkpoints."""


class UserError(Exception):
    """A problem in the user's input. The entry points print its message alone, without a traceback.

    The message names the file or value at fault and says what to do.
    """


def whole_number(value: object, key: str, least: int = 1) -> int:
    """``value`` when it is a whole number of at least ``least``; otherwise a :class:`UserError` naming
    ``key`` (``k='abc' must be a whole number, 1 or more``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise UserError(f"{key}={value!r} must be a whole number, {least} or more")
    return value
