"""PEFT's module path `peft.utils.other`."""

from ..lora import ModulesToSave as ModulesToSaveWrapper  # noqa: F401
from ..qlora import prepare_model_for_kbit_training  # noqa: F401
from ..surface import infer_device, transpose  # noqa: F401
