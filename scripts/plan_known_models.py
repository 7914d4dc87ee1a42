"""Print (or write into docs/planner.md) the memory plan of well-known models at 2k and 8k tokens.

    python scripts/plan_known_models.py            # markdown table on stdout
    python scripts/plan_known_models.py --gpus     # the FSDP table (per GPU, 2 / 4 / 8 GPUs) on stdout
    python scripts/plan_known_models.py --long     # recipes/long-context.yaml: the longest sequence per switch
    python scripts/plan_known_models.py --docs     # rewrite docs/planner.md, long-runs.md, performance.md (markers)

Uses the bundled configs (qlora_pipe/plan/model_configs/), so it works offline. The one-GPU recipe is
recipes/qa-legal.yaml with only the model and the sequence length changed; the FSDP one is
recipes/llama3-70b-fsdp.yaml with only the model changed.
"""

import argparse
import re
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "planner.md"
LONG_RUNS = ROOT / "docs" / "long-runs.md"
sys.path.insert(0, str(ROOT))

from qlora_pipe.machine.hardware import ASSUMED_GPU, resolve_recipe_precision  # noqa: E402
from qlora_pipe.plan.advice import (  # noqa: E402
    advise,
    fewest_gpus,
    longest_by_switches,
    parse_size,
    recipe_plan,
    recipe_shape,
)
from qlora_pipe.plan.report import advice_text, plan_table  # noqa: E402
from qlora_pipe.plan.terms import GiB  # noqa: E402
from qlora_pipe.recipe import load_recipe  # noqa: E402

MODELS = [
    "meta-llama/Llama-3.1-8B",
    "Qwen/Qwen2.5-7B",
    "mistralai/Mistral-7B-v0.3",
    "google/gemma-2-9b",
    "Qwen/Qwen2.5-14B",
]
BUDGET = "24GiB"
LONG_RECIPE = "recipes/long-context.yaml"
LONG_MODELS = [
    "meta-llama/Llama-3.1-8B-Instruct",
    "Qwen/Qwen2.5-7B-Instruct",
    "mistralai/Mistral-7B-Instruct-v0.3",
    "google/gemma-2-9b-it",
]
PERFORMANCE = ROOT / "docs" / "performance.md"
LONG_START, LONG_END = "<!-- long-context-table:start -->\n", "<!-- long-context-table:end -->\n"
START, END = "<!-- plan-table:start -->\n", "<!-- plan-table:end -->\n"
EXAMPLE_START, EXAMPLE_END = "<!-- plan-example:start -->\n", "<!-- plan-example:end -->\n"
FSDP_RECIPE = "recipes/llama3-70b-fsdp.yaml"
FSDP_MODELS = ["meta-llama/Llama-3.1-70B-Instruct", "meta-llama/Llama-2-70b-hf", "meta-llama/Llama-3.1-405B"]
FSDP_GPUS = (2, 4, 8)
FSDP_START, FSDP_END = "<!-- fsdp-table:start -->\n", "<!-- fsdp-table:end -->\n"
FSDP_EXAMPLE_START, FSDP_EXAMPLE_END = "<!-- fsdp-example:start -->\n", "<!-- fsdp-example:end -->\n"


def example() -> str:
    """What `qlora-pipe plan recipes/qa-legal.yaml` prints, as a markdown code block."""
    # The machine-independent output: what the command prints where there is no GPU.
    recipe, precision = resolve_recipe_precision(load_recipe(ROOT / "recipes/qa-legal.yaml"), ASSUMED_GPU)
    plan = recipe_plan(recipe, parse_size(BUDGET))
    body = f"{plan_table(plan, precision)}\n\n{advice_text(plan, advise(plan))}\n"
    return f"```text\n$ qlora-pipe plan recipes/qa-legal.yaml\n{body}```\n"


def fsdp_example(gpus: int = 2) -> str:
    """What `qlora-pipe plan recipes/llama3-70b-fsdp.yaml --gpus 2` prints, as a markdown code block."""
    recipe, precision = resolve_recipe_precision(load_recipe(ROOT / FSDP_RECIPE), ASSUMED_GPU)
    plan = recipe_plan(recipe, parse_size(BUDGET), gpus=gpus)
    body = f"{plan_table(plan, precision)}\n\n{advice_text(plan, advise(plan))}\n"
    return f"```text\n$ qlora-pipe plan {FSDP_RECIPE} --gpus {gpus}\n{body}```\n"


def fsdp_table() -> str:
    """Each GPU's peak for 2, 4 and 8 GPUs (micro batch 1 x 2048 tokens), and the fewest 24 / 80 GiB GPUs."""
    rows = [
        "| model | CPU offload | 2 GPUs | 4 GPUs | 8 GPUs | fewest 24 GiB GPUs | fewest 80 GiB GPUs |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in FSDP_MODELS:
        recipe = load_recipe(ROOT / FSDP_RECIPE, [f"model.name_or_path={name}"])
        shape = recipe_shape(recipe)
        for offload in (False, True):
            plans = [recipe_plan(recipe, None, shape=shape, gpus=n, cpu_offload=offload) for n in FSDP_GPUS]
            cells = " | ".join(f"{p.total / GiB:.1f} GiB" for p in plans)
            fewest = [fewest_gpus(replace(plans[0], budget=parse_size(b))) for b in ("24GiB", "80GiB")]
            counts = " | ".join(str(n) if n else "none up to 64" for n in fewest)
            size = f"{plans[0].shape.total_params / 1e9:.0f}B"
            rows.append(f"| {name} ({size}) | {'yes' if offload else 'no'} | {cells} | {counts} |")
    return "\n".join(rows) + "\n"


def replace_between(text: str, start: str, end: str, body: str) -> str:
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    return pattern.sub(lambda _: start + body + end, text)


def table() -> str:
    """Peaks at 2k and 8k tokens (the recipe's switches as it sets them) and the longest sequence at micro batch 1
    for each combination of the long-context switches."""
    budget = parse_size(BUDGET)
    rows = [
        "| model | params | weights (4-bit + bf16 rest) | peak at 2k tokens | peak at 8k tokens "
        "| longest on 24 GiB: neither switch | tiled MLP | activation offloading | both |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in MODELS:
        recipe = load_recipe(ROOT / "recipes/qa-legal.yaml", [f"model.name_or_path={name}"])
        plans = [recipe_plan(recipe, budget, micro_batch_size=1, max_length=n) for n in (2048, 8192)]
        weights = plans[0].term("base weights, 4-bit") + plans[0].term("base weights, not quantized")
        cells = [f"{p.total / GiB:.1f} GiB {'fits' if p.fits else 'no'}" for p in plans]
        longest = " | ".join(
            _tokens(row.longest) for row in longest_by_switches(plans[0].shape, plans[0].settings, budget)
        )
        rows.append(
            f"| {name} | {plans[0].shape.total_params / 1e9:.2f}B | {weights / GiB:.1f} GiB | "
            f"{cells[0]} | {cells[1]} | {longest} |"
        )
    return "\n".join(rows) + "\n"


def _tokens(n: int | None, positions: int | None = None) -> str:
    """A planned length; one beyond the model's positions is marked (memory allows it, the model does not)."""
    if n is None:
        return "none"
    return f"{n:,}*" if positions and n > positions else f"{n:,}"


def long_context_table() -> str:
    """recipes/long-context.yaml on each model: the longest sequence at micro batch 1 on 24 GiB per switch, as
    memory allows it (marked * beyond the model's positions, which data.max_length auto does not exceed)."""
    budget = parse_size(BUDGET)
    rows = [
        "| model | positions | neither switch | tiled MLP | activation offloading | both | both, LoRA dropout 0.05 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in LONG_MODELS:
        cells = []
        for dropout in (0.0, 0.05):
            recipe = load_recipe(ROOT / LONG_RECIPE, [f"model.name_or_path={name}", f"lora.dropout={dropout}"])
            plan = recipe_plan(recipe, budget, micro_batch_size=1, max_length=2048)
            found = longest_by_switches(plan.shape, plan.settings, budget, capped=False)
            positions = plan.shape.max_positions
            tokens = [_tokens(row.longest, positions) for row in found]
            cells += tokens if dropout == 0 else tokens[-1:]
        rows.append(f"| {name} | {plan.shape.max_positions:,} | {' | '.join(cells)} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--docs", "--readme", dest="docs", action="store_true", help="rewrite the example and table in docs/planner.md"
    )
    parser.add_argument("--gpus", action="store_true", help="print the FSDP table (per GPU) instead")
    parser.add_argument("--long", action="store_true", help="print the long-context table instead")
    args = parser.parse_args()
    if args.docs:
        updated = replace_between(DOC.read_text(), START, END, table())
        DOC.write_text(replace_between(updated, EXAMPLE_START, EXAMPLE_END, example()))
        long_runs = replace_between(LONG_RUNS.read_text(), FSDP_START, FSDP_END, fsdp_table())
        LONG_RUNS.write_text(replace_between(long_runs, FSDP_EXAMPLE_START, FSDP_EXAMPLE_END, fsdp_example()))
        PERFORMANCE.write_text(replace_between(PERFORMANCE.read_text(), LONG_START, LONG_END, long_context_table()))
        print(f"updated {DOC}, {LONG_RUNS} and {PERFORMANCE}")
    else:
        print(fsdp_table() if args.gpus else long_context_table() if args.long else table(), end="")
