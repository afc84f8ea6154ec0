"""Does the verdict cry "helped" by chance? The bootstrap against known answers, the decision's error rates
over many seeds of runs that cannot help, and real tiny runs that help, do nothing, or wreck general text.

Synthetic per-row NLLs give thousands of seeds in seconds (a full Trainer run takes seconds each); the real
model's per-row NLLs check the intervals where the answer is measured on a large pool of the same text.
"""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
import torch

from peftkit import Trainer
from peftkit.config import EvalConfig
from peftkit.evaluation import bootstrap, decide
from peftkit.evaluation.perplexity import nll, nll_rows
from peftkit.evaluation.report import comparison
from tests.conftest import build_tokenizer, make_doc

TOKENS_PER_ROW = 31  # a 32-token row scores 31 next tokens


def synthetic_scores(rng, rows: int, change: float, spread: float, skew: bool = False) -> dict:
    """Per-row NLL sums of a base and a tuned model whose true perplexity change is `change`: the tuned
    model's per-row NLL differs by log(1 + change) per token on average, plus noise of `spread` nats per row
    (skewed: a few rows much worse, most a little better, the same mean)."""
    tokens = torch.full((rows,), TOKENS_PER_ROW)
    base = torch.as_tensor(rng.normal(3.0 * TOKENS_PER_ROW, 10.0, rows))
    noise = rng.lognormal(0, 1, rows) - math.exp(0.5) if skew else rng.normal(0, 1, rows)
    diff = math.log1p(change) * TOKENS_PER_ROW + spread * noise
    return {"base": {"domain": (base, tokens)}, "tuned": {"domain": (base + torch.as_tensor(diff), tokens)}}


def judged(scores: dict, seed: int, ev: EvalConfig):
    cuts = {"domain": bootstrap.Units(rows=len(scores["base"]["domain"][0]), rows_per_unit=1)}
    return decide(comparison(scores, cuts, seed), ev)


def test_the_bootstrap_interval_matches_the_known_answer():
    # constant per-unit change: no spread, the interval is the point
    tokens = np.full(20, 31.0)
    point = math.expm1(-0.1)
    assert bootstrap.change_interval(np.zeros(20), np.full(20, -3.1), tokens, seed=0) == pytest.approx(
        [point] * 2, abs=1e-6
    )
    # many units: the interval of the mean log-ratio is the normal one, mean +- 1.96 sd / sqrt(m)
    rng = np.random.default_rng(1)
    diff = rng.normal(-1.0, 2.0, 2000)
    low, high = bootstrap.ratio_interval(diff, np.full(2000, 31.0), seed=0)
    mean, half = diff.mean() / 31, 1.96 * diff.std(ddof=1) / math.sqrt(2000) / 31
    assert low == pytest.approx(mean - half, rel=0.03) and high == pytest.approx(mean + half, rel=0.03)
    # seeded: the same interval twice; and the two models must have scored the same tokens
    assert bootstrap.ratio_interval(diff[:50], tokens[:1].repeat(50), seed=3) == bootstrap.ratio_interval(
        diff[:50], tokens[:1].repeat(50), seed=3
    )
    with pytest.raises(ValueError, match="same tokens"):
        rows = (torch.zeros(4), torch.full((4,), 31))
        bootstrap.paired_change(rows, (torch.zeros(4), torch.full((4,), 30)), bootstrap.Units(4, 1), seed=0)


@pytest.mark.parametrize("rows", [16, 32])
def test_the_interval_covers_the_true_change_at_its_level(rows):
    rng = np.random.default_rng(rows)
    trials = 300
    covered = 0
    for seed in range(trials):
        scores = synthetic_scores(rng, rows, change=-0.03, spread=1.5)
        cuts = {"domain": bootstrap.Units(rows=rows, rows_per_unit=1)}
        low, high = comparison(scores, cuts, seed)["change_ci95"]["domain_ppl"]
        covered += low <= -0.03 <= high
    assert 0.92 <= covered / trials <= 0.98, covered / trials  # measured: 0.947 (16 rows), 0.950 (32 rows)


def test_a_run_that_cannot_help_is_called_helped_at_most_at_the_rate_the_interval_promises():
    # true change 0; with no practical minimum only the interval decides: its upper end is below 0 by chance
    # in 2.5% of runs (one tail of a 95% interval); with the default 5% minimum, never
    rng = np.random.default_rng(0)
    interval_only = EvalConfig(min_domain_gain=0.0, max_general_ppl_increase=None)
    trials, helped, helped_default = 1000, 0, 0
    for seed in range(trials):
        scores = synthetic_scores(rng, 16, change=0.0, spread=1.5)
        helped += judged(scores, seed, interval_only).helped
        helped_default += judged(scores, seed, EvalConfig()).helped
    assert helped / trials <= 0.025 + 3 * math.sqrt(0.025 * 0.975 / trials), helped / trials  # measured: 0.026
    assert helped_default == 0


def test_skewed_rows_are_a_known_weakness_and_stay_bounded():
    # a few rows much worse and most a little better (mean 0): the studentized interval is still too short on
    # the worse side; measured 5.7% "helped" by the interval alone here (7-9% over 1,000 seeds at 16 and 32
    # rows; a plain percentile interval: 12-15%)
    rng = np.random.default_rng(2)
    interval_only = EvalConfig(min_domain_gain=0.0, max_general_ppl_increase=None)
    helped = sum(
        judged(synthetic_scores(rng, 32, change=0.0, spread=1.5, skew=True), seed, interval_only).helped
        for seed in range(300)
    )
    assert helped / 300 <= 0.10, helped / 300


def test_a_real_gain_is_helped_and_a_gain_the_rows_do_not_support_is_not():
    rng = np.random.default_rng(3)
    ev = EvalConfig(max_general_ppl_increase=None)
    large = [judged(synthetic_scores(rng, 16, change=-0.3, spread=1.5), seed, ev) for seed in range(50)]
    assert all(v.outcome == "helped" for v in large)
    noisy = judged(synthetic_scores(rng, 16, change=-0.08, spread=40.0), 0, ev)  # -8% on average, rows all over
    assert noisy.outcome == "did not help" and "the interval includes no change" in noisy.reasons[0]


# --- the real (tiny) model -------------------------------------------------------------------------------


def rows_of(tokenizer, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from peftkit.data import eval_rows

    rng = random.Random(seed)
    return eval_rows(tokenizer, [make_doc(rng) for _ in range(count)], 32, 10**9)


def adapter(model_dir, seed: int, train: torch.Tensor, steps: int = 30):
    """The tiny model with a LoRA adapter trained on `train` rows in a seeded order."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    order = torch.randperm(len(train))
    for step in range(steps):
        batch = train[order[(step * 8) % len(train) :][:8]]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_per_row_scores_add_up_to_the_totals_in_row_order(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids, labels = rows_of(build_tokenizer(), 40, seed=5)
    sums, tokens = nll_rows(model, ids, labels, batch_size=4)
    total, count = nll(model, ids, labels, batch_size=4)
    assert sums.sum().item() == pytest.approx(total, rel=1e-6) and int(tokens.sum()) == count
    alone = nll(model, ids[7:8], labels[7:8], batch_size=1)
    assert sums[7].item() == pytest.approx(alone[0], rel=1e-5) and tokens[7] == alone[1]


def test_on_real_rows_the_interval_covers_the_change_measured_on_a_large_pool(tiny_model_dir):
    # two adapters trained alike from different seeds: whichever is "better" is a small, real difference,
    # measured on 1,600 rows; each of 40 test sets of 16 rows (the tiny config's 512 tokens) must cover it
    tokenizer = build_tokenizer()
    train, _ = rows_of(tokenizer, 400, seed=10)
    first, second = adapter(tiny_model_dir, 1, train), adapter(tiny_model_dir, 2, train)
    ids, labels = rows_of(tokenizer, 2400, seed=11)
    ids, labels = ids[:1600], labels[:1600]
    a, b = nll_rows(first, ids, labels, 64), nll_rows(second, ids, labels, 64)
    truth = math.expm1((b[0].sum() - a[0].sum()).item() / int(a[1].sum()))
    covered = 0
    for k in range(40):
        part = slice(16 * k, 16 * (k + 1))
        low, high = bootstrap.paired_change(
            (a[0][part], a[1][part]), (b[0][part], b[1][part]), bootstrap.Units(16, 1), k
        )
        covered += low <= truth <= high
    assert covered >= 34, (covered, truth)  # 95% of 40 is 38; 34 or more unless the intervals are too short


def test_a_no_op_adapter_is_never_helped(tiny_config):
    # LoRA starts as the identity (B = 0): with a learning rate too small to move it, the tuned model is the base
    config = dataclasses.replace(
        tiny_config,
        train=dataclasses.replace(tiny_config.train, max_steps=2, lr=1e-12),
        eval=dataclasses.replace(tiny_config.eval, every_steps=2, diagnostics=False, kl_prompts=False),
    )
    report = Trainer(config, log=lambda _: None).fit()
    low, high = report["change_ci95"]["domain_ppl"]
    assert abs(low) < 1e-6 and abs(high) < 1e-6
    assert report["verdict"]["outcome"] == "did not help" and report["verdict"]["recommend"] == "base"


def test_a_large_gain_is_helped_and_with_a_forgetting_budget_it_is_mixed_for_the_right_reason(tiny_config):
    report = Trainer(tiny_config, log=lambda _: None).fit()
    domain, general = report["change_ci95"]["domain_ppl"], report["change_ci95"]["general_ppl"]
    assert domain[1] < -0.3 and report["verdict"]["outcome"] == "helped" and report["verdict"]["helped"] is True
    assert general[0] > 0.10  # the tiny model forgets its general text at once, and the interval says so

    budget = dataclasses.replace(tiny_config.eval, max_general_ppl_increase=0.10)
    verdict = decide(report, budget)
    assert verdict.outcome == "mixed" and verdict.helped is False and verdict.recommend != "tuned"
    assert any("beyond the forgetting budget of +10%" in reason for reason in verdict.deciding)
    assert "gains domain perplexity" in verdict.summary and "general-text perplexity" in verdict.summary
