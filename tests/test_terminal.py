"""What a command writes when its output is a log file or a pipe (CI, nohup, a scheduler): plain progress
lines, no carriage returns, and none of the libraries' own progress bars, warnings or notices unless --debug."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from tests.conftest import REPO, recipe_dict
from tests.helpers.cli import ENV
from tests.helpers.terminal import GGUF_BAR, LIBRARY_BARS, avx512_bf16_site, library_noise


def run_cli(tmp_path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**ENV, "QLORA_PIPE_PROGRESS_SECONDS": "0", **(env or {})}  # a line per update: a short run shows several
    env.pop("HF_DATASETS_DISABLE_PROGRESS_BARS", None)
    command = [sys.executable, "-m", "qlora_pipe.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def test_off_a_terminal_progress_is_plain_lines_and_library_bars_stay_out(tiny_gguf, tmp_path):
    """On a GGUF base, converted on first use, on a CPU where bitsandbytes looks for its Hub kernel, with a fresh
    cache (matplotlib builds its font list): nothing but the tool's own lines, unless --debug."""
    raw = recipe_dict(tiny_gguf, tmp_path / "runs", max_steps=4, report_to=["none"])
    raw["training"]["preview_prompts"] = ["What is a tort?"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    site = {"PYTHONPATH": str(avx512_bf16_site(tmp_path)), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = run_cli(tmp_path, "train", str(path), env=site)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "\r" not in log, max(log.split("\n"), key=len)[:300]
    assert max(len(line) for line in log.splitlines()) < 400
    steps = [line for line in done.stderr.splitlines() if line.startswith("training (")]
    assert len(steps) >= 4 and ": 4/4 steps (100%)" in steps[-1] and "loss=" in steps[-1], steps
    assert "model: converting tiny-f16.gguf" in done.stderr and not library_noise(log), library_noise(log)

    fresh = {**site, "XDG_CACHE_HOME": str(tmp_path / "fresh-cache")}  # converted again, with --debug
    debug = run_cli(tmp_path, "--debug", "data", str(path), "--set", f"data.cache_dir={tmp_path / 'fresh'}", env=fresh)
    assert debug.returncode == 0, debug.stderr[-3000:]
    assert any(bar in debug.stderr for bar in LIBRARY_BARS), debug.stderr[-3000:]  # --debug shows them
    assert GGUF_BAR in debug.stderr, debug.stderr[-3000:]


def test_plain_progress_line_says_where_a_stage_is(capsys, monkeypatch):
    from qlora_pipe.terminal import PlainProgress

    monkeypatch.setenv("QLORA_PIPE_PROGRESS_SECONDS", "3600")
    bar = PlainProgress(total=10, desc="merging", unit="tensor")
    bar.update(4)  # within the interval: nothing yet
    assert capsys.readouterr().err == ""
    bar.set_postfix({"loss": "1.25"})
    bar.close()
    assert capsys.readouterr().err.startswith("merging: 4/10 tensors (40%), 0s, ETA ")
    transient = PlainProgress(total=3, desc="answers", unit="answer", leave=False)
    transient.update(3)
    transient.close()
    assert capsys.readouterr().err == "" and os.environ["QLORA_PIPE_PROGRESS_SECONDS"] == "3600"
