"""Zero-shot accuracy through lm-eval's HFLM against log-likelihoods computed here with torch, the local BIG-bench
tasks against their task.json files, and the CLI's --evaluate_tasks report."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_text_files
from transformers import AutoModelForCausalLM, AutoTokenizer

from mosaic_lightning.evaluation.tasks.bigbench import BIGBENCH_ENV, load_bigbench, task_file
from mosaic_lightning.evaluation.zero_shot import check_task_options, task_manager, zero_shot_accuracy

ROOT = Path(__file__).resolve().parents[1]

# Options of very different lengths, so length normalisation (acc_norm) picks differently from acc.
ITEMS = [
    {"question": f"Item {i}: which colour is thing {i % 7}?",
     "choices": ["red", "a deep and rather dark shade of blue", f"green {i}", "it is yellow, mostly"][: 2 + i % 3],
     "label": i % (2 + i % 3)}
    for i in range(24)
]  # fmt: skip


def write_task(folder: Path, name: str = "tiny_mc") -> Path:
    """A jsonl of ITEMS and an lm-eval multiple-choice YAML over it, in ``folder`` (an include path)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        'output_type: multiple_choice\ntest_split: test\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n'
    )
    return folder


@torch.no_grad()
def option_loglikelihood(model, tokenizer, context: str, option: str) -> float:
    """Summed log-probability of the tokens ``" " + option`` adds after ``context`` (causal LM, one forward)."""
    context_ids = tokenizer.encode(context)
    whole = tokenizer.encode(context + " " + option)
    assert whole[: len(context_ids)] == context_ids  # the split is clean for these strings
    logprobs = model(input_ids=torch.tensor([whole])).logits[0].double().log_softmax(-1)
    return sum(float(logprobs[t - 1, whole[t]]) for t in range(len(context_ids), len(whole)))


def by_hand(model, tokenizer, items) -> dict[str, float]:
    """acc / acc_norm (log-likelihood per character of the option) and their standard errors."""
    hits, hits_norm = [], []
    for item in items:
        context = f"Question: {item['question']}\nAnswer:"
        lls = [option_loglikelihood(model, tokenizer, context, option) for option in item["choices"]]
        norm = [ll / len(option) for ll, option in zip(lls, item["choices"], strict=True)]
        hits.append(float(max(range(len(lls)), key=lls.__getitem__) == item["label"]))
        hits_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == item["label"]))
    out = {}
    for name, values in (("acc", hits), ("acc_norm", hits_norm)):
        mean = sum(values) / len(values)
        out[name] = mean
        out[f"{name}_stderr"] = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
    return out


@pytest.fixture
def tiny_lm(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("limit", [None, 9])
def test_hflm_accuracy_equals_the_models_own_loglikelihoods(tmp_path, tiny_lm, monkeypatch, limit):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    model, tokenizer = tiny_lm
    manager = task_manager(["tiny_mc"], str(write_task(tmp_path / "tasks")))
    result = zero_shot_accuracy(model, tokenizer, ["tiny_mc"], manager, limit=limit)["tiny_mc"]
    expected = by_hand(model.eval(), tokenizer, ITEMS[:limit])
    assert result["samples"] == len(ITEMS[:limit])
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, abs=1e-12), name
    assert 0 < expected["acc"] < 1 and expected["acc"] != expected["acc_norm"]  # neither metric is degenerate


def test_zero_shot_accuracy_restores_training_mode_and_leaves_the_tokenizer(tmp_path, tiny_lm, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    model, tokenizer = tiny_lm
    model.train()
    pad = tokenizer.pad_token
    zero_shot_accuracy(model, tokenizer, ["tiny_mc"], task_manager(["tiny_mc"], str(write_task(tmp_path))), limit=2)
    assert model.training and tokenizer.pad_token == pad


def test_local_bigbench_task_matches_its_task_json():
    path = task_file("social_iqa")
    examples = json.loads(path.read_text())["examples"]
    rows = load_bigbench("social_iqa")["test"]
    assert len(rows) == len(examples) == 1954
    for row, example in zip(rows, examples, strict=True):
        assert row["input"] == example["input"] and row["choices"] == list(example["target_scores"])
        assert example["target_scores"][row["choices"][row["label"]]] == 1
    docs = task_manager(["strategyqa_local"]).load(["strategyqa_local"])["tasks"]["strategyqa_local"].test_docs()
    assert len(docs) == 2290


def test_missing_bigbench_data_names_the_override(tmp_path, monkeypatch):
    monkeypatch.setenv(BIGBENCH_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"{BIGBENCH_ENV}.*strategyqa/task.json"):
        load_bigbench("strategyqa")


@pytest.mark.parametrize(
    ("tasks", "include_path", "limit", "flag"),
    [
        ([], None, None, "--evaluate_tasks"),
        (["social_iqa_local", " "], None, None, "--evaluate_tasks"),
        (["social_iqa_local"], "/no/such/folder", None, "--evaluate_include_path"),
        (["social_iqa_local"], None, 0, "--evaluate_limit"),
        (None, None, 5, "--evaluate_limit"),
    ],
)
def test_bad_task_options_name_the_flag(tasks, include_path, limit, flag):
    with pytest.raises((ValueError, NotADirectoryError), match=flag):
        check_task_options(tasks, include_path, limit)


def test_one_task_name_works_where_a_list_is_expected():
    assert check_task_options("social_iqa_local", None, 3) == ["social_iqa_local"]


def test_unknown_task_names_the_flag_and_suggests_the_local_one():
    with pytest.raises(
        ValueError,
        match=r"--evaluate_tasks: unknown lm-eval task\(s\) \['social_iqa_locl'\].*"
        r"similar: \[[^]]*'social_iqa_local'",
    ):
        task_manager(["social_iqa_locl"])


def write_loglikelihood_task(folder: Path, name: str = "tiny_ll") -> Path:
    """An lm-eval loglikelihood task over ITEMS (the first option as the answer): its perplexity is continuous,
    so two models that choose alike still score differently."""
    write_task(folder)
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'items.jsonl'}\n"
        'output_type: loglikelihood\ntest_split: test\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_target: " {{choices[0]}}"\nmetric_list:\n  - metric: perplexity\n'
    )
    return folder


def test_dense_accuracy_of_a_run_compacting_before_training_is_the_dense_models(tmp_path, tiny_model_dir, tiny_lm):
    """Such a run prunes before fit start: the dense scores are still those of the model as loaded."""
    import lightning as L

    from mosaic_lightning import CausalLM, MosaicPruning, TextDataModule
    from mosaic_lightning.callbacks.zero_shot import ZeroShotAccuracy

    train, test = write_text_files(tmp_path)
    include = str(write_loglikelihood_task(tmp_path / "tasks"))
    data = TextDataModule(str(tiny_model_dir), str(train), str(test), seq_len=32, batch_size=2,
                          num_calibration_samples=4, max_eval_windows=2)  # fmt: skip
    accuracy = ZeroShotAccuracy(["tiny_ll"], include)
    pruning = MosaicPruning(sparsity=0.5, method="magnitude", allocation="uniform", structured_fraction=1.0,
                            uniform_structure=True, whole_units=True, compact_before_training=True)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", max_steps=0, callbacks=[accuracy, pruning], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    module = CausalLM(str(tiny_model_dir))
    trainer.fit(module, data)
    dense, tokenizer = tiny_lm
    manager = task_manager(["tiny_ll"], include)
    expected = zero_shot_accuracy(dense, tokenizer, ["tiny_ll"], manager)["tiny_ll"]["perplexity"]
    compacted = zero_shot_accuracy(module.model, tokenizer, ["tiny_ll"], manager)["tiny_ll"]["perplexity"]
    assert sum(p.numel() for p in module.model.parameters()) < sum(p.numel() for p in dense.parameters())
    assert compacted != pytest.approx(expected)  # else this test could not tell the two models apart
    assert accuracy.results["tiny_ll"]["dense"]["perplexity"] == pytest.approx(expected)


def test_a_resumed_run_compacting_before_training_keeps_its_dense_scores(
    tmp_path, tiny_model_dir, tiny_lm, monkeypatch
):
    """The resumed run is compacted from its checkpoint: lm-eval runs only on the final model, and the dense
    scores are the first run's, from the checkpoint."""
    import lightning as L

    import mosaic_lightning.callbacks.zero_shot as zero_shot_callback
    from mosaic_lightning import CausalLM, MosaicPruning, TextDataModule
    from mosaic_lightning.callbacks.zero_shot import ZeroShotAccuracy

    scored: list[int] = []
    real = zero_shot_callback.zero_shot_accuracy

    def counting(model, *args, **kwargs):
        scored.append(model.num_parameters())
        return real(model, *args, **kwargs)

    monkeypatch.setattr(zero_shot_callback, "zero_shot_accuracy", counting)
    train, test = write_text_files(tmp_path)
    include = str(write_loglikelihood_task(tmp_path / "tasks"))

    def fit(max_steps: int, ckpt_path=None):
        data = TextDataModule(str(tiny_model_dir), str(train), str(test), seq_len=32, batch_size=2,
                              num_calibration_samples=4, max_eval_windows=2)  # fmt: skip
        accuracy = ZeroShotAccuracy(["tiny_ll"], include)
        pruning = MosaicPruning(sparsity=0.5, method="magnitude", allocation="uniform", structured_fraction=1.0,
                                uniform_structure=True, whole_units=True, compact_before_training=True)  # fmt: skip
        trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, callbacks=[accuracy, pruning], logger=False,
                            default_root_dir=tmp_path, enable_progress_bar=False,
                            enable_model_summary=False)  # fmt: skip
        trainer.fit(CausalLM(str(tiny_model_dir)), data, ckpt_path=ckpt_path)
        return accuracy

    first = fit(2)
    assert scored == [tiny_lm[0].num_parameters()]  # the dense model, before the prune
    resumed = fit(3, next(tmp_path.rglob("*.ckpt")))
    assert len(scored) == 1  # nothing scored on resume: this test calls no evaluate_pruned
    assert resumed.results["tiny_ll"]["dense"] == first.results["tiny_ll"]["dense"]


def _cli(tmp_path: Path, model_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    train, test = write_text_files(tmp_path)
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "recipes/wanda-50.yaml"),
         "--model.pretrained", str(model_dir), "--data.train_files", str(train), "--data.eval_files", str(test),
         "--data.seq_len", "32", "--data.num_calibration_samples", "4", "--data.max_eval_windows", "2",
         "--trainer.logger", "false", *extra],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")},
    )  # fmt: skip


def test_cli_reports_dense_and_pruned_accuracy(tmp_path, tiny_model_dir):
    export = tmp_path / "export"
    include = write_task(tmp_path / "my_tasks")
    result = _cli(
        tmp_path,
        tiny_model_dir,
        "--evaluate_tasks",
        "[tiny_mc, social_iqa_local]",
        "--evaluate_include_path",
        str(include),
        "--evaluate_limit",
        "6",
        "--export_dir",
        str(export),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((export / "pruning_report.json").read_text())
    assert set(report["tasks"]) == {"tiny_mc", "social_iqa_local"}
    for phases in report["tasks"].values():
        assert set(phases) == {"dense", "pruned"}
        for metrics in phases.values():
            assert {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr"} <= set(metrics) and metrics["samples"] == 6
            assert all(0 <= metrics[m] <= 1 for m in ("acc", "acc_norm")) and 6 * metrics["acc"] % 1 == 0
    table = result.stdout + result.stderr
    assert "perplexity" in table and "social_iqa_local acc_norm" in table


def test_cli_unknown_task_fails_before_pruning(tmp_path, tiny_model_dir):
    export = tmp_path / "export"
    result = _cli(tmp_path, tiny_model_dir, "--evaluate_tasks", "[social_iqa_locl]", "--export_dir", str(export))
    assert result.returncode != 0
    assert "--evaluate_tasks" in result.stderr and "social_iqa_local" in result.stderr
    assert "dense perplexity" not in result.stderr and not export.exists()  # failed in before_fit
