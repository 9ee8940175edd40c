"""Errors a user can fix: the command line prints them in one line, every other error in full."""

from __future__ import annotations

__all__ = ["UserInputError", "ConfigError"]


class UserInputError(ValueError):
    """A value, option or file given by the user that cannot be used; the message names it and
    says what to give instead.

    A subclass of ``ValueError``, so code that catches ``ValueError`` keeps working; the
    command line catches this class (not every ``ValueError``, which may be a bug) and prints
    its message alone.
    """


class ConfigError(UserInputError):
    """A config key that does not exist, or a value of the wrong type or range."""
