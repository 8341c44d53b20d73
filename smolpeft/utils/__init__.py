"""PEFT's module path `peft.utils`: thin re-exports."""

from ..checkpoint import (  # noqa: F401
    get_base_model_state_dict,
    get_peft_model_state_dict,
    load_peft_weights,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from ..config import CONFIG_NAME, PeftType, TaskType  # noqa: F401
from ..config import WEIGHTS_NAME as SAFETENSORS_WEIGHTS_NAME  # noqa: F401
from ..lora import ModulesToSave as AuxiliaryTrainingWrapper  # noqa: F401
from ..lora import ModulesToSave as ModulesToSaveWrapper  # noqa: F401
from ..qlora import prepare_model_for_kbit_training  # noqa: F401
from ..surface import PeftWarning, infer_device, transpose  # noqa: F401
from .other import _get_submodules  # noqa: F401

WEIGHTS_NAME = "adapter_model.bin"
INCLUDE_LINEAR_LAYERS_SHORTHAND = "all-linear"
