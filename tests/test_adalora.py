"""AdaLoRA: the loop re-allocates its rank budget (peft's update_and_allocate after every step), so the ranks
change; the result reloads with plain peft and merges; resume and best-step restore bring back the ranks."""

import dataclasses
import json
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from peftkit import PeftkitError, Trainer, methods
from peftkit.merge import merge_run


def adalora_config(tiny_config, out, **train):
    return dataclasses.replace(
        tiny_config,
        method=dataclasses.replace(tiny_config.method, name="adalora", r=4, target_modules=["attention"]),
        train=dataclasses.replace(tiny_config.train, **{"max_steps": 20, "lr": 2e-2, **train}),
        eval=dataclasses.replace(tiny_config.eval, every_steps=5, kl_prompts=False, diagnostics=False),
        output_dir=str(out),
    )


@pytest.fixture(scope="module")
def runs():
    return {}


def trained(tiny_config, tmp_path_factory, runs):
    if "straight" not in runs:
        config = adalora_config(tiny_config, tmp_path_factory.mktemp("adalora") / "run")
        trainer = Trainer(config, log=lambda _: None)
        trainer.fit()
        runs["straight"] = trainer
    return runs["straight"]


def test_ranks_are_reallocated_and_reported(tiny_config, tmp_path_factory, runs):
    trainer = trained(tiny_config, tmp_path_factory, runs)
    report = json.loads((trainer.run_dir / "report.json").read_text())
    ranks = report["adapter_ranks"]
    init_r = 6  # 1.5 x method.r
    assert len(ranks) == 4 * 2  # the tiny Llama's attention: q, k, v, o in each of 2 layers
    assert sum(ranks.values()) == 4 * len(ranks)  # the budget reached the target: an average rank of method.r
    assert len(set(ranks.values())) > 1 and max(ranks.values()) <= init_r  # unequal: allocated, not uniform


def test_the_adapter_reloads_with_plain_peft_and_merges(tiny_config, tmp_path_factory, runs, tmp_path):
    trainer = trained(tiny_config, tmp_path_factory, runs)
    ids = torch.arange(3, 15).unsqueeze(0)
    with torch.no_grad():
        live = trainer.model.eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_config.model.name_or_path)
        reloaded = PeftModel.from_pretrained(base, trainer.run_dir / "adapter").eval()(input_ids=ids).logits
    assert torch.allclose(live, reloaded, atol=1e-5)
    saved = json.loads((trainer.run_dir / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["rank_pattern"]
    check = merge_run(trainer.run_dir, tmp_path / "merged", log=lambda _: None)
    assert check["max_abs_logit_diff_vs_adapter"] < 1e-4


def test_resume_continues_the_same_allocation(tiny_config, tmp_path_factory, runs, tmp_path):
    straight = trained(tiny_config, tmp_path_factory, runs)
    run = tmp_path / "resumed"
    shutil.copytree(straight.run_dir, run)
    for path in (run / "checkpoints").iterdir():  # as if killed after step 10: in the middle of the allocation
        if int(path.name.split("-")[1]) > 10:
            shutil.rmtree(path)
    resumed = Trainer(adalora_config(tiny_config, run, resume=True), log=lambda _: None)
    resumed.fit()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for key in a:
        if ".default" in key:
            assert torch.equal(a[key], b[key]), key
    report = json.loads((run / "report.json").read_text())
    assert report["adapter_ranks"] == json.loads((straight.run_dir / "report.json").read_text())["adapter_ranks"]


def test_adalora_needs_the_runs_length(tiny_config, tmp_path):
    with pytest.raises(PeftkitError, match="at least 4 steps"):
        Trainer(adalora_config(tiny_config, tmp_path / "short", max_steps=3), log=lambda _: None).fit()
    with pytest.raises(PeftkitError, match="needs the run's length"):
        methods.apply(dataclasses.replace(tiny_config.method, name="adalora"),
                      AutoModelForCausalLM.from_pretrained(tiny_config.model.name_or_path))  # fmt: skip


def test_best_step_restore_brings_back_that_steps_ranks(tiny_config, tmp_path_factory, runs):
    import copy

    from peftkit import checkpoint

    trainer = trained(tiny_config, tmp_path_factory, runs)
    step, path = checkpoint.checkpoints(trainer.run_dir)[0]  # an earlier step than the final adapter's
    assert step < 20 and (path / checkpoint.METHOD_STATE).exists()
    model = copy.deepcopy(trainer.model)
    checkpoint.load_adapter_weights(model, path / "adapter")  # what the guard's restore calls
    ids = torch.arange(3, 15).unsqueeze(0)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_config.model.name_or_path)
        saved = PeftModel.from_pretrained(base, path / "adapter").eval()(input_ids=ids).logits
        restored = model.eval()(input_ids=ids).logits
        final = trainer.model.eval()(input_ids=ids).logits
    assert torch.allclose(restored, saved, atol=1e-5) and not torch.allclose(restored, final, atol=1e-3)


def test_the_logged_training_loss_leaves_out_the_orthogonality_penalty(tiny_config, tmp_path_factory, runs):
    """AdaLoRA's forward adds 0.5 x its orthogonality penalty to the loss it backpropagates; the training loss
    in metrics.jsonl (and the train/validation gap from it) is the prediction loss alone."""
    from peftkit.loss import TrainingForward

    trainer = trained(tiny_config, tmp_path_factory, runs)
    forward = TrainingForward(trainer.model, chunked=True)
    ids = trainer.data.sample().input_ids
    total = forward(input_ids=ids, labels=ids)
    assert forward.penalty > 0
    with torch.no_grad():
        logits = trainer.model(input_ids=ids).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
    assert torch.isclose(total.detach() - forward.penalty, ce, atol=1e-5)


def test_two_processes_allocate_the_same_ranks(tiny_config, tmp_path):
    """Under DDP every process scores the same all-reduced gradients, so all allocate alike."""
    from tests.test_distributed import launch_ddp

    _, report = launch_ddp(adalora_config(tiny_config, tmp_path / "unused", max_steps=8, batch_size=2), tmp_path)
    assert report["adapter_ranks"]
