"""PEFT's module path `peft.utils.other`."""

from ..lora import ModulesToSave as ModulesToSaveWrapper  # noqa: F401
from ..qlora import prepare_model_for_kbit_training  # noqa: F401
from ..surface import infer_device, transpose  # noqa: F401


def _get_submodules(model, key: str):
    """(parent, target, target_name) of the submodule at `key`: PEFT's helper, which user code imports."""
    parent = model.get_submodule(".".join(key.split(".")[:-1]))
    return parent, model.get_submodule(key), key.split(".")[-1]
