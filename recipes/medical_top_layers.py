"""Partial fine-tuning without adapters: the top 2 of 30 transformer blocks train in full, the
rest stay frozen, on the medical recipe's data and budget. Saved as a standard PEFT folder
(the trained blocks as `modules_to_save`), so it merges and reloads like an adapter.

Run:
    python recipes/medical_top_layers.py --train.max_steps=4 --output_dir=runs/try_top_layers
    peftkit train recipes/medical_top_layers.py
    accelerate launch recipes/medical_top_layers.py

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
    return dataclasses.replace(preset("top_layers").apply(medical_lora), output_dir="runs/medical_top_layers")


def main(argv=None) -> None:
    from peftkit.cli import run_recipe

    run_recipe(config(), argv, prog="recipes/medical_top_layers.py")


if __name__ == "__main__":
    main()
