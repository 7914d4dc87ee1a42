"""What each `qlora-pipe` command does once its arguments are parsed (qlora_pipe/cli/__init__.py parses them).

Each handler imports its stage lazily, so `qlora-pipe --help` and the light commands load no torch.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path

from qlora_pipe.errors import UserError


def needs_bitsandbytes(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """The commands that load or write 4-bit weights refuse in one line, before any work, when bitsandbytes
    does not import (instead of a traceback from deep inside transformers or PEFT)."""

    @functools.wraps(command)
    def checked(args: argparse.Namespace) -> int:
        from qlora_pipe.compat.bitsandbytes import require_bitsandbytes

        require_bitsandbytes(f"qlora-pipe {args.command}")
        return command(args)

    return checked


@needs_bitsandbytes
def cmd_train(args: argparse.Namespace) -> int:
    from qlora_pipe.machine.dist import close_process_group
    from qlora_pipe.publish.training_push import HubPush
    from qlora_pipe.recipe import load_recipe
    from qlora_pipe.training.stage import run_training

    recipe = load_recipe(args.recipe, overrides=args.overrides)
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other; choose one")
    try:
        result = run_training(recipe, overwrite=args.overwrite, resume=args.resume, publisher=HubPush(recipe.hub))
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


@needs_bitsandbytes
def cmd_export(args: argparse.Namespace) -> int:
    from qlora_pipe.export.command import export_merged

    if args.unmerged:
        return export_unmerged_command(args)
    gguf_types = None
    if args.format == "gguf":
        from qlora_pipe.export.gguf import check_gguf_type

        gguf_type = args.gguf_type or "q8_0"
        check_gguf_type(gguf_type)  # before the merge: a missing extra or converter costs nothing
        gguf_types = [gguf_type]
    result = export_merged(
        args.run_dir,
        args.out,
        args.merge_base,
        args.dtype,
        args.max_shard_size,
        args.verify,
        args.compare_original,
        gguf_types,
    )
    info = result.info
    print(
        f"exported: {result.out} ({info['merged']} merged, {info['dequantized']} dequantized from NF4, "
        f"{info['bytes'] / 2**20:.1f} MiB {info['dtype']}, merge base {info['merge_base']})"
    )
    return 0


def export_unmerged_command(args: argparse.Namespace) -> int:
    from qlora_pipe.export.unmerged import export_unmerged

    for flag, value in (("--merge-base", args.merge_base), ("--max-shard-size", args.max_shard_size)):
        if value is not None:
            raise UserError(f"export --unmerged: {flag} applies to a merge; leave it out")
    if args.compare_original:
        raise UserError("export --unmerged: --compare-original applies to a merge; leave it out")
    gguf_type = None
    if args.format == "gguf":
        from qlora_pipe.export.gguf import check_gguf_type

        gguf_type = args.gguf_type or "auto"  # the base folder's own dtype: bit-equal
        if gguf_type != "auto":
            check_gguf_type(gguf_type)
    elif args.gguf_type:
        raise UserError("export --gguf-type: goes with --format gguf")
    result = export_unmerged(args.run_dir, args.out, args.dtype, args.verify, gguf_type)
    print(f"exported unmerged: {result.out} (base {result.info['dtype']}, {result.info['bytes'] / 2**20:.1f} MiB)")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from qlora_pipe.publish.hub import push_run

    push_run(args.run_dir, args.repo_id, args.what, args.private, args.revision, args.commit_message, args.dry_run)
    return 0


@needs_bitsandbytes
def cmd_chat(args: argparse.Namespace) -> int:
    from qlora_pipe.evaluate.chat import run_chat

    flags = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    return run_chat(args.path, args.prompt, args.system, {**flags, "greedy": args.greedy}, args.tools, args.image)


@needs_bitsandbytes
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
    if "table" in result:  # a method scored its own way prints its own table
        print(f"\n{result['table']}\n\nwrote {result['path']} ({result['seconds']:.0f}s)")
        return 0
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
    from qlora_pipe.methods import method_for
    from qlora_pipe.models.loading import load_tokenizer
    from qlora_pipe.plan.auto_sizes import memory_budget, resolve_max_length
    from qlora_pipe.recipe import load_recipe

    recipe = load_recipe(args.recipe, overrides=args.overrides)
    import torch

    recipe = resolve_max_length(recipe, memory_budget(recipe), gpu=torch.cuda.is_available())  # as training will
    tokenizer = load_tokenizer(recipe)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(method_for(recipe).preview(recipe, tokenizer, args.preview, color))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from qlora_pipe.plan.report import run_plan_command

    return run_plan_command(args.recipe, args.overrides, args.gpu_memory, args.json, args.gpus, args.cpu_offload)


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
    from qlora_pipe.methods import method_for

    method_for(recipe).validate(recipe)  # what only the method can check without loading a model
    print(f"{args.recipe}: valid (run directory {recipe.run_dir()})")
    return 0


def cmd_build_quickstart_model(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from qlora_pipe.quickstart.builder import BaseSpec, build_quickstart_base

    spec = BaseSpec() if args.steps is None else replace(BaseSpec(), steps=args.steps)
    out = build_quickstart_base(Path(args.out), Path(args.corpus), spec, force=args.force)
    print(f"quickstart base model ready: {out}")
    return 0


def cmd_build_vision_model(args: argparse.Namespace) -> int:
    from qlora_pipe.models.examples import MODELS, get_model
    from qlora_pipe.models.loading import model_location
    from qlora_pipe.vision.builder import build_vision_model

    language = str(get_model(args.language)) if args.language in MODELS else args.language
    out = build_vision_model(Path(model_location(language)), Path(args.out), force=args.force)
    print(f"vision model ready: {out}")
    return 0


def cmd_setup_gguf(args: argparse.Namespace) -> int:
    from qlora_pipe.export.gguf import setup_converter

    setup_converter()
    return 0


def cmd_get_model(args: argparse.Namespace) -> int:
    from qlora_pipe.models.examples import MODELS, get_model

    path = get_model(args.name)
    print(f"{MODELS[args.name].about}: {path}")
    return 0


def cmd_wheelhouse(args: argparse.Namespace) -> int:
    from qlora_pipe.wheelhouse.command import run_wheelhouse

    sources = (*(["--no-index"] if args.no_index else []), *(f"--find-links={link}" for link in args.find_links))
    return run_wheelhouse(
        Path(args.dir),
        args.purpose,
        args.python_version,
        args.platform,
        args.have,
        args.have_file,
        args.extra,
        args.max_size,
        sources,
        args.pin,
    )


def cmd_doctor(args: argparse.Namespace) -> int:
    from qlora_pipe.cli.doctor import run_doctor

    return run_doctor(args.output_dir)


COMMANDS = {
    "doctor": cmd_doctor,
    "wheelhouse": cmd_wheelhouse,
    "export": cmd_export,
    "push": cmd_push,
    "chat": cmd_chat,
    "eval": cmd_eval,
    "data": cmd_data,
    "train": cmd_train,
    "plan": cmd_plan,
    "validate": cmd_validate,
    "build-quickstart-model": cmd_build_quickstart_model,
    "build-vision-model": cmd_build_vision_model,
    "setup-gguf": cmd_setup_gguf,
    "get-model": cmd_get_model,
}
