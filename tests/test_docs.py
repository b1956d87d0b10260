"""The documentation: the README is a front page that opens with two working commands, docs/ links resolve,
the NixOS module reference names every option of module.nix, and the man page is the one the parser makes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def prose(path: Path) -> str:
    """A Markdown page without its fenced code blocks (a `# comment` in a bash block is not a heading)."""
    return re.sub(r"(?ms)^```.*?^```$", "", path.read_text())


def anchors(path: Path) -> set[str]:
    """The anchors GitHub, Gitea and GitLab give a page's headings."""
    return {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", prose(path), re.M)
    }


def test_readme_is_a_front_page_of_at_most_16000_bytes():
    size = len((REPO / "README.md").read_bytes())
    assert size <= 16000, f"README.md is {size} bytes: keep the front page at most 16,000, move detail to docs/"


def test_readme_opens_with_the_demo_and_the_whole_test_suite():
    text = (REPO / "README.md").read_text()
    opening = text.split("\n## ", 1)[0]
    assert re.findall(r"^```bash\n(.*?)^```$", opening, re.S | re.M) == [
        "pip install '.[demo]' && homelab-deploy demo\n",
        "bash .ci/run\n",
    ]
    # .ci/run ends by running every test, not a marked subset
    assert (REPO / ".ci" / "run").read_text().rstrip().splitlines()[-1] == "python3 -m pytest -q -p no:cacheprovider"


def test_every_link_between_the_pages_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(page)):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists() or (anchor and anchor not in anchors(resolved)):
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken


def test_no_page_keeps_a_flag_table_by_hand():
    """Flags are documented once, by the parser (--help, the man page); a hand-kept table goes stale."""
    assert not [page.name for page in PAGES if re.search(r"^\| Flag \|", page.read_text(), re.M)]


def module_options() -> dict[str, list[str]]:
    """Every option module.nix declares, per service, as the module reference names it (`metrics.enable`)."""
    nix = (REPO / "module.nix").read_text()
    helpers = dict(re.findall(r"^  (\w+) = (?:(?:\w+|\{[^}]*\}): )+\{\n(.*?)^  \};", nix, re.S | re.M))
    repo_options = re.findall(r"^      (\w+) = mkOption", helpers["repoModule"], re.M)
    options = {}
    for service in ("listener", "builder"):
        block = nix.split(f"options.services.homelab-deploy.{service} = {{\n", 1)[1].split("\n  };\n", 1)[0]
        names = []
        for name, value in re.findall(r"^    (\w+) = (\w+)", block, re.M):
            if value in helpers:  # a helper that declares several options, such as metricsOptions
                names += [f"{name}.{sub}" for sub in re.findall(r"^    (\w+) = mk", helpers[value], re.M)]
            elif name == "settings":
                names += [f"settings.{sub}" for sub in re.findall(r"options\.(\w+) = mkOption", block)]
                names += [f"settings.repos.<name>.{sub}" for sub in repo_options]
            else:
                names.append(name)
        options[service] = names
    return options


def test_the_module_reference_names_every_option_of_module_nix():
    options = module_options()
    assert {"trustedKeys", "trustedKeysFile", "metrics.openFirewall", "rollbackTimeout"} <= set(options["listener"])
    assert {"settings.trusted_keys", "settings.repos.<name>.url", "configFile"} <= set(options["builder"])
    doc = (REPO / "docs" / "nixos-module.md").read_text()
    for service, section in (("listener", "Listener (every host)"), ("builder", "Builder (one build host)")):
        table = set(re.findall(r"^\| `([^`]+)` \|", doc.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0], re.M))
        missing = [name for name in options[service] if name not in table]
        assert not missing, f"docs/nixos-module.md, '{section}': no table row for {missing}"


def test_the_man_page_is_the_one_the_parser_makes(tmp_path):
    """The committed homelab-deploy.1 matches what build_parser gives now; only the date may differ."""
    subprocess.run(
        ["bash", str(REPO / ".ci" / "manpage"), str(tmp_path / "homelab-deploy.1")],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=60,
    )

    def undated(text: str) -> str:
        return re.sub(r'^(\.TH \S+ "1") "[^"]*"', r"\1", text, flags=re.M)

    assert undated((REPO / "homelab-deploy.1").read_text()) == undated((tmp_path / "homelab-deploy.1").read_text()), (
        "homelab-deploy.1 is not what the CLI's parser gives now: regenerate it with `bash .ci/manpage` and commit it"
    )
