"""QLoRA: LoRA on a 4-bit NormalFloat base (bitsandbytes, double quantization), on the medical
recipe's data and budget. `peftkit merge` merges into the dequantized 4-bit weights the adapter
was trained against (not the original ones) and checks the result against the quantized model.

Run:
    python recipes/medical_qlora.py --train.max_steps=4 --output_dir=runs/try_qlora
    peftkit train recipes/medical_qlora.py
    accelerate launch recipes/medical_qlora.py

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
    return dataclasses.replace(preset("qlora").apply(medical_lora), output_dir="runs/medical_qlora")


def main(argv=None) -> None:
    from peftkit.cli import run_recipe

    run_recipe(config(), argv, prog="recipes/medical_qlora.py")


if __name__ == "__main__":
    main()
