"""Exceptions raised by irisseg.

Every error a user can cause with their own files (a missing or corrupt file, wrong dimensions, a mask
whose geometry does not match its image, an empty or non-binary mask, NaN intensities) is raised as an
:class:`InputError` whose message is one line naming the file and the problem. The CLI prints that line
as ``irisseg: error: <message>`` and exits with code 2, without a traceback.
"""

from __future__ import annotations


class IrissegError(Exception):
    """Base class of every exception irisseg raises on purpose."""


class InputError(IrissegError, ValueError):
    """Bad user input: the message is a single line that names the file (or option) and the problem."""
