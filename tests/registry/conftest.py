"""The registry tests' fixtures (defined in regfixtures.py, which also holds their helpers)."""

from regfixtures import fast_retries, registry, stand_in  # noqa: F401  (fixtures, found by pytest here)
