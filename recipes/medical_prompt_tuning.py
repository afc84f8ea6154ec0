"""Prompt tuning: 20 trained virtual-token embeddings in front of every input, nothing else changes
(prefix tuning is `--method.name=prefix_tuning`), on the medical recipe's data and budget. Not
mergeable: deploy the base model with the adapter (`peftkit generate RUN`).

Run:
    python recipes/medical_prompt_tuning.py --train.max_steps=4 --output_dir=runs/try_prompt_tuning
    peftkit train recipes/medical_prompt_tuning.py
    accelerate launch recipes/medical_prompt_tuning.py

Everything else (model, data, evaluation, the 10-minute budget) is recipes/medical_lora.py's,
so the reports compare directly; `scripts/compare_methods` runs the methods side by side on a
smaller budget (its table is in the README, with time and memory on a 2-core CPU).
"""

import dataclasses
from pathlib import Path

from peftkit import Config
from peftkit.cli import load_target
from peftkit.methods import preset


def config() -> Config:
    medical_lora = load_target(str(Path(__file__).with_name("medical_lora.py")))
    # the method and what it changes (learning rate, targets, ...) are its preset in peftkit/methods
    return dataclasses.replace(preset("prompt_tuning").apply(medical_lora), output_dir="runs/medical_prompt_tuning")


def main(argv=None) -> None:
    from peftkit.cli import run_recipe

    run_recipe(config(), argv, prog="recipes/medical_prompt_tuning.py")


if __name__ == "__main__":
    main()
