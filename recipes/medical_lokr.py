"""LoKr: Kronecker-product adapters (the LyCORIS family; LoHa is `--method.name=loha`), on the
medical recipe's data and budget.

Run:
    python recipes/medical_lokr.py --train.max_steps=4 --output_dir=runs/try_lokr
    peftkit train recipes/medical_lokr.py
    accelerate launch recipes/medical_lokr.py

Everything else (model, data, evaluation, 40 steps of 8 x 512 tokens) is recipes/medical_lora.py's,
so the reports compare directly; `scripts/compare_methods` runs the methods side by side on a
smaller budget (its table is in the README, with time and memory on a 2-core CPU).
"""

import dataclasses
from pathlib import Path

from peftkit import Config, MethodConfig
from peftkit.cli import load_target


def config() -> Config:
    base = load_target(str(Path(__file__).with_name("medical_lora.py")))
    return dataclasses.replace(
        base,
        method=MethodConfig(name="lokr", r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        train=dataclasses.replace(base.train, lr=1e-3),
        output_dir="runs/medical_lokr",
    )


def main(argv=None) -> None:
    from peftkit.cli import run_recipe

    run_recipe(config(), argv, prog="recipes/medical_lokr.py")


if __name__ == "__main__":
    main()
