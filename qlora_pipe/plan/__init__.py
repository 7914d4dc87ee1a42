"""The memory planner: the peak GPU memory of a recipe from the model's config.json alone (no weights).

recipe_plan(recipe, budget) -> MemoryPlan    advice.py (also: largest micro batch, longest sequence)
plan_memory(shape, settings, budget)         terms.py (every peak-memory term)
shapes.py        config.json -> exact parameter shapes on the meta device; bundled configs
report.py        `qlora-pipe plan`: table, advice, JSON
auto_sizes.py    data.max_length: auto and the first micro batch that micro_batch_size: auto tries
measure.py       measured bytes of a loaded model (the tests' ground truth)
"""

from qlora_pipe.lazy import lazy_api

__getattr__ = lazy_api(
    __name__, {"recipe_plan": "advice", "plan_memory": "terms", "MemoryPlan": "terms", "PlanSettings": "terms"}
)
__all__ = ["MemoryPlan", "PlanSettings", "plan_memory", "recipe_plan"]
