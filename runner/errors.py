"""Errors a user can act on. The CLI prints them as one line and exits 2; anything else is a bug."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (manifest, data, usage): the message says what is wrong and where."""


class ManifestError(UserError):
    """The manifest is not valid; the message names the YAML path (and line) of each problem."""


class DataError(UserError):
    """The data a manifest points at cannot be used as asked (missing files, one class left, ...)."""
