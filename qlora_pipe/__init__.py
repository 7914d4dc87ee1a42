"""qlora-pipe: QLoRA fine-tuning on one consumer GPU.

The public API mirrors the CLI stages, for notebooks and scripts::

    from qlora_pipe import load_recipe, train
    recipe = load_recipe("recipes/quickstart.yaml", overrides=["training.max_steps=10"])
    result = train(recipe)
    print(result.run_dir, result.summary["final_eval_loss"])
"""

from qlora_pipe.errors import UserError
from qlora_pipe.recipe import Recipe, load_recipe

__version__ = "0.1.0"


def train(
    recipe: "Recipe | str",
    overrides: list[str] | None = None,
    overwrite: bool = False,
    resume: bool | str = False,
    callbacks: tuple = (),
):
    """Run the training stage on a recipe object or a recipe path; returns a ``TrainResult``.

    ``resume``: True (latest complete checkpoint) or a checkpoint path. ``callbacks``: extra
    transformers ``TrainerCallback`` objects."""
    from qlora_pipe.training.stage import run_training

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides=overrides)
    elif overrides:
        raise UserError("overrides apply to recipe paths; edit the Recipe object directly instead")
    from qlora_pipe.publish.training_push import HubPush

    publisher = HubPush(recipe.hub)  # the recipe's hub section: checkpoints and the adapter pushed as it asks
    return run_training(recipe, overwrite=overwrite, resume=resume, callbacks=tuple(callbacks), publisher=publisher)


__all__ = ["Recipe", "UserError", "__version__", "load_recipe", "train"]
