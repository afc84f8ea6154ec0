"""Every command in the README and docs/ is checked by the real parser of what it calls, and the fast ones run.

Commands come from ```bash blocks, from the first line of a plain ``` block that starts with one, and from
inline code in the prose (`peftkit merge RUN --out DIR [--dtype fp32|bf16|fp16]`: placeholders are given
sample values, each alternative is checked). `peftkit ...` goes through peftkit's argparse parser and, for a
recipe or YAML target, the config schema (unknown keys fail); `python recipes/X.py` and `accelerate launch`
through the recipe's overrides and accelerate's own launch parser and config loader; `scripts/bench`,
`scripts/bench_data` and `scripts/bench_qa` through their argparse parsers, `scripts/test` through pytest's, and the commands inside
the shell scripts are checked the same way. The README's command line then runs for real on the tiny model
(training, evaluation, report, merges and generation on run folders it trains), and so does its Python API
example.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peftkit import Config
from peftkit.cli import _after_arms, build_parser, load_target
from peftkit.compare import METHODS
from tests.conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```(\w*)\n(.*?)```", flags=re.S)
STARTS = ("peftkit ", "python ", "accelerate launch ", "scripts/")
CONFIG_COMMANDS = ("train", "cv", "compare", "preview")  # the rest of their arguments are config overrides
# sample values for the placeholders of inline synopses
PLACEHOLDERS = {"RUN": "runs/x", "RUN2": "runs/y", "RUN_DIR": "runs/x", "DIR": "runs/x/merged", "FILE": "out.gguf"}


def joined(body: str) -> list[str]:
    """The lines of a shell text with backslash continuations joined and comments dropped."""
    lines = body.replace("\\\n", " ").splitlines()
    return [line.split("  #")[0].strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def variants(command: str) -> list[str]:
    """An inline synopsis as concrete commands: `[...]` optional parts kept, `a|b|c` one command each,
    placeholders replaced, `...` and `[overrides]` dropped."""
    command = re.sub(r"\[overrides\]|(?<=\s)\.\.\.(?=\s|$)", "", command)
    command = re.sub(r"\[([^\]]*)\]", r"\1", command)
    words = [PLACEHOLDERS.get(w, w).replace("recipes/X.py", "recipes/medical_lora.py") for w in command.split()]
    choice = next((i for i, w in enumerate(words) if re.fullmatch(r"[\w.]+(\|[\w.]+)+", w)), None)
    if choice is None:
        return [" ".join(words)]
    return [
        v for alt in words[choice].split("|") for v in variants(" ".join([*words[:choice], alt, *words[choice + 1 :]]))
    ]


def commands_of(page: Path) -> list[str]:
    text = page.read_text()
    found = []
    for kind, body in FENCE.findall(text):
        if kind == "bash":
            found += joined(body)
        elif not kind and body.startswith(STARTS):
            found.append(joined(body)[0])  # a command followed by what it printed
    prose = FENCE.sub("", text)
    for span in re.findall(r"`([^`]+)`", prose):
        span = " ".join(span.split())  # inline code may wrap across lines
        if span.startswith(STARTS) and not span.endswith("/"):  # `scripts/` names the folder
            found += variants(span)
    return found


COMMANDS = sorted({(page.relative_to(ROOT).as_posix(), c) for page in PAGES for c in commands_of(page)})
YAML_BLOCKS = [
    yaml.safe_load(body) for page in PAGES for kind, body in FENCE.findall(page.read_text()) if kind == "yaml"
]


def targets(tmp_path: Path) -> dict[str, Path]:
    """The YAML files the docs' commands name, written from the docs' own YAML block."""
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(YAML_BLOCKS[0]))
    return {"my.yaml": tmp_path / "my.yaml"}


def check_config_target(target: str, overrides: list[str], tmp_path: Path) -> Config:
    path = targets(tmp_path).get(target, ROOT / target)
    assert path.is_file(), f"{target}: no such recipe or config"
    return load_target(str(path)).override(overrides)  # unknown keys and bad values raise


def check_peftkit(argv: list[str], tmp_path: Path) -> None:
    parser = build_parser()
    if "--help" in argv:
        with pytest.raises(SystemExit) as done, contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(argv)
        assert done.value.code == 0
        return
    if len(argv) == 1:  # `peftkit preview` named in a sentence: the subcommand must exist
        assert argv[0] in parser._subparsers._group_actions[0].choices, argv
        return
    args, rest = parser.parse_known_args(argv)
    if args.command in CONFIG_COMMANDS:
        check_config_target(args.target, rest, tmp_path)
        assert args.command != "compare" or set(args.methods or []) <= set(METHODS), args.methods
        assert args.command != "compare" or not _after_arms(argv), f"overrides after --arm: {argv}"
    else:
        assert not rest, f"unknown options {rest}"


def check_accelerate(argv: list[str], tmp_path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    args = launch_command_parser().parse_args(argv)
    if args.config_file:
        assert (ROOT / args.config_file).is_file(), args.config_file
        load_config_from_file(str(ROOT / args.config_file))  # accelerate's loader: unknown keys fail
    check_config_target(args.training_script, args.training_script_args, tmp_path)


def check_script(argv: list[str], tmp_path: Path) -> None:
    name = argv[0].removeprefix("scripts/")
    path = ROOT / "scripts" / name
    if Path(name).suffix:  # `scripts/constraints.txt` named in a sentence: a file, not a command
        assert path.is_file() and len(argv) == 1, argv
        return
    assert path.is_file() and path.stat().st_mode & 0o111, f"{argv[0]}: not an executable script"
    if name in ("bench", "bench_data", "bench_qa", "bench_dpo"):
        load_script(name).parse(argv[1:])  # argparse: unknown options exit 2
    elif name in ("test", "models_table"):  # extra arguments go to pytest: its own parser checks them
        result = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", *argv[1:],
                                 str(ROOT / "tests" / "test_imports.py")], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
        assert result.returncode in (0, 5), result.stdout[-2000:] + result.stderr[-2000:]
    for inner in script_commands(path, argv[1:]):
        check(inner, tmp_path)


def script_commands(path: Path, extra: list[str]) -> list[list[str]]:
    """The peftkit and recipe commands a shell script runs, its variables at their defaults and "$@" = `extra`."""
    if path.read_text().startswith("#!/usr/bin/env python"):
        return []
    text = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", path.read_text())  # ${VAR:-default}
    text = text.replace('RUN="runs/medical_demo"\n', "").replace("$RUN", "runs/medical_demo")
    out = []
    for line in joined(text):
        if line.startswith(("peftkit ", "python recipes/")):
            argv = shlex.split(line.replace('"${overwrite[@]}"', "--train.overwrite=true"))
            out.append([a for word in argv for a in (extra if word == "$@" else [word])])
    return out


def check(argv: list[str], tmp_path: Path) -> None:
    if argv[0] == "peftkit":
        check_peftkit(argv[1:], tmp_path)
    elif argv[:2] == ["accelerate", "launch"]:
        check_accelerate(argv[2:], tmp_path)
    elif argv[0] == "python":
        check_config_target(argv[1], argv[2:], tmp_path)
    elif argv[0].startswith("scripts/"):
        check_script(argv, tmp_path)
    else:
        raise AssertionError(f"no parser for {argv}")


def test_the_docs_have_commands_of_every_kind():
    found = [c for _, c in COMMANDS]
    for start in STARTS:
        assert any(c.startswith(start) for c in found), start
    assert any(page != "README.md" and c.startswith("accelerate launch --config_file") for page, c in COMMANDS)
    assert ("docs/deployment.md", "peftkit merge runs/x --out runs/x/merged --dtype bf16") in COMMANDS  # inline


@pytest.mark.parametrize("page, command", COMMANDS)
def test_docs_command_parses_with_the_real_parser(page, command, tmp_path):
    check(shlex.split(command), tmp_path)


@pytest.mark.parametrize(
    "command, fragment",
    [
        ("peftkit train my.yaml --train.max_stepz=3", "train.max_stepz"),  # a YAML target with an unknown key
        ("peftkit merge runs/x --out runs/y --dtypes bf16", "--dtypes"),
        ("peftkit export runs/x/merged --quant q4_k", "q4_k"),
        ("peftkit compare recipes/medical_lora.py --methods lora nope", "nope"),
        ("python recipes/medical_lora.py --train.lr=fast", "train.lr"),
        (
            "accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml --num_procs 2 recipes/medical_lora.py",
            "--num_procs",
        ),
        ("accelerate launch recipes/medical_lora.py --trian.max_steps=1", "trian"),
        ("scripts/bench --stepz 4", "--stepz"),
        ("scripts/bench_data --sizes 64 --quik", "--quik"),
        ("scripts/test --no-such-pytest-option", "--no-such-pytest-option"),
        ("scripts/demo --train.max_stepz=3", "train.max_stepz"),  # the overrides scripts/demo hands the recipe
    ],
)
def test_a_command_with_an_unknown_option_fails(command, fragment, tmp_path):
    from peftkit.errors import PeftkitError

    stderr = io.StringIO()
    with pytest.raises((SystemExit, PeftkitError, AssertionError)) as failed, contextlib.redirect_stderr(stderr):
        check(shlex.split(command), tmp_path)
    assert not isinstance(failed.value, SystemExit) or failed.value.code == 2  # argparse's usage error
    assert fragment in stderr.getvalue() + str(failed.value), stderr.getvalue()[-2000:] + str(failed.value)


def test_docs_yaml_configs_are_valid():
    assert YAML_BLOCKS
    for data in YAML_BLOCKS:
        Config.from_dict(data)


def test_docs_links_point_at_files_that_exist():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


# ---------------------------------------------------------------- the fast commands, for real


def tiny_overrides(tiny_model_dir: Path, corpus_dir: Path) -> list[str]:
    """What turns a documented training command into a seconds-long one on the tiny model (appended: later wins)."""
    return [f"--model.name_or_path={tiny_model_dir}", "--model.dtype=fp32", f"--data.source={corpus_dir}",
            f"--data.general_source={corpus_dir / 'general.jsonl'}", "--data.seq_len=32", "--method.r=4",
            "--train.max_steps=4", "--train.batch_size=4", "--train.lr=5e-2", "--train.warmup_steps=1",
            "--train.mixed_precision=no", "--train.progress=false", "--eval.every_steps=2", "--eval.val_tokens=256",
            "--eval.test_tokens=256", "--eval.qa_questions=0", "--eval.kl_prompts=false", "--eval.prompt_tokens=0",
            "--eval.max_general_ppl_increase=none"]  # fmt: skip


# run for real: commands on run folders, and training on a recipe or YAML (shrunk by tiny_overrides)
RUNNABLE = ("train", "preview", "eval", "report", "merge", "generate")


def readme_command_line() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    commands = [shlex.split(c) for kind, body in FENCE.findall(text) if kind == "bash" for c in joined(body)]
    return [argv for argv in commands if argv[0] == "peftkit" and argv[1] in RUNNABLE and "--help" not in argv]


def peftkit(argv: list[str]) -> str:
    from peftkit.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit as done:
            raise AssertionError(f"peftkit {' '.join(argv)} exited {done.code}") from None
    return out.getvalue()


def keep_source(overrides: list[str]) -> list[str]:
    """The tiny overrides for a config that names its own corpus (the README's YAML and Python example)."""
    return [o for o in overrides if not o.startswith("--data.source=")]


def test_the_readme_command_line_runs_on_the_tiny_model(tiny_model_dir, corpus_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the documented relative paths (runs/x, my.yaml, my_notes.jsonl) land here
    targets(tmp_path)
    (tmp_path / "my_notes.jsonl").write_text((corpus_dir / "train.jsonl").read_text())
    tiny = tiny_overrides(tiny_model_dir, corpus_dir)
    # the second adapter the README's merge and generate commands name, from the README's YAML config
    peftkit(["train", "my.yaml", *keep_source(tiny), "--seed=1", "--output_dir=runs/y"])
    ran = []
    for argv in readme_command_line():
        command = argv[1:]
        if command[0] == "generate" and command[1].endswith(".gguf"):
            continue  # the word-level tiny tokenizer has no GGUF form: tests/test_export.py runs this one
        if command[0] in ("train", "preview"):
            recipe = command[1].startswith("recipes/")
            command = [command[0], str(ROOT / command[1]) if recipe else command[1], *command[2:]]
            command += tiny if recipe else keep_source(tiny)
            if any(c.startswith("--train.time_budget=") for c in command):
                command += ["--train.time_budget=1s"]  # the budget's planning, in seconds
            if command[0] == "train" and Path("runs/x/config.yaml").exists() and "--output_dir=runs/x" in command:
                command += ["--train.overwrite=true"]  # the README's two ways to train runs/x, one after the other
        if command[0] == "generate":
            command = [c if c != "..." else "the patient" for c in command] + ["--max-new-tokens", "4", "--no-stream"]
        printed = peftkit(command)
        ran.append(" ".join(argv))
        if command[0] in ("eval", "report"):
            assert "domain ppl" in printed
    assert [c.split()[1] for c in ran].count("merge") == 3 and [c.split()[1] for c in ran].count("generate") == 2
    assert (tmp_path / "runs/x/report.html").is_file() and (tmp_path / "runs/my_notes/merged/config.json").is_file()
    assert (tmp_path / "runs/xy/config.json").is_file()  # the weighted ties merge of runs/x and runs/y
    assert len(ran) >= 11, ran


def test_the_readme_python_api_example_runs_on_the_tiny_model(
    tiny_model_dir, corpus_dir, tmp_path, monkeypatch, capsys
):
    import json

    [example] = [body for kind, body in FENCE.findall((ROOT / "README.md").read_text()) if kind == "python"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_corpus.jsonl").write_text((corpus_dir / "train.jsonl").read_text())
    # run as written, with one statement added after `config = ...`: the tiny model, local general text, no QA,
    # a few steps (the example's defaults would fetch the real model and corpora)
    tree = ast.parse(example)
    at = next(i for i, node in enumerate(tree.body) if isinstance(node, ast.Assign) and node.targets[0].id == "config")
    tree.body.insert(at + 1, ast.parse("config = shrink(config)").body[0])

    def shrink(config: Config) -> Config:
        assert config.data.source == "my_corpus.jsonl" and config.output_dir == "runs/mine"
        return config.override(keep_source(tiny_overrides(tiny_model_dir, corpus_dir)))

    exec(compile(tree, "README.md", "exec"), {"shrink": shrink})
    tuned, base = (float(x) for x in capsys.readouterr().out.splitlines()[-1].split())
    report = json.loads((tmp_path / "runs" / "mine" / "report.json").read_text())
    assert (tuned, base) == (report["tuned"]["domain_ppl"], report["base"]["domain_ppl"])
