"""Several processes train the same model as one process would (accelerate launch on CPU, gloo).

On a machine without GPUs, accelerate 1.15 starts a real 2-process group only for
`--multi_gpu` / `distributed_type: MULTI_GPU` launches with the CPU chosen in code (the trainer
does that); so every test asserts the world size it got.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftkit import checkpoint

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "distributed_driver.py"
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
TOLERANCE = 1e-5  # fp32 on CPU: gloo all-reduce vs local accumulation sum in different orders


def launch(args: list[str], config: Path, out: Path, overrides: list[str], timeout: int = 300):
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*ACCELERATE, *args, str(DRIVER), str(config), str(out), *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def launch_ddp(config, tmp_path: Path) -> tuple[list[dict], dict]:
    """`config` (a Config) trained by 2 DDP processes (cpu_2proc.yaml): each process's adapter, checked
    identical across the two, and the run's report."""
    path = tmp_path / "ddp.yaml"
    config.save_yaml(path)
    out = tmp_path / "ddp"
    launch(["--config_file", str(ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml")], path, out,
           [f"--output_dir={out / 'run'}"])  # fmt: skip
    both = ranks(out)
    assert [r["world"] for r in both] == [2, 2] and both[0]["state"].keys() == both[1]["state"].keys()
    for key, value in both[0]["state"].items():
        assert torch.equal(value, both[1]["state"][key]), key
    return both, json.loads((out / "run" / "report.json").read_text())


def ranks(out: Path) -> list[dict]:
    return [torch.load(p, weights_only=True) for p in sorted(out.glob("rank*.pt"))]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().split("\n")[:-1]) if "loss" in r]


def assert_close(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=TOLERANCE, rtol=0), (key, (a[key] - b[key]).abs().max())


@pytest.fixture
def dist_config(tiny_config, tmp_path) -> Path:
    config = dataclasses.replace(
        tiny_config,
        train=dataclasses.replace(
            tiny_config.train, max_steps=6, batch_size=2, lr=1e-3, lr_schedule="constant", warmup_steps=0
        ),  # fmt: skip
        eval=dataclasses.replace(tiny_config.eval, every_steps=3, kl_prompts=False, diagnostics=False),
    )
    path = tmp_path / "dist.yaml"
    config.save_yaml(path)
    return path


@pytest.fixture
def one_process(dist_config, tmp_path):
    out = tmp_path / "one"
    launch(["--num_processes", "1"], dist_config, out, ["--train.grad_accum=2", f"--output_dir={out / 'run'}"])
    (state,) = ranks(out)
    assert state["world"] == 1
    return out, state["state"]


def test_two_processes_equal_one_process_with_accumulation(dist_config, one_process, tmp_path):
    one_dir, one_state = one_process
    out = tmp_path / "two"
    launch(["--multi_gpu", "--num_processes", "2"], dist_config, out, [f"--output_dir={out / 'run'}"])
    both = ranks(out)
    assert [r["world"] for r in both] == [2, 2], "accelerate did not form a 2-process group"
    assert_close(both[0]["state"], both[1]["state"])  # DDP keeps the ranks identical
    assert_close(both[0]["state"], one_state)  # and equal to one process reading the same rows
    assert losses(out / "run") == pytest.approx(losses(one_dir / "run"), abs=1e-5)
    report = json.loads((out / "run" / "report.json").read_text())
    assert report["processes"] == 2 and report["global_batch_rows"] == 4


def test_two_processes_on_a_streamed_corpus_equal_one_process_loading_it_whole(
    dist_config, one_process, tmp_path, monkeypatch
):
    """The main process builds the streamed token files while the other waits; both then read disjoint
    rows of the same memory-mapped corpus, which are the rows loaded whole (no duplicates here)."""
    _, one_state = one_process
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "streamed"
    launch(["--multi_gpu", "--num_processes", "2"], dist_config, out,
           ["--data.streaming=on", f"--output_dir={out / 'run'}"])  # fmt: skip
    both = ranks(out)
    assert [r["world"] for r in both] == [2, 2], "accelerate did not form a 2-process group"
    assert_close(both[0]["state"], one_state)
    assert len(list((tmp_path / "cache" / "stream").glob("*/tokens-*/meta.json"))) == 1


def test_checkpoint_from_two_processes_resumes_on_one(dist_config, one_process, tmp_path):
    _, one_state = one_process
    out = tmp_path / "two_then_one"
    run = out / "run"
    launch(["--multi_gpu", "--num_processes", "2"], dist_config, out, ["--train.max_steps=3", f"--output_dir={run}"])
    assert [r["world"] for r in ranks(out)] == [2, 2], "accelerate did not form a 2-process group"
    # without a complete step-3 checkpoint the 1-process run would retrain from step 0 and still match
    assert [step for step, _ in checkpoint.checkpoints(run)] == [3]
    assert checkpoint.verify(run / "checkpoints" / "step-3")
    # the LR schedule is constant, so stopping at 3 of 3 and continuing to 6 is the same training
    launch(["--num_processes", "1"], dist_config, out,
           ["--train.grad_accum=2", "--train.resume=true", f"--output_dir={run}"])  # fmt: skip
    # rank 0 of the resumed run overwrote rank0.pt; rank1.pt is left from the 2-process run
    assert [r["world"] for r in ranks(out)] == [1, 2]
    (state,) = [r for r in ranks(out) if r["world"] == 1]
    assert_close(state["state"], one_state)


def test_two_machines_simulated_on_one(dist_config, one_process, tmp_path):
    _, one_state = one_process
    out = tmp_path / "machines"
    common = ["--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--main_process_ip", "127.0.0.1",
              "--main_process_port", "29561"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out.mkdir()
    procs = [
        subprocess.Popen(
            [
                *ACCELERATE,
                *common,
                "--machine_rank",
                str(rank),
                str(DRIVER),
                str(dist_config),
                str(out),
                f"--output_dir={out / 'run'}",
            ],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    both = ranks(out)
    assert [r["world"] for r in both] == [2, 2]
    assert_close(both[0]["state"], one_state)


def test_shipped_accelerate_configs_load():
    from accelerate.commands.config.config_args import ClusterConfig

    configs = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
    assert {c.stem for c in configs} >= {"cpu_2proc", "multi_gpu", "fsdp", "deepspeed_zero2"}
    for path in configs:
        config = ClusterConfig.from_yaml_file(path)  # rejects unknown keys
        assert config.num_processes >= 1
        assert f"recipes/accelerate/{path.name}" in path.read_text(), f"{path.name}: document its launch command"


def test_zero3_is_refused_before_training_naming_fsdp2():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from peftkit import checkpoint
    from peftkit.errors import PeftkitError

    def deepspeed(stage):
        return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                               state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)))  # fmt: skip

    with pytest.raises(
        PeftkitError, match="ZeRO-3 is not supported .* shard with FSDP2 instead: --train.sharding=fsdp"
    ):
        checkpoint.check_supported(deepspeed(3))
    checkpoint.check_supported(deepspeed(2))
    for kind in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.FSDP):
        checkpoint.check_supported(SimpleNamespace(distributed_type=kind))


def test_a_time_budgeted_run_plans_one_step_count_on_every_process(dist_config, tmp_path):
    """Each process times its own steps; the plan is made from the slowest clock, so every process stops at the
    same step (a process planning more steps than the other would wait at its next all-reduce forever)."""
    out = tmp_path / "budget"
    launch(["--config_file", str(ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml")], dist_config, out,
           ["--train.time_budget=4s", "--train.collective_timeout=60s", "--eval.every_steps=1000",
            f"--output_dir={out / 'run'}"])  # fmt: skip
    assert [r["world"] for r in ranks(out)] == [2, 2]
    report = json.loads((out / "run" / "report.json").read_text())
    assert report["planned_steps"] == report["final_step"] > 3
