"""Preference pairs from multiple-choice questions, for a DPO stage without a shipped preference data set.

Each medical MMLU question of the training half (`qa.question_half`) gives one pair per wrong option: the
prompt is the QA evaluation's own ("Question: ...\\nAnswer:"), chosen the correct option, rejected the wrong
one. The test half never enters a pair, so `eval.qa_half=test` measures what the pairs taught on questions
the run never saw (tests/test_alignment.py checks that no question text is in both).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from peftkit import assets
from peftkit.evaluation import qa


def medical_pairs(qa_source: str, out: Path, max_prompt_chars: int = 1500, log=print) -> Path:
    """Write the pairs (JSONL) to `out` atomically, and return it; questions with a prompt longer than
    `max_prompt_chars` are left out (they would not fit the recipe's data.seq_len)."""
    path = assets.resolve(qa_source, log=log)
    path = path / "mmlu.jsonl" if path.is_dir() else path
    questions = qa.load_questions(path, medical=True, limit=10**9, seed=0, half="train")
    rows = []
    for q in questions:
        correct = q["choices"][q["answer"]].strip()
        if len(qa.prompt(q)) > max_prompt_chars or not correct:
            continue
        for wrong in {c.strip() for i, c in enumerate(q["choices"]) if i != q["answer"]} - {"", correct}:
            rows.append({"prompt": qa.prompt(q), "chosen": " " + correct, "rejected": " " + wrong})
    rows.sort(key=lambda r: (r["prompt"], r["rejected"]))  # the same file whatever the set order
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f"{out.name}.{os.getpid()}.partial")
    partial.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    partial.replace(out)  # several processes may write it at once: each writes the same bytes
    log(f"{out}: {len(rows):,} pairs from {len(questions):,} medical questions of the training half")
    return out
