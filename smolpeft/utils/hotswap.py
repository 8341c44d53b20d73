"""PEFT's module path `peft.utils.hotswap`: thin re-exports."""

from ..hotswap import (  # noqa: F401
    CONFIG_KEYS_TO_CHECK,
    check_hotswap_configs_compatible,
    hotswap_adapter,
    hotswap_adapter_from_state_dict,
    prepare_model_for_compiled_hotswap,
)
