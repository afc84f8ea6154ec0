"""Bad input: one line naming the file, line or key and the fix, exit status 2, no traceback, and the
run folder that was already there left exactly as it was (even with --train.overwrite=true)."""

import hashlib
import json
import random
from pathlib import Path

import pytest

from peftkit import Trainer
from peftkit.cli import main
from tests.conftest import write_jsonl


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def finished_run(tiny_config):
    import dataclasses

    config = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, max_steps=2))
    Trainer(config, log=lambda _: None).fit()
    return Path(config.output_dir)


def run_cli(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("peftkit: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def yaml_with(tiny_config, tmp_path, text: str = "", **data) -> Path:
    """A config file: the working tiny config with `data` overrides, plus raw YAML appended."""
    import dataclasses

    config = dataclasses.replace(tiny_config, data=dataclasses.replace(tiny_config.data, **data))
    path = tmp_path / "config.yaml"
    config.save_yaml(path)
    if text:
        path.write_text(path.read_text() + text)
    return path


def corpus_folder(tmp_path, corpus_dir, train_text: str | bytes | None) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir(exist_ok=True)
    for split in ("validation", "test"):
        (folder / f"{split}.jsonl").write_text((corpus_dir / f"{split}.jsonl").read_text())
    if isinstance(train_text, bytes):
        (folder / "train.jsonl").write_bytes(train_text)
    elif train_text is not None:
        (folder / "train.jsonl").write_text(train_text)
    return folder


CONFIG_CASES = [
    ("unknown key", "train:\n  lrr: 1\n", "unknown config key 'train.lrr'; did you mean 'train.lr'"),
    ("wrong type", "train:\n  lr: fast\n", "config key 'train.lr' must be a number"),
    ("yaml syntax", "train: [1\n", "line 2: invalid YAML"),
    ("not a mapping", "- 1\n- 2\n", "expected a mapping of config sections"),
    ("negative batch", "train:\n  batch_size: -1\n", "'train.batch_size': must be positive"),
    ("unknown method", "method:\n  name: magic\n", "'method.name': must be one of"),
    ("bad choice", "train:\n  lr_schedule: steep\n", "one of 'cosine', 'linear', 'constant'"),
    ("section not a mapping", "train: 5\n", "config key 'train' must be a mapping"),
    ("bad fold", "data:\n  folds: 3\n  fold: 7\n", "'data.fold': must be in [0, 3)"),
    ("negative budget", "eval:\n  max_general_kl: -1\n", "'eval.max_general_kl'"),
]


@pytest.mark.parametrize("name, text, fragment", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_configs(name, text, fragment, finished_run, tmp_path, capsys):
    before = snapshot(finished_run)
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    line = run_cli(["train", config, f"--output_dir={finished_run}", "--train.overwrite=true"], capsys)
    assert fragment in line and "bad.yaml" in line
    assert snapshot(finished_run) == before


def test_non_utf8_config(finished_run, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_bytes(b"train:\n  lr: \xff\xfe\n")
    assert "not UTF-8" in run_cli(["train", config, f"--output_dir={finished_run}"], capsys)


DATA_CASES = [
    ("malformed json", '{"text": "a b"}\n{"text": oops}\n', "train.jsonl line 2: malformed JSON"),
    ("missing field", '{"text": "the patient"}\n{"body": "x"}\n', "train.jsonl line 2: no string field 'text'"),
    ("not utf-8", b'{"text": "the patient"}\n{"text": "\xff"}\n', "train.jsonl line 2: not valid UTF-8"),
    ("empty file", "", "train.jsonl: holds no documents"),
    ("missing train split", None, "has no train.jsonl"),
    ("too small for a batch", '{"text": "the patient received aspirin ."}\n', "one step needs 4"),
]


@pytest.mark.parametrize("name, train_text, fragment", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_corpora(name, train_text, fragment, finished_run, tiny_config, corpus_dir, tmp_path, capsys):
    before = snapshot(finished_run)
    folder = corpus_folder(tmp_path, corpus_dir, train_text)
    config = yaml_with(tiny_config, tmp_path, source=str(folder))
    line = run_cli(["train", config, f"--output_dir={finished_run}", "--train.overwrite=true"], capsys)
    assert fragment in line
    assert snapshot(finished_run) == before


def test_other_bad_sources(finished_run, tiny_config, tmp_path, capsys):
    before = snapshot(finished_run)
    csv = tmp_path / "corpus.xlsx"
    csv.write_text("text\nthe patient\n")
    from peftkit.data.splits import split_of

    train_only = [d for d in (f"the patient received aspirin {i} times ." for i in range(400))
                  if split_of("text:" + d) == "train"]  # fmt: skip
    single = write_jsonl(tmp_path / "one.jsonl", train_only)  # every document hashes into train
    cases = [
        (dict(source=str(csv)), "unsupported file type '.xlsx'; use .jsonl, .txt, .csv or .parquet"),
        (dict(source=str(single)), "one.jsonl gives an empty validation split; add documents"),
        (dict(general_source=str(tmp_path / "missing.jsonl")), "missing.jsonl: no such data file"),
    ]
    for data, fragment in cases:
        config = yaml_with(tiny_config, tmp_path, **data)
        assert fragment in run_cli(["train", config, f"--output_dir={finished_run}", "--train.overwrite=true"], capsys)
    assert snapshot(finished_run) == before


def test_bad_models_targets_and_run_folders(finished_run, tiny_config, tmp_path, capsys):
    before = snapshot(finished_run)
    no_model = tmp_path / "no_model"
    no_model.mkdir()
    config = tmp_path / "c.yaml"
    config.write_text(yaml_with(tiny_config, tmp_path).read_text())
    recipe = tmp_path / "recipe.py"
    recipe.write_text("x = 1\n")
    broken = tmp_path / "broken_run"
    broken.mkdir()
    (broken / "adapter").mkdir()
    (broken / "adapter" / "adapter_config.json").write_text("{}")
    (broken / "config.yaml").write_text("train: [\n")
    cases = [
        (
            [
                "train",
                config,
                f"--model.name_or_path={no_model}",
                f"--output_dir={finished_run}",
                "--train.overwrite=true",
            ],
            "is not a transformers model folder (no config.json)",
        ),
        (["train", tmp_path / "nope.yaml"], "no such recipe or config file"),
        (["train", tmp_path / "notes.txt"], "no such recipe or config file"),
        (["train", recipe], "a recipe must define config()"),
        (["train", config, f"--output_dir={finished_run}"], "already holds files"),
        (["train", config, f"--output_dir={tmp_path / 'empty'}", "--train.resume=true"], "no peftkit run to resume"),
        (["train", config, "--train.lr"], "is not an override"),
        (["merge", finished_run, "--out", finished_run], "already holds files"),
        (["merge", tmp_path, "--out", tmp_path / "m"], "no adapter/ folder"),
        (["eval", broken], "invalid YAML"),
        (["fetch", "nope"], "unknown asset 'nope'"),
    ]
    (tmp_path / "notes.txt").write_text("hello")
    cases[2] = (["train", tmp_path / "notes.txt"], "expected a recipe (.py) or a config (.yaml)")
    for argv, fragment in cases:
        assert fragment in run_cli(argv, capsys), argv
    assert snapshot(finished_run) == before


def test_all_checkpoints_damaged_refuses_to_resume(finished_run, capsys):
    for manifest in (finished_run / "checkpoints").glob("*/manifest.json"):
        data = json.loads(manifest.read_text())
        data["files"] = {name: "0" * 64 for name in data["files"]}
        manifest.write_text(json.dumps(data))
    before = snapshot(finished_run)
    line = run_cli(["train", finished_run / "config.yaml", "--train.resume=true"], capsys)
    assert "every checkpoint fails its manifest check" in line
    assert snapshot(finished_run) == before


@pytest.mark.parametrize("seed", range(12))
def test_fuzzed_config_and_corpus_bytes_never_give_a_traceback(
    seed, finished_run, tiny_config, corpus_dir, tmp_path, capsys
):
    rng = random.Random(seed)
    blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
    before = snapshot(finished_run)
    config = tmp_path / "fuzz.yaml"
    config.write_bytes(blob if seed % 2 else b"train:\n  lr: " + blob)
    run_cli(["train", config, f"--output_dir={finished_run}", "--train.overwrite=true"], capsys)
    folder = corpus_folder(tmp_path, corpus_dir, blob)
    good = yaml_with(tiny_config, tmp_path, source=str(folder))
    run_cli(["train", good, f"--output_dir={finished_run}", "--train.overwrite=true"], capsys)
    assert snapshot(finished_run) == before
