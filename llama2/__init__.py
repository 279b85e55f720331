"""Llama 2 in plain PyTorch: the model, its tokenizer, checkpoints, and the training recipe."""

from .checkpoint import Llama, load, read_checkpoint, save_gguf, save_hf, save_meta
from .config import PRESETS, ModelConfig, get_preset
from .model import Transformer
from .tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "PRESETS", "Llama", "ModelConfig", "Tokenizer", "Transformer", "get_preset", "load",
    "read_checkpoint", "save_gguf", "save_hf", "save_meta", "train_tokenizer",
]  # fmt: skip
__version__ = "0.1.0"
