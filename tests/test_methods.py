"""Every method in the registry on the tiny model: it learns, leaves the base frozen, round-trips
through save -> plain-peft reload -> same logits, and merges (or refuses to, clearly)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peftkit import PeftkitError, Trainer, methods
from peftkit.checkpoint import load_adapter_weights
from peftkit.config import Config, MethodConfig
from peftkit.merge import MERGE_ATOL, QUANTIZED_MERGE_SHARE, merge_run

# name -> MethodConfig changes; each entry trains for 8 steps on the tiny model
CASES = {
    "lora": {},
    "rslora": {"rslora": True},
    "lora_layers": {"layers": [1]},
    "lora_plus": {"lora_plus_ratio": 16.0},
    "lora_gaussian": {"init": "gaussian"},
    "pissa": {"init": "pissa"},
    "olora": {"init": "olora"},
    "dora": {"name": "dora"},
    "ia3": {"name": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"]},
    "loha": {"name": "loha"},
    "lokr": {"name": "lokr"},
    "prompt_tuning": {"name": "prompt_tuning", "virtual_tokens": 8},
    "prefix_tuning": {"name": "prefix_tuning", "virtual_tokens": 8},
    "top_layers": {"name": "top_layers", "top_layers": 1},
    "neftune": {"neftune_alpha": 5.0},
}
LR = {"ia3": 0.2, "prompt_tuning": 0.3, "prefix_tuning": 0.2, "top_layers": 1e-2, "dora": 2e-2, "pissa": 1e-2,
      "olora": 1e-2, "lora_plus": 1e-2}  # fmt: skip
NOT_MERGEABLE = {"prompt_tuning", "prefix_tuning"}


def method_config(tiny_config, case: str, tmp_path) -> Config:
    method = dataclasses.replace(tiny_config.method, **CASES[case])
    train = dataclasses.replace(tiny_config.train, max_steps=8, lr=LR.get(case, tiny_config.train.lr))
    ev = dataclasses.replace(tiny_config.eval, patience=0)
    return dataclasses.replace(tiny_config, method=method, train=train, eval=ev, output_dir=str(tmp_path / case))


def train_losses(run_dir) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize("case", list(CASES))
def test_method_learns_saves_reloads_and_merges(case, tiny_config, tiny_model_dir, tmp_path):
    config = method_config(tiny_config, case, tmp_path)
    trainer = Trainer(config, log=lambda _: None)
    report = trainer.fit()
    run = trainer.run_dir

    losses = train_losses(run)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses  # it learns
    assert report["tuned"]["domain_ppl"] < report["base"]["domain_ppl"], report

    # the adapter was applied: the tuned model differs from the base, and only the method's weights train
    x = torch.randint(3, 40, (2, 16))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "adapter").eval()
    with torch.no_grad():
        base_logits, tuned_logits = base(x).logits, methods.sequence_logits(reloaded, x)
        assert (tuned_logits - base_logits).abs().max() > 1e-2
        # the saved adapter is the trained model: plain peft reproduces the trainer's final model
        assert torch.allclose(methods.sequence_logits(trainer.model.eval(), x), tuned_logits, atol=1e-4)
        with reloaded.disable_adapter():
            assert torch.allclose(reloaded(x).logits, base_logits, atol=1e-5)  # and the base is untouched
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert saved and all(torch.isfinite(v).all() for v in saved.values())

    merged_dir = tmp_path / f"{case}-merged"
    if case in NOT_MERGEABLE:
        with pytest.raises(PeftkitError, match="cannot be merged"):
            merge_run(run, merged_dir, log=lambda _: None)
        assert not merged_dir.exists()
    else:
        check = merge_run(run, merged_dir, log=lambda _: None)
        assert check["max_abs_logit_diff_vs_adapter"] <= MERGE_ATOL
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)
        with torch.no_grad():
            assert (merged(x).logits - tuned_logits).abs().max() < 1e-3


def trainable(config: MethodConfig, model_dir) -> int:
    model = methods.apply(config, AutoModelForCausalLM.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_trainable_parameter_counts_follow_each_method(tiny_model_dir):
    """hidden 64, intermediate 128, 2 blocks, 4 query heads and 2 key/value heads of 16 (k/v: 32 outputs)."""
    qkvo = MethodConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    # LoRA: r x (in + out) per module: q 8x(64+64), k 8x(64+32), v 8x(64+32), o 8x(64+64), 2 blocks
    assert trainable(qkvo, tiny_model_dir) == 2 * 8 * (128 + 96 + 96 + 128)
    assert trainable(dataclasses.replace(qkvo, layers=[1]), tiny_model_dir) == 8 * (128 + 96 + 96 + 128)
    # DoRA adds one magnitude per output row
    assert trainable(dataclasses.replace(qkvo, name="dora"), tiny_model_dir) == 2 * (8 * 448 + 64 + 32 + 32 + 64)
    # IA3: one vector per target (k, v: 32 outputs; down_proj: its 128 inputs)
    assert trainable(
        MethodConfig(name="ia3", target_modules=["k_proj", "v_proj", "down_proj"]), tiny_model_dir
    ) == 2 * (32 + 32 + 128)
    assert trainable(MethodConfig(name="prompt_tuning", virtual_tokens=8), tiny_model_dir) == 8 * 64
    # top block in full: attention 64x64 + 64x32 x2 + 64x64, MLP 3 x 64x128, two norms
    block = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64
    assert trainable(MethodConfig(name="top_layers", top_layers=1), tiny_model_dir) == block


def test_top_layers_trains_exactly_the_top_blocks(tiny_model_dir):
    model = methods.apply(
        MethodConfig(name="top_layers", top_layers=1), AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    )
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".layers.1." in n and "modules_to_save" in n for n in names)


def test_pissa_adapter_is_converted_to_plain_lora_on_the_original_base(tiny_config, tiny_model_dir, tmp_path):
    """The in-training model (PiSSA residual base + principal adapter) and the saved, converted
    adapter on the untouched base give the same logits."""
    config = method_config(tiny_config, "pissa", tmp_path)
    report = Trainer(config, log=lambda _: None).fit()
    run = config.output_dir
    step = report["adapter_step"]
    torch.manual_seed(config.seed)
    in_training = methods.apply(config.method, AutoModelForCausalLM.from_pretrained(tiny_model_dir))  # same SVD
    load_adapter_weights(in_training, Path(run) / "checkpoints" / f"step-{step}" / "adapter")
    converted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), f"{run}/adapter")
    x = torch.randint(3, 40, (2, 16))
    with torch.no_grad():
        assert torch.allclose(in_training(x).logits, converted(x).logits, atol=1e-4)
    assert json.loads((Path(run) / "adapter" / "adapter_config.json").read_text())["r"] == 2 * config.method.r


def test_lora_plus_gives_the_b_matrices_a_higher_learning_rate(tiny_model_dir):
    config = MethodConfig(r=4, lora_plus_ratio=16.0)
    model = methods.apply(config, AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    optimizer = methods.optimizer(config, model, lr=1e-3, weight_decay=0.0)
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    lrs = [(names[id(p)], group["lr"]) for group in optimizer.param_groups for p in group["params"]]
    lr_of = dict(lrs)
    assert sorted(lr_of) == sorted(n for n, _ in lrs) == sorted(names.values())  # each one optimised, once
    b = {n for n in lr_of if "lora_B" in n}
    assert b and all(lr_of[n] == pytest.approx(16e-3) for n in b), lr_of
    assert all(lr_of[n] == pytest.approx(1e-3) for n in set(lr_of) - b), lr_of
    with pytest.raises(PeftkitError, match="LoRA\\+ needs LoRA B matrices"):
        ia3 = MethodConfig(name="ia3", lora_plus_ratio=16.0, target_modules=["k_proj", "v_proj", "down_proj"])
        methods.optimizer(ia3, methods.apply(ia3, AutoModelForCausalLM.from_pretrained(tiny_model_dir)), 1e-3, 0.0)


def test_neftune_noises_embeddings_in_training_only(tiny_model_dir):
    model = methods.apply(MethodConfig(neftune_alpha=5.0), AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    x = torch.randint(3, 40, (1, 16))
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x).logits, model(x).logits)
        model.train()
        assert not torch.equal(model(x).logits, model(x).logits)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"method": {"name": "qlora"}}, "set model.quantization=nf4"),
        ({"method": {"name": "sparse_magic"}}, "method.name"),
        ({"method": {"lora_plus_ratio": 0.5}}, "must be 0 \\(off\\) or >= 1"),
        ({"method": {"init": "svd"}}, "method.init"),
        ({"method": {"top_layers": 0}}, "method.top_layers"),
        ({"model": {"quantization": "int4"}}, "model.quantization"),
    ],
)
def test_invalid_method_settings_name_the_key(changes, message):
    with pytest.raises(PeftkitError, match=message):
        Config.from_dict(changes)


def test_method_settings_that_only_fail_on_the_model_say_why(tiny_model_dir):
    for config, message in [
        (MethodConfig(layers=[5]), "the model has blocks 0..1"),
        (MethodConfig(name="top_layers", top_layers=2), "full fine-tuning"),
        (MethodConfig(name="dora", init="pissa"), "cannot be converted back"),
        (MethodConfig(target_modules=["no_such_proj"]), "method.target_modules"),
    ]:
        with pytest.raises(PeftkitError, match=message):
            methods.apply(config, AutoModelForCausalLM.from_pretrained(tiny_model_dir))


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_qlora_trains_on_a_quantized_base_and_merges_into_its_dequantized_weights(
    quantization, tiny_config, tiny_model_dir, tmp_path
):
    from peftkit import models

    config = dataclasses.replace(
        method_config(tiny_config, "lora", tmp_path),
        model=dataclasses.replace(tiny_config.model, quantization=quantization),
        method=dataclasses.replace(tiny_config.method, name="qlora"),
    )
    trainer = Trainer(config, log=lambda _: None)
    report = trainer.fit()
    losses = train_losses(trainer.run_dir)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 and report["tuned"]["domain_ppl"] < report["base"]["domain_ppl"]
    base = models.load_model(config.model)
    assert base.is_quantized and any("Linear4bit" in type(m).__name__ or "Linear8bit" in type(m).__name__
                                     for m in base.modules())  # fmt: skip
    # the adapter on the quantized base reproduces the trainer's model
    x = torch.randint(3, 40, (2, 16))
    reloaded = PeftModel.from_pretrained(base, trainer.run_dir / "adapter").eval()
    with torch.no_grad():
        tuned = reloaded(x).logits
        trained = trainer.model.eval()(x).logits
        full = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        quantization_error = (full(x).logits - base(x).logits).abs().max().item()
        # bitsandbytes' CPU kernels differ between a model that trained and a fresh load by float noise only
        assert (trained - tuned).abs().max().item() < 0.1 * quantization_error
    # merged into the dequantized weights: matches the quantized adapter model, unlike a merge into
    # the original full-precision weights (the trap), which is off by the 4-bit quantization error
    check = merge_run(trainer.run_dir, tmp_path / "merged", log=lambda _: None)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    naive = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), trainer.run_dir / "adapter")
    with torch.no_grad():
        right = (merged(x).logits - tuned).abs().max().item()
        trap = (naive.merge_and_unload()(x).logits - tuned).abs().max().item()
    assert check["max_abs_logit_diff_vs_adapter"] <= check["tolerance"]
    assert right < QUANTIZED_MERGE_SHARE[quantization] * quantization_error, (right, quantization_error)
    if quantization == "nf4":  # 4-bit weights are far from the originals; int8 weights are close to them
        assert right < 0.1 * trap, (right, trap)


def test_unfreeze_pattern_trains_exactly_the_matching_modules(tiny_model_dir, tiny_config, tmp_path):
    config = MethodConfig(name="top_layers", unfreeze_pattern=r"mlp\.(up|down)_proj")
    model = methods.apply(config, AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    names = {n.split(".modules_to_save")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"base_model.model.model.layers.{i}.mlp.{m}" for i in (0, 1) for m in ("up_proj", "down_proj")}
    for pattern, message in [("no_such_module", "matches no module"), (".", "matches every module")]:
        with pytest.raises(PeftkitError, match=message):
            methods.apply(MethodConfig(name="top_layers", unfreeze_pattern=pattern),
                          AutoModelForCausalLM.from_pretrained(tiny_model_dir))  # fmt: skip
    with pytest.raises(PeftkitError, match="method.unfreeze_pattern"):
        Config.from_dict({"method": {"unfreeze_pattern": "("}})
    # and it trains, saves, reloads and merges like every other method
    run = method_config(tiny_config, "top_layers", tmp_path)
    run = dataclasses.replace(run, method=config)
    Trainer(run, log=lambda _: None).fit()
    check = merge_run(run.output_dir, tmp_path / "merged", log=lambda _: None)
    assert check["max_abs_logit_diff_vs_adapter"] <= MERGE_ATOL and check["max_abs_logit_diff_vs_base"] > 0
