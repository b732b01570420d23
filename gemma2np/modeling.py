"""The public model classes under transformers' module name (`modeling_gemma2`), for

    from gemma2np.modeling import Gemma2ForCausalLM

They live in gemma2np/model/: decoder.py (the decoder math, read it beside ops.py), heads.py,
pretrained.py (load / save / init) and validation.py (argument checks).
"""

from .model.decoder import Gemma2Model
from .model.heads import Gemma2ForCausalLM, Gemma2ForSequenceClassification, Gemma2ForTokenClassification
from .model.pretrained import Gemma2PreTrainedModel
from .model.validation import InputError

__all__ = [
    "Gemma2PreTrainedModel",
    "Gemma2Model",
    "Gemma2ForCausalLM",
    "Gemma2ForSequenceClassification",
    "Gemma2ForTokenClassification",
    "InputError",
]
