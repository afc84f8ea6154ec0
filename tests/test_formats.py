"""Instruction and chat formats: loss on responses only (labels -100 exactly on prompt tokens),
EOS inside the loss, packing that keeps labels aligned, and errors that say where."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from peftkit import Trainer, data
from peftkit.config import DataConfig
from peftkit.errors import PeftkitError
from tests.conftest import build_tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")  # fmt: skip


def example(prompt, response):
    return json.dumps([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])


def test_instruction_without_a_chat_template_masks_exactly_the_prompt():
    tokenizer = build_tokenizer()
    config = DataConfig(format="instruction")
    [(ids, labels)] = data.encode(tokenizer, [example("the patient received", "aspirin and recovered .")], config)
    prompt = tokenizer("the patient received\n", add_special_tokens=False)["input_ids"]
    answer = tokenizer("aspirin and recovered .", add_special_tokens=False)["input_ids"]
    assert ids.tolist() == prompt + answer + [tokenizer.eos_token_id]
    assert labels.tolist() == [-100] * len(prompt) + answer + [tokenizer.eos_token_id]
    [(_, all_labels)] = data.encode(tokenizer, [example("the patient received", "aspirin .")],
                                    dataclasses.replace(config, train_on_prompt=True))  # fmt: skip
    assert (all_labels != -100).all()


def test_chat_template_loss_covers_every_assistant_turn_and_nothing_else():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    messages = [{"role": "user", "content": "the patient"}, {"role": "assistant", "content": "received aspirin ."},
                {"role": "user", "content": "the child"}, {"role": "assistant", "content": "was given insulin ."}]  # fmt: skip
    [(ids, labels)] = data.encode(tokenizer, [json.dumps(messages)], DataConfig(format="chat"))
    words = tokenizer.convert_ids_to_tokens(ids.tolist())
    trained = [w for w, lab in zip(words, labels.tolist(), strict=True) if lab != -100]
    assert trained == ["received", "aspirin", ".", "<eos>", "was", "given", "insulin", ".", "<eos>"]
    assert ids.tolist() == tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]
    masked = [w for w, lab in zip(words, labels.tolist(), strict=True) if lab == -100]
    assert "the" in masked and "patient" in masked and "child" in masked  # user turns carry no loss


def test_packed_rows_keep_labels_aligned_with_tokens():
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 40, size=rng.integers(5, 30)) for _ in range(50)]
    labels = [np.where(np.arange(len(d)) < len(d) // 2, -100, d) for d in docs]
    stream = data.PackedRows(docs, seq_len=16, seed=3, labels=labels)
    for start in (0, 7, stream.rows_per_epoch - 1, stream.rows_per_epoch + 2):  # crossing an epoch too
        ids, lab = stream.rows(start, 2), stream.rows(start, 2, part="labels")
        assert ((lab == -100) | (lab == ids)).all() and (lab == -100).any()
    assert 0.4 < stream.loss_share() < 0.6
    assert data.PackedRows(docs, 16, 3).loss_share() == 1.0


@pytest.mark.parametrize(
    "config, record, message",
    [
        (DataConfig(format="chat"), {"messages": [{"role": "user", "content": "hi"}]}, "line 1: a chat example without an assistant turn"),
        (DataConfig(format="chat"), {"messages": "hi"}, "line 1: field 'messages' must be a list of \\{role, content\\}"),
        (DataConfig(format="instruction"), {"prompt": "hi"}, "line 1: no string field 'response'"),
        (DataConfig(format="instruction", prompt_template="{title}"), {"response": "x"}, "line 1: no field 'title' for data.prompt_template"),
    ],
)  # fmt: skip
def test_bad_examples_name_the_line_and_field(config, record, message, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(PeftkitError, match=message):
        data.read_documents(path, config=config)


def test_sentence_shuffle_is_refused_for_instruction_data():
    with pytest.raises(PeftkitError, match="sentence_shuffle applies to format text only"):
        DataConfig(format="instruction", augment=["sentence_shuffle"])


def test_training_on_instruction_data_puts_loss_on_responses_only(tiny_config, tmp_path):
    from tests.conftest import make_doc

    rng = __import__("random").Random(0)
    folder = tmp_path / "sft"
    folder.mkdir()
    for split, n in (("train", 150), ("validation", 20), ("test", 20)):
        rows = [{"prompt": " ".join(make_doc(rng).split()[:3]), "response": make_doc(rng)} for _ in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = dataclasses.replace(
        tiny_config, data=dataclasses.replace(tiny_config.data, source=str(folder), format="instruction"),
        train=dataclasses.replace(tiny_config.train, max_steps=6),
    )  # fmt: skip
    logs = []
    trainer = Trainer(config, log=logs.append)
    report = trainer.fit()
    share = next(line for line in logs if "carry loss" in line)
    assert "instruction:" in share and "responses only" in share
    stream, val_sets = trainer.data.stream, trainer.data.val_sets
    assert 0.5 < stream.loss_share() < 0.97
    _, val_labels = val_sets["domain"]
    assert (val_labels == -100).float().mean() > 0.03  # prompts are not scored in evaluation either
    assert report["tuned"]["domain_ppl"] < report["base"]["domain_ppl"]


def test_positions_restart_at_every_document_and_keep_documents_apart(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    docs = [np.array([5, 6, 7, 2]), np.array([8, 9, 2]), np.array([10, 11, 12, 13, 2])]
    stream = data.PackedRows(docs, seq_len=6, seed=0)
    ids, positions = stream.rows(0, 2), stream.rows(0, 2, part="positions")
    flat_ids, flat_pos = ids.flatten().tolist(), positions.flatten().tolist()
    starts = [i for i, p in enumerate(flat_pos) if p == 0]
    assert len(starts) == 3 and all(flat_ids[i - 1] == 2 for i in starts[1:])  # a new document follows each EOS
    # with restarting positions, a token's logits do not depend on the document packed before it
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    second = torch.tensor([[8, 9, 10, 11]])
    with torch.no_grad():
        alone = model(second).logits
        packed = model(
            torch.tensor([[5, 6, 2, 8, 9, 10, 11]]), position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3]]), use_cache=False
        ).logits  # with a cache, transformers does not look for packed documents
        leaky = model(torch.tensor([[5, 6, 2, 8, 9, 10, 11]])).logits
    assert torch.allclose(packed[:, 3:], alone, atol=1e-5) and not torch.allclose(leaky[:, 3:], alone, atol=1e-3)
