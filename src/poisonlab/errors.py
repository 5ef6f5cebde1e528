"""User-facing errors: the CLI prints them as one line and exits with status 2, no traceback."""


class UserError(Exception):
    """Bad input from the user (a file, a setting, a path). The message names what and where."""
