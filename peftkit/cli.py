"""`peftkit` command line: parse -> call the library -> print. Heavy imports happen inside commands."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

from peftkit.compare import METHODS
from peftkit.config import Config, describe
from peftkit.errors import PeftkitError

COMPARED = ["lora", "dora", "ia3", "prompt_tuning", "top_layers"]  # `peftkit compare`'s default


def config_help() -> str:
    lines = ["config keys (override with --key=value):"]
    for key, kind, default, help_text in describe():
        lines.append(f"  --{key}  ({kind}, default {default!r})\n      {help_text}")
    return "\n".join(lines)


def load_target(target: str) -> Config:
    """A recipe module (.py with a `config()` function) or a YAML config file."""
    path = Path(target)
    if not path.is_file():
        raise PeftkitError(f"{target}: no such recipe or config file")
    if path.suffix in (".yaml", ".yml"):
        return Config.from_yaml(path)
    if path.suffix != ".py":
        raise PeftkitError(f"{target}: expected a recipe (.py) or a config (.yaml)")
    spec = importlib.util.spec_from_file_location(f"peftkit_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "config", None)):
        raise PeftkitError(f"{target}: a recipe must define config() returning a peftkit.Config")
    return module.config()


def train(config: Config) -> dict:
    from peftkit.alignment.trainer import PreferenceTrainer
    from peftkit.trainer import Trainer

    return (PreferenceTrainer if config.train.objective == "dpo" else Trainer)(config).fit()


def run_recipe(config: Config, argv: list[str] | None = None, prog: str | None = None) -> None:
    """Entry point of a recipe module: apply `--section.key=value` overrides and train."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: {prog or 'recipe'} [--section.key=value ...]\n\n{config_help()}")
        return
    guarded(lambda: train(config.override(argv)))


def guarded(action) -> None:
    """Run `action`; a PeftkitError becomes one line on stderr and exit status 2 (1 for a RunAborted)."""
    try:
        action()
    except PeftkitError as err:
        print(f"peftkit: error: {err}", file=sys.stderr, flush=True)
        sys.exit(getattr(err, "exit_code", 2))
    except KeyboardInterrupt:
        print("peftkit: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftkit", description="Parameter-efficient fine-tuning, checked.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (also PEFTKIT_QUIET=1): for logs and CI")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="train a recipe or YAML config", epilog=config_help(),
                            formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("target", help="recipes/NAME.py or a .yaml config")
    p = commands.add_parser("preview", help="what a recipe would train: tokens, packing, an example row, memory, time",
                            epilog=config_help(), formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("target", help="recipes/NAME.py or a .yaml config")
    p = commands.add_parser("cv", help="k-fold cross-validation of a recipe or YAML config")
    p.add_argument("target", help="recipes/NAME.py or a .yaml config")
    p.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    p = commands.add_parser("eval", help="recompute RUN_DIR/report.json (base vs tuned perplexity)")
    p.add_argument("run_dir")
    p.add_argument("--recompute", action="store_true", help="recompute the base model's side too (not from the cache)")
    p = commands.add_parser("merge", help="merge a run's adapter (or several, weighted) into the base model")
    p.add_argument("run_dir", nargs="?", help="the run folder whose adapter to merge")
    p.add_argument("--adapters", nargs="+", default=[], help="several run folders to combine instead")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per adapter (default 1.0 each)")
    p.add_argument("--combination", default="linear", help="linear, cat, ties, dare_ties or dare_linear")
    p.add_argument("--out", required=True, help="folder for the merged model")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="dtype of the saved weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p = commands.add_parser(
        "compare",
        help="train several methods on the same data and budget; tabulate them",
        epilog=config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", help="recipes/NAME.py or a .yaml config (data, budget and evaluation shared)")
    p.add_argument(
        "--methods",
        nargs="+",
        help="methods to compare (default lora dora ia3 prompt_tuning top_layers; none with --arm): "
        + ", ".join(METHODS),
    )
    p.add_argument("--arm", nargs="+", action="append", default=[], metavar="NAME KEY=VALUE",
                   help="another run: a name, then overrides of the recipe (repeatable; a sweep)")  # fmt: skip
    p.add_argument("--out", default="runs/compare", help="folder for the runs and compare.md/.json/.png")
    p = commands.add_parser("export", help="write a merged model folder as GGUF, checked by reloading it")
    p.add_argument("model_dir", help="a model folder, e.g. the --out of `peftkit merge`")
    p.add_argument("--format", default="gguf", choices=["gguf"], help="export format (default gguf)")
    p.add_argument("--quant", default="f16", choices=["f32", "f16", "q8_0"], help="tensor type (default f16)")
    p.add_argument("--out", help="the .gguf file to write (default MODEL_DIR-QUANT.gguf beside the folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p = commands.add_parser("generate", help="answer a prompt with a run's adapter(s) or a merged model")
    p.add_argument("target", help="a run folder (base + its adapter), a merged model folder or a .gguf file")
    p.add_argument("--prompt", required=True)
    p.add_argument("--adapter", action="append", default=[], help="another adapter to compare (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--no-stream", action="store_true", help="print each answer when complete")
    p = commands.add_parser("report", help="write RUN_DIR/report.md and report.html (loss curves, verdict)")
    p.add_argument("run_dir")
    p = commands.add_parser("doctor", help="versions, CPU/GPU features, bitsandbytes, and what is cached")
    p.add_argument("--verify", action="store_true", help="check every cached asset file against its sha256")
    p = commands.add_parser("fetch", help="download and prepare a catalog asset")
    p.add_argument("name", help="asset name, or 'all'")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    from peftkit.progress import quiet, set_quiet

    if args.quiet or quiet():
        set_quiet()
    if rest and args.command not in ("train", "cv", "compare", "preview"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    guarded(lambda: _dispatch(args, rest))


def _after_arms(argv: list[str]) -> list[str]:
    """The --key=value overrides written after the first --arm: argparse gives them to every run, which is
    not what their place says (compare refuses them)."""
    first = argv.index("--arm") if "--arm" in argv else len(argv)
    return [a for a in argv[first:] if a.startswith("--") and "=" in a and a.split("=")[0] not in ("--out",)]


def _dispatch(args, rest: list[str]) -> None:
    if args.command == "train":
        train(load_target(args.target).override(rest))
    elif args.command == "preview":
        from peftkit.preview import format_preview, preview

        config = load_target(args.target).override(rest)
        print(format_preview(preview(config, log=lambda m: print(m, file=sys.stderr)), config))
    elif args.command == "cv":
        from peftkit.evaluation.cv import cross_validate, format_cv

        if args.folds < 2:
            raise PeftkitError(f"--folds {args.folds}: cross-validation needs at least 2 folds")
        print(format_cv(cross_validate(load_target(args.target).override(rest), args.folds)))
    elif args.command == "eval":
        from peftkit.evaluation import evaluate_run
        from peftkit.evaluation.render import print_report

        print_report(evaluate_run(Path(args.run_dir), recompute=args.recompute))
    elif args.command == "generate":
        from peftkit.generate import run

        answers = run(Path(args.target), args.prompt, [Path(a) for a in args.adapter], args.max_new_tokens,
                      chat=not args.no_chat, stream=not args.no_stream)  # fmt: skip
        if args.no_stream:
            for label, text in answers.items():
                print(f"--- {label}\n{text}")
    elif args.command == "report":
        from peftkit.evaluation.render import print_report, write_report_files

        md, page = write_report_files(Path(args.run_dir))
        print_report(json.loads((Path(args.run_dir) / "report.json").read_text()))
        print(f"wrote {md} and {page}")
    elif args.command == "compare":
        from peftkit.compare import compare

        chosen = args.methods if args.methods is not None else [] if args.arm else COMPARED
        compare(args.target, chosen, Path(args.out), rest, arms=args.arm, after_arms=_after_arms(args.argv))
    elif args.command == "export":
        from peftkit.export import export_gguf

        model_dir = Path(args.model_dir).resolve()
        out = Path(args.out) if args.out else model_dir.with_name(f"{model_dir.name}-{args.quant}.gguf")
        export_gguf(model_dir, out, quant=args.quant, overwrite=args.overwrite)
    elif args.command == "merge":
        from peftkit.merge import merge_runs

        runs = [Path(r) for r in ([args.run_dir] if args.run_dir else []) + args.adapters]
        if not runs:
            raise PeftkitError("merge needs a run folder, or several with --adapters RUN_A RUN_B")
        merge_runs(runs, args.weights, args.combination, Path(args.out), dtype=args.dtype, overwrite=args.overwrite)
    elif args.command == "doctor":
        from peftkit.doctor import format_doctor, report

        print(format_doctor(report(verify=args.verify)))
    elif args.command == "fetch":
        from peftkit import assets

        names = list(assets.CATALOG) if args.name == "all" else [args.name]
        for name in names:
            was_ready = assets.is_prepared(name)
            path = assets.fetch(name, log=lambda m: print(m, file=sys.stderr))
            stats = path / "stats.json"
            summary = json.loads(stats.read_text()) if stats.exists() else {}
            print(f"{name}: {'already prepared' if was_ready else 'prepared'} at {path} {json.dumps(summary)[:200]}")


if __name__ == "__main__":
    main()
