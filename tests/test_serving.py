"""Serving cost in the report: the adapter's decoding speed unmerged vs merged, measured on the tiny model."""

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from peftkit.evaluation import decide, format_report
from peftkit.evaluation.run_report import Serving
from peftkit.evaluation.serving import decode, prompts, serving_latency
from tests.conftest import build_tokenizer
from tests.test_run_report import EV, everything_measured


def test_serving_latency_times_unmerged_and_a_merged_copy_that_decodes_the_same(tiny_model_dir):
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # a random B: the adapter changes what the model generates, so dropping it in the merge would show
    config = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    model = get_peft_model(base, config)
    before = {name: p.clone() for name, p in model.named_parameters()}
    with model.disable_adapter():
        _, base_tokens = decode(model, tokenizer, prompts(tokenizer), 8, 1)
    _, tuned_tokens = decode(model, tokenizer, prompts(tokenizer), 8, 1)
    assert any(not torch.equal(a, b) for a, b in zip(base_tokens, tuned_tokens, strict=True))

    result = serving_latency(model, tokenizer, new_tokens=8, repeats=3)
    serving = Serving.from_json(result)  # the report's record reads it
    assert serving.unmerged_ms_per_token > 0 and serving.merged_ms_per_token > 0
    assert serving.same_tokens is True
    assert (serving.new_tokens, serving.prompts, serving.repeats) == (8, 3, 3)
    # the merge went into a copy: the model being evaluated still has its adapter unmerged, weights untouched
    after = dict(model.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_the_printed_report_states_the_serving_speed():
    report = everything_measured()
    report["verdict"] = decide(report, EV).to_json()
    assert "merged: the base model's size and speed" in format_report(report)  # not measured: nothing claimed
    speeds = {"unmerged_ms_per_token": 12.0, "merged_ms_per_token": 10.0, "same_tokens": True}
    report["cost"]["serving"] = {**speeds, "new_tokens": 8, "prompts": 3, "repeats": 3}
    text = format_report(report)
    line = next(line for line in text.splitlines() if line.startswith("cost: "))
    assert "; decoding 12.0 ms/token unmerged vs 10.0 merged (+20%, greedy, 8 tokens on 3 prompts, median of 3)" in line
    assert "other tokens" not in line
    report["cost"]["serving"].update(same_tokens=False)
    assert "; the merged copy generated other tokens" in format_report(report)
