"""Which LoRA parameters attribution differentiates, and which it cannot (docs/method.md §6).

peft wraps each adapted layer of the UNet in a tuner layer holding, per adapter, a ``lora_A`` and a
``lora_B`` module. das-sd differentiates the weights of those modules exactly when they are plain
``nn.Linear`` layers (attention projections, SD 2.x's linear ``proj_in``/``proj_out``) or
``nn.Conv2d`` layers with one group and zero padding (kohya's 1x1 ``proj_in``/``proj_out``, LoCon's
3x3 ResNet convolutions): their per-row gradients come from one batched backward. Everything else an
adapter adds (DoRA magnitudes, which also change how A and B act; embedding LoRAs; LoRA biases;
other LyCORIS tuners) is *left out* and reported, never dropped silently: ``LoraInventory.left_out``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import nn

#: what a store's manifest and das-sd's messages call the layers it differentiates
SUPPORTED_KINDS = "linear and 2-D convolution (one group, zero padding) LoRA A/B weights"


@dataclass(frozen=True)
class LoraLayer:
    """One differentiated LoRA factor (an A or a B of one adapted layer).

    Attributes:
        name: Module name in the model, e.g. ``down_blocks.0.attentions.0.proj_in.lora_A.default``.
        module: The ``nn.Linear`` or ``nn.Conv2d`` whose weight is differentiated.
        kind: The adapted layer's kind, "linear" or "conv<h>x<w>" (its kernel size, which its A
            factor carries; a conv's B is 1x1), for the parameter accounting.
    """

    name: str
    module: nn.Module
    kind: str

    @property
    def num_parameters(self) -> int:
        """The element count of the factor's weight.

        Returns:
            ``module.weight.numel()``.
        """
        return self.module.weight.numel()


@dataclass
class LoraInventory:
    """The LoRA parameters of a model: those das-sd differentiates, in parameter order, and those
    it leaves out.

    Attributes:
        layers: The differentiated factors, in module (= parameter) order.
        left_out: Parameter name -> (kind, element count) of every active adapter parameter that is
            not differentiated (e.g. ``lora_magnitude_vector`` of DoRA).
    """

    layers: list[LoraLayer]
    left_out: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        """p, the number of differentiated parameters (the length of g_{z,t}).

        Returns:
            The summed element count of the differentiated weights.
        """
        return sum(layer.num_parameters for layer in self.layers)

    def record(self) -> dict:
        """The parameter accounting a store's manifest keeps and ``das-sd featurize`` prints.

        Returns:
            {"differentiated": {kind: parameters}, "differentiated_total": p,
            "left_out": {kind: parameters}, "left_out_total": parameters,
            "left_out_examples": up to 5 parameter names}.
        """
        done: Counter[str] = Counter()
        for layer in self.layers:
            done[layer.kind] += layer.num_parameters
        missed: Counter[str] = Counter()
        for kind, count in self.left_out.values():
            missed[kind] += count
        return {"differentiated": dict(sorted(done.items())), "differentiated_total": self.num_parameters,
                "left_out": dict(sorted(missed.items())), "left_out_total": sum(missed.values()),
                "left_out_examples": sorted(self.left_out)[:5]}

    def left_out_message(self) -> str:
        """One paragraph saying what would be left out of the attribution, for refusals and notes.

        Returns:
            The kinds and counts left out, with the counts differentiated beside them.
        """
        r = self.record()
        kinds = ", ".join(f"{kind} ({count:,} parameters)" for kind, count in r["left_out"].items())
        return (f"das-sd differentiates {SUPPORTED_KINDS} ({r['differentiated_total']:,} parameters here); "
                f"this LoRA also has {kinds}, e.g. {', '.join(r['left_out_examples'][:2])}")


def _active_adapters(tuner: nn.Module) -> list[str]:
    if getattr(tuner, "disable_adapters", False):
        return []
    return list(getattr(tuner, "active_adapters", []))


def _conv_supported(module: nn.Conv2d) -> bool:
    return (module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
            and module.bias is None)


def _factor(tuner: nn.Module, container_name: str, adapter: str) -> nn.Module | None:
    container = getattr(tuner, container_name, None)
    return container[adapter] if container is not None and adapter in container else None


def _factor_kind(module: nn.Module) -> str | None:
    """"linear" or "conv<h>x<w>" for a LoRA factor das-sd can differentiate, else None."""
    if type(module) is nn.Linear and module.bias is None:
        return "linear"
    if type(module) is nn.Conv2d and _conv_supported(module):
        return "conv{}x{}".format(*module.kernel_size)
    return None


def lora_inventory(model: nn.Module, required: bool = True) -> LoraInventory:
    """Sort the active LoRA adapter's parameters of ``model`` into differentiated and left out.

    Args:
        model: The UNet (or text encoder) with peft LoRA layers.
        required: Raise when nothing can be differentiated (featurizing a model without a LoRA);
            False returns an empty inventory.

    Returns:
        The inventory; its ``layers`` are in module (= parameter) order.

    Raises:
        ValueError: When ``required`` and the model has no LoRA layer das-sd can differentiate.
    """
    layers: list[LoraLayer] = []
    left_out: dict[str, tuple[str, int]] = {}
    for name, tuner in model.named_modules():
        names = getattr(tuner, "adapter_layer_names", None)
        if not names:
            continue
        active = _active_adapters(tuner)
        dora = {a for a in active if getattr(tuner, "use_dora", {}).get(a)}
        for adapter in active:
            factors = [_factor(tuner, n, adapter) if n in names else None for n in ("lora_A", "lora_B")]
            kinds = [_factor_kind(f) if f is not None else None for f in factors]
            # the layer's kind is its A's: A carries the adapted layer's kernel, B of a conv is 1x1
            if adapter not in dora and None not in kinds:
                layers += [LoraLayer(f"{name}.{n}.{adapter}", f, kinds[0]) for n, f in zip(("lora_A", "lora_B"), factors)]
                differentiated = ("lora_A", "lora_B")
            else:
                differentiated = ()
            for container_name in names:
                container = getattr(tuner, container_name, None)
                if container_name in differentiated or container is None or adapter not in container:
                    continue
                part = container[adapter]
                label = f"{container_name} (DoRA)" if adapter in dora else \
                    f"{container_name} ({type(part).__name__})" if isinstance(part, nn.Module) else container_name
                params = part.named_parameters() if isinstance(part, nn.Module) else [("", part)]
                for pname, p in params:
                    left_out[f"{name}.{container_name}.{adapter}.{pname}".rstrip(".")] = (label, p.numel())
    # named_modules visits a tuner before its children: sort the factors into module order, the
    # parameter order of g that stores have always used (lora_A before lora_B of each layer)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    layers.sort(key=lambda layer: order[layer.name])
    if not layers and required:
        if left_out:
            raise ValueError("the UNet's LoRA has no layer das-sd can differentiate: "
                             + LoraInventory(layers, left_out).left_out_message())
        raise ValueError("the UNet has no LoRA layers: load a LoRA before featurizing")
    return LoraInventory(layers, left_out)


def lora_parameters(model: nn.Module, required: bool = True) -> list[nn.Parameter]:
    """The LoRA parameters, in parameter order: the weights of the differentiated LoRA A / B
    factors. The one definition of what `das-sd train-lora` trains and what attribution
    differentiates.

    Args:
        model: The UNet (or text encoder) with LoRA layers.
        required: Raise ValueError when there is none (see ``lora_inventory``); False returns [].

    Returns:
        The weight parameters theta (docs/method.md §1), in module order.
    """
    return [layer.module.weight for layer in lora_inventory(model, required).layers]


def num_lora_parameters(model: nn.Module) -> int:
    """p, the number of LoRA parameters attribution differentiates (the length of g_{z,t}).

    Args:
        model: The UNet with a LoRA loaded.

    Returns:
        The total element count of ``lora_parameters(model)``.

    Raises:
        ValueError: When the model has no LoRA layer das-sd can differentiate.
    """
    return lora_inventory(model).num_parameters
