import dataclasses

import pytest

from peftkit import PeftkitError, Trainer
from peftkit.generate import generate, load, run
from peftkit.merge import merge_run

PROMPT = "the patient received"


@pytest.fixture
def two_runs(tiny_config, tmp_path):
    runs = []
    for name, lr in (("a", 5e-2), ("b", 2e-2)):
        config = dataclasses.replace(
            tiny_config,
            output_dir=str(tmp_path / name),
            train=dataclasses.replace(tiny_config.train, max_steps=8, lr=lr),
            eval=dataclasses.replace(tiny_config.eval, diagnostics=False, kl_prompts=False),
        )
        Trainer(config, log=lambda _: None).fit()
        runs.append(tmp_path / name)
    return runs


def test_switching_adapters_on_one_base_equals_loading_each_alone(two_runs):
    a, b = two_runs
    answers = run(a, PROMPT, [b], max_new_tokens=8, chat=False, stream=False)
    assert list(answers) == ["adapter0", "adapter1"]
    # two adapters that answered alike could not show that the switch happened
    assert answers["adapter0"] != answers["adapter1"], answers
    model_b, tokenizer, _ = load(b, [])
    assert answers["adapter1"] == generate(model_b, tokenizer, PROMPT, 8, chat=False)
    model_a, tokenizer, _ = load(a, [])
    assert answers["adapter0"] == generate(model_a, tokenizer, PROMPT, 8, chat=False)
    assert answers["adapter0"].strip()  # a trained tiny model continues with words


def test_merged_folder_generates_like_its_run(two_runs, tmp_path):
    a, _ = two_runs
    merge_run(a, tmp_path / "merged", log=lambda _: None)
    merged = run(tmp_path / "merged", PROMPT, [], max_new_tokens=8, chat=False, stream=False)
    from_run = run(a, PROMPT, [], max_new_tokens=8, chat=False, stream=False)
    assert list(merged.values()) == list(from_run.values())


def test_generate_needs_a_run_or_model_folder(tmp_path):
    with pytest.raises(PeftkitError, match="neither a peftkit run folder"):
        load(tmp_path, [])
