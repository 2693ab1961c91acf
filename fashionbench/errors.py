"""The one base class for problems a user can fix."""


class UserError(Exception):
    """Bad input or missing prerequisites; the message says what is wrong and what to do."""
