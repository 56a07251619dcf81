"""Turn a model name or path, as a user types it, into a local checkpoint folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

from worker.engine.errors import ModelLoadError
from worker.models.tiny import TINY_MODEL_DIRNAME, build_tiny_model

TINY_MODEL_NAME = "tiny"
# Configs of common real models ship with the project, for `load_format="dummy"` benchmarks.
SHIPPED_CONFIGS_DIR = Path(__file__).parent / "configs"
CACHE_DIR_ENV = "SLUICE_CACHE_DIR"
# Only the files a serving worker reads: a hub repo can also hold GB of other formats.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]
# "org/name" as the hub spells repo ids; a leading "." or "/" means a filesystem path instead.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_OPTIONS = (f"Pass '{TINY_MODEL_NAME}' for the built-in test model, a shipped config name for "
            f"dummy weights ({', '.join(sorted(p.name for p in SHIPPED_CONFIGS_DIR.iterdir() if p.is_dir()))}), "
            f"the path of a local folder "
            f"with config.json and safetensors weights, or a Hugging Face hub id such as "
            f"'org/name'")


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sluice"


def resolve_model(name_or_path: str, cache_dir: str | Path | None = None) -> Path:
    """Return a folder holding the model's config.json, building or fetching it if needed.

    "tiny" is built into the cache; an existing folder is used as is; "org/name" is fetched
    from the Hugging Face hub when `huggingface_hub` is installed and the hub is reachable.
    """
    if not name_or_path.strip():
        # Path("") is the working directory, which would give a confusing config.json error.
        raise ModelLoadError(f"no model given. {_OPTIONS}")
    if name_or_path == TINY_MODEL_NAME:
        return _tiny(Path(cache_dir).expanduser() if cache_dir else default_cache_dir())
    shipped = SHIPPED_CONFIGS_DIR / name_or_path
    if "/" not in name_or_path and (shipped / "config.json").is_file():
        return shipped
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _checked(path, f"model folder {path}")
    if path.exists():
        raise ModelLoadError(f"model path {path} is a file; pass the folder that holds config.json")
    if _HUB_ID.match(name_or_path) and ".." not in name_or_path:
        return _from_hub(name_or_path)
    raise ModelLoadError(f"unknown model {name_or_path!r}: no folder by that name exists. {_OPTIONS}")


def _tiny(cache_dir: Path) -> Path:
    target = cache_dir / "models" / TINY_MODEL_DIRNAME
    if (target / "config.json").is_file():
        return target
    # Safe against a concurrent build: each builds privately and the first rename wins.
    return build_tiny_model(target)


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ModelLoadError(
            f"model {repo_id!r} is not a local folder, and huggingface_hub is not installed to "
            f"fetch it; install it or pass a local folder with config.json") from exc
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as exc:  # offline, unknown repo, gated, disk full: all mean the same here
        raise ModelLoadError(
            f"model {repo_id!r} could not be fetched from the Hugging Face hub "
            f"({type(exc).__name__}: {exc}); no local folder {repo_id!r} exists either. "
            f"Pass the path of a local folder with config.json and safetensors weights "
            f"instead") from exc
    return _checked(folder, f"hub model {repo_id!r} (downloaded to {folder})")


def _checked(folder: Path, what: str) -> Path:
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{what} has no config.json; expected a Hugging Face-format checkpoint folder "
            f"(config.json, tokenizer files, *.safetensors)")
    return folder
