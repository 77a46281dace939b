"""The exception and warning hierarchy: every user-facing failure is a PathomicsError saying what to do.

The CLI turns a PathomicsError into one line and exit code 2 (bad usage or bad input); in a batch, a
PathomicsError raised for one slide fails that slide alone. Anything else is a bug and is not caught.
"""

from __future__ import annotations


class PathomicsError(Exception):
    """Base class of every error pathomics raises on purpose."""


class ConfigError(PathomicsError, ValueError):
    """A setting is out of range or contradicts another (a config dataclass, a CLI option, a registry name)."""


class InputError(PathomicsError, ValueError):
    """A file or table the user gave is missing, unreadable or malformed."""


class CohortError(InputError):
    """A clinical, radiology, label or signature table is malformed or does not match the slides."""


class SlideReadError(PathomicsError, OSError):
    """A slide cannot be opened or read (missing, truncated, not a slide, no MPP)."""


class WriteError(PathomicsError, OSError):
    """An output cannot be written (disk full, file size limit, permissions): names the path and what to do."""


class StoreError(PathomicsError):
    """A patch store or feature file is missing, incomplete, foreign or inconsistent."""


class ModelError(PathomicsError):
    """A backbone or aggregator cannot be built, loaded or applied."""


class WorkerError(PathomicsError):
    """A helper process died (a patch reader killed by a signal, by the out-of-memory killer): fails that slide."""


class PathomicsWarning(UserWarning):
    """Base class of the warnings pathomics issues."""


class DataWarning(PathomicsWarning):
    """Input data was left out or is thin (slides without features, an empty slide, a fold without pairs)."""


class FitWarning(PathomicsWarning):
    """A model fit is unreliable (non-convergence, a covariate that separates events)."""
