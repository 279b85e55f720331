"""One training loop (loop.py) and one run directory (rundir.py) for every stage; one small
file per stage, each with its settings class (config.py)."""

from .config import (
    STAGE_CONFIGS,
    DPOConfig,
    GattConfig,
    LoopConfig,
    PPOConfig,
    PretrainConfig,
    RejectionConfig,
    RewardConfig,
    SFTConfig,
    TrainConfig,
    load_train_config,
)
from .loop import train

__all__ = [
    "STAGE_CONFIGS",
    "DPOConfig",
    "GattConfig",
    "LoopConfig",
    "PPOConfig",
    "PretrainConfig",
    "RejectionConfig",
    "RewardConfig",
    "SFTConfig",
    "TrainConfig",
    "load_train_config",
    "train",
]
