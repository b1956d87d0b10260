"""The test layout: the unit suite is test_homelab_deploy.py at the root (what default.nix runs), everything under
tests/ is marked `integration` by its directory, and no test file imports another (shared code is in
tests/helpers.py, shared fixtures in tests/fixtures.py and tests/conftest.py)."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.helpers import REPO

TEST_FILES = [REPO / "test_homelab_deploy.py", *sorted((REPO / "tests").glob("test_*.py"))]


def collected(*args: str, python: tuple[str, ...] = (sys.executable,)) -> set[str]:
    r = subprocess.run(
        [*python, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return {line for line in r.stdout.splitlines() if "::" in line}


def test_not_integration_is_the_unit_suite_and_needs_no_mcp_sdk():
    everything = collected()
    unit = collected("-m", "not integration")
    under_tests = {t for t in everything if t.startswith("tests/")}
    assert unit and all(t.startswith("test_homelab_deploy.py::") for t in unit), sorted(unit)[:5]
    assert under_tests and not under_tests & unit
    # default.nix's checkPhase, where the MCP SDK is not installed: the same tests, with mcp unimportable
    no_mcp = (
        sys.executable,
        "-c",
        "import sys, runpy; sys.modules['mcp'] = None; runpy.run_module('pytest', run_name='__main__')",
    )
    assert collected("-m", "not integration", "test_homelab_deploy.py", python=no_mcp) == unit


def test_no_test_file_imports_another():
    for path in TEST_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            wrong = [n for n in names if n.split(".")[-1].startswith("test_") or n.split(".")[-1] == "conftest"]
            assert not wrong, f"{path.relative_to(REPO)}:{node.lineno} imports {wrong}: move it to tests/helpers.py"
