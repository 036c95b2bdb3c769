"""Task vectors are (alpha/r)·B·A, equal to merging the adapter into a fresh base copy minus the base."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from alignx.config import ModelConfig
from alignx.errors import AlignXError
from alignx.models.loading import load_base_model
from alignx.stage1.task_vector import lora_factors, task_vector


@pytest.mark.parametrize("use_rslora", [False, True])
def test_task_vector_equals_merged_minus_base(tmp_path, tiny_model_dir, use_rslora):
    config = ModelConfig(name=str(tiny_model_dir), precision="fp32")
    model = get_peft_model(
        load_base_model(config).model,
        LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=use_rslora),
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # B starts at zero; make the adapter do something
    model.save_pretrained(tmp_path / "adapter")

    base = load_base_model(config).model.state_dict()
    merged = PeftModel.from_pretrained(load_base_model(config).model, tmp_path / "adapter").merge_and_unload().state_dict()
    vector = task_vector(tmp_path / "adapter")
    assert len(vector) == 3 * 3  # three modules in each of three layers
    for key, delta in vector.items():
        torch.testing.assert_close(delta, merged[key] - base[key], rtol=1e-4, atol=1e-6)
    untouched = [k for k in base if k not in vector and k.endswith("k_proj.weight")]
    assert untouched and all(torch.equal(base[k], merged[k]) for k in untouched)
    assert next(iter(lora_factors(tmp_path / "adapter").values())).scale == pytest.approx(16 / (2 if use_rslora else 4))


def test_non_adapter_directory_is_a_clear_error(tmp_path):
    with pytest.raises(AlignXError, match="not a PEFT adapter"):
        task_vector(tmp_path)
