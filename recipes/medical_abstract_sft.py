"""Instruction tuning with prompt masking: SmolLM2-135M-Instruct learns to write a PubMed abstract
for a given title. Each example is a chat turn (the tokenizer's chat template): the user asks for
the abstract of a paper with that title, the assistant answers with the abstract. The loss covers
the answer and its end-of-turn token only; the prompt carries none (`peftkit preview` shows the
masked part), so the guard's held-out perplexity is the perplexity of abstracts given titles.

Run:
    peftkit preview recipes/medical_abstract_sft.py
    python recipes/medical_abstract_sft.py --train.max_steps=4 --output_dir=runs/try_sft
    accelerate launch recipes/medical_abstract_sft.py

Same model, data split and guard as recipes/medical_lora.py (MMLU stays an evaluation set only).
A 10-minute training budget (the medical recipe's) on 2 CPU cores, then the guard; afterwards try
`peftkit generate runs/medical_abstract_sft --prompt "Write the abstract of a medical research paper titled: ..."`.
"""

import dataclasses
from pathlib import Path

from peftkit import Config
from peftkit.cli import load_target

PROMPT = "Write the abstract of a medical research paper titled: {title}"


def config() -> Config:
    base = load_target(str(Path(__file__).with_name("medical_lora.py")))
    return dataclasses.replace(
        base,
        data=dataclasses.replace(base.data, format="instruction", prompt_template=PROMPT, response_field="abstract"),
        output_dir="runs/medical_abstract_sft",
    )


def main(argv=None) -> None:
    from peftkit.cli import run_recipe

    run_recipe(config(), argv, prog="recipes/medical_abstract_sft.py")


if __name__ == "__main__":
    main()
