"""The callback API: hooks in order, seeing the state, able to stop a run; TrainState round-trips."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from peftkit import Callback, Trainer
from peftkit.evaluation.run_report import EvalRecord
from peftkit.state import TrainState


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_fit_start(self, trainer):
        self.calls.append(("fit_start", trainer.state.step))

    def on_step_end(self, trainer, record):
        self.calls.append(("step", record.step))

    def on_evaluate(self, trainer, record):
        # the guard runs first: its marks are on the record already
        self.calls.append(("evaluate", record.step, record.within_budget is not None, trainer.state.best_step))

    def on_save(self, trainer, path):
        assert (Path(path) / "manifest.json").exists()
        self.calls.append(("save", int(Path(path).name.removeprefix("step-"))))

    def on_train_end(self, trainer):
        self.calls.append(("train_end", trainer.state.step))

    def on_run_end(self, trainer, report):
        self.calls.append(("run_end", report.training.final_step))


def test_hooks_run_in_order_and_see_the_guards_marks(tiny_config):
    config = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, max_steps=8))
    recorder = Recorder()
    Trainer(config, callbacks=[recorder], log=lambda _: None).fit()
    evaluations = [c for c in recorder.calls if c[0] == "evaluate"]
    assert evaluations[0] == ("evaluate", 0, False, None)  # step 0: the base model, the guard's reference
    assert [c[1] for c in evaluations] == [0, 4, 8] and all(c[2] for c in evaluations[1:])
    assert recorder.calls[1] == ("fit_start", 0)  # after the step-0 evaluation
    assert [c[1] for c in recorder.calls if c[0] == "step"] == list(range(1, 9))
    assert [c for c in recorder.calls if c[0] == "save"] == [("save", 4), ("save", 8)]
    assert recorder.calls[-2:] == [("train_end", 8), ("run_end", 8)]
    # each evaluation comes right after its step and before its checkpoint
    at = recorder.calls.index(("step", 4))
    assert recorder.calls[at + 1][:2] == ("evaluate", 4) and recorder.calls[at + 2] == ("save", 4)


def test_the_documented_example_stops_the_run_and_the_report_says_why(tiny_config, capsys):
    source = (Path(__file__).parents[1] / "docs" / "training.md").read_text()
    example = re.search(r"```python\nfrom peftkit import Callback, Trainer\n(.*?)```", source, re.S).group(1)
    definition = example.split("\nreport = ")[0]
    namespace = {"Callback": Callback, "Trainer": Trainer}
    exec(definition, namespace)
    config = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, max_steps=40))
    report = Trainer(config, callbacks=[namespace["StopWhenGood"](1e9)], log=lambda _: None).fit()
    assert report["stopped_early"] and report["final_step"] == 4  # the first evaluation after step 0
    assert report["stop_reason"].startswith("validation perplexity") and "< 1000000000.0" in report["stop_reason"]
    assert json.loads((Path(config.output_dir) / "report.json").read_text())["stop_reason"] == report["stop_reason"]
    assert "step 10" not in capsys.readouterr().out  # it stopped before step 10


def test_train_state_round_trips_through_json_and_refuses_unknown_keys():
    state = TrainState(
        step=7,
        train_tokens=896,
        best_step=4,
        best_val_loss=2.5,
        evals_since_best=1,
        bad_steps=1,
        recent_losses=[2.0, 1.5],
        baseline=EvalRecord(step=0, val_loss=3.0, val_ppl=20.1),
    )
    assert TrainState.from_json(json.loads(json.dumps(state.to_json()))) == state
    with pytest.raises(ValueError, match="unknown trainer state keys"):
        TrainState.from_json({**state.to_json(), "stray": 1})
