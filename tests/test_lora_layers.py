"""Which LoRA parameters das-sd differentiates, counted against the adapter's own parameters."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from das_sd.featurize.lora_layers import lora_inventory, lora_parameters
from sd_layouts import ATTENTION, KOHYA_DEFAULT, LOCON, add_random_lora, sd_unet


def _lora_elements(unet, needle=".lora_"):
    """Brute-force count: every parameter the adapter added, by name."""
    return sum(p.numel() for name, p in unet.named_parameters() if needle in name)


@pytest.mark.parametrize("family, targets", [("sd15", ATTENTION), ("sd15", KOHYA_DEFAULT), ("sd15", LOCON),
                                             ("sd2", KOHYA_DEFAULT), ("sd2", LOCON)])
def test_every_lora_or_locon_parameter_is_differentiated_and_counted_by_kind(family, targets):
    unet = sd_unet(family)
    add_random_lora(unet, targets, rank=4)
    inventory = lora_inventory(unet)
    record = inventory.record()
    assert not inventory.left_out and record["left_out_total"] == 0
    assert record["differentiated_total"] == _lora_elements(unet) == sum(p.numel() for p in lora_parameters(unet))
    by_kind = {}  # by the adapted (base) layer: a conv LoRA's B is 1x1 whatever the conv's kernel
    for name, module in unet.named_modules():
        if name.endswith(".base_layer"):
            kind = "linear" if isinstance(module, torch.nn.Linear) else "conv{}x{}".format(*module.kernel_size)
            tuner = unet.get_submodule(name.removesuffix(".base_layer"))
            count = tuner.lora_A["default"].weight.numel() + tuner.lora_B["default"].weight.numel()
            by_kind[kind] = by_kind.get(kind, 0) + count
    assert record["differentiated"] == dict(sorted(by_kind.items()))
    # SD 1.x projections are 1x1 convs, SD 2.x's are linear; LoCon adds the 3x3 convs and 1x1 shortcuts
    assert ("conv1x1" in record["differentiated"]) == (targets is LOCON or (family == "sd15" and targets is not ATTENTION))
    assert ("conv3x3" in record["differentiated"]) == (targets is LOCON)


def test_dora_magnitudes_and_the_factors_they_reshape_are_left_out_not_dropped():
    unet = sd_unet("sd15")
    names = sorted({n for n, _ in unet.named_modules() if n.endswith(("to_q", "to_v"))})
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=names, use_dora=True))
    with pytest.raises(ValueError, match=r"no layer das-sd can differentiate.*lora_magnitude_vector \(DoRA\)"):
        lora_inventory(unet)
    inventory = lora_inventory(unet, required=False)
    record = inventory.record()
    assert not inventory.layers and record["left_out_total"] == _lora_elements(unet)
    assert set(record["left_out"]) == {"lora_A (DoRA)", "lora_B (DoRA)", "lora_magnitude_vector (DoRA)"}


def test_only_the_active_adapter_counts():
    unet = sd_unet("sd15")
    add_random_lora(unet, ATTENTION, rank=2)
    first = lora_inventory(unet).num_parameters
    names = sorted({n for n, _ in unet.named_modules() if n.endswith(("conv1", "conv2"))})
    unet.add_adapter(LoraConfig(r=3, lora_alpha=3, target_modules=names), adapter_name="other")
    unet.set_adapters("other")
    record = lora_inventory(unet).record()
    assert set(record["differentiated"]) == {"conv3x3"} and record["differentiated_total"] != first
    assert record["differentiated_total"] == sum(p.numel() for n, p in unet.named_parameters() if ".other." in n)
    unet.set_adapters("default")
    assert lora_inventory(unet).num_parameters == first


def test_a_model_without_lora_is_refused_or_empty():
    unet = sd_unet("sd15")
    with pytest.raises(ValueError, match="has no LoRA layers"):
        lora_inventory(unet)
    assert lora_inventory(unet, required=False).layers == [] and lora_parameters(unet, required=False) == []
