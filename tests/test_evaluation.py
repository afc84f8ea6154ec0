import random
from types import SimpleNamespace

import pytest
import torch

from peftkit.evaluation.leakage import find_leaks
from peftkit.evaluation.qa import choose, wilson
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


class FavouriteWordModel(torch.nn.Module):
    """A stand-in LM that always gives one token a high probability, whatever the context."""

    def __init__(self, vocab: int, favourite: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.logits = torch.zeros(vocab)
        self.logits[favourite] = 5.0

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1).clone())


def test_qa_scorer_picks_the_option_the_model_finds_likeliest():
    tokenizer = build_tokenizer()
    aspirin = tokenizer.convert_tokens_to_ids("aspirin")
    model = FavouriteWordModel(len(tokenizer), aspirin)
    questions = [
        {"question": "the patient received", "choices": ["insulin", "aspirin", "heparin", "statins"], "answer": 1},
        {
            "question": "a woman was given",
            "choices": ["aspirin aspirin", "insulin .", "the river", "music"],
            "answer": 0,
        },
        {"question": "the child", "choices": ["heparin", "the city", "a king", "aspirin and recovered"], "answer": 3},
    ]
    assert choose(model, tokenizer, questions, batch_size=2) == [1, 0, 3]


def test_wilson_interval():
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson(0, 10)[0] == pytest.approx(0.0, abs=1e-9)
