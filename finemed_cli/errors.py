"""The error hierarchy: every message names the bad value and the fix; the CLI prints it on one line."""

from __future__ import annotations


class FinemedError(Exception):
    """Base of every error finemed reports to the user without a traceback."""


class DataError(FinemedError):
    """A data file is missing, malformed or inconsistent."""


class ConfigError(FinemedError):
    """An option or config value is invalid, alone or in combination."""


class ModelError(FinemedError):
    """A model, tokenizer, embedder or index cannot be loaded or used."""


class ExportError(FinemedError):
    """A model cannot be exported."""
