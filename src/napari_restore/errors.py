"""The one error hierarchy of napari-restore.

Every failure a user can cause (a bad file, a bad model, a cancelled run) is raised as a
subclass of :class:`RestoreError` with a message that names the file and the problem.
"""
from __future__ import annotations

from os import PathLike


class RestoreError(Exception):
    """Base class of every error napari-restore raises on purpose."""


class InputError(RestoreError):
    """An input (file, folder, layer, volume) cannot be read or used.

    ``path`` names the offending file or folder when there is one.
    """

    def __init__(self, message: str, path: str | PathLike | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class OutputError(RestoreError):
    """An output cannot be written (target exists, disk full, read-only folder)."""

    def __init__(self, message: str, path: str | PathLike | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class ModelError(RestoreError):
    """A model file or card is missing, untrusted, corrupt or of an unknown architecture."""

    def __init__(self, message: str, path: str | PathLike | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class Cancelled(RestoreError):
    """The user cancelled a long run; nothing was written or returned."""


class PacsError(RestoreError):
    """A PACS (DIMSE or DICOMweb) operation failed: server down, association refused, timeout, HTTP error.

    ``server`` names the configured server. Messages never carry credentials.
    """

    def __init__(self, message: str, server: str | None = None):
        self.server = server
        super().__init__(f"PACS {server!r}: {message}" if server else message)


class PartialRetrieveError(PacsError):
    """A retrieve delivered only part of a series; what arrived stays on disk for a resumed retrieve,
    and is never opened as the complete series. ``received``/``expected`` count instances."""

    def __init__(self, message: str, server: str | None = None, received: int = 0, expected: int = 0,
                 folder: str | PathLike | None = None):
        self.received, self.expected = received, expected
        self.folder = None if folder is None else str(folder)
        super().__init__(message, server)
