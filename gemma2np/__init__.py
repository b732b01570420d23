"""gemma2np: Google's Gemma 2 as a readable NumPy reference with a native (C/OpenMP) hot path.

The API mirrors Hugging Face transformers' Gemma 2 classes, with NumPy arrays instead of tensors.
"""

from .config import ConfigError, Gemma2Config
from .checkpoint import CheckpointError
from .modeling import (
    Gemma2ForCausalLM,
    Gemma2ForSequenceClassification,
    Gemma2ForTokenClassification,
    Gemma2Model,
    Gemma2PreTrainedModel,
    InputError,
)
from .cache import Gemma2Cache

__version__ = "0.1.0"

__all__ = [
    "Gemma2Config",
    "Gemma2Model",
    "Gemma2ForCausalLM",
    "Gemma2ForSequenceClassification",
    "Gemma2ForTokenClassification",
    "Gemma2PreTrainedModel",
    "Gemma2Cache",
    "ConfigError",
    "CheckpointError",
    "InputError",
    "GemmaTokenizer",
]


def __getattr__(name):  # the tokenizer needs sentencepiece: import it on first use
    if name == "GemmaTokenizer":
        from .tokenizer import GemmaTokenizer

        return GemmaTokenizer
    raise AttributeError(f"module 'gemma2np' has no attribute {name!r}")
