"""When does fine-tuning start to pay? A small-data study on PubMed abstracts.

With 50, 200 and 1,000 training abstracts and the same token budget for every run, compare on
the same held-out test set: the base model, the base model prompted with domain text (k-shot for
QA: no fine-tuning at all), LoRA, LoRA + augmentation (sentence shuffling and token noise) and
LoRA + replay of general text. Every run goes through the guard (early stopping with best-step
restore), so the numbers are what peftkit would hand to a user.

Run:
    python recipes/small_data_study.py
    python recipes/small_data_study.py --train.max_steps=4 --eval.qa_questions=8 --output_dir=runs/study_try

Writes OUTPUT_DIR/study.md and study.json (one row per corpus size) and one run folder per cell.
About 30 minutes on 2 CPU cores; the table measured here is in the README. `config()` is the
LoRA run every cell starts from.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from peftkit import Config, DataConfig, EvalConfig, MethodConfig, ModelConfig, TrainConfig

SIZES = (50, 200, 1000)
VARIANTS = {
    "lora": {},
    "lora+augment": {"augment": ["sentence_shuffle", "token_noise"], "token_noise": 0.1},
    "lora+replay": {"replay": 0.3},
}


def config() -> Config:
    return Config(
        model=ModelConfig(name_or_path="asset:smollm2-135m-instruct"),
        data=DataConfig(source="asset:pubmed-abstracts", general_source="asset:wiki-general", seq_len=256),
        method=MethodConfig(name="lora", r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        train=TrainConfig(max_steps=12, batch_size=8, lr=5e-4, warmup_steps=2, progress=False),
        eval=EvalConfig(every_steps=4, val_tokens=2048, test_tokens=4096, patience=2, qa_questions=24, kshot=3),
        output_dir="runs/small_data_study",
    )


def study(base: Config, log=print) -> list[dict]:
    from peftkit import Trainer
    from peftkit.evaluation.run_report import as_run_report

    out, rows = Path(base.output_dir), []
    for size in SIZES:
        row = {"train_docs": size}
        for name, changes in VARIANTS.items():
            cell = dataclasses.replace(
                base,
                data=dataclasses.replace(base.data, max_train_docs=size, **changes),
                output_dir=str(out / f"{size}-{name}"),
                train=dataclasses.replace(base.train, overwrite=True),
            )
            log(f"--- {size} documents, {name}")
            report = as_run_report(Trainer(cell, log=lambda _: None).fit())
            qa = (report.qa or {}).get("medical")
            if name == "lora":  # the baselines do not depend on the variant: take them once per size
                row["base"] = report.base.domain_ppl
                row["base_prompted"] = report.base_prompted.domain_ppl if report.base_prompted else None
                row["qa_base"] = qa.base_accuracy if qa else None
                row["qa_base_kshot"] = qa.kshot_base_accuracy if qa else None
                row["general_base"] = report.base.general_ppl
            row[name] = report.tuned.domain_ppl
            row[f"{name}_general"] = report.tuned.general_ppl
            row[f"{name}_qa"] = qa.tuned_accuracy if qa else None
            row[f"{name}_recommend"] = report.verdict.recommend
            row[f"{name}_stopped_at"] = report.training.adapter_step
        rows.append(row)
        (out / "study.json").write_text(json.dumps(rows, indent=2))
    (out / "study.md").write_text(format_study(rows) + "\n")
    log(format_study(rows))
    return rows


def format_study(rows: list[dict]) -> str:
    def cell(row, name):
        qa = row.get(f"{name}_qa")
        return f"{row[name]:.2f}" + (f" / {qa:.0%}" if qa is not None else "")

    lines = [
        "Domain test perplexity / medical QA accuracy (lower / higher is better); general-text perplexity "
        "in brackets for the tuned runs; the verdict's choice per run.",
        "",
        "| train docs | base | base prompted / k-shot | LoRA | LoRA + augment | LoRA + replay |",
        "|---:|---|---|---|---|---|",
    ]
    for row in rows:
        base = f"{row['base']:.2f}" + (f" / {row['qa_base']:.0%}" if row.get("qa_base") is not None else "")
        prompted = "-"
        if row.get("base_prompted") is not None:
            kshot = row.get("qa_base_kshot")
            prompted = f"{row['base_prompted']:.2f}" + (f" / {kshot:.0%}" if kshot is not None else "")
        tuned = [f"{cell(row, n)} [{row[f'{n}_general']:.1f}] {row[f'{n}_recommend']}" for n in VARIANTS]
        lines.append(
            f"| {row['train_docs']} | {base} [{row['general_base']:.1f}] | {prompted} | " + " | ".join(tuned) + " |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    import sys

    from peftkit.cli import config_help, guarded

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: recipes/small_data_study.py [--section.key=value ...]\n\n{config_help()}")
        return
    guarded(lambda: study(config().override(argv)))


if __name__ == "__main__":
    main()
