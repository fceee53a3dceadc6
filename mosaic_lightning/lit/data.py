"""``TextDataModule``: plain text files (or the bundled Wikipedia sample) cut into fixed token windows."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ..core.assets import BUNDLED_MODEL, load_tokenizer, wikipedia_split
from .hf_text import documents, load_split, take_documents
from .resumable import EpochShuffle, ResumableLoader


class TokenWindows(Dataset):
    """Non-overlapping windows of ``seq_len`` tokens from one long token stream (the tail is dropped)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        n = tokens.numel() // seq_len
        self.windows = tokens[: n * seq_len].view(n, seq_len)

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i]}


class TextDataModule(L.LightningDataModule):
    """Train/calibration windows from ``train_files`` (or ``dataset``); held-out perplexity windows from
    ``eval_files`` (or ``eval_split`` of ``eval_dataset``, by default of ``dataset``).

    Without files or a dataset, the bundled Wikipedia sample is used: the first 80 articles for calibration and
    training, the last 20 for evaluation (split by article, never calibrating on test text). A dataset's rows
    are documents, joined with a blank line exactly as several files are.

    Args:
        tokenizer: tokenizer source (hub id, local dir or ``bundled:smollm2-135m``); the CLI links it to
            ``model.pretrained``.
        train_files, eval_files: UTF-8 text files (one path or a list); documents are joined with a blank line.
        seq_len: tokens per window.
        batch_size: windows per training/evaluation batch.
        num_calibration_samples: windows drawn (seeded) from the training text for calibration.
        max_eval_windows: evaluate on the first N held-out windows only (None = all).
        seed: seed of the calibration draw and training shuffle.
        dataset: a ``datasets`` source instead of files: hub id, ``save_to_disk`` folder, folder of data files, or
            one json/jsonl/parquet/csv/txt file (a single file is one split whatever ``split`` says).
        dataset_config: the configuration name of a hub dataset (e.g. ``wikitext-2-raw-v1``).
        split: the split of ``dataset`` that calibrates and trains.
        eval_dataset: where the held-out text comes from (default: ``dataset``, at ``eval_split``).
        eval_split: the split of ``eval_dataset`` (or ``dataset``) that is evaluated.
        text_column: the column holding the text, in both.
        streaming: read the datasets lazily and stop once the text holds the windows needed:
            ``num_calibration_samples`` for calibration and training, ``max_eval_windows`` for evaluation
            (the whole split when that is null).
    """

    def __init__(
        self,
        tokenizer: str = BUNDLED_MODEL,
        train_files: list[str] | str | None = None,
        eval_files: list[str] | str | None = None,
        seq_len: int = 512,
        batch_size: int = 4,
        num_calibration_samples: int = 128,
        max_eval_windows: int | None = None,
        seed: int = 0,
        dataset: str | None = None,
        dataset_config: str | None = None,
        split: str = "train",
        eval_dataset: str | None = None,
        eval_split: str = "validation",
        text_column: str = "text",
        streaming: bool = False,
    ) -> None:
        super().__init__()
        if seq_len < 2:
            raise ValueError(f"seq_len={seq_len}; must be >= 2")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; must be >= 1")
        if num_calibration_samples < 1:
            raise ValueError(f"num_calibration_samples={num_calibration_samples}; must be >= 1")
        if max_eval_windows is not None and max_eval_windows < 1:
            raise ValueError(f"max_eval_windows={max_eval_windows}; must be >= 1 (or null for all windows)")
        train_files, eval_files = _as_list(train_files), _as_list(eval_files)
        if (train_files is None) != (eval_files is None):
            raise ValueError("give both train_files and eval_files, or neither (bundled Wikipedia sample)")
        if dataset is not None and train_files is not None:
            raise ValueError("give data.dataset or data.train_files/eval_files, not both")
        if dataset is None and eval_dataset is not None:
            raise ValueError(f"data.eval_dataset={eval_dataset!r} needs data.dataset (the calibration text)")
        for field_name, paths in (("train_files", train_files), ("eval_files", eval_files)):
            for path in paths or []:  # at construction: before the model loads or anything is pruned
                _check_text_file(path, field_name)
        self.save_hyperparameters()
        self.tokenizer = None
        self.train_set: TokenWindows | None = None
        self.eval_set: TokenWindows | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.tokenizer)
        if hp.dataset is not None:
            train_docs, eval_docs = self._dataset_documents()
        elif hp.train_files is None:
            train_docs, eval_docs = wikipedia_split()
        else:
            train_docs, eval_docs = (
                _read_files(_as_list(hp.train_files), "train_files"),
                _read_files(_as_list(hp.eval_files), "eval_files"),
            )
        self.train_set = TokenWindows(self._tokenize(train_docs), hp.seq_len)
        self.eval_set = TokenWindows(self._tokenize(eval_docs), hp.seq_len)
        if len(self.train_set) == 0:
            raise ValueError(
                f"the training text (train_files or dataset) holds fewer than seq_len={hp.seq_len} tokens: "
                "the calibration set is empty"
            )
        if len(self.eval_set) == 0:
            raise ValueError(f"the held-out text (eval_files, eval_dataset or dataset's eval_split) holds fewer than "
                             f"seq_len={hp.seq_len} tokens: nothing to evaluate")  # fmt: skip
        if hp.max_eval_windows is not None:
            self.eval_set.windows = self.eval_set.windows[: hp.max_eval_windows]

    def _dataset_documents(self) -> tuple[list[str], list[str]]:
        """Calibration/training documents from ``dataset``; held-out ones from ``eval_dataset`` or ``dataset``."""
        hp = self.hparams
        train = self._split_documents(hp.dataset, hp.split, hp.dataset_config, ("dataset", "split"),
                                      hp.num_calibration_samples)  # fmt: skip
        if hp.eval_dataset is None:
            held_out = (hp.dataset, hp.eval_split, hp.dataset_config, ("dataset", "eval_split"))
        else:
            held_out = (hp.eval_dataset, hp.eval_split, None, ("eval_dataset", "eval_split"))
        return train, self._split_documents(*held_out, hp.max_eval_windows)

    def _split_documents(self, source: str, split: str, config: str | None, fields: tuple[str, str],
                         windows: int | None) -> list[str]:  # fmt: skip
        """The split's texts; streamed, only as many leading rows as ``windows`` windows need."""
        hp = self.hparams
        rows = documents(load_split(source, split, config, hp.streaming, fields), hp.text_column, source, fields[0])
        needed = windows * hp.seq_len if hp.streaming and windows else None
        return take_documents(rows, lambda docs: self._tokenize(docs).numel(), needed)

    def _tokenize(self, docs: list[str]) -> torch.Tensor:
        ids = self.tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch from ``seed``; its position travels in checkpoints (resumes mid-epoch exactly)."""
        sampler = EpochShuffle(len(self.train_set), self.hparams.seed)
        return ResumableLoader(self.train_set, batch_size=self.hparams.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.eval_set, batch_size=self.hparams.batch_size)

    def calibration_batches(self, num_samples: int | None = None) -> list[torch.Tensor]:
        """``num_samples`` training windows drawn with the module's seed, as ``input_ids`` batches."""
        self.setup()
        n = min(num_samples or self.hparams.num_calibration_samples, len(self.train_set))
        order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(self.hparams.seed))
        windows = self.train_set.windows[order[:n]]
        return list(windows.split(self.hparams.batch_size))


def _as_list(paths: list[str] | str | None) -> list[str] | None:
    """A single path works where a list is expected (``--data.train_files x.txt``)."""
    return [paths] if isinstance(paths, str) else paths


def _check_text_file(path: str, field_name: str) -> None:
    where = Path(path)
    if where.is_dir():
        raise IsADirectoryError(f"{field_name}: {path} is a directory; give UTF-8 text files")
    if not where.is_file():
        raise FileNotFoundError(f"{field_name}: {path}: no such file ({where.absolute()}); give UTF-8 text files")


def _read_files(paths: list[str], field_name: str) -> list[str]:
    if not paths:
        raise ValueError(f"{field_name} is empty; give one or more UTF-8 text files")
    docs = []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            try:
                docs.append(fh.read())
            except UnicodeDecodeError as err:  # a binary file: say which, and what was expected
                raise ValueError(f"{field_name}: {path} is not UTF-8 text (byte {err.start}: {err.reason}); give "
                                 "plain text files") from None  # fmt: skip
    return docs
