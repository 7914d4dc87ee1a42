"""The tiled MLP against the plain one: the same loss and gradients, on real 4-bit models with LoRA."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import recipe_dict

from qlora_pipe.errors import UserError
from qlora_pipe.models.tiled_mlp import tile_mlps, untile_mlps, untiled_forward
from qlora_pipe.recipe import validate_recipe

TILE, LENGTH = 32, 100  # four tiles, the last one short
FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=1)),
}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    out = {}
    for name, (config_cls, model_cls, heads) in FAMILY_CONFIGS.items():
        config = getattr(transformers, config_cls)(
            vocab_size=320,
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=2,
            head_dim=32,
            max_position_embeddings=512,
            **heads,
        )
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(name)
        getattr(transformers, model_cls)(config).to(torch.bfloat16).save_pretrained(folder)
        out[name] = folder
    return out


def _model(folder, tmp_path, dropout: float, checkpointing: bool):
    from qlora_pipe.models.loading import add_lora, load_base_model

    raw = recipe_dict(folder, tmp_path / "runs", precision="fp32", gradient_checkpointing=checkpointing)
    raw["lora"]["dropout"] = dropout
    recipe = validate_recipe(raw)
    model = add_lora(load_base_model(recipe, torch.device("cpu")), recipe).model.train()
    torch.manual_seed(1)
    for param in model.parameters():  # LoRA B starts at zero: give every adapter weight a gradient path
        if param.requires_grad:
            param.data.normal_(0, 0.05)
    return model


def _loss_and_grads(model, ids, seed: int = 3):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
@pytest.mark.parametrize("checkpointing", [True, False])
def test_tiled_mlp_gives_the_plain_loss_and_gradients(family_models, tmp_path, family, checkpointing):
    model = _model(family_models[family], tmp_path, dropout=0.0, checkpointing=checkpointing)
    ids = torch.randint(0, 320, (2, LENGTH), generator=torch.Generator().manual_seed(0))
    plain_loss, plain = _loss_and_grads(model, ids)
    assert tile_mlps(model, tile=TILE) == 2
    tiled_loss, tiled = _loss_and_grads(model, ids)
    assert tiled_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain.keys() == tiled.keys() and any("mlp" in name for name in plain)
    for name, grad in plain.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(tiled[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _untiled_copy_of_tiles(mlp, tile: int):
    """The reference for dropout: the same tiles run with autograd recording them all (no replay)."""
    run = untiled_forward(mlp)

    def forward(x):
        return torch.cat([run(piece) for piece in x.split(tile, dim=1)], dim=1)

    return forward


@pytest.mark.parametrize("checkpointing", [True, False])
def test_tiled_mlp_replays_each_tiles_dropout_masks_in_backward(family_models, tmp_path, checkpointing):
    model = _model(family_models["llama"], tmp_path, dropout=0.3, checkpointing=checkpointing)
    ids = torch.randint(0, 320, (1, LENGTH), generator=torch.Generator().manual_seed(0))
    tile_mlps(model, tile=TILE)
    tiled_loss, tiled = _loss_and_grads(model, ids)
    mlps = [m for n, m in model.named_modules() if n.endswith(".mlp")]
    for mlp in mlps:
        mlp.forward = _untiled_copy_of_tiles(mlp, TILE)
    recorded_loss, recorded = _loss_and_grads(model, ids)
    assert tiled_loss == pytest.approx(recorded_loss, rel=1e-6)
    for name, grad in recorded.items():
        torch.testing.assert_close(tiled[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    other_seed_loss, _ = _loss_and_grads(model, ids, seed=4)
    assert other_seed_loss != pytest.approx(recorded_loss, rel=1e-6)  # the masks do matter here


def test_tiled_mlp_keeps_no_intermediate_for_the_whole_sequence(family_models, tmp_path):
    """Saved for backward in forward: the untiled MLP keeps its intermediates, the tiled one its input alone."""
    model = _model(family_models["llama"], tmp_path, dropout=0.0, checkpointing=False)
    mlp = model.get_base_model().model.layers[0].mlp

    def saved_by_mlp() -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mlp(torch.randn(1, 256, 128, requires_grad=True))
        return total

    plain = saved_by_mlp()
    tile_mlps(model, tile=TILE)
    assert saved_by_mlp() == 256 * 128 * 4  # its fp32 input only
    assert plain >= 3 * 256 * 384 * 4  # gate, up and the activation, each 384 wide


def test_a_copied_model_tiles_its_own_mlps_and_untiling_restores_them(family_models, tmp_path):
    import copy

    model = _model(family_models["qwen2"], tmp_path, dropout=0.0, checkpointing=True)
    ids = torch.randint(0, 320, (1, LENGTH), generator=torch.Generator().manual_seed(0))
    plain_loss, plain = _loss_and_grads(model, ids)
    tile_mlps(model, tile=TILE)
    model.zero_grad(set_to_none=True)
    twin = copy.deepcopy(model)
    twin_loss, twin_grads = _loss_and_grads(twin, ids)
    assert twin_loss == pytest.approx(plain_loss, rel=1e-6)
    assert all(p.grad is None for p in model.parameters())  # the copy's gradients land on the copy
    for name, grad in plain.items():
        torch.testing.assert_close(twin_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert untile_mlps(model) == 2 and not any(type(m).__name__.startswith("Tiled") for m in model.modules())
    assert _loss_and_grads(model, ids)[0] == plain_loss  # the same computation as before tiling, bit for bit


def test_a_model_without_decoder_mlps_is_refused(tmp_path):
    config = transformers.GPT2Config(vocab_size=64, n_embd=64, n_layer=1, n_head=2, n_positions=64)
    with pytest.raises(UserError, match=r"training.tiled_mlp: .*no `mlp` module"):
        tile_mlps(transformers.GPT2LMHeadModel(config))
