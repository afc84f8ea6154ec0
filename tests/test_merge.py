import dataclasses

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from peftkit import PeftkitError, Trainer
from peftkit.merge import MERGE_ATOL, merge_run


@pytest.fixture
def trained_run(tiny_config):
    config = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, max_steps=6))
    Trainer(config, log=lambda _: None).fit()
    return config


def test_merged_model_loads_without_peft_and_matches_the_adapter(trained_run, tiny_model_dir, tmp_path):
    run = trained_run.output_dir
    check = merge_run(run, tmp_path / "merged", log=lambda _: None)
    assert check["max_abs_logit_diff_vs_adapter"] <= MERGE_ATOL and check["max_abs_logit_diff_vs_base"] > 0

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), f"{run}/adapter")
    x = torch.randint(3, 40, (2, 20))
    with torch.no_grad():
        assert (merged(x).logits - adapted(x).logits).abs().max() < 1e-4
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "method: lora, r=8" in card and "| domain_ppl |" in card and "Verdict:" in card


def test_merge_refuses_existing_output_and_bad_dtype(trained_run, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(PeftkitError, match="already holds files"):
        merge_run(trained_run.output_dir, tmp_path / "out", log=lambda _: None)
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
    with pytest.raises(PeftkitError, match="--dtype"):
        merge_run(trained_run.output_dir, tmp_path / "new", dtype="int3", log=lambda _: None)


def test_merge_refuses_an_adapter_that_changes_nothing(trained_run, tiny_model_dir, tmp_path):
    # a freshly initialised LoRA has B = 0: merging it would silently ship the base model
    fresh = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj"])
    )
    run = tmp_path / "noop"
    run.mkdir()
    trained_run.save_yaml(run / "config.yaml")
    fresh.save_pretrained(run / "adapter")
    with pytest.raises(PeftkitError, match="identical to the base model"):
        merge_run(run, tmp_path / "merged", log=lambda _: None)
    assert not (tmp_path / "merged").exists()


def test_merge_of_a_folder_without_adapter_is_an_error(tmp_path):
    with pytest.raises(PeftkitError, match="no adapter/ folder"):
        merge_run(tmp_path, tmp_path / "merged", log=lambda _: None)


def weighted_by_peft(tiny_model_dir, runs, weights, combination):
    """The expected model, built here with peft alone: both adapters combined by add_weighted_adapter."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), f"{runs[0]}/adapter")
    model.load_adapter(f"{runs[1]}/adapter", adapter_name="other")
    density = 0.5 if combination == "ties" else None
    model.add_weighted_adapter(["default", "other"], weights, "mix", combination_type=combination, density=density)
    model.set_adapter("mix")
    return model.eval()


def test_weighted_merge_of_two_runs(trained_run, tiny_model_dir, tmp_path):
    import json

    from peftkit.merge import merge_runs

    other = dataclasses.replace(
        trained_run, output_dir=str(tmp_path / "other"), seed=1, train=dataclasses.replace(trained_run.train, lr=2e-2)
    )
    Trainer(other, log=lambda _: None).fit()
    runs = [trained_run.output_dir, other.output_dir]
    x = torch.randint(3, 40, (2, 20))
    logits = {}
    for combination in ("linear", "ties"):
        out = tmp_path / f"merged-{combination}"
        check = merge_runs(runs, [0.7, 0.3], combination, out, log=lambda _: None)
        assert check["combination"] == combination and check["weights"] == [0.7, 0.3]
        assert check["max_abs_logit_diff_vs_adapter"] <= MERGE_ATOL and check["max_abs_logit_diff_vs_base"] > 0
        assert json.loads((out / "peftkit_merge.json").read_text())["runs"] == runs
        with torch.no_grad():
            logits[combination] = AutoModelForCausalLM.from_pretrained(out)(x).logits
            expected = weighted_by_peft(tiny_model_dir, runs, [0.7, 0.3], combination)(x).logits
        assert (logits[combination] - expected).abs().max() < 1e-4, combination
    # the combination is honoured: ties (trim to half, elect signs) is not the weighted sum
    assert (logits["linear"] - logits["ties"]).abs().max() > 1e-3
    with pytest.raises(PeftkitError, match="2 weights for 1 adapters"):
        merge_runs([trained_run.output_dir], [0.5, 0.5], "linear", tmp_path / "x", log=lambda _: None)
