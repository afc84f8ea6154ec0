import dataclasses

import pytest

from peftkit import Config, PeftkitError
from peftkit.config import describe


def test_defaults_are_valid_and_documented():
    config = Config()
    assert Config.from_dict(config.to_dict()) == config
    rows = describe()
    assert {r[0] for r in rows} >= {"train.lr", "method.r", "data.seq_len", "eval.patience", "output_dir", "seed"}
    assert all(help_text for *_, help_text in rows)


def test_overrides_coerce_types():
    config = Config().override(
        [
            "--train.max_steps=5",
            "--train.lr=3e-4",
            "--train.resume=true",
            "--method.target_modules=q_proj,v_proj",
            "--data.max_train_docs=null",
            "--output_dir=runs/x",
            "--seed=3",
        ]  # fmt: skip
    )
    assert config.train.max_steps == 5 and config.train.lr == 3e-4 and config.train.resume is True
    assert config.method.target_modules == ["q_proj", "v_proj"]
    assert config.data.max_train_docs is None and config.output_dir == "runs/x" and config.seed == 3


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("--train.lrr=1", "did you mean 'train.lr'"),
        ("--trian.lr=1", "did you mean 'train'"),
        ("--train.lr=abc", "'train.lr' must be a number"),
        ("--train.max_steps=2.5", "'train.max_steps' must be an integer"),
        ("--train.max_steps=0", "'train.max_steps': must be positive"),
        ("--method.name=nope", "'method.name': must be one of"),
        ("--train.lr_schedule=steep", "one of 'cosine', 'linear', 'constant'"),
        ("--train.resume=maybe", "true or false"),
        ("--train.time_budget=soon", "'train.time_budget': must be a duration such as '90s'"),
        ("--train.collective_timeout=0s", "'train.collective_timeout': must be a duration such as '90s' or '10m'"),
        ("train.lr", "is not an override"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(PeftkitError) as info:
        Config().override([override])
    assert fragment in str(info.value)


def test_yaml_round_trip(tmp_path):
    config = Config().override(["--train.lr=1e-3", "--method.r=4"])
    config.save_yaml(tmp_path / "c.yaml")
    assert Config.from_yaml(tmp_path / "c.yaml") == config


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 1e-3\n  batch: 4\n")
    with pytest.raises(
        PeftkitError, match=r"bad.yaml: unknown config key 'train.batch'; did you mean 'train.batch_size'"
    ):
        Config.from_yaml(bad)
    bad.write_text("train:\n  lr: [1\n")
    with pytest.raises(PeftkitError, match=r"bad.yaml line \d+: invalid YAML"):
        Config.from_yaml(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(PeftkitError, match="expected a mapping"):
        Config.from_yaml(bad)


def test_sections_are_dataclasses_with_help_on_every_field():
    for section in dataclasses.fields(Config):
        kind = type(getattr(Config(), section.name))
        if dataclasses.is_dataclass(kind):
            assert all(f.metadata.get("help") for f in dataclasses.fields(kind)), kind


def test_string_values_stay_strings():
    config = Config().override(["--output_dir=runs/1e3", "--data.text_field=true", "--model.name_or_path=007"])
    assert config.output_dir == "runs/1e3" and config.data.text_field == "true" and config.model.name_or_path == "007"
    assert Config().override(["--method.target_modules=[q_proj, v_proj]"]).method.target_modules == ["q_proj", "v_proj"]


def test_fold_settings_are_checked():
    with pytest.raises(PeftkitError, match="data.folds"):
        Config().override(["--data.folds=1"])
    with pytest.raises(PeftkitError, match="data.fold"):
        Config().override(["--data.folds=3", "--data.fold=3"])
