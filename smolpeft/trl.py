"""TRL's SFTTrainer on smolpeft: smolpeft configs as `peft_config`, smolpeft PeftModels as `model`.

    from smolpeft import LoraConfig
    from smolpeft.trl import SFTTrainer
    from trl import SFTConfig

    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, peft_config=LoraConfig(...))

Everything else is TRL's: data preparation, packing, assistant-only loss, logging. What changes is where the adapter
comes from (smolpeft's get_peft_model, created where TRL would create peft's, right after `set_seed(args.seed)`),
what serves TRL's fused LM head (`model(..., fused_lm_head=True)`: per-token log-probs, entropy and top-1 without
full logits), and what is saved (adapters, see `smolpeft.hf_trainer.AdapterCheckpoints`).

The fused head is smolpeft's `token_log_probs` on the transformers model, under the adapters, where TRL puts its own
for peft. TRL's kernel scores tiles of 4,096 positions x 32,768 vocabulary entries and recomputes them in backward;
on a CPU without Triton, its peak held most of a 2 GB job's RSS (an 8-layer SmolLM2 shape). Ours holds 128 positions
x vocabulary and forms the gradient in the forward pass: two head matmuls, not three. Models `lean_ok` does not cover
(scaled or soft-capped logits, a head with a bias) keep TRL's head.
"""

from __future__ import annotations

import functools
import inspect
import types

try:
    import trl
    from trl.trainer import utils as trl_utils
except ImportError as e:  # TRL is optional: `import smolpeft` never imports it
    raise ImportError("smolpeft.trl needs TRL; install it with: pip install 'smolpeft[trl]'") from e

from transformers import set_seed

from .config import PeftConfig
from .hf_trainer import AdapterCheckpoints, unwrap
from .loss import fused_head_forward, lean_ok
from .model import PeftModel, get_peft_model

_TRL_INIT = inspect.signature(trl.SFTTrainer.__init__)
_FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")  # what TRL's SFTTrainer asks of its fused head


class SFTTrainer(AdapterCheckpoints, trl.SFTTrainer):
    """trl.SFTTrainer that takes smolpeft's `LoraConfig`/`PromptTuningConfig` as `peft_config` and smolpeft
    `PeftModel`s as `model`, and saves adapters; every other argument is TRL's, positional or by name."""

    def __init__(self, *args, **kwargs):
        a = _TRL_INIT.bind(self, *args, **kwargs).arguments
        a.pop("self")
        config = a.get("peft_config")
        if isinstance(config, PeftConfig):
            a["model"], a["peft_config"] = _with_adapter(a, config), None
        base = m.get_base_model() if (m := unwrap(a["model"])) is not None else None
        if base is not None and hasattr(base.get_output_embeddings(), "lora_A"):
            # TRL's fused head multiplies by lm_head.weight: an adapter there would never train (TRL refuses it too).
            raise ValueError("an adapter on lm_head is not supported by SFTTrainer; remove it from target_modules")
        super().__init__(**a)
        if base is not None and "forward" in vars(self.model):
            # TRL took our PeftModel for a plain model and fused its head onto the wrapper; the head goes under the
            # adapters instead, onto the transformers model, where TRL puts it for peft models.
            del self.model.forward
            add_fused_lm_head(base)


def add_fused_lm_head(base) -> None:
    """TRL's fused-head protocol on a transformers causal LM: `base(..., labels, fused_lm_head=True)` returns TRL's
    FusedCausalLMOutput (loss, per-token log_probs, entropy, is_top1, label_mask) from smolpeft's kernel, where
    `lean_ok` holds; else TRL's own head. Calls without `fused_lm_head` run the model's own forward."""
    if not lean_ok(base):
        trl_utils.add_fused_lm_head(base, outputs=_FUSED_OUTPUTS)
        return
    original = base.forward

    @functools.wraps(type(base).forward)  # the original signature: generate() validates its kwargs against it
    def forward(self, *args, fused_lm_head: bool = False, **kwargs):
        if not fused_lm_head:
            return original(*args, **kwargs)
        return trl_utils.FusedCausalLMOutput(**fused_head_forward(self, *args, **kwargs))

    base.forward = types.MethodType(forward, base)


def _with_adapter(a: dict, config: PeftConfig) -> PeftModel:
    """What TRL does with a peft config, with smolpeft: load the model if it is a name, then add the adapter
    right after `set_seed(args.seed)`, so the adapter's random init equals TRL + peft's."""
    model, args = a["model"], a.get("args")
    if unwrap(model) is not None:
        raise ValueError(
            "model is already a PeftModel and peft_config was given too; pass the base model with peft_config, "
            "or the PeftModel alone"
        )
    if isinstance(model, str):
        init_kwargs = dict(getattr(args, "model_init_kwargs", None) or {})
        if a.get("quantization_config") is not None:
            init_kwargs["quantization_config"] = a.pop("quantization_config")
        init_kwargs.setdefault("trust_remote_code", getattr(args, "trust_remote_code", False))
        model = trl_utils.create_model_from_path(model, **init_kwargs)
        if getattr(args, "model_init_kwargs", None) is not None:
            args.model_init_kwargs = None  # used here; TRL would warn that they are ignored for a loaded model
    set_seed(args.seed if args is not None else trl.SFTConfig.__dataclass_fields__["seed"].default)
    return get_peft_model(model, config)
