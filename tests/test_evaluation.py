import random

import pytest
import torch

from peftkit.dedup import find_leaks
from peftkit.evaluation.qa import choose, option_scores, prompt, shots_text, wilson
from tests.conftest import build_tokenizer


def test_find_leaks_counts_exact_and_near_duplicates_only():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(500)]
    held = [" ".join(rng.choices(words, k=60)) for _ in range(20)]
    near = held[1].split()
    near[30] = "changed"  # one word in sixty: Jaccard of 5-gram shingles ~0.84
    train = [" ".join(rng.choices(words, k=60)) for _ in range(50)]
    train += [held[0].upper() + "!", " ".join(near), " ".join(held[2].split()[:20])]  # exact, near, fragment
    result = find_leaks(train, held)
    assert result["exact"] == 1 and result["near"] == 1 and result["held_out_docs"] == 20
    assert {e["held_out"] for e in result["examples"]} == {0, 1}


def test_wilson_interval():
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson(0, 10)[0] == pytest.approx(0.0, abs=1e-9)


def test_qa_scorer_matches_unpadded_scoring_on_a_real_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rng = random.Random(0)
    words = ["aspirin", "the river", "a king ruled", "insulin and recovered .", "music", "the city has a large park"]
    questions = [{"question": " ".join(rng.choices(["the patient", "received", "a woman"], k=rng.randint(1, 6))),
                  "choices": rng.sample(words, 4), "answer": 0} for _ in range(6)]  # fmt: skip
    expected = []
    with torch.no_grad():
        for q in questions:
            context = tokenizer(prompt(q), add_special_tokens=False)["input_ids"]
            scores = []
            for option in q["choices"]:
                ids = tokenizer(" " + option, add_special_tokens=False)["input_ids"]
                logprobs = torch.log_softmax(model(input_ids=torch.tensor([context + ids])).logits[0], dim=-1)
                scores.append(sum(logprobs[len(context) - 1 + t, ids[t]].item() for t in range(len(ids))) / len(ids))
            expected.append(max(range(4), key=scores.__getitem__))
    assert len(set(expected)) > 1  # a scorer stuck on one option would not pass by luck
    assert choose(model, tokenizer, questions, batch_size=3) == expected


def reference_scores(model, tokenizer, questions, shots: str = "") -> torch.Tensor:
    """The computation the scorer replaces: prompt + option as one unpadded sequence per option, whole model."""
    scores = torch.full((len(questions), 4), -float("inf"))
    with torch.no_grad():
        for qi, q in enumerate(questions):
            context = tokenizer(shots + prompt(q), add_special_tokens=False)["input_ids"]
            for oi, option in enumerate(q["choices"]):
                ids = tokenizer(" " + option, add_special_tokens=False)["input_ids"]
                logits = model(input_ids=torch.tensor([context + ids])).logits[0].float()
                logprobs = torch.log_softmax(logits[len(context) - 1 : -1], dim=-1)
                scores[qi, oi] = logprobs[torch.arange(len(ids)), torch.tensor(ids)].mean()
    return scores


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_cached_qa_scores_equal_whole_sequence_scores(family):
    """Prompts run once into a KV cache, options continued from it (rotary and learned positions, grouped-query
    and full attention): every option's score and every pick as if each option were run with its prompt."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  initializer_range=0.3, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    rng = random.Random(1)
    # options of 1 to 6 tokens, prompts of different lengths in one batch, so padding is on both passes
    words = ["aspirin", "the river", "a king ruled", "insulin and recovered .", "music", "the city has a large park"]
    questions = [{"question": " ".join(rng.choices(["the patient", "received", "a woman"], k=rng.randint(1, 9))),
                  "choices": rng.sample(words, 4), "answer": 0} for _ in range(7)]  # fmt: skip
    for shots in ("", shots_text(questions[:2])):  # 0-shot and a long shared prefix
        expected = reference_scores(model, tokenizer, questions, shots)
        for batch_size in (1, 3):
            scores = option_scores(model, tokenizer, questions, batch_size=batch_size, shots=shots)
            assert torch.allclose(scores, expected, atol=1e-5, rtol=0), (family, shots != "", batch_size)
            assert scores.argmax(dim=1).tolist() == expected.argmax(dim=1).tolist()
        assert len(set(expected.argmax(dim=1).tolist())) > 1  # the picks are not all one option by luck
