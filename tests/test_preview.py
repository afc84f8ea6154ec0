"""`peftkit preview`: counts, packing, an example row, memory and time, before any training."""

import subprocess
import sys

from peftkit import data
from peftkit.preview import format_preview, preview


def test_preview_counts_what_training_would_see(tiny_config):
    import dataclasses

    tiny_config = dataclasses.replace(tiny_config, data=dataclasses.replace(tiny_config.data, seq_len=128))
    p = preview(tiny_config, timed_steps=1, log=lambda _: None)
    train = data.load_split(tiny_config.data, "train")
    tokenizer = __import__("peftkit").models.load_tokenizer(tiny_config.model)
    tokens = sum(len(t) for t in data.tokenize(tokenizer, train))
    assert p["splits"]["train"] == {"documents": len(train), "tokens": tokens, "estimated": False, "loss_share": 1.0}
    assert p["rows_per_epoch"] == tokens // tiny_config.data.seq_len
    assert 0.9 < p["packing_efficiency"] <= 1 and p["loss_token_share"] == (128 - 1) / 128
    assert p["tokens_per_s"] > 0 and p["memory_estimate_mb"] > 0 and p["trainable_params"] > 0
    assert "[EOS]" in p["example"] and p["example"].split(" [EOS] ")[0] == train[0]
    text = format_preview(p, tiny_config)
    assert "packing:" in text and "tokens/s measured on this machine" in text


def test_preview_cli_runs_on_a_yaml_config(tiny_config, tmp_path):
    path = tmp_path / "tiny.yaml"
    tiny_config.save_yaml(path)
    done = subprocess.run([sys.executable, "-m", "peftkit.cli", "preview", str(path), "--data.seq_len=16"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rows of 16 per epoch" in done.stdout and "first training row:" in done.stdout


def test_preview_marks_the_prompt_of_instruction_data(tiny_config, tmp_path):
    import dataclasses
    import json

    folder = tmp_path / "sft"
    folder.mkdir()
    for split in ("train", "validation", "test"):
        rows = [{"prompt": "the patient", "response": "received aspirin and recovered ."} for _ in range(40)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = dataclasses.replace(tiny_config, data=dataclasses.replace(tiny_config.data, source=str(folder),
                                                                       format="instruction", seq_len=64,
                                                                       dedup="none"))  # repeated on purpose  # fmt: skip
    p = preview(config, timed_steps=1, log=lambda _: None)
    assert p["example"].startswith(
        "[no loss: the patient] received aspirin and recovered . [EOS] [no loss: the patient]"
    )
    assert p["splits"]["train"]["loss_share"] == 6 / 8  # 5 response words + EOS of 8 tokens
    assert "responses only" in format_preview(p, config)


def test_memory_estimate_is_measured_from_what_a_step_keeps(tiny_config):
    """Activations kept for backward grow with the batch and shrink with activation checkpointing."""
    import dataclasses

    def estimate(**train):
        config = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, **train))
        return preview(config, timed_steps=1, log=lambda _: None)["memory_estimate_mb"]

    four, eight = estimate(batch_size=4), estimate(batch_size=8)
    checkpointed = estimate(batch_size=8, gradient_checkpointing=True)
    assert eight - four > 0.1  # MB: 4 more rows of 32 tokens through the tiny model
    assert checkpointed < eight - 0.5 * (eight - four)
