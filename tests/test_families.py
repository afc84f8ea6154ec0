"""The model-family matrix: every decoder family peftkit claims, built tiny and random in the test.

For each family one Trainer run covers the whole path with the default targets (`attention`; MoE families
add `experts`): the training loss falls, the adapter reloads with plain peft to the same logits, the merge
passes its self-check and the merged folder reloads without peft to the same logits, and generation from
the run folder and from the merged folder agree. What the run chose on its own (chunked loss or the
model's own, document separation or not), whether regional compilation finds the decoder layers and
whether GGUF export takes the merged folder are recorded, not asserted: the last test checks that
docs/models.md shows exactly what was measured (`scripts/models_table` rewrites it). Three families of
different shapes also resume bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from peftkit import (
    Config,
    DataConfig,
    EvalConfig,
    MethodConfig,
    ModelConfig,
    PeftkitError,
    TrainConfig,
    Trainer,
    methods,
)
from peftkit import generate as generation
from peftkit.merge import MERGE_ATOL, merge_run
from tests.conftest import build_bpe_tokenizer
from tests.test_trainer import StopAt

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"
TABLE_START, TABLE_END = "<!-- models-table: start -->", "<!-- models-table: end -->"

# model_type -> settings on top of the shared tiny shape. Where a family's real checkpoints set something
# that changes the loss or the routing, the tiny model sets it too, so the matrix meets what users bring.
FAMILIES = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    # Gemma 2 caps its logits at 30 (tanh softcapping); a tiny model at the usual init scale has logits below 1,
    # which the cap leaves alone, so its init is scaled up until logits reach ~10 as a trained model's do
    # head_dim = query_pre_attn_scalar (256), as in Gemma 2 2B/9B and Gemma 3: a shape both GGUF readers agree on
    "gemma2": {"head_dim": 256, "initializer_range": 0.2},
    "gemma3_text": {"head_dim": 256},
    "phi3": {},
    "gpt2": {},
    "gpt_neox": {},
    "olmo2": {},
    # Granite 3's multipliers (granite-3.0-2b-base): logits are divided by 8, which plain cross-entropy
    # over the output layer would miss
    "granite": {
        "logits_scaling": 8.0,
        "embedding_multiplier": 12.0,
        "residual_multiplier": 0.22,
        "attention_multiplier": 0.015625,
    },
    "starcoder2": {},
    "stablelm": {},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
    },
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
}
MOE = ("qwen2_moe", "mixtral")
RESUMED = ("gpt2", "mixtral", "gemma2")  # fused qkv (GPT-2's Conv1D), fused expert parameters, plain q/k/v/o
# (family, column) -> (the cell, why): a cell that fails upstream (transformers, peft), expected to stay so
UPSTREAM: dict[tuple[str, str], tuple[str, str]] = {
    ("qwen2_moe", "GGUF"): (
        "refused",
        "upstream: transformers' GGUF loader does not read expert sizes back but takes Qwen2MoeConfig's "
        "defaults, so only experts sized as Qwen1.5-MoE-A2.7B's reload",
    ),
}
PROMPT = "the patient received"

ROWS: dict[str, dict[str, str]] = {}  # family -> the measured table row, filled by the matrix tests
RUNS: dict[str, Trainer] = {}  # family -> its finished trainer, reused as the uninterrupted run of the resume test


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Models this small gain nothing from a second thread, and where other processes share the 2 cores two
    threads spin against them (one family's run: 3.5 s with one thread, 12.9 s with two, measured under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """family -> a folder with the tiny random model and the byte-level BPE tokenizer (built on first use)."""
    tokenizer, built = build_bpe_tokenizer(), {}

    def build(family: str) -> Path:
        if family not in built:
            path = tmp_path_factory.mktemp(family)
            config = AutoConfig.for_model(
                family,
                vocab_size=len(tokenizer),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **FAMILIES[family],
            )
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(config).save_pretrained(path)
            tokenizer.save_pretrained(path)
            built[family] = path
        return built[family]

    return build


def family_config(family: str, model_dir: Path, corpus_dir: Path, out: Path) -> Config:
    """A few fp32 steps with an evaluation (and checkpoint) every 4 steps; small held-out sets."""
    targets = ["attention", "experts"] if family in MOE else ["attention"]
    return Config(
        model=ModelConfig(name_or_path=str(model_dir), dtype="fp32"),
        data=DataConfig(source=str(corpus_dir), general_source=str(corpus_dir / "general.jsonl"), seq_len=32),
        method=MethodConfig(r=8, alpha=16, target_modules=targets),
        train=TrainConfig(max_steps=8, batch_size=4, lr=2e-2, warmup_steps=1, mixed_precision="no", progress=False),
        eval=EvalConfig(
            every_steps=4,
            val_tokens=128,
            test_tokens=256,
            batch_size=8,
            max_general_ppl_increase=None,
            prompt_tokens=0,
            diagnostics=False,
        ),
        output_dir=str(out),
    )


def trained(family: str, family_dirs, corpus_dir, tmp_path_factory) -> Trainer:
    if family not in RUNS:
        config = family_config(
            family, family_dirs(family), corpus_dir, tmp_path_factory.mktemp(f"{family}-runs") / "run"
        )
        trainer = Trainer(config, log=lambda _: None)
        trainer.fit()
        RUNS[family] = trainer
    return RUNS[family]


def losses(run_dir: Path) -> list[tuple]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in records]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_reloads_merges_and_generates(family, family_dirs, corpus_dir, tmp_path_factory, tmp_path):
    trainer = trained(family, family_dirs, corpus_dir, tmp_path_factory)
    model_dir, run = family_dirs(family), trainer.run_dir
    train_losses = [loss for _, loss, _ in losses(run) if loss is not None]
    assert len(train_losses) == 8 and sum(train_losses[-3:]) < sum(train_losses[:3]), train_losses
    adapted = methods.adapted_modules(trainer.model)
    if family in MOE:
        assert {"experts.gate_up_proj", "experts.down_proj"} <= set(adapted["names"]), adapted

    # the adapter is a plain peft folder that reproduces the trained model, and it moved the model
    ids = trainer.tokenizer("the patient received aspirin and recovered .", return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), run / "adapter")
    tuned = logits(reloaded, ids)
    assert torch.allclose(logits(trainer.model, ids), tuned, atol=1e-5)
    assert (tuned - logits(base, ids)).abs().max() > 1e-3

    # merged: the self-check passes, and the folder is a plain transformers model with the same logits
    merged_dir = tmp_path / "merged"
    check = merge_run(run, merged_dir, log=lambda _: None)
    assert check["max_abs_logit_diff_vs_adapter"] <= MERGE_ATOL
    assert load_file(merged_dir / "model.safetensors").keys() == load_file(model_dir / "model.safetensors").keys()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert (logits(merged, ids) - tuned).abs().max() <= MERGE_ATOL

    # generation (with its cache) from the run folder's base + adapter and from the merged folder agree
    answers = [
        generation.generate(*generation.load(target, [])[:2], PROMPT, max_new_tokens=8, chat=False)
        for target in (run, merged_dir)
    ]
    assert answers[0] == answers[1], answers

    row = measured_row(family, trainer, base, adapted, merged_dir, tmp_path)
    for (upstream, column), (cell, why) in UPSTREAM.items():
        if upstream == family:
            assert row[column] == cell, f"{family} {column} is now {row[column]!r}; fixed upstream? ({why})"
    ROWS[family] = row


def measured_row(family: str, trainer: Trainer, base, adapted: dict, merged_dir: Path, tmp_path: Path) -> dict:
    """The family's table row: what was adapted, what the run chose on its own, what export made of the merge."""
    return {
        "family": f"`{family}`",
        "class": type(base).__name__,
        "attention": ", ".join(n for n in adapted["names"] if not n.startswith("experts.")),
        "experts": ", ".join(n for n in adapted["names"] if n.startswith("experts.")) or "-",
        "train": "yes",
        "chunked loss": "yes" if getattr(trainer.forward, "module", trainer.forward).chunked else "no: own loss",
        "compile": compile_cell(trainer.config),
        "documents apart": "yes" if trainer.data.separate_documents else "no: causal rows",
        "merge": "yes",
        "GGUF": gguf_cell(merged_dir, tmp_path / "merged.gguf"),
    }


def compile_cell(config: Config) -> str:
    """Does regional compilation find the decoder layers? `compile_layers` only marks them (torch compiles
    on the first call, which never comes here), so this costs nothing."""
    from peftkit import assets, models, runtime

    model = methods.apply(config.method, models.load_model(config.model))
    count = runtime.compile_layers(model, assets.cache_dir() / "inductor")
    return f"yes ({count} layers)" if count else "no: eager"


def gguf_cell(merged_dir: Path, out: Path) -> str:
    """Whatever `peftkit.export` supports when the matrix runs: written and checked, or refused."""
    from peftkit import export

    try:
        export.export_gguf(merged_dir, out, quant="f32", log=lambda _: None)
    except PeftkitError:
        return "refused"
    return "yes (f32)"


@pytest.mark.parametrize("family", RESUMED)
def test_resume_is_exact(family, family_dirs, corpus_dir, tmp_path_factory, tmp_path):
    straight = trained(family, family_dirs, corpus_dir, tmp_path_factory)
    broken = dataclasses.replace(straight.config, output_dir=str(tmp_path / "broken"))
    with pytest.raises(KeyboardInterrupt):
        Trainer(broken, callbacks=[StopAt(6)], log=lambda _: None).fit()
    assert (tmp_path / "broken" / "checkpoints" / "step-6").exists()  # Ctrl-C saved the last completed step
    Trainer(broken, log=lambda _: None).fit(resume=True)
    a = load_file(straight.run_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "broken" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert losses(straight.run_dir) == losses(tmp_path / "broken")


def test_unknown_targets_are_one_line_errors_naming_the_linear_layers(family_dirs):
    gpt2 = AutoModelForCausalLM.from_pretrained(family_dirs("gpt2"))
    with pytest.raises(PeftkitError) as error:
        methods.apply(MethodConfig(target_modules=["q_proj"]), gpt2)
    assert "\n" not in str(error.value)
    assert "'q_proj' selects nothing in GPT2LMHeadModel" in str(error.value)
    assert "its linear layers: c_attn, c_proj, c_fc, lm_head" in str(error.value)
    mixtral = AutoModelForCausalLM.from_pretrained(family_dirs("mixtral"))
    with pytest.raises(PeftkitError, match="fused experts are taken by 'experts'"):
        methods.apply(MethodConfig(target_modules=["mlp"]), mixtral)
    with pytest.raises(PeftkitError, match="only LoRA adapts"):
        methods.apply(MethodConfig(name="loha", target_modules=["experts"]), mixtral)
    with pytest.raises(PeftkitError, match="not a valid regular expression"):  # before any model is loaded
        Config.from_dict({"method": {"target_modules": ["re:(q|k"]}})


def test_preview_prints_what_is_adapted(family_dirs, corpus_dir, tmp_path):
    from peftkit.preview import format_preview, preview

    config = family_config("gpt2", family_dirs("gpt2"), corpus_dir, tmp_path / "run")
    shown = preview(config, timed_steps=1, log=lambda _: None)
    assert shown["adapted_modules"] == {"names": ["c_attn", "attn.c_proj"], "count": 4}
    assert "adapted: c_attn, attn.c_proj (4 weights; method.target_modules=attention)" in format_preview(shown, config)


def test_experts_that_are_modules_are_adapted_by_name():
    """MoE blocks built the older way, one module per expert: `experts` takes their linear layers."""
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = LlamaForCausalLM(config)
    for block in model.model.layers:
        block.mlp.experts = nn.ModuleList(LlamaMLP(config) for _ in range(2))
    adapted = methods.adapted_modules(methods.apply(MethodConfig(target_modules=["experts"]), model))
    assert adapted["count"] == 2 * 2 * 3  # blocks x experts x projections; the dense MLP is left alone
    assert adapted["names"] == [f"experts.{e}.{m}" for e in (0, 1) for m in ("gate_proj", "up_proj", "down_proj")]


def test_keywords_names_and_regexes_select_by_structure(family_dirs):
    from peftkit.methods.targeting import resolve

    gpt2 = AutoModelForCausalLM.from_pretrained(family_dirs("gpt2"))
    select = {
        ("attention",): ["c_attn", "attn.c_proj"],  # c_proj alone would take the MLP's too
        ("mlp",): ["c_fc", "mlp.c_proj"],
        ("attention", "mlp"): ["c_attn", "c_proj", "c_fc"],  # both c_proj now: the short name will do
        ("all-linear",): ["c_attn", "c_proj", "c_fc"],
        ("re:h\\.1\\..*c_attn",): ["h.1.attn.c_attn"],
        ("attn",): ["c_attn", "attn.c_proj"],  # a container stands for its linear layers
    }
    for targets, expected in select.items():
        assert resolve(MethodConfig(target_modules=list(targets)), gpt2).modules == expected, targets
    # peft's own all-linear takes the same modules
    from peft import LoraConfig, get_peft_model

    ours = methods.apply(MethodConfig(target_modules=["all-linear"]), gpt2)
    theirs = get_peft_model(
        AutoModelForCausalLM.from_pretrained(family_dirs("gpt2")), LoraConfig(target_modules="all-linear")
    )
    assert methods.adapted_modules(ours) == methods.adapted_modules(theirs)
    assert methods.adapted_modules(ours) == {"names": ["c_attn", "c_proj", "c_fc"], "count": 8}
    # block selection: GPT-2's blocks are transformer.h.N, not layers.N
    one = methods.apply(MethodConfig(layers=[1]), AutoModelForCausalLM.from_pretrained(family_dirs("gpt2")))
    assert methods.adapted_modules(one)["count"] == 2
    qwen = AutoModelForCausalLM.from_pretrained(family_dirs("qwen2_moe"))
    moe = resolve(MethodConfig(target_modules=["attention", "mlp", "experts"], layers=[0]), qwen)
    assert moe.parameters == ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]
    assert moe.feedforward == ["gate_proj", "up_proj", "down_proj", "shared_expert_gate"]


def test_models_doc_is_the_measured_table(request):
    """docs/models.md's table is the matrix's: regenerate it with scripts/models_table when this fails."""
    if not ROWS:
        pytest.skip("no family of the matrix ran in this session")
    text = DOC.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    measured = table(ROWS)
    if request.config.getoption("--write-models-table"):
        missing = [f for f in FAMILIES if f not in ROWS]
        assert not missing, f"the table needs every family measured; missing {missing}"
        DOC.write_text(text[:start] + "\n" + measured + "\n" + text[end:])
        return
    documented = {row.split(" | ")[0].strip("| "): row for row in text[start:end].strip().splitlines()[2:]}
    for line in measured.splitlines()[2:]:
        family = line.split(" | ")[0].strip("| ")
        assert documented.get(family) == line, (
            f"docs/models.md disagrees with the matrix for {family}; run scripts/models_table\n"
            f"  doc:      {documented.get(family)}\n  measured: {line}"
        )
    if len(ROWS) == len(FAMILIES):
        assert set(documented) == {f"`{f}`" for f in FAMILIES}, "docs/models.md lists families the matrix lacks"


def table(rows: dict[str, dict[str, str]]) -> str:
    header = list(next(iter(rows.values())))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for family in FAMILIES:
        if family in rows:
            cells = [rows[family][key] for key in header]
            cells = [
                f"{cell} ({UPSTREAM[family, key][1]})" if (family, key) in UPSTREAM else cell
                for key, cell in zip(header, cells, strict=True)
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
