"""DPO on medical multiple-choice answers after domain tuning: does preference tuning teach a 135M model to pick
the right answer on questions it never saw?

Run:
    python recipes/medical_dpo.py --model.adapter=runs/medical_demo --output_dir=runs/medical_dpo
    accelerate launch recipes/medical_dpo.py --train.max_steps=4 --output_dir=runs/try_dpo
    python recipes/medical_dpo.py --model.adapter= --output_dir=runs/medical_dpo_from_base

The pairs come from the medical MMLU questions whose text hashes into the training half (question -> the
correct option over each wrong one: peftkit.alignment.mmlu); the QA evaluation at the end scores only the
other half (eval.qa_half=test), so no question is both trained on and tested. `model.adapter` names the
domain-adaptation run the stage starts from (`scripts/demo` leaves one in runs/medical_demo): that model is
the reference, the "base" of every comparison in the report, and what `peftkit merge` merges onto. Without it
(`--model.adapter=`) DPO starts from the plain base model.
"""

import sys
from pathlib import Path

from peftkit import Config, DataConfig, EvalConfig, MethodConfig, ModelConfig, TrainConfig
from peftkit.cli import run_recipe

PAIRS = Path("runs/medical_dpo_pairs/pairs.jsonl")  # written by main() from the MMLU asset


def config() -> Config:
    return Config(
        model=ModelConfig(name_or_path="asset:smollm2-135m-instruct", adapter="runs/medical_demo"),
        data=DataConfig(
            source=str(PAIRS),
            format="preference",
            general_source="asset:wiki-general",
            seq_len=256,
            validation_share=0.05,
            test_share=0.1,
            max_train_docs=600,
        ),
        method=MethodConfig(name="lora", r=16, alpha=32, target_modules=["all-linear"]),
        train=TrainConfig(objective="dpo", max_steps=40, time_budget="6m", batch_size=8, lr=1e-4, warmup_steps=4),
        eval=EvalConfig(
            every_steps=15,
            val_tokens=4096,
            test_tokens=8192,
            batch_size=8,
            patience=2,
            qa_questions=100,
            qa_half="test",
            max_general_ppl_increase=0.05,
            max_general_kl=0.25,
        ),
        output_dir="runs/medical_dpo",
    )


def main(argv=None) -> None:
    from peftkit.alignment.mmlu import medical_pairs
    from peftkit.cli import guarded

    argv = sys.argv[1:] if argv is None else argv
    if not any(a in ("-h", "--help") for a in argv):
        chosen = config().override(argv)
        # prompts of at most 700 characters (~180 tokens): prompt and answer fit data.seq_len
        guarded(lambda: medical_pairs(chosen.eval.qa_source, Path(chosen.data.source), max_prompt_chars=700))
    run_recipe(config(), argv)


if __name__ == "__main__":
    main()
