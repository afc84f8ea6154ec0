"""Killed runs resume exactly, bad states never lose work, and every run records how to reproduce it."""

import dataclasses
import hashlib
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit import PeftkitError, Trainer, checkpoint

ROOT = Path(__file__).resolve().parents[1]


def reliability_config(tiny_config, **train):
    return dataclasses.replace(
        tiny_config,
        train=dataclasses.replace(tiny_config.train, **{"max_steps": 40, "lr": 1e-2, **train}),
        eval=dataclasses.replace(tiny_config.eval, every_steps=4, diagnostics=False),
    )


def trajectory(run: Path) -> list[tuple]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().split("\n") if line]
    return [(r["step"], r.get("loss"), r.get("val_loss"), r.get("general_kl")) for r in records]


def steps_logged(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().split("\n")
    except FileNotFoundError:
        return -1
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return max(steps, default=-1)


def test_sigkill_at_random_points_then_resume_gives_the_same_run(tiny_config, tmp_path):
    config = reliability_config(tiny_config)
    straight = dataclasses.replace(config, output_dir=str(tmp_path / "straight"))
    Trainer(straight, log=lambda _: None).fit()

    run = tmp_path / "killed"
    yaml = tmp_path / "killed.yaml"
    dataclasses.replace(config, output_dir=str(run)).save_yaml(yaml)
    rng = random.Random(1234)
    kill_points = sorted(rng.sample(range(1, 40), 5))
    cmd = [sys.executable, "-m", "peftkit.cli", "train", str(yaml)]
    killed_at = []
    for point in kill_points:
        resume = ["--train.resume=true"] if killed_at else []
        proc = subprocess.Popen([*cmd, *resume], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while proc.poll() is None and steps_logged(run) < point and time.time() < deadline:
            time.sleep(0.002)
        if proc.poll() is not None:  # finished before the kill point: nothing more to kill
            assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at.append(steps_logged(run))
    result = subprocess.run([*cmd, "--train.resume=true"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(killed_at) >= 3, f"the run outpaced the kills: {killed_at}"

    a, b = (
        load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"),
        load_file(run / "adapter" / "adapter_model.safetensors"),
    )
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bitwise: fp32 CPU kernels are deterministic here
    assert trajectory(run) == trajectory(tmp_path / "straight")
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_interrupted_save_on_a_full_disk_keeps_earlier_checkpoints(tiny_config, monkeypatch):
    config = reliability_config(tiny_config, max_steps=12)
    real_save, calls = torch.save, {"n": 0}

    def failing_save(obj, path, *args, **kwargs):
        if "step-8" in str(path):
            raise OSError(28, "No space left on device")
        calls["n"] += 1
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(
        PeftkitError,
        match=r"could not write checkpoint .*step-8 \(No space left on device\); is the disk full\? Earlier checkpoints are intact \(step-4\)",
    ):
        Trainer(config, log=lambda _: None).fit()
    run = Path(config.output_dir)
    assert [p.name for _, p in checkpoint.checkpoints(run)] == ["step-4"]
    assert checkpoint.verify(run / "checkpoints" / "step-4")
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_damaged_checkpoint_is_skipped_for_the_previous_one(tiny_config, tmp_path):
    # a constant rate: the 8-step run that wrote the checkpoints trains like the first 8 steps of 12
    config = reliability_config(tiny_config, max_steps=12, keep_checkpoints=3, lr_schedule="constant", warmup_steps=0)
    straight = dataclasses.replace(config, output_dir=str(tmp_path / "straight"))
    Trainer(straight, log=lambda _: None).fit()
    run = dataclasses.replace(config, output_dir=str(tmp_path / "run"))
    Trainer(dataclasses.replace(run, train=dataclasses.replace(run.train, max_steps=8)), log=lambda _: None).fit()
    # the step-8 checkpoint of that shorter run is damaged; resuming must fall back to step-4
    (tmp_path / "run" / "checkpoints" / "step-8" / "optimizer.pt").write_bytes(b"garbage")
    messages = []
    Trainer(run, log=messages.append).fit(resume=True)
    assert any("step-8 does not match its manifest" in m for m in messages)
    assert any("at step 4" in m for m in messages)
    # resumed from step 4, not retrained from scratch nor from the damaged step 8: the straight run, bitwise
    a, b = (load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in ("straight", "run"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


class PoisonWeightsAt:
    """Turns one adapter weight into NaN after a given step, as a diverging run would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, record):
        if record.step == self.step:
            with torch.no_grad():
                next(p for n, p in trainer.model.named_parameters() if "lora_A" in n).fill_(float("nan"))


def test_non_finite_losses_stop_the_run_after_max_bad_steps(tiny_config):
    config = reliability_config(tiny_config, max_steps=30, max_bad_steps=2)
    with pytest.raises(
        PeftkitError,
        match=r"non-finite loss or gradient \(3 steps skipped, more than train.max_bad_steps=2\); stopped. Kept checkpoints: step-4",
    ):
        Trainer(config, callbacks=[PoisonWeightsAt(5)], log=lambda _: None).fit()
    run = Path(config.output_dir)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().split("\n") if line]
    assert [r["step"] for r in records if r.get("skipped")] == [6, 7, 8]
    assert checkpoint.verify(run / "checkpoints" / "step-4")


def test_manifest_records_what_reproduces_the_run(tiny_config, corpus_dir, tiny_model_dir):
    config = reliability_config(tiny_config, max_steps=2)
    Trainer(config, log=lambda _: None).fit()
    manifest = json.loads((Path(config.output_dir) / "manifest.json").read_text())
    assert manifest["seed"] == config.seed and manifest["processes"] == 1
    assert manifest["packages"]["torch"] and manifest["packages"]["peft"]
    # the hashes themselves, computed here: a manifest with the right keys but stale or empty values fails
    train = corpus_dir / "train.jsonl"
    assert manifest["data_files"][str(train)] == hashlib.sha256(train.read_bytes()).hexdigest()
    weights = tiny_model_dir / "model.safetensors"
    assert manifest["base_model_files"] == {str(weights): hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert manifest["config"]["train"]["max_steps"] == 2 and manifest["machine"]["cpus"] >= 1


def test_pickled_weights_need_allow_pickle(tiny_model_dir, tmp_path, tiny_config):
    from transformers import AutoModelForCausalLM

    pickled = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    pickled.mkdir()
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (pickled / name).write_bytes((tiny_model_dir / name).read_bytes())
    assert not list(pickled.glob("*.safetensors")) and list(pickled.glob("*.bin"))
    config = dataclasses.replace(
        reliability_config(tiny_config, max_steps=2),
        model=dataclasses.replace(tiny_config.model, name_or_path=str(pickled)),
    )
    with pytest.raises(PeftkitError, match="no .safetensors weights; pickled weights can run code"):
        Trainer(config, log=lambda _: None).fit()
    allowed = dataclasses.replace(config, model=dataclasses.replace(config.model, allow_pickle=True))
    Trainer(allowed, log=lambda _: None).fit()
