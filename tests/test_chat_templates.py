"""Chat masking across the template styles of the families people fine-tune: ChatML (Qwen), Llama 3's header
tokens, Gemma's turns, Mistral's [INST], Phi-3's tags. Each template is written here close to the family's own
and set on a tokenizer built here; the expected labels are computed from the rendered text (the assistant
contents found by character offsets), not by the code under test."""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import json
import re
import string
from dataclasses import dataclass

import numpy as np
import pytest

from peftkit import data
from peftkit.config import DataConfig
from peftkit.data.packing import IGNORE_INDEX
from peftkit.errors import PeftkitError

QWEN = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
GEMMA2 = (  # rejects a system message
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
GEMMA3 = (  # folds a system message into the first user turn
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\\n'}}{%- endif -%}"
)
MISTRAL = (  # v0.3: a system message goes into the last user turn only, so a prefix renders differently
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate user/assistant') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] | trim + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported') }}{%- endif %}"
    "{%- endfor %}"
)
PHI3 = (  # ends a conversation with EOS unless it asks for a reply
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI3_ORIGINAL = (  # the first Phi-3 template: BOS, the generation prompt inside every user turn, no system
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') %}{{'<|user|>' + '\\n' + message['content'] + '<|end|>' + '\\n' + "
    "'<|assistant|>' + '\\n'}}"
    "{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\\n'}}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class Style:
    template: str
    bos: str | None
    eos: str
    close: str  # what the template writes right after an assistant's content: the token that ends the turn
    system: str  # what the template does with a system message: "turn" (its own), "folded", "dropped", "rejected"
    trims: bool = True  # the template strips whitespace around the content
    sentencepiece: bool = True  # Metaspace ("▁") pieces as Gemma, Mistral and Phi-3 have; else byte-level BPE


STYLES = {
    "chatml-qwen": Style(QWEN, None, "<|im_end|>", "<|im_end|>", "turn", trims=False, sentencepiece=False),
    "llama3": Style(LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", "turn", sentencepiece=False),
    # Gemma's EOS is not its end-of-turn marker: an EOS follows the last <end_of_turn>, inside the loss
    "gemma2": Style(GEMMA2, "<bos>", "<eos>", "<end_of_turn>", "rejected"),
    "gemma3": Style(GEMMA3, "<bos>", "<eos>", "<end_of_turn>", "folded"),
    # a system message goes into the last user turn only, which a conversation ending with a reply lacks
    "mistral": Style(MISTRAL, "<s>", "</s>", "</s>", "dropped"),
    "phi3": Style(PHI3, "<s>", "<|endoftext|>", "<|end|>", "turn", trims=False),
    "phi3-original": Style(PHI3_ORIGINAL, "<s>", "<|endoftext|>", "<|end|>", "dropped", trims=False),
}

SYSTEM = "you answer with the drug and the outcome ."
TURNS = [
    ("which drug did the patient receive ?", "the patient received aspirin and recovered ."),
    ("and what about the child ?", "the child was given insulin without side effects ."),
]
CONVERSATIONS = {
    "one turn": [TURNS[0]],
    "two turns": TURNS,
    # whitespace around the content, which some templates strip
    "padded": [(" which drug did the patient receive ?\n", "  the patient received aspirin and recovered .\n\n")],
}


def messages_of(turns, system: bool = False) -> list[dict]:
    out = [{"role": "system", "content": SYSTEM}] if system else []
    for prompt, response in turns:
        out += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return out


@functools.cache
def build_tokenizer(name: str):
    """A tokenizer trained here on the test's words (and every printable character, so any text encodes), with
    the family's special tokens (its template's markers, BOS, EOS) as added tokens."""
    from tokenizers import ByteLevelBPETokenizer, SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    style = STYLES[name]
    words = [SYSTEM, *(text for turn in TURNS for text in turn), "system user assistant model", string.printable]
    trainer = SentencePieceBPETokenizer(unk_token="<unk>") if style.sentencepiece else ByteLevelBPETokenizer()
    markers = re.findall(r"<\|\w+\|>|<\w+>|\[/?INST\]", style.template)
    specials = list(dict.fromkeys(["<unk>", *filter(None, [style.bos, style.eos]), *markers]))
    trainer.train_from_iterator(words * 4, vocab_size=400, special_tokens=specials, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=trainer._tokenizer,
        bos_token=style.bos,
        eos_token=style.eos,
        unk_token="<unk>",
        pad_token="<unk>",
    )
    tokenizer.chat_template = style.template
    return tokenizer


def expected_encoding(tokenizer, style: Style, messages: list[dict]) -> tuple[list[int], list[int]]:
    """The ids the template renders and their labels: the tokens overlapping an assistant content or the token
    that closes its turn carry loss, every other token is -100; the example ends with EOS inside the loss (the
    template's own EOS when only whitespace precedes it, else one inserted after the last closing token)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    spans, cursor = [], 0
    for message in messages:
        if message["role"] == "assistant":
            shown = message["content"].strip() if style.trims else message["content"]
            start = text.index(shown, cursor)  # no assistant content appears elsewhere in the conversation
            end = start + len(shown)
            assert text.startswith(style.close, end), (text, shown)
            spans.append((start, end + len(style.close)))
            cursor = end
    trained = [any(s < b and e > a for a, b in spans) for s, e in offsets]
    eos = tokenizer.eos_token_id
    if style.close != style.eos:
        rest = text[spans[-1][1] :]
        if rest.strip() == style.eos:  # the template ends the conversation with EOS after some whitespace
            trained = [t or s >= spans[-1][1] for t, (s, _) in zip(trained, offsets, strict=True)]
        else:
            after = max(i for i, t in enumerate(trained) if t) + 1
            ids.insert(after, eos)
            trained.insert(after, True)
    return ids, [i if t else IGNORE_INDEX for i, t in zip(ids, trained, strict=True)]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", STYLES)
def test_loss_covers_the_assistant_turns_and_nothing_else(name, conversation):
    tokenizer, style = build_tokenizer(name), STYLES[name]
    messages = messages_of(CONVERSATIONS[conversation])
    [(ids, labels)] = data.encode(tokenizer, [json.dumps(messages)], DataConfig(format="chat"))
    expected_ids, expected_labels = expected_encoding(tokenizer, style, messages)
    assert ids.tolist() == expected_ids
    assert labels.tolist() == expected_labels
    # the tokens the template renders, and an EOS where it does not write one after the last assistant turn
    rendered, eos = list(tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]), tokenizer.eos_token_id
    assert [i for i in ids.tolist() if i != eos] == [i for i in rendered if i != eos]
    assert ids.tolist().count(eos) == rendered.count(eos) + (style.close != style.eos and name != "phi3")
    trained = tokenizer.decode([i for i, lab in zip(ids.tolist(), labels.tolist(), strict=True) if lab != -100])
    for prompt, response in CONVERSATIONS[conversation]:
        assert response.strip() in trained and prompt.strip() not in trained
    assert style.close in trained and "assistant" not in trained and "model" not in trained  # headers carry no loss


@pytest.mark.parametrize("name", [n for n, s in STYLES.items() if s.system != "rejected"])
def test_a_system_message_carries_no_loss(name):
    tokenizer, style = build_tokenizer(name), STYLES[name]
    messages = messages_of(TURNS, system=True)
    [(ids, labels)] = data.encode(tokenizer, [json.dumps(messages)], DataConfig(format="chat"))
    assert (ids.tolist(), labels.tolist()) == expected_encoding(tokenizer, style, messages)
    text = tokenizer.decode(ids.tolist())
    assert (SYSTEM in text) == (style.system in ("turn", "folded"))
    trained = tokenizer.decode([i for i, lab in zip(ids.tolist(), labels.tolist(), strict=True) if lab != -100])
    assert SYSTEM not in trained and all(response in trained for _, response in TURNS)


def test_a_template_that_rejects_the_conversation_says_so():
    tokenizer = build_tokenizer("gemma2")
    with pytest.raises(PeftkitError, match="data.format=chat: .*chat template.*System role not supported"):
        data.encode(tokenizer, [json.dumps(messages_of(TURNS, system=True))], DataConfig(format="chat"))


def test_a_template_that_lays_a_reply_out_by_its_content_is_refused_not_mislabelled():
    tokenizer = copy.deepcopy(build_tokenizer("chatml-qwen"))
    # a long reply ends with another token: the probe string cannot stand for the content
    closing = "('<|im_end|>' if message.content | length < 40 else '<|endoftext|>')"
    tokenizer.chat_template = QWEN.replace("message.content + '<|im_end|>'", f"message.content + {closing}")
    with pytest.raises(PeftkitError, match="message 2 \\(assistant\\) differently depending on its content"):
        data.encode(tokenizer, [json.dumps(messages_of(TURNS[:1]))], DataConfig(format="chat"))


@pytest.mark.parametrize("name", STYLES)
def test_train_on_prompt_labels_every_token(name):
    tokenizer, style = build_tokenizer(name), STYLES[name]
    messages = messages_of(TURNS, system=style.system != "rejected")
    config = DataConfig(format="chat", train_on_prompt=True)
    [(ids, labels)] = data.encode(tokenizer, [json.dumps(messages)], config)
    assert ids.tolist() == expected_encoding(tokenizer, style, messages)[0] and labels.tolist() == ids.tolist()


@pytest.mark.parametrize("name", STYLES)
def test_packed_chat_examples_keep_their_labels(name):
    tokenizer, style = build_tokenizer(name), STYLES[name]
    rng = np.random.default_rng(0)
    conversations = []
    for i in range(12):  # distinct conversations of one or two turns
        turns = [(f"{prompt} {i}", f"{response} {'.' * (i + 1)}") for prompt, response in TURNS]
        conversations.append(messages_of(turns[: rng.integers(1, 3)], system=style.system != "rejected"))
    pairs = data.encode(tokenizer, [json.dumps(m) for m in conversations], DataConfig(format="chat"))
    assert all(
        p[1].tolist() == expected_encoding(tokenizer, style, m)[1] for p, m in zip(pairs, conversations, strict=True)
    )
    stream = data.PackedRows([p[0] for p in pairs], seq_len=24, seed=1, labels=[p[1] for p in pairs])
    ids, labels, positions = (stream.epoch_rows(0, part).reshape(-1) for part in ("ids", "labels", "positions"))
    starts = [*np.flatnonzero(positions == 0).tolist(), len(ids)]
    by_ids = {tuple(p[0].tolist()): p[1].tolist() for p in pairs}
    for begin, end in itertools.pairwise(starts):  # every document in the epoch, split where positions restart
        doc = tuple(ids[begin:end].tolist())
        whole = next(key for key in by_ids if key[: len(doc)] == doc)  # the last one may be cut by the epoch's end
        assert labels[begin:end].tolist() == by_ids[whole][: len(doc)]
    assert 0 < stream.loss_share() < 1


def test_the_token_cache_key_follows_what_decides_the_labels():
    tokenizer, chat = build_tokenizer("chatml-qwen"), DataConfig(format="chat")
    key = data.encoding_key(tokenizer, chat).hexdigest()
    assert key == data.encoding_key(copy.deepcopy(tokenizer), chat).hexdigest()
    assert key != data.encoding_key(tokenizer, dataclasses.replace(chat, train_on_prompt=True)).hexdigest()
    assert key != data.encoding_key(tokenizer, DataConfig(format="instruction")).hexdigest()
    other_template = copy.deepcopy(tokenizer)
    other_template.chat_template = QWEN.replace("helpful", "careful")
    assert key != data.encoding_key(other_template, chat).hexdigest()
    other_bos = copy.deepcopy(tokenizer)  # templates write bos_token and eos_token as text
    other_bos.bos_token = "<|endoftext|>"
    assert key != data.encoding_key(other_bos, chat).hexdigest()
