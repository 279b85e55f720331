"""Llama 2 in plain PyTorch: the model, its tokenizer, checkpoints, and the training recipe."""

from .checkpoint import read_checkpoint, save_gguf, save_hf, save_meta
from .config import PRESETS, ModelConfig, get_preset
from .formats import encode_chat, encode_infill
from .generation import Completion, SamplingParams
from .llm import Llama, load
from .model import Transformer
from .tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "PRESETS",
    "Completion",
    "Llama",
    "ModelConfig",
    "SamplingParams",
    "Tokenizer",
    "Transformer",
    "encode_chat",
    "encode_infill",
    "get_preset",
    "load",
    "read_checkpoint",
    "save_gguf",
    "save_hf",
    "save_meta",
    "train_tokenizer",
]
__version__ = "0.1.0"
