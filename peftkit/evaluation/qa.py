"""Multiple-choice QA scored by log-likelihood of each option (MMLU style), base vs tuned.

Each option is scored as the mean log-probability of its tokens after the prompt
"Question: ...\\nAnswer:"; the highest-scoring option is the model's answer. Scoring the option
text rather than a letter is the reading that small models can actually do.
"""

from __future__ import annotations

import json
import math
import random
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from peftkit.methods import is_prompt_learning, sequence_logits

MEDICAL_SUBJECTS = (
    "anatomy",
    "clinical knowledge",
    "college biology",
    "college medicine",
    "medical genetics",
    "professional medicine",
)


def load_questions(path: Path, medical: bool, limit: int, seed: int, skip: int = 0) -> list[dict]:
    """A seeded sample of `limit` MMLU questions from the medical subjects, or from all the others.

    `skip` starts further down the same shuffled order, so examples for k-shot prompts drawn with
    skip=limit never include a test question.
    """
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]
    rows = [r for r in rows if (r["subject"] in MEDICAL_SUBJECTS) == medical]
    random.Random(seed).shuffle(rows)
    return rows[skip : skip + limit]


def select(path: Path, medical: bool, count: int | str, kshot: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(test questions, k-shot examples) of one group, never sharing a question.

    `count` questions and the next `kshot` of the seeded order as examples; with count="all", every question
    of the group but the first `kshot`, which are the examples.
    """
    if count != "all":
        return load_questions(path, medical, count, seed), load_questions(path, medical, kshot, seed, skip=count)
    rows = load_questions(path, medical, 10**9, seed)
    return rows[kshot:], rows[:kshot]


def prompt(question: dict) -> str:
    return f"Question: {question['question'].strip()}\nAnswer:"


def shots_text(examples: list[dict]) -> str:
    """Solved examples in the scoring format, placed before the question for the k-shot baseline."""
    return "".join(f"{prompt(q)} {q['choices'][q['answer']].strip()}\n\n" for q in examples)


@torch.no_grad()
def choose(
    model, tokenizer, questions: list[dict], batch_size: int = 8, accelerator=None, shots: str = ""
) -> list[int]:
    """Index of the option each question's highest mean log-probability picks (`shots`: solved examples first)."""
    pairs = []  # (question index, option index, prompt ids, option ids)
    for qi, q in enumerate(questions):
        context = tokenizer(shots + prompt(q), add_special_tokens=False)["input_ids"]
        for oi, option in enumerate(q["choices"]):
            pairs.append((qi, oi, context, tokenizer(" " + option.strip(), add_special_tokens=False)["input_ids"]))
    scores = torch.full((len(questions), max(len(q["choices"]) for q in questions)), -math.inf)
    device = next(model.parameters()).device
    order = sorted(range(len(pairs)), key=lambda k: len(pairs[k][2]) + len(pairs[k][3]))  # less padding
    was_training = model.training
    model.eval()
    # Run the decoder once per batch and the 49k-wide output layer only where an option token is predicted.
    # Prompt/prefix tuning live in the peft model's forward, so those go through it whole.
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    whole = is_prompt_learning(model)
    with accelerator.autocast() if accelerator else nullcontext():
        for start in range(0, len(order), batch_size):
            chunk = [pairs[k] for k in order[start : start + batch_size]]
            length = max(len(c) + len(o) for _, _, c, o in chunk)
            ids = torch.full((len(chunk), length), tokenizer.pad_token_id)
            for row, (_, _, c, o) in enumerate(chunk):  # right padding: causal attention never sees it
                ids[row, : len(c) + len(o)] = torch.tensor(c + o)
            if whole:
                hidden = sequence_logits(model, ids.to(device))  # already logits
            else:
                hidden = decoder(input_ids=ids.to(device)).last_hidden_state
            for row, (qi, oi, c, o) in enumerate(chunk):
                # option token t is predicted by the hidden state one position before it
                at = torch.arange(len(c) - 1, len(c) + len(o) - 1, device=device)
                states = hidden[row, at]
                logprobs = F.log_softmax((states if whole else head(states)).float(), dim=-1)
                scores[qi, oi] = logprobs[torch.arange(len(o)), torch.tensor(o, device=device)].mean().item()
    model.train(was_training)
    return scores.argmax(dim=1).tolist()


def wilson(correct: int, n: int, z: float = 1.96) -> list[float]:
    if n == 0:
        return [0.0, 1.0]
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(centre - half, 4), round(centre + half, 4)]


def paired_change(after: list[bool], before: list[bool]) -> tuple[float, list[float], float]:
    """Mean change in accuracy on the same questions, its 95% interval (normal approximation of the paired
    differences) and its standard error."""
    n = len(after)
    diffs = [float(a) - float(b) for a, b in zip(after, before, strict=True)]
    mean = sum(diffs) / n
    error = math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(n - 1, 1) / n)
    return mean, [round(mean - 1.96 * error, 4), round(mean + 1.96 * error, 4)], error


DETECTABLE = 1.96 + 0.8416  # z for 5% two-sided plus z for 80% power


def compare(
    peft_model,
    tokenizer,
    groups: dict[str, list[dict]],
    batch_size: int = 8,
    accelerator=None,
    shots: dict[str, list[dict]] | None = None,
) -> dict:
    """Accuracy of base (adapter disabled) and tuned model per group, with 95% intervals, and the
    paired change in accuracy with its 95% interval (same questions for both). With `shots` (solved
    examples per group, never test questions), also the base model's k-shot accuracy: the
    no-fine-tuning alternative."""
    result = {}
    for name, questions in groups.items():
        if not questions:
            continue
        answers = torch.tensor([q["answer"] for q in questions])
        examples = (shots or {}).get(name) or []
        with peft_model.disable_adapter():
            base = (torch.tensor(choose(peft_model, tokenizer, questions, batch_size, accelerator)) == answers).tolist()
            if examples:
                picked = choose(peft_model, tokenizer, questions, batch_size, accelerator, shots_text(examples))
                kshot = (torch.tensor(picked) == answers).tolist()
        tuned = (torch.tensor(choose(peft_model, tokenizer, questions, batch_size, accelerator)) == answers).tolist()
        n = len(questions)
        change, interval, error = paired_change(tuned, base)
        result[name] = {
            "questions": n,
            "base_accuracy": sum(base) / n,
            "base_ci95": wilson(sum(base), n),
            "tuned_accuracy": sum(tuned) / n,
            "tuned_ci95": wilson(sum(tuned), n),
            "change": change,
            "change_ci95": interval,
        }
        if examples:
            vs_kshot, vs_kshot_interval, _ = paired_change(tuned, kshot)
            result[name].update(
                kshot=len(examples),
                kshot_base_accuracy=sum(kshot) / n,
                kshot_base_ci95=wilson(sum(kshot), n),
                tuned_vs_kshot=vs_kshot,
                tuned_vs_kshot_ci95=vs_kshot_interval,
            )
        result[name]["chance"] = round(sum(1 / len(q["choices"]) for q in questions) / n, 4)
        result[name]["mde"] = round(DETECTABLE * error, 4)
    return result
