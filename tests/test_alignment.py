"""DPO (train.objective=dpo) on the tiny model: it learns a held-out preference, its reference never moves,
it resumes exactly, two processes equal one, a second stage starts from the first's model, bad pairs are
refused in one line, and its tokens and loss are trl's."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit import Config, DataConfig, PeftkitError
from peftkit.alignment import pairs as P
from peftkit.alignment.dpo import dpo_losses, sequence_logps
from peftkit.alignment.trainer import PreferenceTrainer
from peftkit.evaluation.base_cache import model_fingerprint
from tests.conftest import DRUGS, GENERAL, OUTCOMES, SUBJECTS, VERBS, build_tokenizer, make_tiny_config
from tests.test_trainer import StopAt

ROOT = Path(__file__).resolve().parents[1]


def pair_rows(count: int = 300, seed: int = 0) -> list[dict]:
    """A medical outcome preferred over a general sentence after a treatment prompt: the general-text
    pretrained tiny model prefers the general sentence at first."""
    rng = random.Random(seed)
    return [{"prompt": f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(DRUGS)}",
             "chosen": f" {rng.choice(OUTCOMES)} . <eos>", "rejected": f" {rng.choice(GENERAL)} . <eos>"}
            for _ in range(count)]  # fmt: skip


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", pair_rows())


def dpo_config(tiny_config, pairs_file: Path, out: Path, **train) -> Config:
    return dataclasses.replace(
        tiny_config,
        data=dataclasses.replace(
            tiny_config.data, source=str(pairs_file), format="preference", validation_share=0.15, test_share=0.15
        ),  # fmt: skip
        train=dataclasses.replace(tiny_config.train, objective="dpo", lr=1e-2, **train),
        eval=dataclasses.replace(tiny_config.eval, qa_questions=0, diagnostics=False),
        output_dir=str(out),
    )


@pytest.fixture(scope="module")
def dpo_run(tiny_config_module, pairs_file, tmp_path_factory):
    config = dpo_config(tiny_config_module, pairs_file, tmp_path_factory.mktemp("dpo") / "run")
    trainer = PreferenceTrainer(config, log=lambda _: None)
    trainer.fit()
    return trainer


@pytest.fixture(scope="module")
def tiny_config_module(tiny_model_dir, corpus_dir, tmp_path_factory):
    """conftest's tiny_config, for the module's one shared run."""
    return make_tiny_config(tiny_model_dir, corpus_dir, tmp_path_factory.mktemp("tiny"))


def test_dpo_learns_a_held_out_preference_and_its_reference_never_moves(dpo_run):
    report = json.loads((dpo_run.run_dir / "report.json").read_text())
    evals = [
        r for r in map(json.loads, (dpo_run.run_dir / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r
    ]
    assert abs(evals[0]["val_loss"] - 0.693147) < 1e-4  # step 0: the policy is its reference, the loss ln 2
    assert evals[-1]["val_loss"] < 0.5 and evals[-1]["pref_reward_accuracy"] > 0.8
    pref = report["preference"]
    assert pref["likelihood_accuracy"]["base"] < 0.5 < pref["likelihood_accuracy"]["tuned"]
    assert pref["likelihood_accuracy_change_ci95"][0] > 0 and pref["reward_accuracy"] > 0.8
    assert report["verdict"]["outcome"] == "helped"
    # the reference: what the untouched base gives the test pairs, before and after training
    model, data = dpo_run.model, dpo_run.data
    batch = data.pick("test", range(len(data.splits["test"])))
    with model.disable_adapter(), torch.no_grad():
        base = sequence_logps(model.eval(), batch.input_ids, batch.attention_mask, batch.completion_mask)
    assert torch.allclose(torch.stack(base.chunk(2), dim=1), data.ref["test"], atol=1e-5)
    stored = load_file(Path(dpo_run.config.model.name_or_path) / "model.safetensors")
    frozen = {k.removeprefix("base_model.model."): v for k, v in model.state_dict().items() if "lora_" not in k}
    frozen = {k.replace(".base_layer.", "."): v for k, v in frozen.items()}
    assert all(torch.equal(frozen[k], v) for k, v in stored.items() if k in frozen)


def test_an_interrupted_dpo_run_resumes_to_the_same_adapter(dpo_run, tmp_path):
    broken = dataclasses.replace(dpo_run.config, output_dir=str(tmp_path / "broken"))
    with pytest.raises(KeyboardInterrupt):
        PreferenceTrainer(broken, callbacks=[StopAt(6)], log=lambda _: None).fit()
    PreferenceTrainer(broken, log=lambda _: None).fit(resume=True)
    a = load_file(dpo_run.run_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "broken" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_two_processes_train_the_same_adapter_as_one(tiny_config, pairs_file, tmp_path):
    from tests.test_distributed import assert_close, launch, ranks

    config = dpo_config(tiny_config, pairs_file, tmp_path / "unused", max_steps=4, batch_size=2, lr_schedule="constant",
                        warmup_steps=0)  # fmt: skip
    config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, every_steps=2, kl_prompts=False))
    path = tmp_path / "dpo.yaml"
    config.save_yaml(path)
    launch(
        ["--num_processes", "1"], path, tmp_path / "one", ["--train.grad_accum=2", f"--output_dir={tmp_path / 'r1'}"]
    )
    launch(["--multi_gpu", "--num_processes", "2"], path, tmp_path / "two", [f"--output_dir={tmp_path / 'r2'}"])
    (one,), both = ranks(tmp_path / "one"), ranks(tmp_path / "two")
    assert [r["world"] for r in both] == [2, 2]
    assert_close(both[0]["state"], both[1]["state"])
    assert_close(both[0]["state"], one["state"])


def test_tokens_and_loss_are_trls(tiny_model_dir, tmp_path):
    """trl's DPOTrainer (its tokenization, collator and loss) on the same pairs and adapter: the same token ids
    and, for each loss type, the same loss to 1e-6, the reference being the adapter as the stage started."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = pair_rows(6, seed=3)
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], beta=0.1, max_length=32, use_cpu=True,
                     per_device_train_batch_size=6, gradient_checkpointing=False, bf16=False)  # fmt: skip
    trl = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    theirs = [trl.train_dataset[i] for i in range(len(rows))]
    for row, their in zip(rows, theirs, strict=True):
        mine = P.tokenize(tokenizer, json.dumps(row))
        assert all(mine[k] == their[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")), (mine, their)
    batch = trl.data_collator(theirs)
    model.train()
    with torch.no_grad():  # the reference: the adapter as it starts (trl keeps a copy named "ref")
        ref = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        for name, param in model.named_parameters():
            if ".default." in name and "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.3)  # the policy moves away from it
    for loss in ("sigmoid", "ipo", "hinge"):
        trl.loss_types = [loss]
        expected = trl.compute_loss(model, batch).item()
        logps = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        mine = dpo_losses(logps, ref, batch["completion_mask"], 0.1, loss)[0].mean().item()
        assert abs(mine - expected) < 1e-6 * max(1.0, abs(expected)), (loss, mine, expected)
        assert abs(expected - 0.693147) > 1e-3  # not the trivial policy-equals-reference value


def test_conversational_pairs_go_through_the_chat_template():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} . {% endfor %}"
                               "{% if add_generation_prompt %}assistant {% endif %}")  # fmt: skip
    spec = DataConfig(format="preference")
    doc = P.pair_record({"prompt": [{"role": "user", "content": "the patient was given aspirin"}],
                         "chosen": [{"role": "assistant", "content": "and recovered"}],
                         "rejected": [{"role": "assistant", "content": "the river flows to the sea"}]}, spec, "x")  # fmt: skip
    ids = P.tokenize(tokenizer, doc)
    assert tokenizer.decode(ids["chosen_ids"]) == "and recovered ."
    # the roles are not in the tiny vocabulary: <unk>; the prompt ends with the generation prompt
    assert tokenizer.decode(ids["prompt_ids"]) == "<unk> the patient was given aspirin . <unk>"
    with pytest.raises(PeftkitError, match="the tokenizer has no chat template to render them"):
        P.tokenize(build_tokenizer(), doc)


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"prompt": "a", "rejected": " b"},
            "line 2: no field 'chosen' holding a string or a list of {role, content} messages; set data.chosen_field",
        ),
        ({"prompt": "a", "chosen": " ", "rejected": " b"}, "line 2: the chosen completion is empty"),
        ({"prompt": "a", "chosen": " b", "rejected": " b"}, "line 2: chosen equals rejected"),
        ({"prompt": [{"role": "user", "content": "a"}], "chosen": " b", "rejected": " c"}, "line 2: mixes plain text"),
        ("{not json", "line 2: malformed JSON"),
    ],
)
def test_bad_pairs_are_refused_in_one_line_with_their_line(tiny_config, pairs_file, tmp_path, row, message):
    bad = write_rows(tmp_path / "bad.jsonl", [pair_rows(1)[0], row])
    config = dpo_config(tiny_config, bad, tmp_path / "run")
    with pytest.raises(PeftkitError) as error:
        PreferenceTrainer(config, log=lambda _: None).fit()
    assert "\n" not in str(error.value) and str(error.value).startswith(f"{bad} {message}"), str(error.value)
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before the run folder was set up


def test_a_prompt_longer_than_seq_len_and_a_mismatched_objective_are_refused(tiny_config, pairs_file, tmp_path):
    long = {"prompt": " ".join(["aspirin"] * 40), "chosen": " and recovered . <eos>", "rejected": " the sea . <eos>"}
    rows = pair_rows(60) + [long] * 1
    config = dpo_config(tiny_config, write_rows(tmp_path / "long.jsonl", rows), tmp_path / "run")
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, validation_share=0.2, test_share=0.2))
    with pytest.raises(PeftkitError, match=r"prompt starts 'aspirin aspirin.*' has a prompt of 40 tokens, which "
                                           r"leaves no room in data.seq_len=32; raise data.seq_len"):  # fmt: skip
        PreferenceTrainer(config, log=lambda _: None).fit()
    with pytest.raises(PeftkitError, match="set train.objective=dpo with data.format=preference"):
        tiny_config.override(["--train.objective=dpo"])
    for refused in ("--train.sharding=fsdp", "--train.gradient_checkpointing=true", "--data.replay=0.2"):
        key = refused[2:].split("=")[0]
        with pytest.raises(PeftkitError, match=f"'{key}': not supported with train.objective=dpo"):
            PreferenceTrainer(config.override([refused]), log=lambda _: None)


def test_the_cli_trains_dpo_and_a_bad_pair_exits_2_without_a_traceback(tiny_config, pairs_file, tmp_path):
    bad = write_rows(tmp_path / "bad.jsonl", [pair_rows(1)[0], {"prompt": "a", "chosen": " b", "rejected": " b"}])
    config = dpo_config(tiny_config, bad, tmp_path / "run")
    config.save_yaml(tmp_path / "run.yaml")
    result = subprocess.run([sys.executable, "-m", "peftkit.cli", "train", str(tmp_path / "run.yaml")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == f"peftkit: error: {bad} line 2: chosen equals rejected, so the " \
        "pair prefers nothing; fix or drop it"  # fmt: skip


def test_a_second_stage_starts_from_the_first_stages_model(tiny_config, pairs_file, tmp_path):
    """DPO after domain tuning: model.adapter merges the first run's adapter into the base; that merged model is
    the reference, the evaluation cache's base is not the plain base's, and merging the second run gives base +
    both adapters."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftkit import Trainer, models
    from peftkit.merge import merge_run

    first = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, max_steps=4),
                                eval=dataclasses.replace(tiny_config.eval, qa_questions=0, diagnostics=False),
                                output_dir=str(tmp_path / "domain"))  # fmt: skip
    Trainer(first, log=lambda _: None).fit()
    config = dpo_config(tiny_config, pairs_file, tmp_path / "dpo", max_steps=4)
    config = config.override([f"--model.adapter={tmp_path / 'domain'}"])
    assert model_fingerprint(config.model) != model_fingerprint(tiny_config.model)
    second = PreferenceTrainer(config, log=lambda _: None)
    second.fit()
    domain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_config.model.name_or_path),
                                       tmp_path / "domain" / "adapter").merge_and_unload().eval()  # fmt: skip
    batch = second.data.pick("test", range(4))
    with torch.no_grad():
        ref = sequence_logps(domain, batch.input_ids, batch.attention_mask, batch.completion_mask)
    assert torch.allclose(torch.stack(ref.chunk(2), dim=1), second.data.ref["test"][:4], atol=1e-5)
    merge_run(second.run_dir, tmp_path / "merged", log=lambda _: None)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tuned = PeftModel.from_pretrained(models.load_model(config.model), second.run_dir / "adapter").eval()
    ids = batch.input_ids[:2]
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, tuned(ids).logits, atol=1e-4)
        assert not torch.allclose(merged(ids).logits, domain(ids).logits, atol=1e-3)  # the second stage moved it
    with pytest.raises(PeftkitError, match="model.adapter=.*: no adapter_config.json there"):
        models.load_model(dataclasses.replace(config.model, adapter=str(tmp_path)))


def test_mmlu_pairs_come_from_the_training_half_and_qa_scores_the_other(tmp_path):
    """recipes/medical_dpo.py's data: pairs from the questions of the training half, one per wrong option; the QA
    evaluation with eval.qa_half=test draws only from the other half: no question text is in both."""
    from peftkit.alignment.mmlu import medical_pairs
    from peftkit.evaluation import qa

    rng = random.Random(0)
    questions = [{"subject": "anatomy", "question": f"question {i} {rng.random()}", "answer": i % 4,
                  "choices": [f"option {i}-{k}" for k in range(4)]} for i in range(200)]  # fmt: skip
    source = write_rows(tmp_path / "mmlu.jsonl", questions)
    out = medical_pairs(str(source), tmp_path / "pairs.jsonl", log=lambda _: None)
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    trained = {p["prompt"] for p in pairs}
    tested, _ = qa.select(source, True, "all", 0, 0, half="test")
    assert 60 < len(tested) < 140 and 3 * (200 - len(tested)) == len(pairs)  # about half each; 3 wrong options
    assert not trained & {qa.prompt(q) for q in tested}
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    by_prompt = {qa.prompt(q): q for q in questions}
    assert all(p["chosen"] == " " + by_prompt[p["prompt"]]["choices"][by_prompt[p["prompt"]]["answer"]] for p in pairs)


def test_the_dpo_benchmark_runs_both_trainers(tiny_model_dir, pairs_file, tmp_path):
    """scripts/bench_dpo --quick: trl's DPOTrainer and peftkit's, each in its own process, timed and tabulated."""
    out = tmp_path / "bench"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_dpo"), "--quick", "--model", str(tiny_model_dir),
           "--pairs", str(pairs_file), "--out", str(out), "--seq-len", "32"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads((out / "bench_dpo.json").read_text())
    assert measured["results"]["T"]["steps"] == measured["results"]["P"]["steps"] == 3
    assert all(r["step_s"] > 0 and r["peak_rss_mib"] > 0 for r in measured["results"].values())
    assert "peftkit / trl speed" in (out / "bench_dpo.md").read_text()
