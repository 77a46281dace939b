"""Helpers shared by the tests: ``helpers.survival`` (clinical tables, planted cohorts, CLI runs) and
``helpers.mil`` (feature files with planted witness patches). Imported as ``from helpers.mil import ...``
(pytest puts ``tests/`` on the path)."""
