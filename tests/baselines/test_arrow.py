"""PEFT's Arrow router over the axis experts: the expert weights we read are the ones PEFT mixes with."""

import torch

from alignx.axes import AXES
from alignx.baselines.arrow import ArrowShares, arrow_coefficients, load_arrow
from alignx.data.formatting import ChatFormatter
from alignx.models.loading import load_base_model
from alignx.run import RunDir


def _arrow_model(run_dir):
    run = RunDir(run_dir)
    loaded = load_base_model(run.load_config().model)
    return load_arrow([run.adapter_dir(axis) for axis in AXES], loaded.model), loaded.tokenizer


def test_recorded_coefficients_rebuild_the_delta_peft_adds(tiny_stage1_run):
    model, tokenizer = _arrow_model(tiny_stage1_run.run_dir)
    inputs = tokenizer([ChatFormatter(tokenizer).prompt_text("What happens if you eat watermelon seeds?")],
                       return_tensors="pt", add_special_tokens=False)
    checked = []

    def check(layer, args, kwargs, delta):
        x = args[0]
        coefficients = arrow_coefficients(layer, x)
        names = layer.task_adapter_names
        per_expert = torch.stack([kwargs["scaling"][n] * (x @ kwargs["lora_A"][n].weight.T @ kwargs["lora_B"][n].weight.T)
                                  for n in names], dim=-2)  # [B, T, E, out]
        torch.testing.assert_close((coefficients[..., None] * per_expert).sum(-2), delta, rtol=1e-4, atol=1e-5)
        checked.append(coefficients.shape[-1])

    layers = [m for m in model.modules() if type(m).__name__ == "ArrowLoraLinearLayer"]
    handles = [layer.register_forward_hook(check, with_kwargs=True) for layer in layers]
    with torch.no_grad(), ArrowShares(model) as shares:
        model(**inputs)
    for handle in handles:
        handle.remove()
    assert checked and set(checked) == {len(AXES)} and len(checked) == len(layers)
    per_prompt = shares.per_prompt(inputs["attention_mask"])
    assert per_prompt.shape == (1, len(AXES)) and torch.allclose(per_prompt.sum(1), torch.ones(1))


def test_shares_ignore_padding(tiny_stage1_run):
    model, tokenizer = _arrow_model(tiny_stage1_run.run_dir)
    formatter = ChatFormatter(tokenizer)
    texts = [formatter.prompt_text("Hi"), formatter.prompt_text("Tell me a long story about a dragon and a knight.")]
    with torch.no_grad():
        alone = []
        for text in texts:
            batch = tokenizer([text], return_tensors="pt", add_special_tokens=False)
            with ArrowShares(model) as shares:
                model(**batch)
            alone.append(shares.per_prompt(batch["attention_mask"]))
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with ArrowShares(model) as shares:
            model(**batch)
    torch.testing.assert_close(shares.per_prompt(batch["attention_mask"]), torch.cat(alone), rtol=1e-3, atol=1e-4)
