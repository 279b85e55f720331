"""One training loop for every stage (loop.py); one small file per stage."""

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
