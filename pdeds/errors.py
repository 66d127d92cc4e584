"""The one user-facing error type.

Every problem caused by input (config, file, CLI flag, rank count) is raised as a
``PdedsError`` whose message names the problem and the fix; the CLI prints it as one
line and exits with status 2, never a stack trace.
"""

from __future__ import annotations


class PdedsError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""
