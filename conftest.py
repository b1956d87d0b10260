"""The fixtures both the unit suite here and the integration suites under tests/ use (a root conftest is the one
place pytest reads `pytest_plugins` from)."""

pytest_plugins = ["tests.fixtures"]
