"""train.time_budget: the step count is planned from the measured step time and the schedule runs to it."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftkit.trainer
from peftkit import Callback, PeftkitError, Trainer
from peftkit.config import Config


class FakeClock:
    """Each step takes exactly 0.05 s: plans become reproducible, so resume can be compared bitwise."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 0.05  # called at the start and at the end of each step: each step lasts 0.05 s
        return self.now


def budgeted(config, budget, output_dir):
    train = dataclasses.replace(config.train, time_budget=budget, max_steps=3, warmup_steps=2)
    return dataclasses.replace(config, train=train, output_dir=str(output_dir))


def records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_a_budgeted_run_plans_its_steps_ends_annealed_and_within_its_budget(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(peftkit.trainer, "time", FakeClock())
    config = budgeted(tiny_config, "1.2s", tmp_path / "run")
    logs = []
    report = Trainer(config, log=logs.append).fit()
    planned = report["planned_steps"]
    # step 1 is warm-up; steps 2-7 are timed (6 steps, 0.3 s >= 10% of 1.2 s), and (1.2 - 0.3) / 0.05 = 18 more fit
    assert planned == 25 and report["final_step"] == planned  # train.max_steps=3 does not limit a budgeted run
    assert report["train_seconds"] == pytest.approx(1.2)  # steps 2..25, the budget to the step
    assert report["stop_reason"] == "used train.time_budget"
    steps = [r for r in records(config.output_dir) if "loss" in r]
    assert steps[-1]["step"] == planned and steps[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine's end
    assert max(r["lr"] for r in steps) == pytest.approx(config.train.lr)
    evaluated = [r["step"] for r in records(config.output_dir) if "val_loss" in r]
    assert evaluated[-1] == planned  # the last step is evaluated, as with max_steps
    plan = "train.time_budget: 0.050 s per step over the last 3 of 6 steps; 25 steps fit 1.2s (evaluations not counted)"
    assert plan in logs


class WarmingClock:
    """Steps 1-4 take 0.1 s, the later ones 0.05 s: the first steps of a real run are slower than its steady ones."""

    def __init__(self):
        self.now, self.calls = 0.0, 0

    def perf_counter(self):
        self.calls += 1
        if self.calls % 2 == 0:  # the end of step calls / 2
            self.now += 0.1 if self.calls // 2 <= 4 else 0.05
        return self.now


def test_the_plan_uses_the_later_steps_time_so_slow_first_steps_do_not_shorten_the_run(tiny_config, tmp_path,
                                                                                       monkeypatch):  # fmt: skip
    monkeypatch.setattr(peftkit.trainer, "time", WarmingClock())
    report = Trainer(budgeted(tiny_config, "1.2s", tmp_path / "run"), log=lambda _: None).fit()
    # timed steps 2-7 took 0.45 s; the later half's 0.05 s per step fits (1.2 - 0.45) / 0.05 = 15 more
    # (the mean of all six, 0.075 s, would plan 10 more and stop at 0.95 s of the 1.2 s)
    assert report["planned_steps"] == 22 and report["train_seconds"] == pytest.approx(1.2)


def test_a_budgeted_run_on_the_real_clock_ends_at_its_plan(tiny_config, tmp_path):
    report = Trainer(budgeted(tiny_config, "2s", tmp_path / "run"), log=lambda _: None).fit()
    # how close train_seconds comes to 2 s depends on how steady the machine's step time is; shared CPUs vary
    assert report["planned_steps"] >= 4 and report["final_step"] == report["planned_steps"]
    assert 0 < report["train_seconds"]


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, record):
        if record.step == self.step:
            raise KeyboardInterrupt


def test_resume_continues_the_planned_schedule_exactly(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(peftkit.trainer, "time", FakeClock())
    straight = budgeted(tiny_config, "1.2s", tmp_path / "straight")
    report = Trainer(straight, log=lambda _: None).fit()
    planned = report["planned_steps"]
    assert planned == 25

    monkeypatch.setattr(peftkit.trainer, "time", FakeClock())
    broken = budgeted(tiny_config, "1.2s", tmp_path / "broken")
    with pytest.raises(KeyboardInterrupt):
        Trainer(broken, callbacks=[StopAt(10)], log=lambda _: None).fit()
    monkeypatch.setattr(peftkit.trainer, "time", FakeClock())
    resumed = Trainer(broken, log=lambda _: None).fit(resume=True)
    assert resumed["planned_steps"] == planned and resumed["final_step"] == planned

    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "broken" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)
    lr = [
        [(r["step"], r["lr"], r["loss"]) for r in records(run.output_dir) if "loss" in r] for run in (straight, broken)
    ]
    assert lr[0] == lr[1]


def test_a_step_count_on_the_command_line_replaces_a_recipes_budget():
    recipe = Config.from_dict({"train": {"time_budget": "10m", "max_steps": 40}})
    assert recipe.override(["--train.max_steps=3"]).train.time_budget == ""  # what the user asked: 3 steps
    assert recipe.override(["--train.lr=1e-3"]).train.time_budget == "10m"
    both = recipe.override(["--train.max_steps=3", "--train.time_budget=2m"]).train
    assert (both.max_steps, both.time_budget) == (3, "2m")


def test_a_duration_that_is_not_one_is_refused_naming_the_key():
    with pytest.raises(PeftkitError, match=r"train.time_budget.*'90s', '10m' or '1.5h', got 'ten minutes'"):
        Config.from_dict({"train": {"time_budget": "ten minutes"}})
    assert Config.from_dict({"train": {"time_budget": "1.5h"}}).train.time_budget_s == 5400
