"""What `accelerate launch --config_file F` asks for, applied to the run config (it reaches the ranks as
ACCELERATE_* environment variables, not as arguments).

A file that enables DeepSpeed (`distributed_type: DEEPSPEED`, what `accelerate config` writes) is honoured
through our DeepSpeed backend: its ZeRO stage and offload pick the shipped ds_config (or its own
`deepspeed_config_file`), its mixed precision sets `precision`. A config key set to something else than
its default and than the file's value is a conflict: refused, naming both. A plain multi-process file
changes nothing, except that its mixed precision must agree with `precision` under backend.name=accelerate.
"""

from __future__ import annotations

from collections.abc import Mapping

from trainer.config import Config, ConfigError

PRECISION_OF = {"bf16": "bf16", "fp16": "fp16", "no": "fp32"}
SHIPPED_DS_CONFIG = {("1", False): "ds_configs/zero1.json", ("2", False): "ds_configs/zero2.json",
                     ("3", False): "ds_configs/zero3.json", ("3", True): "ds_configs/zero3_offload.json"}


def _get(cfg: Config, key: str) -> object:
    section, _, name = key.rpartition(".")
    return getattr(getattr(cfg, section) if section else cfg, name)


def _set(cfg: Config, key: str, value: object) -> None:
    section, _, name = key.rpartition(".")
    setattr(getattr(cfg, section) if section else cfg, name, value)


def _deepspeed_settings(env: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """{config key: (value, the Accelerate setting it comes from)} of a DeepSpeed-enabled launch."""
    wanted = {"backend.name": ("deepspeed", "ACCELERATE_USE_DEEPSPEED=true")}
    own_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if own_file not in ("", "none"):
        wanted["backend.ds_config"] = (own_file, f"ACCELERATE_DEEPSPEED_CONFIG_FILE={own_file}")
    elif "ACCELERATE_DEEPSPEED_ZERO_STAGE" in env:
        stage = env["ACCELERATE_DEEPSPEED_ZERO_STAGE"]
        offload = [f"ACCELERATE_DEEPSPEED_OFFLOAD_{part}_DEVICE={env[var]}" for part in ("OPTIMIZER", "PARAM")
                   if env.get(var := f"ACCELERATE_DEEPSPEED_OFFLOAD_{part}_DEVICE", "none") not in ("", "none")]
        shipped = SHIPPED_DS_CONFIG.get((stage, bool(offload)))
        setting = ", ".join([f"ACCELERATE_DEEPSPEED_ZERO_STAGE={stage}", *offload])
        if shipped is None:
            raise ConfigError(f"accelerate config ({setting}): no shipped DeepSpeed config for it (shipped: "
                              f"{sorted(SHIPPED_DS_CONFIG.values())}); point deepspeed_config_file at your own JSON")
        wanted["backend.ds_config"] = (shipped, setting)
    return wanted


def apply_accelerate_env(cfg: Config, env: Mapping[str, str]) -> list[str]:
    """Apply the accelerate launch settings to cfg (ConfigError on a conflict); returns `key=value (from X)` notes."""
    wanted: dict[str, tuple[str, str]] = {}
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        wanted = _deepspeed_settings(env)
    mixed = env.get("ACCELERATE_MIXED_PRECISION")
    deepspeed = wanted or cfg.backend.name == "deepspeed"
    if mixed in PRECISION_OF and (wanted or (not deepspeed and mixed != "no")):
        wanted["precision"] = (PRECISION_OF[mixed], f"ACCELERATE_MIXED_PRECISION={mixed}")
    defaults = Config()
    notes = []
    for key, (value, setting) in wanted.items():
        current = _get(cfg, key)
        if current != value and current != _get(defaults, key):
            raise ConfigError(f"{key}={current!r} conflicts with the accelerate config file ({setting}, which means "
                              f"{key}={value!r}); make them agree, or launch with a config file that does not set it")
        if current != value:
            _set(cfg, key, value)
            notes.append(f"{key}={value} (from {setting})")
    return notes


__all__ = ["apply_accelerate_env"]
