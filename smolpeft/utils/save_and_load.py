"""PEFT's module path `peft.utils.save_and_load`."""

from ..checkpoint import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict  # noqa: F401
