"""Documents from a Hugging Face ``datasets`` source: a hub id, a ``save_to_disk`` folder, a folder of data files,
or one json/jsonl/parquet/csv/text file (each loaded with its ``datasets`` builder), one text column.

Errors name the ``TextDataModule`` field (``data.dataset``, ``data.split``, ``data.text_column``) and list what
is there (splits, columns, file types), before any tokenizing or pruning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

# A single local file is loaded by the builder its suffix names.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
_SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes (DatasetDict, Dataset)


def load_split(
    source: str,
    split: str,
    config: str | None = None,
    streaming: bool = False,
    fields: tuple[str, str] = ("dataset", "split"),
):
    """One split of ``source`` as a ``datasets`` ``Dataset`` (``IterableDataset`` when ``streaming``); ``fields``
    names the source and split options in errors.

    A single file is one split whatever ``split`` says (``datasets`` calls it ``train``); a ``save_to_disk``
    folder of one ``Dataset`` likewise. Anything that is not a local path is a hub id (with ``config`` as its
    configuration name).
    """
    import datasets

    field = fields[0]
    path = Path(source)
    if path.is_dir() and any((path / marker).is_file() for marker in _SAVED_MARKERS):
        saved = datasets.load_from_disk(str(path))
        if isinstance(saved, datasets.DatasetDict):
            saved = _pick(saved, split, source, fields)
        return saved.to_iterable_dataset() if streaming else saved
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            allowed = f"{sorted(FILE_BUILDERS)}, a save_to_disk folder, a folder of data files or a hub id"
            raise ValueError(f"data.{field}={source!r}: unknown file type {path.suffix!r}; allowed: {allowed}")
        return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=streaming)
    if path.exists() and not path.is_dir():
        raise ValueError(f"data.{field}={source!r} is neither a file nor a directory")
    loaded = datasets.load_dataset(source, name=config, streaming=streaming)
    return _pick(loaded, split, source, fields)


def _pick(splits, split: str, source: str, fields: tuple[str, str]):
    if split not in splits:
        raise ValueError(f"data.{fields[1]}={split!r} is not a split of data.{fields[0]}={source!r}; "
                         f"available: {sorted(splits)}")  # fmt: skip
    return splits[split]


def documents(dataset, text_column: str, source: str, field: str = "dataset") -> Iterator[str]:
    """The ``text_column`` strings of ``dataset`` in order; a missing column lists the columns there are."""
    columns = dataset.column_names
    if columns is None:  # a streamed dataset whose features are unknown until read: look at the first row
        columns = list(next(iter(dataset), {}))
    if text_column not in columns:
        raise ValueError(f"data.text_column={text_column!r} is not a column of data.{field}={source!r}; "
                         f"available: {sorted(columns)}")  # fmt: skip
    for i, row in enumerate(dataset.select_columns([text_column])):
        text = row[text_column]
        if not isinstance(text, str):
            raise ValueError(f"data.text_column={text_column!r} of data.{field}={source!r}: row {i} holds "
                             f"{type(text).__name__}, not text")  # fmt: skip
        yield text


def take_documents(docs: Iterable[str], num_tokens: Callable[[list[str]], int], needed: int | None) -> list[str]:
    """Every document (``needed`` None), or the fewest leading ones whose joined text holds ``needed`` tokens:
    a streamed corpus is read only as far as the windows need. A running per-document count decides when to
    check the exact count of the joined text, so the text is tokenized about once."""
    if needed is None:
        return list(docs)
    taken, estimate = [], 0
    for doc in docs:
        taken.append(doc)
        estimate += num_tokens([doc])
        if estimate >= needed and num_tokens(taken) >= needed:
            break
    return taken
