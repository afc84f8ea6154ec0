"""The evaluation cache: a hit is keyed by everything the base model's numbers depend on, and a damaged
entry is recomputed, never trusted (the end-to-end reuse is in test_final_evaluation.py)."""

import dataclasses
import shutil

import torch

from peftkit.evaluation.base_cache import BaseCache, model_fingerprint


def counting(value):
    calls = []

    def compute():
        calls.append(1)
        return value

    return compute, calls


def test_a_hit_needs_the_same_model_files_inputs_and_settings(tiny_config, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    rows = (torch.arange(12).view(3, 4), torch.ones(3, 4, dtype=torch.long))
    compute, calls = counting({"domain": (torch.tensor([1.5, 2.5], dtype=torch.float64), torch.tensor([3, 4]))})
    first = BaseCache(tiny_config).get("base_scores", (rows,), compute)
    again = BaseCache(tiny_config)
    assert torch.equal(again.get("base_scores", (rows,), compute)["domain"][0], first["domain"][0])
    assert len(calls) == 1 and again.hits == ["base_scores"]

    sets = {"domain": (torch.zeros(40, 500, dtype=torch.long), torch.zeros(40, 500, dtype=torch.long))}
    BaseCache(tiny_config).get("base_scores", (sets,), compute)
    sets["domain"][0][20, 250] = 7  # one token in the middle of a set's rows (a printed tensor elides it)
    BaseCache(tiny_config).get("base_scores", (sets,), compute)
    assert len(calls) == 3
    del calls[1:]
    other_rows = (rows[0] + 1, rows[1])
    BaseCache(tiny_config).get("base_scores", (other_rows,), compute)  # other token ids
    assert len(calls) == 2
    bigger = dataclasses.replace(tiny_config, eval=dataclasses.replace(tiny_config.eval, batch_size=3))
    BaseCache(bigger).get("base_scores", (rows,), compute)  # another batch size: other rounding
    assert len(calls) == 3

    # the same model in another folder hits; one changed file in it misses
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    moved = dataclasses.replace(tiny_config, model=dataclasses.replace(tiny_config.model, name_or_path=str(copy)))
    assert model_fingerprint(moved.model) == model_fingerprint(tiny_config.model)
    BaseCache(moved).get("base_scores", (rows,), compute)
    assert len(calls) == 3
    config_file = copy / "config.json"
    config_file.write_text(config_file.read_text().replace("\n", "\n ", 1))
    assert model_fingerprint(moved.model) != model_fingerprint(tiny_config.model)
    BaseCache(moved).get("base_scores", (rows,), compute)
    assert len(calls) == 4


def test_damaged_entries_are_recomputed_and_recompute_rewrites(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    compute, calls = counting([[0, 1, 2], [2, 1, 0]])
    BaseCache(tiny_config).get("qa_base", ([{"question": "q"}],), compute)
    (entry,) = (tmp_path / "cache" / "eval").glob("qa_base-*.pt")
    entry.write_bytes(b"not a torch file")
    cache = BaseCache(tiny_config)
    assert cache.get("qa_base", ([{"question": "q"}],), compute) == [[0, 1, 2], [2, 1, 0]]
    assert len(calls) == 2 and cache.computed == ["qa_base"]
    off = BaseCache(dataclasses.replace(tiny_config, eval=dataclasses.replace(tiny_config.eval, cache=False)))
    off.get("qa_base", ([{"question": "q"}],), compute)  # eval.cache=false: computed even though stored
    assert len(calls) == 3 and off.summary() == {"cache": False, "reused": [], "computed": ["qa_base"]}
    assert BaseCache(tiny_config).get("qa_base", ([{"question": "q"}],), compute) == [[0, 1, 2], [2, 1, 0]]
    assert len(calls) == 3  # the recompute rewrote the entry: usable again


def test_a_model_that_is_not_a_local_folder_is_never_cached(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    hub = dataclasses.replace(tiny_config, model=dataclasses.replace(tiny_config.model, name_or_path="org/model"))
    compute, calls = counting(1)
    for _ in range(2):
        BaseCache(hub).get("base_scores", (), compute)
    assert len(calls) == 2 and not (tmp_path / "cache" / "eval").exists()
