"""The error raised for mistakes a user can fix: bad config values, missing files, wrong checkpoints."""


class UserError(Exception):
    """A problem in the user's input. The entry points print its message alone, without a traceback.

    The message names the file or value at fault and says what to do.
    """
