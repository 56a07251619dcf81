"""The `sluice` command line, run as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def sluice(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    # Offline hub mode: a hub id fails at once instead of waiting on the network.
    env = {**os.environ, "SLUICE_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "infra.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_help_lists_commands(tmp_path: Path) -> None:
    proc = sluice("--help", cache=tmp_path)
    assert proc.returncode == 0
    assert "generate" in proc.stdout and "model" in proc.stdout


def test_generate_on_builtin_tiny_model(tmp_path: Path) -> None:
    proc = sluice("generate", "Sluice is", "KV cache", "--max-tokens", "8", "--ignore-eos",
                  "--json", cache=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == ["Sluice is", "KV cache"]
    assert all(len(line["token_ids"]) == 8 and line["finish_reason"] == "length" for line in lines)
    assert (tmp_path / "models" / "tiny-v1" / "config.json").is_file()


def test_generate_reports_bad_input_clearly(tmp_path: Path) -> None:
    proc = sluice("generate", "x", "--max-tokens", "0", cache=tmp_path)
    assert proc.returncode == 2
    assert "max_tokens must be an integer >= 1" in proc.stderr
    proc = sluice("generate", cache=tmp_path)
    assert proc.returncode == 2 and "at least one PROMPT" in proc.stderr
    proc = sluice("generate", "x", "--model", "no/such-model-here", cache=tmp_path)
    assert proc.returncode == 2 and "could not be fetched" in proc.stderr


def test_model_tiny_writes_a_checkpoint(tmp_path: Path) -> None:
    proc = sluice("model", "tiny", str(tmp_path / "tiny"), cache=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "tiny" / name).is_file()
