"""Test and harness helpers that ship with the package (the chaos harness needs them)."""
