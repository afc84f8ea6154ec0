"""method.auto_layers: blocks chosen by the adapter's gradient on the run's first training batches."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from peftkit import MethodConfig, PeftkitError, Trainer
from peftkit.methods.layer_choice import choose


def short(tiny_config, out, **method):
    return dataclasses.replace(
        tiny_config,
        method=dataclasses.replace(tiny_config.method, **method),
        train=dataclasses.replace(tiny_config.train, max_steps=4),
        eval=dataclasses.replace(tiny_config.eval, every_steps=4, kl_prompts=False, diagnostics=False),
        output_dir=str(out),
    )


def test_an_auto_run_is_the_run_with_its_chosen_layers_written_out(tiny_config, tmp_path):
    auto = Trainer(short(tiny_config, tmp_path / "auto", auto_layers=1), log=lambda _: None)
    auto.fit()
    report = json.loads((tmp_path / "auto" / "report.json").read_text())
    scores, chosen = report["layer_scores"], report["chosen_layers"]
    assert len(scores) == 2 and abs(sum(scores) - 1) < 1e-6 and all(s > 0 for s in scores)
    assert chosen == [max(range(2), key=lambda i: scores[i])]
    adapted = {name.split(".layers.")[1].split(".")[0] for name in load_file(tmp_path / "auto" / "adapter" /
                                                                            "adapter_model.safetensors")}  # fmt: skip
    assert adapted == {str(chosen[0])}
    explicit = Trainer(short(tiny_config, tmp_path / "explicit", layers=chosen), log=lambda _: None)
    explicit.fit()
    a = load_file(tmp_path / "auto" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "explicit" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (
        report["trainable_params"]
        == json.loads((tmp_path / "explicit" / "report.json").read_text())["trainable_params"]
    )


def test_choose_keeps_the_highest_scores_in_block_order():
    assert choose([0.1, 0.4, 0.2, 0.3], 2) == [1, 3]
    assert choose([0.25, 0.25, 0.25, 0.25], 2) == [0, 1]  # ties to the lower block
    with pytest.raises(PeftkitError, match="has 4 blocks"):
        choose([0.25] * 4, 5)


def test_auto_layers_refusals():
    with pytest.raises(PeftkitError, match="set one of the two"):
        MethodConfig(auto_layers=2, layers=[0])
    with pytest.raises(PeftkitError, match="does not adapt chosen blocks"):
        MethodConfig(name="prompt_tuning", auto_layers=2)
    with pytest.raises(PeftkitError, match="method.init=pissa"):
        MethodConfig(init="pissa", auto_layers=2)


def test_preview_shows_the_blocks_the_run_will_choose(tiny_config, tmp_path):
    from peftkit.preview import format_preview, preview

    config = short(tiny_config, tmp_path / "unused", auto_layers=1)
    shown = preview(config, timed_steps=1, log=lambda _: None)
    run = Trainer(dataclasses.replace(config, output_dir=str(tmp_path / "run")), log=lambda _: None)
    run.fit()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert shown["chosen_layers"] == report["chosen_layers"]
    assert shown["layer_scores"] == pytest.approx(report["layer_scores"], abs=1e-6)
    text = format_preview(shown, config)
    assert "method.auto_layers=1: blocks" in text and "<- adapted" in text


def test_two_processes_choose_the_same_blocks(tiny_config, tmp_path):
    """Each process measures its own batches; the scores are summed over processes, so both adapt the same
    blocks (different choices would give the processes different models and break DDP)."""
    from tests.test_distributed import launch_ddp

    config = short(tiny_config, tmp_path / "unused", auto_layers=1)
    _, report = launch_ddp(dataclasses.replace(config, train=dataclasses.replace(config.train, batch_size=2)), tmp_path)
    assert len(report["chosen_layers"]) == 1 and abs(sum(report["layer_scores"]) - 1) < 1e-6
