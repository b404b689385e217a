"""Datasets of the model zoo, generated in-process or shipped by a package (no downloads)."""


class DataError(ValueError):
    """Data a user supplied cannot be read (missing file, malformed line); the message
    names the file and, where there is one, the line."""
