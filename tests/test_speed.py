"""The fast training path: chunked loss, fp32 parity of the default path, compilation, checkpointing, bench."""

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM

from peftkit import Trainer, loss, models, runtime
from tests.conftest import load_script, make_doc, picked_qa_file, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def with_train(config, **changes):
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **changes))


def lora_model(tiny_model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model


def test_chunked_loss_equals_the_full_logit_loss_and_its_gradients(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    x = torch.randint(3, 40, (3, 24))
    labels = x.clone()
    labels[0, :10] = -100  # masked prompt tokens count nowhere
    decoder, head = loss.decoder_and_head(model)

    full = model(input_ids=x, labels=labels).loss
    full.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    # chunks of 7 positions: the 23 x 3 scored positions split unevenly
    n = (labels[:, 1:] != -100).sum()
    ours = loss.nll_sum(head, loss.hidden_states(decoder, x), labels, chunk=7) / n
    ours.backward()
    assert torch.allclose(ours, full, rtol=1e-6)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert torch.allclose(parameter.grad, expected[name], atol=1e-6), name

    # the module the trainer prepares gives the same loss
    assert torch.allclose(loss.TrainingForward(model)(x, labels), full, rtol=1e-6)
    assert torch.allclose(loss.TrainingForward(model, chunked=False)(x, labels), full, rtol=1e-6)


def test_chunked_loss_is_refused_where_it_would_be_wrong(tiny_model_dir):
    from transformers import GraniteConfig, GraniteForCausalLM

    x = torch.randint(3, 40, (2, 16))
    # prompt tuning prepends virtual tokens: the decoder alone would skip them
    prompt = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    )
    assert loss.decoder_and_head(prompt) is None and not loss.chunked_matches(prompt, x, x)
    # Granite divides its logits by a scale: not plain cross-entropy over lm_head(hidden)
    torch.manual_seed(0)
    granite = GraniteForCausalLM(GraniteConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=2, logits_scaling=4.0))  # fmt: skip
    assert loss.decoder_and_head(granite) is not None
    assert not loss.chunked_matches(granite, x, x)
    # and the TrainingForward of a plain Llama passes the same check
    assert loss.chunked_matches(lora_model(tiny_model_dir), x, x)


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_default_fast_path_learns_what_the_fp32_reference_learns(tiny_config, tmp_path):
    """bf16 weights + autocast + chunked loss against fp32 weights, no autocast, the model's own loss,
    over the same 12 steps: every step's loss within 3%, the final held-out loss within 2%."""
    fast = dataclasses.replace(
        with_train(tiny_config, mixed_precision="auto", lr=1e-2), output_dir=str(tmp_path / "fast")
    )
    fast = dataclasses.replace(fast, model=dataclasses.replace(fast.model, dtype="bf16"))
    reference = dataclasses.replace(
        with_train(tiny_config, mixed_precision="no", chunked_loss=False, lr=1e-2), output_dir=str(tmp_path / "ref")
    )
    from accelerate.state import AcceleratorState

    fast_logs, ref_logs = [], []
    fast_report = Trainer(fast, log=fast_logs.append).fit()
    AcceleratorState._reset_state(reset_partial_state=True)  # the reference runs without mixed precision
    ref_report = Trainer(reference, log=ref_logs.append).fit()
    # the path each run actually took: a silent fallback to the full-logit loss or to fp32 must not pass
    autocast = "bf16" if models.fast_bf16() else "fp32"  # mixed_precision=auto: bf16 where it is native
    assert any(line.startswith(f"training forward: chunked loss, {autocast} autocast") for line in fast_logs), fast_logs
    assert any(line.startswith("training forward: full-logit loss, fp32 autocast") for line in ref_logs), ref_logs
    a, b = losses(tmp_path / "fast"), losses(tmp_path / "ref")
    assert b[-1] < 0.8 * b[0]  # it learned
    assert all(abs(x - y) / y < 0.03 for x, y in zip(a, b, strict=True)), (a, b)
    fast_ppl, ref_ppl = fast_report["tuned"]["domain_ppl"], ref_report["tuned"]["domain_ppl"]
    assert abs(torch.tensor(fast_ppl).log() - torch.tensor(ref_ppl).log()) / torch.tensor(ref_ppl).log() < 0.02


def test_gradient_checkpointing_changes_memory_not_the_training(tiny_config, tmp_path):
    plain = with_train(tiny_config, max_steps=4)
    checkpointed = dataclasses.replace(with_train(plain, gradient_checkpointing=True), output_dir=str(tmp_path / "gc"))
    Trainer(plain, log=lambda _: None).fit()
    trainer = Trainer(checkpointed, log=lambda _: None)
    trainer.fit()
    assert trainer.model.get_base_model().is_gradient_checkpointing
    assert losses(Path(plain.output_dir)) == pytest.approx(losses(tmp_path / "gc"), rel=1e-5)


# compile_wanted("true") raises where g++ is missing: ask for the compiler itself, or collection fails
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="needs a C++ compiler")
def test_compiled_layers_train_like_eager_ones(tiny_config, tmp_path):
    eager = dataclasses.replace(with_train(tiny_config, max_steps=4, compile="false"), output_dir=str(tmp_path / "e"))
    compiled = dataclasses.replace(with_train(tiny_config, max_steps=4, compile="true"), output_dir=str(tmp_path / "c"))
    logs = []
    report = Trainer(compiled, log=logs.append).fit()
    Trainer(eager, log=lambda _: None).fit()
    assert report["compiled"] and any("compiling 2 decoder layers" in line for line in logs)
    assert report["first_step_s"] > 0 and report["tokens_per_s"] > 0  # steady state, compilation apart
    assert losses(tmp_path / "c") == pytest.approx(losses(tmp_path / "e"), rel=1e-4)


def test_auto_compiles_only_models_big_enough_to_pay_back(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    too_small = "train.compile=auto: models under 50M parameters run eagerly"
    assert runtime.compile_wanted("auto", model) == (False, too_small)
    assert runtime.compile_wanted("false", model) == (False, "train.compile=false")
    # parameter counts on either side of 50M, on the meta device: nothing allocated, and no C++ compiler needed
    big = torch.nn.Embedding(runtime.COMPILE_MIN_PARAMS, 1, device="meta")
    small = torch.nn.Embedding(runtime.COMPILE_MIN_PARAMS - 1, 1, device="meta")
    assert runtime.COMPILE_MIN_PARAMS == 50_000_000
    assert runtime.compile_wanted("auto", big) == (True, "")
    assert runtime.compile_wanted("auto", small) == (False, too_small)
    assert runtime.compile_wanted("false", big) == (False, "train.compile=false")


def test_bench_quick_runs_every_configuration_and_writes_the_json(tiny_model_dir, tmp_path):
    rng = random.Random(0)
    docs = write_jsonl(tmp_path / "docs.jsonl", [make_doc(rng) for _ in range(120)])
    env = {**os.environ, "PEFTKIT_QUIET": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench"), "--quick", "--model", str(tiny_model_dir),
         "--docs", str(docs), "--out", str(tmp_path / "out")],  # fmt: skip
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    for key in ("ratio_c_over_a", "ratio_c_over_b", "mfu_c", "peak_rss_mb_c", "loss_rel_diff_c_vs_a"):
        assert isinstance(report[key], float | int) and report[key] >= 0, key
    # the loss tolerance is enforced, not only written down: C and C+gc within 2% of A, and the exit status says so
    parity = report["loss_parity"]
    assert parity["tolerance"] == report["loss_tolerance"] == 0.02 and set(parity["rel_diff_vs_a"]) == {"C", "C+gc"}
    assert parity["passed"] and parity["rel_diff_vs_a"]["C"] == report["loss_rel_diff_c_vs_a"] <= 0.02, parity
    assert "tolerance 2%): passed" in (tmp_path / "out" / "bench.md").read_text()
    assert set(report["configs"]) == {"A", "B", "C", "C+gc"}
    for row in report["configs"].values():
        assert row["tokens_per_s"] > 0 and row["peak_rss_mb"] > 0 and row["steps"] >= 2
    assert report["configs"]["A"]["padding_share"] > 0.2  # A pads every document to seq_len
    assert report["configs"]["C"]["padding_share"] == 0
    assert "| C |" in (tmp_path / "out" / "bench.md").read_text()


def test_bench_fails_when_a_peftkit_configuration_diverges_from_a(capsys):
    bench = load_script("bench")
    rows = {"A": {"heldout_loss": 3.0}, "B": {"heldout_loss": 9.0}, "C": {"heldout_loss": 3.03}}
    rows["C+gc"] = {"heldout_loss": 3.09}  # 3% from A's
    parity = bench.loss_parity(rows, 0.02)
    assert parity["rel_diff_vs_a"] == pytest.approx({"C": 0.01, "C+gc": 0.03}) and parity["failed"] == ["C+gc"]
    assert bench.exit_status({"loss_parity": parity}) == 1 and "FAILED" in capsys.readouterr().err
    rows["C+gc"]["heldout_loss"] = float("nan")  # a diverged run scores NaN: that fails too
    assert bench.loss_parity(rows, 0.02)["failed"] == ["C+gc"]
    rows["C+gc"]["heldout_loss"] = 2.97  # better or worse, 1% either way is within tolerance (B is not judged)
    assert (
        bench.loss_parity(rows, 0.02)["passed"] and bench.exit_status({"loss_parity": parity | {"passed": True}}) == 0
    )
    assert bench.loss_parity({"B": rows["B"], "C": rows["C"]}, 0.02) is None  # nothing to compare with


def test_bench_data_compares_the_rows_exactly(tmp_path):
    import numpy as np

    bench_data = load_script("bench_data")
    rows = {part: np.arange(64, dtype=np.int64).reshape(4, 16) for part in ("ids", "labels", "positions")}
    np.savez(tmp_path / "a.npz", **rows)
    np.savez(tmp_path / "b.npz", **rows)
    assert bench_data.first_difference(tmp_path / "a.npz", tmp_path / "b.npz") is None
    swapped = rows["ids"].copy()
    swapped[2, [3, 4]] = swapped[2, [4, 3]]  # the same tokens, the same sums: a checksum of sums cannot see it
    np.savez(tmp_path / "b.npz", **{**rows, "ids": swapped})
    assert bench_data.first_difference(tmp_path / "a.npz", tmp_path / "b.npz") == "ids row 2, token 3: 35 vs 36"


def test_cross_entropy_reference_shape():
    """nll_sum's contract on a toy head: the sum over shifted positions, -100 ignored."""
    head = torch.nn.Linear(4, 6, bias=False)
    hidden = torch.randn(2, 5, 4)
    labels = torch.randint(0, 6, (2, 5))
    labels[1, 3] = -100
    expected = F.cross_entropy(head(hidden)[:, :-1].reshape(-1, 6), labels[:, 1:].reshape(-1), reduction="sum")
    assert torch.allclose(loss.nll_sum(head, hidden, labels, chunk=3), expected, atol=1e-6)


@pytest.mark.parametrize("case", ["lora", "dora", "ia3", "loha", "lokr", "top_layers", "prompt_tuning"])
def test_every_method_family_trains_on_the_default_bf16_path(case, tiny_config, tmp_path):
    from tests.test_methods import method_config

    config = method_config(tiny_config, case, tmp_path)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, dtype="bf16"))
    report = Trainer(with_train(config, mixed_precision="bf16", max_steps=4), log=lambda _: None).fit()
    assert report["tuned"]["domain_ppl"] < report["base"]["domain_ppl"], report


def test_document_separation_falls_back_with_one_line_where_positions_do_not_separate(tiny_config, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.conftest import build_tokenizer

    tokenizer = build_tokenizer()
    sizes = dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    llama = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", intermediate_size=128, **sizes))
    bloom = AutoModelForCausalLM.from_config(AutoConfig.for_model("bloom", **sizes))  # ALiBi: no position ids
    assert loss.documents_kept_apart(llama) and not loss.documents_kept_apart(bloom)
    bloom.config.eos_token_id, bloom.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    bloom.save_pretrained(tmp_path / "bloom")
    tokenizer.save_pretrained(tmp_path / "bloom")
    config = dataclasses.replace(
        tiny_config,
        model=dataclasses.replace(tiny_config.model, name_or_path=str(tmp_path / "bloom")),
        method=dataclasses.replace(tiny_config.method, target_modules=["query_key_value"]),
        train=dataclasses.replace(tiny_config.train, max_steps=2),
    )
    logs = []
    trainer = Trainer(config, log=logs.append)
    trainer.fit()
    assert [line for line in logs if line.startswith("data.separate_documents:")] == [
        "data.separate_documents: this model does not keep packed documents apart through position ids (bloom); "
        "its rows use plain causal attention across documents"
    ]
    assert trainer.data.batch(0, 0, 0, 1, 2, 1).position_ids is None


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "falcon", "phi3", "qwen2_moe"])
def test_regional_compilation_finds_the_decoder_blocks_of_each_family(family):
    from transformers import AutoConfig

    sizes = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **sizes))
    decoder, _ = loss.decoder_and_head(model)
    blocks = runtime.decoder_layers(decoder)
    assert blocks is not None and len(blocks) == 3


def test_bench_qa_times_both_scoring_paths_and_they_agree(tiny_model_dir, tmp_path, capsys):
    bench_qa = load_script("bench_qa")
    qa_file = picked_qa_file(tmp_path / "mmlu.jsonl", [0, 1, 0, 1, 0, 1], [0, 1])
    args = ["--questions", "4", "--kshot", "0", "1", "--model", str(tiny_model_dir), "--mmlu", str(qa_file)]
    assert bench_qa.main(args) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[0] for row in rows] == ["0", "1"]
    for _kshot, whole, cached, speedup, diff, same in rows:
        assert float(whole) > 0 and float(cached) > 0 and speedup.endswith("x")
        assert float(diff) < 1e-4 and same == "True"  # the cache changes the cost, not the scores
