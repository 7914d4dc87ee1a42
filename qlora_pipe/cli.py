"""`qlora-pipe <command>`: argument parsing and error reporting only."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from qlora_pipe.errors import Interrupted, RunStopped, UserError

USER_ERROR_EXIT = 2


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
    export.add_argument("--dtype", choices=["bfloat16", "float16"], help="dtype of the merged model")
    export.add_argument("--max-shard-size", help="largest safetensors shard, e.g. 5GB")
    export.add_argument("--no-verify", dest="verify", action="store_false", default=None, help="skip verification")
    export.add_argument(
        "--compare-original", action="store_true", help="also report the fidelity of a merge into the 16-bit weights"
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
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from qlora_pipe.dist import close_process_group
    from qlora_pipe.recipe import load_recipe
    from qlora_pipe.training.stage import run_training

    recipe = load_recipe(args.recipe, overrides=args.overrides)
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other; choose one")
    try:
        result = run_training(recipe, overwrite=args.overwrite, resume=args.resume)
    finally:
        close_process_group()
    s = result.summary
    if not s:  # not the first process of a multi-process launch
        return 0
    eval_part = ""
    if s["final_eval_loss"] is not None:
        eval_part = f"eval loss {s['eval_loss_before']:.4f} -> {s['final_eval_loss']:.4f}, "
    print(
        f"finished: {result.run_dir.root} ({s['steps']} steps, {eval_part}"
        f"{s['supervised_tokens']:,} supervised tokens in {s['train_seconds']:.0f}s)"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from qlora_pipe.export.command import export_merged

    result = export_merged(
        args.run_dir, args.out, args.merge_base, args.dtype, args.max_shard_size, args.verify, args.compare_original
    )
    info = result.info
    print(
        f"exported: {result.out} ({info['merged']} merged, {info['dequantized']} dequantized from NF4, "
        f"{info['bytes'] / 2**20:.1f} MiB {info['dtype']}, merge base {info['merge_base']})"
    )
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from qlora_pipe.publish.hub import push_run

    push_run(args.run_dir, args.repo_id, args.what, args.private, args.revision, args.commit_message, args.dry_run)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from qlora_pipe.evaluate.chat import run_chat

    flags = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    return run_chat(args.path, args.prompt, args.system, {**flags, "greedy": args.greedy})


def cmd_eval(args: argparse.Namespace) -> int:
    from qlora_pipe.evaluate.evaluation import run_eval
    from qlora_pipe.evaluate.metrics import eval_heading, eval_table

    result = run_eval(
        args.run_dir,
        args.data,
        args.limit,
        args.batch_size,
        args.max_new_tokens,
        args.merged,
        args.lm_eval,
        args.lm_eval_include,
    )
    print(f"\n{eval_heading(result)}\n\n{eval_table(result)}")
    if "lm_eval" in result["base"]:
        from qlora_pipe.evaluate.lm_harness import lm_eval_table

        print(f"\n{lm_eval_table(result['base']['lm_eval'], result['tuned']['lm_eval'])}")
    for row in result["answers"][: args.examples]:
        print(f"\nQ: {row['question']}\n  reference: {row['reference']!r}")
        print(f"  base:      {row['base']!r}\n  tuned:     {row['tuned']!r}")
    print(f"\nwrote {result['path']} ({result['seconds']:.0f}s)")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from qlora_pipe.data.prepare import prepare_data
    from qlora_pipe.data.preview import preview_text
    from qlora_pipe.model import load_tokenizer
    from qlora_pipe.plan.auto_sizes import memory_budget, resolve_max_length
    from qlora_pipe.recipe import load_recipe

    recipe = load_recipe(args.recipe, overrides=args.overrides)
    recipe = resolve_max_length(recipe, memory_budget(recipe))
    tokenizer = load_tokenizer(recipe)
    prepared = prepare_data(recipe.data, tokenizer, recipe.seed)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(preview_text(prepared, tokenizer, args.preview, color))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from qlora_pipe.plan.report import run_plan_command

    return run_plan_command(args.recipe, args.overrides, args.gpu_memory, args.json)


def cmd_validate(args: argparse.Namespace) -> int:
    from qlora_pipe.recipe import load_recipe
    from qlora_pipe.recipe.reference import explain, explain_markdown

    if args.explain:
        print(explain_markdown() if args.markdown else explain(), end="\n" if not args.markdown else "")
        if not args.recipe:
            return 0
    if not args.recipe:
        raise UserError("validate: give a recipe path (or --explain)")
    recipe = load_recipe(args.recipe, overrides=args.overrides)
    print(f"{args.recipe}: valid (run directory {recipe.run_dir()})")
    return 0


def cmd_build_quickstart_model(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from qlora_pipe.quickstart.builder import BaseSpec, build_quickstart_base

    spec = BaseSpec() if args.steps is None else replace(BaseSpec(), steps=args.steps)
    out = build_quickstart_base(Path(args.out), Path(args.corpus), spec, force=args.force)
    print(f"quickstart base model ready: {out}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from qlora_pipe.doctor import run_doctor

    return run_doctor(args.output_dir)


COMMANDS = {
    "doctor": cmd_doctor,
    "export": cmd_export,
    "push": cmd_push,
    "chat": cmd_chat,
    "eval": cmd_eval,
    "data": cmd_data,
    "train": cmd_train,
    "plan": cmd_plan,
    "validate": cmd_validate,
    "build-quickstart-model": cmd_build_quickstart_model,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        # transformers 5 renames gradient checkpointing; PEFT still calls the old names. Not actionable.
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
    from qlora_pipe.dist import is_main_process

    quiet = not is_main_process()  # under torchrun, one process speaks for the run
    logging.basicConfig(
        level=logging.DEBUG if args.debug else (logging.WARNING if quiet else logging.INFO),
        format="%(levelname)s %(name)s: %(message)s" if args.debug else "%(message)s",
    )
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2"):  # one line per HTTP request is noise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from qlora_pipe.cpu_threads import set_up_cpu

        set_up_cpu(args.command)
        return COMMANDS[args.command](args)
    except Interrupted as exc:
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


if __name__ == "__main__":
    sys.exit(main())
