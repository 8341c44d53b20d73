"""PEFT names that smolpeft does not implement, refused with a clear error, and PEFT's small utilities.

PEFT users' code (and PEFT's tests) import many names at module level. Each PEFT method smolpeft does not do is
importable here, so an import line does not fail, and refuses to be built with an error that names it.
"""

from __future__ import annotations

import torch

SUPPORTED = "LoRA (LoraConfig) and prompt tuning (PromptTuningConfig)"

# PEFT 0.21's method configs other than LoRA and prompt tuning.
UNSUPPORTED_CONFIGS = [
    "AdaLoraConfig",
    "AdamssConfig",
    "AdaptionPromptConfig",
    "ArrowConfig",
    "BdLoraConfig",
    "BeftConfig",
    "BOFTConfig",
    "C3AConfig",
    "CartridgeConfig",
    "CPTConfig",
    "DeftConfig",
    "DeloraConfig",
    "FourierFTConfig",
    "FrodConfig",
    "GloraConfig",
    "GraloraConfig",
    "HiraConfig",
    "HRAConfig",
    "IA3Config",
    "KasaConfig",
    "LilyConfig",
    "LNTuningConfig",
    "LoftQConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoraGAConfig",
    "LoraRuntimeConfig",
    "MissConfig",
    "MontecloraConfig",
    "MultitaskPromptTuningConfig",
    "OFTConfig",
    "OSFConfig",
    "PeanutConfig",
    "PolyConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PsoftConfig",
    "PveraConfig",
    "RandLoraConfig",
    "RoadConfig",
    "ShadowConfig",
    "ShiraConfig",
    "SupertuningConfig",
    "TinyLoraConfig",
    "TrainableTokensConfig",
    "UniLoraConfig",
    "VBLoRAConfig",
    "VeloraConfig",
    "VeraConfig",
    "WaveFTConfig",
    "XLoraConfig",
]


def unsupported(name: str) -> type:
    """A stand-in for PEFT's class `name`. It can be built (PEFT's tests and scripts build configs at import time),
    but any model operation refuses it: see `refuse`."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    return type(name, (), {"__init__": __init__, "unsupported": True, "__doc__": f"Not supported by smolpeft: {name}."})


def refuse(config: object) -> None:
    """Raise for a config of a PEFT method smolpeft does not implement."""
    if getattr(config, "unsupported", False) or not hasattr(config, "peft_type"):
        raise NotImplementedError(
            f"{type(config).__name__} is a PEFT feature smolpeft does not implement; smolpeft supports {SUPPORTED}"
        )


class PeftWarning(UserWarning):
    """PEFT's warning category."""


def infer_device() -> str:
    """The accelerator torch sees ("cuda", "mps", "xpu"), or "cpu"."""
    if torch.cuda.is_available():
        return "cuda"
    for name in ("mps", "xpu"):
        backend = getattr(torch, name, None) or getattr(torch.backends, name, None)
        if backend is not None and getattr(backend, "is_available", lambda: False)():
            return name
    return "cpu"


def transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.T if fan_in_fan_out else weight
