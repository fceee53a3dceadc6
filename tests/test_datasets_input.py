"""``TextDataModule(dataset=...)``: a local jsonl / parquet / save_to_disk dataset gives exactly the token windows
the same text gives as plain files; streaming reads only what the windows need; bad fields are named."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch

from mosaic_lightning import TextDataModule

TRAIN_DOCS = [f"Training document {i}: " + " ".join(f"word{(i * 7 + j) % 53}" for j in range(40 + i))
              for i in range(30)]  # fmt: skip
EVAL_DOCS = [f"Held-out text {i}, " + " ".join(f"other{(i * 5 + j) % 41}" for j in range(30 + i)) for i in range(12)]
KW = {"seq_len": 32, "batch_size": 4, "num_calibration_samples": 8}


@pytest.fixture(autouse=True)
def _offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def _write_jsonl(path: Path, docs: list[str], column: str = "body") -> Path:
    path.write_text("".join(json.dumps({"id": i, column: doc}) + "\n" for i, doc in enumerate(docs)))
    return path


def _module(tokenizer_dir: Path, **kwargs) -> TextDataModule:
    module = TextDataModule(tokenizer=str(tokenizer_dir), **KW, **kwargs)
    module.setup("fit")
    return module


@pytest.fixture
def from_files(tmp_path, tiny_model_dir) -> TextDataModule:
    """The reference: the documents written as text files, joined with a blank line as the module joins rows."""
    (tmp_path / "train.txt").write_text("\n\n".join(TRAIN_DOCS))
    (tmp_path / "eval.txt").write_text("\n\n".join(EVAL_DOCS))
    return _module(tiny_model_dir, train_files=str(tmp_path / "train.txt"), eval_files=str(tmp_path / "eval.txt"))


def _assert_same_windows(module: TextDataModule, reference: TextDataModule) -> None:
    assert torch.equal(module.train_set.windows, reference.train_set.windows)
    assert torch.equal(module.eval_set.windows, reference.eval_set.windows)
    for ours, theirs in zip(module.calibration_batches(), reference.calibration_batches(), strict=True):
        assert torch.equal(ours, theirs)
    assert [b["input_ids"].tolist() for b in module.train_dataloader()] == [
        b["input_ids"].tolist() for b in reference.train_dataloader()
    ]


def test_jsonl_dataset_equals_the_same_text_as_files(tmp_path, tiny_model_dir, from_files):
    train, held_out = _write_jsonl(tmp_path / "train.jsonl", TRAIN_DOCS), _write_jsonl(tmp_path / "e.jsonl", EVAL_DOCS)
    module = _module(tiny_model_dir, dataset=str(train), eval_dataset=str(held_out), text_column="body")
    assert len(module.train_set) > KW["num_calibration_samples"]  # the calibration draw really chooses
    _assert_same_windows(module, from_files)


def test_parquet_and_save_to_disk_splits_equal_the_files(tmp_path, tiny_model_dir, from_files):
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TRAIN_DOCS}),
                                   "test": datasets.Dataset.from_dict({"text": EVAL_DOCS})})  # fmt: skip
    splits.save_to_disk(str(tmp_path / "saved"))
    _assert_same_windows(_module(tiny_model_dir, dataset=str(tmp_path / "saved"), eval_split="test"), from_files)
    splits["train"].to_parquet(str(tmp_path / "train.parquet"))
    splits["test"].to_parquet(str(tmp_path / "test.parquet"))
    module = _module(tiny_model_dir, dataset=str(tmp_path / "train.parquet"),
                     eval_dataset=str(tmp_path / "test.parquet"))  # fmt: skip
    _assert_same_windows(module, from_files)


def test_streaming_reads_only_the_windows_it_needs(tmp_path, tiny_model_dir, from_files):
    train, held_out = _write_jsonl(tmp_path / "train.jsonl", TRAIN_DOCS), _write_jsonl(tmp_path / "e.jsonl", EVAL_DOCS)
    module = _module(tiny_model_dir, dataset=str(train), eval_dataset=str(held_out), text_column="body",
                     streaming=True, max_eval_windows=3)  # fmt: skip
    n = KW["num_calibration_samples"]
    assert n <= len(module.train_set) < len(from_files.train_set)  # stopped early, with enough windows
    assert torch.equal(module.train_set.windows[:n], from_files.train_set.windows[:n])  # the leading text
    assert torch.equal(module.eval_set.windows, from_files.eval_set.windows[:3])


def test_missing_column_lists_the_columns(tmp_path, tiny_model_dir):
    train = _write_jsonl(tmp_path / "train.jsonl", TRAIN_DOCS)
    with pytest.raises(ValueError, match=r"data.text_column='text' is not a column .*available: \['body', 'id'\]"):
        _module(tiny_model_dir, dataset=str(train), eval_dataset=str(train))


def test_unknown_split_lists_the_splits(tmp_path, tiny_model_dir):
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TRAIN_DOCS})}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(ValueError, match=r"data.eval_split='validation' is not a split .*available: \['train'\]"):
        _module(tiny_model_dir, dataset=str(tmp_path / "d"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dataset": "x.jsonl", "train_files": "a.txt", "eval_files": "b.txt"}, "data.dataset or data.train_files"),
        ({"eval_dataset": "x.jsonl"}, "data.eval_dataset='x.jsonl' needs data.dataset"),
    ],
)
def test_conflicting_sources_are_refused_up_front(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TextDataModule(**kwargs)


def test_unknown_file_type_names_the_field(tmp_path, tiny_model_dir):
    (tmp_path / "corpus.xml").write_text("<a/>")
    with pytest.raises(ValueError, match=r"data.dataset=.*corpus.xml.*unknown file type '.xml'; allowed: \['.csv'"):
        _module(tiny_model_dir, dataset=str(tmp_path / "corpus.xml"))
