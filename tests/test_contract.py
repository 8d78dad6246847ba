"""The contract every registered strategy must keep: only declared parameters train, state round-trips, exports reload."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune.strategies import build_strategy, strategy_names

from conftest import ddim_pipeline, make_config, render

# Enough learning rate that two steps visibly change the model, for every method.
CONTRACT_LR = {"lora": 1e-2, "textual_inversion": 5e-2, "hypernetwork": 1e-3, "dreambooth": 1e-4}


def _all_params(components):
    parts = {f"text_encoder_{i}": encoder for i, encoder in enumerate(components.text_encoders)}
    for part, module in {**parts, "vae": components.vae, "unet": components.unet}.items():
        for name, param in module.named_parameters():
            yield f"{part}.{name}", param


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("method", [*strategy_names(), "lora:dora", "lora:loha", "lora:lokr"])
def test_strategy_contract(method, family, tmp_path, request):
    """Over every base family: the toy SD base, and the tiny SDXL (both text encoders trained where the method
    can train them); LoRA also as each LyCORIS algorithm (lora.algo)."""
    from finetune.data import format_prompt
    from finetune.inference import load_adapter, pipeline_from_components
    from finetune.models import load_components
    from finetune.trainer import run_training

    method, _, algo = method.partition(":")
    base = "tiny" if family == "sd" else str(request.getfixturevalue("tiny_sdxl_folder"))
    options = {"lora.algo": algo} if algo else {}
    # Every format the method can write, not only its defaults: each one must reload.
    formats = ",".join(build_strategy(make_config(method, tmp_path, **options)).formats)
    options.update({"train.lr": CONTRACT_LR.get(method, 1e-3), "output.formats": formats, "model.name": base})
    if family == "sdxl" and method in ("lora", "dreambooth"):
        options[f"{method}.train_text_encoder"] = True
    config = make_config(method, tmp_path / "run", **options)
    components = load_components(base)
    assert components.family.name == family
    before = {id(p): (name, p.detach().clone()) for name, p in _all_params(components)}
    base_pipe = ddim_pipeline(base)

    outcome = run_training(config, components)
    strategy, components = outcome.strategy, outcome.components

    # 1. Only the declared parameters change.
    declared = {id(p) for group in strategy.param_groups() for p in group["params"]}
    changed = []
    for name, param in _all_params(components):
        if id(param) in before:
            if not torch.equal(before[id(param)][1], param.detach()):
                changed.append(name)
                assert id(param) in declared, f"{method} changed undeclared parameter {name}"
        else:
            assert id(param) in declared or not param.requires_grad, f"new trainable {name} not declared"
    new_declared = [p for p in declared if p not in before]
    assert changed or new_declared, "nothing was trained"
    assert not any(p.requires_grad for n, p in _all_params(components) if id(p) not in declared)

    # 2. State round-trips into a fresh base.
    state = strategy.state_dict()
    fresh = build_strategy(config)
    fresh.prepare(load_components(base))
    fresh.load_state_dict(state)
    restored = fresh.state_dict()
    assert restored.keys() == state.keys()
    for key in state:
        assert torch.equal(restored[key], state[key]), key

    # 3. Every export, loaded into a fresh pipeline, reproduces the trained model's images.
    prompt = format_prompt(config.data.prompt, config.data.token, config.data.class_word)
    for module in strategy.trainable_modules():
        module.eval()
    trained_image = render(pipeline_from_components(components), prompt)
    base_image = render(base_pipe, prompt)
    assert np.abs(trained_image - base_image).max() > 1e-3, "training did not change the images"
    exports = outcome.summary["exports"]
    assert set(exports) == set(strategy.formats)
    for fmt, paths in exports.items():
        for path in paths:
            pipe = ddim_pipeline(base)
            load_adapter(pipe, path)
            loaded_image = render(pipe, prompt)
            assert np.abs(loaded_image - trained_image).max() < 1e-4, f"{fmt} export {path} differs from the model"
