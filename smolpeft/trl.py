"""TRL's SFTTrainer on smolpeft: smolpeft configs as `peft_config`, smolpeft PeftModels as `model`.

    from smolpeft import LoraConfig
    from smolpeft.trl import SFTTrainer
    from trl import SFTConfig

    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, peft_config=LoraConfig(...))

Everything else is TRL's: data preparation, packing, assistant-only loss, the fused LM head that computes the loss
lean, logging. What changes is where the adapter comes from (smolpeft's get_peft_model, created where TRL would
create peft's, right after `set_seed(args.seed)`), where TRL's fused head goes (on the transformers model, under
the adapters, as TRL does for peft), and what is saved (adapters, see `smolpeft.hf_trainer.AdapterCheckpoints`).
"""

from __future__ import annotations

import inspect

try:
    import trl
    from trl.trainer import utils as trl_utils
except ImportError as e:  # TRL is optional: `import smolpeft` never imports it
    raise ImportError("smolpeft.trl needs TRL; install it with: pip install 'smolpeft[trl]'") from e

from transformers import set_seed

from .config import PeftConfig
from .hf_trainer import AdapterCheckpoints, unwrap
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
            # TRL took our PeftModel for a plain model and fused its head onto the wrapper; move it under the
            # adapters, onto the transformers model, where TRL puts it for peft models.
            del self.model.forward
            trl_utils.add_fused_lm_head(base, outputs=_FUSED_OUTPUTS)


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
