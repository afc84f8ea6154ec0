"""Bad input through every path that reads it: each malformed data source through every command that reads
a data source (train, preview, cv, compare, eval), in memory and streamed; each unusable model folder through
every command that loads one (train, preview, eval, merge, export, generate). A new command or data path that
skips validation fails here, not in a user's hands. The expected line is the same on every path: the input's
own error, once, exit status 2, no traceback, and any run folder already there left as it was."""

import dataclasses
import shutil
from pathlib import Path

import pytest

from peftkit import Trainer
from tests.test_bad_input import corpus_folder, run_cli, snapshot

# name -> (what to write as the source: (relative path, bytes) per file, or None for a missing source;
#          the fragment every path must report)
MISSING = "no_such_corpus.jsonl"
SOURCES = {
    "missing file": (None, f"{MISSING}: no such data file"),
    "malformed json": ({"train.jsonl": b'{"text": "a b"}\n{"text": oops}\n'}, "train.jsonl line 2: malformed JSON"),
    "missing field": ({"train.jsonl": b'{"text": "the patient"}\n{"body": "x"}\n'}, "line 2: no string field 'text'"),
    "not utf-8": ({"train.jsonl": b'{"text": "the patient"}\n{"text": "\xff"}\n'}, "line 2: not valid UTF-8"),
    "not an object": ({"train.jsonl": b'{"text": "the patient"}\n[1, 2]\n'}, "line 2: expected a JSON object"),
    "empty file": ({"train.jsonl": b""}, "train.jsonl: holds no documents"),
    "missing train split": ({}, "has no train.jsonl"),
    "unsupported type": ({"corpus.xlsx": b"text\nthe patient\n"}, "unsupported file type '.xlsx'"),
}
# data.streaming=on is refused with data.folds (cross-validation pools the corpus in memory), so cv reads
# a source in memory only; every other command reads it both ways.
DATA_COMMANDS = {
    "train": lambda cfg, run, tmp: ["train", cfg, f"--output_dir={run}", "--train.overwrite=true"],
    "preview": lambda cfg, run, tmp: ["preview", cfg],
    "cv": lambda cfg, run, tmp: ["cv", cfg, "--folds=2", f"--output_dir={tmp / 'cv'}"],
    "compare": lambda cfg, run, tmp: ["compare", cfg, "--methods", "lora", "--out", tmp / "compare"],
    "eval": lambda cfg, run, tmp: ["eval", run],
}
# compare hands the config to one `peftkit train` subprocess per method (~10 s each): what it adds is relaying
# that run's one line, the same for either data path, so it runs in memory only, among the slow tests.
STREAMED_BY = {"off": list(DATA_COMMANDS), "on": [c for c in DATA_COMMANDS if c not in ("cv", "compare")]}
DATA_PATHS = [
    pytest.param(c, s, id=f"{c}-stream_{s}", marks=[pytest.mark.slow] if c == "compare" else [])
    for s, commands in STREAMED_BY.items()
    for c in commands
]


@pytest.fixture(scope="module")
def module_run(tiny_model_dir, corpus_dir, tmp_path_factory):
    """One finished run for the module: eval, merge and generate read it, train must leave it alone."""
    from peftkit import Config, DataConfig, EvalConfig, MethodConfig, ModelConfig, TrainConfig

    run = tmp_path_factory.mktemp("bad-input-paths") / "run"
    config = Config(
        model=ModelConfig(name_or_path=str(tiny_model_dir), dtype="fp32"),
        data=DataConfig(source=str(corpus_dir), general_source=str(corpus_dir / "general.jsonl"), seq_len=32),
        method=MethodConfig(r=4, alpha=8, target_modules=["all-linear"]),
        train=TrainConfig(max_steps=2, batch_size=4, mixed_precision="no", progress=False),
        eval=EvalConfig(every_steps=2, val_tokens=128, test_tokens=128, batch_size=8, max_general_ppl_increase=None),
        output_dir=str(run),
    )
    Trainer(config, log=lambda _: None).fit()
    return run, config


def bad_source(name: str, tmp_path: Path, corpus_dir: Path) -> str:
    files, _ = SOURCES[name]
    if files is None:
        return str(tmp_path / MISSING)
    if list(files) == ["corpus.xlsx"]:
        path = tmp_path / "corpus.xlsx"
        path.write_bytes(files["corpus.xlsx"])
        return str(path)
    folder = corpus_folder(tmp_path, corpus_dir, None)
    for rel, content in files.items():
        (folder / rel).write_bytes(content)
    return str(folder)


@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("command, streaming", DATA_PATHS)
def test_bad_data_source_on_every_path(
    command, streaming, source, module_run, corpus_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))  # streamed indexes go to a cache of the test's
    finished, config = module_run
    before = snapshot(finished)
    bad = dataclasses.replace(config.data, source=bad_source(source, tmp_path, corpus_dir), streaming=streaming)
    bad_config = dataclasses.replace(config, data=bad)
    yaml = tmp_path / "bad.yaml"
    bad_config.save_yaml(yaml)
    run = finished
    if command == "eval":  # a finished run whose config names the bad source: a copy, the original stays
        run = tmp_path / "run"
        shutil.copytree(finished, run)
        bad_config.save_yaml(run / "config.yaml")
    line = run_cli(DATA_COMMANDS[command](yaml, run, tmp_path), capsys)
    assert SOURCES[source][1] in line, line
    assert snapshot(finished) == before


def model_inputs(tmp_path: Path, tiny_model_dir: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a model folder that cannot be used, the fragment every command must report)."""
    missing = tmp_path / "no_such_model"
    empty = tmp_path / "empty_model"
    empty.mkdir()
    pickled = tmp_path / "no_weights"
    shutil.copytree(tiny_model_dir, pickled)
    for f in pickled.glob("*.safetensors"):
        f.unlink()
    return {
        "missing folder": (missing, "no_such_model is not a transformers model folder (no config.json)"),
        "no config.json": (empty, "empty_model is not a transformers model folder (no config.json)"),
        "no weights": (pickled, "no_weights has no .safetensors weights"),
    }


MODEL_COMMANDS = ["train", "preview", "eval", "merge", "export", "generate"]


@pytest.mark.parametrize("model", ["missing folder", "no config.json", "no weights"])
@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_bad_model_on_every_path(command, model, module_run, tiny_model_dir, tmp_path, capsys):
    finished, config = module_run
    before = snapshot(finished)
    folder, fragment = model_inputs(tmp_path, tiny_model_dir)[model]
    bad_config = dataclasses.replace(config, model=dataclasses.replace(config.model, name_or_path=str(folder)))
    yaml = tmp_path / "bad.yaml"
    bad_config.save_yaml(yaml)
    run = tmp_path / "run"  # a finished run whose base model is the bad one (eval, merge, generate read it)
    shutil.copytree(finished, run)
    bad_config.save_yaml(run / "config.yaml")
    argv = {
        "train": ["train", yaml, f"--output_dir={finished}", "--train.overwrite=true"],
        "preview": ["preview", yaml],
        "eval": ["eval", run],
        "merge": ["merge", run, "--out", tmp_path / "merged"],
        "export": ["export", folder, "--out", tmp_path / "model.gguf"],
        "generate": ["generate", run, "--prompt", "hello"],
    }[command]
    line = run_cli(argv, capsys)
    if command == "export":  # export reads a merged model folder, not a config: its own words for the same fault
        assert folder.name in line, line
    else:
        assert fragment in line, line
    assert snapshot(finished) == before
    assert not (tmp_path / "merged").exists() and not (tmp_path / "model.gguf").exists()
