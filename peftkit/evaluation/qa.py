"""Multiple-choice QA scored by log-likelihood of each option (MMLU style), base vs tuned.

Each option is scored as the mean log-probability of its tokens after the prompt
"Question: ...\\nAnswer:"; the highest-scoring option is the model's answer. Scoring the option
text rather than a letter is the reading that small models can actually do.
"""

from __future__ import annotations

import hashlib
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


def question_half(question: dict) -> str:
    """'train' or 'test': the half a question's text hashes into (eval.qa_half; recipes/medical_dpo.py builds
    its preference pairs from the 'train' half only)."""
    digest = hashlib.sha256(("question:" + question["question"].strip()).encode("utf-8")).digest()
    return "test" if digest[0] < 128 else "train"


def load_questions(path: Path, medical: bool, limit: int, seed: int, skip: int = 0, half: str = "all") -> list[dict]:
    """A seeded sample of `limit` MMLU questions from the medical subjects, or from all the others
    (`half`: only those of that `question_half`).

    `skip` starts further down the same shuffled order, so examples for k-shot prompts drawn with
    skip=limit never include a test question.
    """
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]
    rows = [r for r in rows if (r["subject"] in MEDICAL_SUBJECTS) == medical]
    rows = [r for r in rows if half == "all" or question_half(r) == half]
    random.Random(seed).shuffle(rows)
    return rows[skip : skip + limit]


def select(
    path: Path, medical: bool, count: int | str, kshot: int, seed: int, half: str = "all"
) -> tuple[list[dict], list[dict]]:
    """(test questions, k-shot examples) of one group, never sharing a question.

    `count` questions and the next `kshot` of the seeded order as examples; with count="all", every question
    of the group but the first `kshot`, which are the examples.
    """
    if count != "all":
        return (load_questions(path, medical, count, seed, half=half),
                load_questions(path, medical, kshot, seed, skip=count, half=half))  # fmt: skip
    rows = load_questions(path, medical, 10**9, seed, half=half)
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
    return option_scores(model, tokenizer, questions, batch_size, accelerator, shots).argmax(dim=1).tolist()


@torch.no_grad()
def option_scores(
    model, tokenizer, questions: list[dict], batch_size: int = 8, accelerator=None, shots: str = ""
) -> torch.Tensor:
    """Mean log-probability of each option's tokens after its question's prompt: (questions, options), -inf
    where a question has fewer options. `batch_size` questions share a forward pass."""
    items = []  # (prompt ids, [option ids, ...]) per question
    for q in questions:
        context = tokenizer(shots + prompt(q), add_special_tokens=False)["input_ids"]
        items.append(
            (context, [tokenizer(" " + o.strip(), add_special_tokens=False)["input_ids"] for o in q["choices"]])
        )
    scores = torch.full((len(questions), max(len(q["choices"]) for q in questions)), -math.inf)
    was_training = model.training
    model.eval()
    with accelerator.autocast() if accelerator else nullcontext():
        if is_prompt_learning(model):  # prompt/prefix tuning live in the peft model's forward: run it whole
            _score_whole(model, tokenizer, items, scores, batch_size)
        else:
            _score_cached(model, tokenizer, items, scores, batch_size)
    model.train(was_training)
    return scores


def _score_cached(model, tokenizer, items, scores: torch.Tensor, batch_size: int) -> None:
    """Each prompt once, its options as continuations from its KV cache.

    The prompt (k-shot examples and question) is most of the tokens, and the old way ran it once per
    option. Per batch: the prompts, right-padded (causal attention never lets a real token see the padding
    after it), into a fresh cache; the cache repeated once per option; the options (all but their last
    token, which predicts nothing scored) right-padded, with an attention mask hiding the prompts' padding
    and explicit positions continuing each prompt. The output layer runs only where an option token is
    predicted.
    """
    from transformers import DynamicCache

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    device = next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda k: len(items[k][0]))  # similar lengths: less padding
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        lengths = torch.tensor([len(items[qi][0]) for qi in batch])
        ids = torch.full((len(batch), int(lengths.max())), tokenizer.pad_token_id)
        for row, qi in enumerate(batch):
            ids[row, : lengths[row]] = torch.tensor(items[qi][0])
        cache = DynamicCache(config=inner.config)
        prompt_states = decoder(input_ids=ids.to(device), past_key_values=cache, use_cache=True).last_hidden_state
        rows = [(row, oi, option) for row, qi in enumerate(batch) for oi, option in enumerate(items[qi][1])]
        width = max(len(option) for _, _, option in rows) - 1
        if width > 0:
            source = torch.tensor([row for row, _, _ in rows])
            cache.batch_select_indices(source.to(device))  # one copy of its prompt's cache per option
            option_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
            for r, (_, _, option) in enumerate(rows):
                option_ids[r, : len(option) - 1] = torch.tensor(option[:-1])
            seen = torch.arange(ids.shape[1]) < lengths[:, None]  # the prompts' real tokens
            mask = torch.cat([seen[source], torch.ones(len(rows), width, dtype=torch.bool)], dim=1).long()
            positions = lengths[source][:, None] + torch.arange(width)
            option_states = decoder(
                input_ids=option_ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state
        # option token t is predicted by the state one position before it: the prompt's last, then the option's
        states, targets = [], []
        for r, (row, _, option) in enumerate(rows):
            states.append(prompt_states[row, lengths[row] - 1][None])
            if len(option) > 1:
                states.append(option_states[r, : len(option) - 1])
            targets.extend(option)
        logprobs = F.log_softmax(head(torch.cat(states)).float(), dim=-1)
        picked = logprobs[torch.arange(len(targets)), torch.tensor(targets, device=device)].cpu()
        at = 0
        for row, oi, option in rows:
            scores[batch[row], oi] = picked[at : at + len(option)].mean()
            at += len(option)


def _score_whole(model, tokenizer, items, scores: torch.Tensor, batch_size: int) -> None:
    """Prompt and option as one sequence per option, through the peft model's forward (prompt learning)."""
    pairs = [(qi, oi, c, o) for qi, (c, options) in enumerate(items) for oi, o in enumerate(options)]
    device = next(model.parameters()).device
    order = sorted(range(len(pairs)), key=lambda k: len(pairs[k][2]) + len(pairs[k][3]))  # less padding
    for start in range(0, len(order), batch_size):
        chunk = [pairs[k] for k in order[start : start + batch_size]]
        length = max(len(c) + len(o) for _, _, c, o in chunk)
        ids = torch.full((len(chunk), length), tokenizer.pad_token_id)
        for row, (_, _, c, o) in enumerate(chunk):  # right padding: causal attention never sees it
            ids[row, : len(c) + len(o)] = torch.tensor(c + o)
        logits = sequence_logits(model, ids.to(device))
        for row, (qi, oi, c, o) in enumerate(chunk):
            at = torch.arange(len(c) - 1, len(c) + len(o) - 1, device=device)
            logprobs = F.log_softmax(logits[row, at].float(), dim=-1)
            scores[qi, oi] = logprobs[torch.arange(len(o)), torch.tensor(o, device=device)].mean().item()


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
    cache=None,
) -> dict:
    """Accuracy of base (adapter disabled) and tuned model per group, with 95% intervals, and the
    paired change in accuracy with its 95% interval (same questions for both). With `shots` (solved
    examples per group, never test questions), also the base model's k-shot accuracy: the
    no-fine-tuning alternative. `cache` (evaluation.base_cache): where the base model's picks may come from."""
    result = {}
    for name, questions in groups.items():
        if not questions:
            continue
        answers = torch.tensor([q["answer"] for q in questions])
        examples = (shots or {}).get(name) or []

        def base_picks(questions=questions, examples=examples) -> list:
            with peft_model.disable_adapter():
                picks = [choose(peft_model, tokenizer, questions, batch_size, accelerator)]
                if examples:
                    picks.append(
                        choose(peft_model, tokenizer, questions, batch_size, accelerator, shots_text(examples))
                    )
            return picks

        picks = cache.get("qa_base", (questions, examples), base_picks, collective=False) if cache else base_picks()
        base = (torch.tensor(picks[0]) == answers).tolist()
        if examples:
            kshot = (torch.tensor(picks[1]) == answers).tolist()
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
