"""Every command in the README and docs/ parses: peftkit subcommands with their options, recipe
overrides, and the YAML configs; the scripts they name exist."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from peftkit import Config
from peftkit.cli import build_parser, load_target

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [block for page in PAGES for block in re.findall(r"```(\w*)\n(.*?)```", page.read_text(), flags=re.S)]
COMMANDS = [line.split("  #")[0].strip() for kind, body in BLOCKS if kind == "bash" for line in body.splitlines()
            if line.strip() and not line.startswith("#")]  # fmt: skip


def test_the_readme_has_commands():
    assert any(c.startswith("peftkit ") for c in COMMANDS) and any(c.startswith("scripts/") for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command):
    argv = shlex.split(command)
    if argv[0].startswith("scripts/"):
        assert (ROOT / argv[0]).is_file()
        return
    if argv[:2] == ["accelerate", "launch"]:
        argv = [a for a in argv[2:] if not a.startswith("--config_file") and not a.endswith(".yaml")]
        argv = ["python", *[a for a in argv if not a.startswith("--machine_rank") and a not in ("0", "1")]]
    if argv[0] == "python":
        recipe = ROOT / argv[1]
        assert recipe.is_file(), command
        load_target(str(recipe)).override([a for a in argv[2:] if a.startswith("--")])
        return
    assert argv[0] == "peftkit", command
    if "--help" in argv:
        with pytest.raises(SystemExit) as done:
            build_parser().parse_known_args(argv[1:])
        assert done.value.code == 0
        return
    args, rest = build_parser().parse_known_args(argv[1:])
    target = getattr(args, "target", None)
    if args.command in ("train", "cv", "compare", "preview") and target.startswith("recipes/"):
        load_target(str(ROOT / target)).override(rest)  # the documented overrides are valid keys and values
    else:
        assert not rest or args.command in ("train", "cv", "compare", "preview"), command


def test_readme_yaml_config_is_valid():
    configs = [yaml.safe_load(body) for kind, body in BLOCKS if kind == "yaml"]
    assert configs
    for data in configs:
        Config.from_dict(data)


def test_docs_links_point_at_files_that_exist():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
