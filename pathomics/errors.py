"""The exception hierarchy: every user-facing failure is a PathomicsError with a message saying what to do."""

from __future__ import annotations


class PathomicsError(Exception):
    """Base class of every error pathomics raises on purpose."""


class SlideReadError(PathomicsError, OSError):
    """A slide cannot be opened or read (missing, truncated, not a slide, no MPP)."""


class StoreError(PathomicsError):
    """A patch store or feature file is missing, incomplete, foreign or inconsistent."""


class CohortError(PathomicsError, ValueError):
    """A clinical, radiology, label or signature table is malformed."""


class ModelError(PathomicsError):
    """A backbone or aggregator cannot be built, loaded or applied."""
