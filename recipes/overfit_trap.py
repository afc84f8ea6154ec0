"""The overfitting trap: a few dozen PubMed abstracts, many epochs, a high learning rate.

Run:
    python recipes/overfit_trap.py
    peftkit train recipes/overfit_trap.py --eval.patience=3 --output_dir=runs/trap

What to expect (about 3 minutes on 2 CPU cores): the training loss keeps falling while the
validation loss falls for a few evaluations and then rises. The guard stops the run early,
restores the checkpoint with the lowest validation loss, and report.json / report.html say
why (stop_reason, the generalisation gap at the best step and at the end, memorisation).
Measured here: validation perplexity 29.9 (base) -> 24.2 at step 12 -> 35.4 at step 24 while the
training loss fell from 3.3 to 2.1; stopped at step 24 and restored step 12.
"""

from peftkit import Config, DataConfig, EvalConfig, MethodConfig, ModelConfig, TrainConfig


def config() -> Config:
    return Config(
        model=ModelConfig(name_or_path="asset:smollm2-135m-instruct"),
        data=DataConfig(source="asset:pubmed-abstracts", seq_len=256, max_train_docs=40),
        method=MethodConfig(name="lora", r=32, alpha=64, target_modules=["all-linear"]),
        train=TrainConfig(max_steps=200, batch_size=4, lr=2e-3, lr_schedule="constant", warmup_steps=2),
        eval=EvalConfig(every_steps=6, val_tokens=4096, test_tokens=8192, patience=2, kl_prompts=False),
        output_dir="runs/overfit_trap",
    )


def main(argv=None) -> None:
    from peftkit.cli import run_recipe

    run_recipe(config(), argv, prog="recipes/overfit_trap.py")


if __name__ == "__main__":
    main()
