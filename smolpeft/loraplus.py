"""LoRA+ (Hayou et al., 2024, https://arxiv.org/abs/2402.12354): B learns faster than A, by a fixed ratio."""

from __future__ import annotations

from torch import nn
from torch.optim import Optimizer

from .lora import LoraLayer


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_lr_embedding: float = 1e-6,
    loraplus_weight_decay: float = 0.0,
    **kwargs,
) -> Optimizer:
    """`optimizer_cls` over the trainable parameters in PEFT's four groups (same order, same rules):
        A and every other matrix          lr                       weight decay loraplus_weight_decay
        LoRA factors of embedding layers  loraplus_lr_embedding    loraplus_weight_decay
        B and 1-D tensors (m, biases)     lr · loraplus_lr_ratio   loraplus_weight_decay
        ... of which biases and norms     lr · loraplus_lr_ratio   0
    `kwargs` go to the optimizer (its own weight_decay is overridden by the groups')."""
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    decay = {n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in n}
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Adapter tensors sit one container below their layer: <layer>.lora_embedding_A.<adapter>
        owner = ".".join(name.split(".")[:-2])
        layer = model.get_submodule(owner) if owner else None
        if isinstance(layer, LoraLayer) and layer.is_embedding:
            groups["embedding"].append(p)
        elif "lora_B" in name or p.ndim == 1:
            groups["B" if name in decay else "B_no_decay"].append(p)
        else:
            groups["A"].append(p)
    optimizer = optimizer_cls(
        [
            {"params": groups["A"], "weight_decay": loraplus_weight_decay, "lr": lr},
            {"params": groups["embedding"], "weight_decay": loraplus_weight_decay, "lr": loraplus_lr_embedding},
            {"params": groups["B"], "weight_decay": loraplus_weight_decay, "lr": lr * loraplus_lr_ratio},
            {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
        ],
        lr=lr,
        **kwargs,
    )
    if optimizer_cls.__name__ in ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit"):
        import bitsandbytes  # embeddings keep 32-bit optimizer state, as bitsandbytes recommends

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer
