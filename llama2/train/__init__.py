"""One training loop for every stage (loop.py); one small file per stage."""

from .config import TrainConfig, load_train_config
from .loop import train

__all__ = ["TrainConfig", "load_train_config", "train"]
