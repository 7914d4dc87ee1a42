"""Publishing against a loopback Hub: what arrives, the card, dry run, auth failures, retries, no token leaks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import recipe_dict
from tests.helpers.fake_hub import FakeHub

REPO = Path(__file__).resolve().parents[1]
WRITE, READ = "hf_writer_secret_123", "hf_reader_secret_456"


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hub-run")
    raw = recipe_dict(tiny_model_dir, folder / "runs", max_steps=2, report_to=["none"])
    (folder / "recipe.yaml").write_text(yaml.safe_dump(raw))
    for command in (["train", str(folder / "recipe.yaml")], ["export", str(folder / "runs/test")]):
        done = subprocess.run(
            [sys.executable, "-m", "qlora_pipe.cli", *command], capture_output=True, text=True, cwd=REPO
        )
        assert done.returncode == 0, done.stderr[-2000:]
    return folder / "runs" / "test"


def push(run: Path, hub: FakeHub | None, token: str | None, *args: str, home: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "2"}
    if hub:
        env["HF_ENDPOINT"] = hub.url
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "qlora_pipe.cli", "push", str(run), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )


def test_push_adapter_and_merged_sends_exactly_the_right_files(finished_run, tmp_path):
    with FakeHub() as hub:
        result = push(finished_run, hub, WRITE, "--repo-id", "me/legal", "--what", "both", "--private", home=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [c["repo"] for c in hub.commits] == ["me/legal", "me/legal-merged"]
    adapter, merged = (set(c["files"]) for c in hub.commits)
    assert adapter == {
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "chat_template.jinja",
        "tokenizer.json",
        "tokenizer_config.json",
        "loss.png",
    }
    assert {"README.md", "config.json", "generation_config.json", "model.safetensors", "fidelity.json"} <= merged
    assert not any(name.startswith(("checkpoint", "optimizer")) or name.endswith(".jsonl") for name in adapter | merged)
    assert [repo["visibility"] for repo in hub.repos] == ["private", "private"]
    sent = hub.commits[0]["files"]
    assert sent["adapter_model.safetensors"] == (finished_run / "adapter_model.safetensors").read_bytes()
    from qlora_pipe.export.serving import has_generation_tags

    # The pushed adapter carries the serving template and a tokenizer config transformers 4 loads too;
    # the run keeps the training template it masked with.
    assert not has_generation_tags(sent["chat_template.jinja"].decode())
    assert has_generation_tags((finished_run / "chat_template.jinja").read_text())
    assert json.loads(sent["tokenizer_config.json"])["tokenizer_class"] == "PreTrainedTokenizerFast"
    # The card: valid front matter through huggingface_hub's own parser, and the facts of the run.
    from huggingface_hub import ModelCard

    card = ModelCard(sent["README.md"].decode())
    assert (
        card.data.library_name == "peft" and "qlora" in card.data.tags and card.data.pipeline_tag == "text-generation"
    )
    assert "PeftModel.from_pretrained" in card.text and "vllm serve" in card.text and "eval loss" in card.text
    merged_card = ModelCard(hub.commits[1]["files"]["README.md"].decode())
    assert merged_card.data.library_name == "transformers" and "Fidelity" in merged_card.text
    # No local path leaves the machine: not the base model's directory, not the run directory (every byte).
    base_dir = yaml.safe_load((finished_run / "recipe.resolved.yaml").read_text())["model"]["name_or_path"]
    for local in {base_dir, str(Path(base_dir).resolve()), str(finished_run), str(finished_run.resolve())}:
        leaks = [name for c in hub.commits for name, data in c["files"].items() if local.encode() in data]
        assert not leaks, f"{local} was uploaded in {leaks}"
    config = json.loads(sent["adapter_config.json"])
    assert config["base_model_name_or_path"] == "<base model>"  # a local base with no Hub id: a placeholder
    assert "A LoRA adapter for `<base model>`" in card.text
    # The token never appears in output, in what was uploaded, or in the run directory.
    assert WRITE not in result.stdout + result.stderr
    assert all(WRITE.encode() not in data for c in hub.commits for data in c["files"].values())
    assert all(WRITE.encode() not in body for _, _, _, body in hub.requests)
    assert not any(WRITE.encode() in p.read_bytes() for p in finished_run.rglob("*") if p.is_file())


def test_dry_run_lists_files_and_uploads_nothing(finished_run, tmp_path):
    with FakeHub() as hub:
        result = push(finished_run, hub, WRITE, "--repo-id", "me/legal", "--dry-run", home=tmp_path)
    assert result.returncode == 0
    assert "would upload adapter -> me/legal" in result.stdout and "adapter_model.safetensors" in result.stdout
    assert hub.requests == []


def test_missing_or_read_only_token_fails_before_any_upload(finished_run, tmp_path):
    with FakeHub() as hub:
        missing = push(finished_run, hub, None, "--repo-id", "me/legal", home=tmp_path)
        read_only = push(finished_run, hub, READ, "--repo-id", "me/legal", home=tmp_path)
        foreign = push(finished_run, hub, WRITE, "--repo-id", "someone-else/legal", home=tmp_path)
    assert missing.returncode == 2 and "HF_TOKEN" in missing.stderr
    assert read_only.returncode == 2 and "read-only" in read_only.stderr and READ not in read_only.stderr
    assert foreign.returncode == 2 and "cannot write to the namespace 'someone-else'" in foreign.stderr
    assert hub.commits == [] and hub.repos == []


def test_hub_errors_say_what_actually_failed(finished_run, tmp_path):
    """No token, a refused token, offline mode and an unreachable endpoint: four different one-line errors."""
    with FakeHub() as hub:
        missing = push(finished_run, hub, None, "--repo-id", "me/legal", home=tmp_path)
        refused = push(finished_run, hub, "hf_not_a_real_token", "--repo-id", "me/legal", home=tmp_path)
    down = FakeHub.__new__(FakeHub)
    down.url = "http://127.0.0.1:9"  # nothing listens on the discard port
    unreachable = push(finished_run, down, WRITE, "--repo-id", "me/legal", home=tmp_path)
    env = {"PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path), "HF_TOKEN": WRITE, "HF_HUB_OFFLINE": "1"}
    offline = subprocess.run(
        [sys.executable, "-m", "qlora_pipe.cli", "push", str(finished_run), "--repo-id", "me/legal"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    expected = [
        (missing, "Hub: no token found; set HF_TOKEN"),
        (refused, "refused the token (HTTP 401)"),
        (offline, "Hub: offline mode is on (HF_HUB_OFFLINE)"),
        (unreachable, "Hub: cannot reach http://127.0.0.1:9"),
    ]
    for result, message in expected:
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 2 and last.startswith("error: ") and message in last, result.stderr[-1500:]
        assert "Traceback" not in result.stderr


def test_server_errors_are_retried_by_the_library_then_reported_with_a_retry_command(finished_run, tmp_path):
    with FakeHub() as hub:
        hub.fail_commits = 1
        recovered = push(finished_run, hub, WRITE, "--repo-id", "me/legal", home=tmp_path)
        assert recovered.returncode == 0, recovered.stderr[-2000:]
        assert len(hub.commits) == 1
        hub.fail_commits = 1000
        failed = push(finished_run, hub, WRITE, "--repo-id", "me/legal", home=tmp_path)
    assert failed.returncode == 2
    last = failed.stderr.strip().splitlines()[-1]
    assert "local files are untouched" in last and f"qlora-pipe push {finished_run} --repo-id me/legal" in last
    assert (finished_run / "adapter_model.safetensors").is_file()


def train_with_hub(tiny_model_dir, tmp_path, hub: FakeHub, hub_section: dict, **training):
    raw = recipe_dict(tiny_model_dir, tmp_path / "runs", report_to=["none"], **training)
    raw["hub"] = hub_section
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    env = {"PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": hub.url, "HF_TOKEN": WRITE}
    return subprocess.run(
        [sys.executable, "-m", "qlora_pipe.cli", "train", str(tmp_path / "recipe.yaml")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )


def test_recipe_can_push_the_adapter_when_training_ends(tiny_model_dir, tmp_path):
    with FakeHub() as hub:
        done = train_with_hub(
            tiny_model_dir, tmp_path, hub, {"repo_id": "me/at-end", "push_adapter_at_end": True}, max_steps=1
        )
    assert done.returncode == 0, done.stderr[-2000:]
    assert [c["repo"] for c in hub.commits] == ["me/at-end"]
    assert "adapter_model.safetensors" in hub.commits[0]["files"]
    assert [r["visibility"] for r in hub.repos] == ["private"]  # hub.private defaults to true


def test_push_to_a_branch_with_a_commit_message(finished_run, tmp_path):
    with FakeHub() as hub:
        result = push(
            finished_run,
            hub,
            WRITE,
            "--repo-id",
            "me/legal",
            "--revision",
            "dev",
            "--commit-message",
            "v2",
            home=tmp_path,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    assert any(method == "POST" and "/branch/dev" in path for method, path, _, _ in hub.requests)
    assert [(c["revision"], c["summary"]) for c in hub.commits] == [("dev", "v2")]


def test_recipe_can_push_every_checkpoint(tiny_model_dir, tmp_path):
    with FakeHub() as hub:
        done = train_with_hub(
            tiny_model_dir, tmp_path, hub, {"repo_id": "me/ckpts", "push_checkpoints": True}, max_steps=2, save_steps=1
        )
    assert done.returncode == 0, done.stderr[-2000:]
    assert [c["summary"] for c in hub.commits] == [f"Adapter at step {n} (qlora-pipe checkpoint)" for n in (1, 2)]
    assert all(set(c["files"]) == {"adapter_model.safetensors", "adapter_config.json"} for c in hub.commits)


def test_pushed_files_name_a_local_base_by_the_hub_id_it_records(tmp_path, tiny_model_dir):
    from qlora_pipe.publish.hub import public_base_name
    from qlora_pipe.recipe import validate_recipe

    def base_named(name: str) -> str:
        return public_base_name(validate_recipe(recipe_dict(Path(name), tmp_path / "runs"), "r"))

    assert base_named("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"  # a Hub id stays
    assert base_named(str(tiny_model_dir)) == "<base model>"  # a local model that records no Hub id
    local = tmp_path / "my-llama"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"_name_or_path": "meta-llama/Llama-3.1-8B"}))
    assert base_named(str(local)) == "meta-llama/Llama-3.1-8B"
    (local / "config.json").write_text(json.dumps({"_name_or_path": "/home/me/models/llama"}))
    (local / "README.md").write_text("---\nbase_model: mistralai/Mistral-7B-v0.3\n---\n# card\n")
    assert base_named(str(local)) == "mistralai/Mistral-7B-v0.3"
