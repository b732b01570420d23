"""Model outputs with transformers' field names and behaviour (arrays instead of tensors).

Like `transformers.utils.ModelOutput`: attribute access (`out.logits`), key access
(`out["logits"]`), integer / slice access over the fields that are not None (`out[0]`), and
`to_tuple()` -- which is also what a model returns with `return_dict=False`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any


class ModelOutput(OrderedDict):
    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                OrderedDict.__setitem__(self, f.name, value)

    def __getitem__(self, key):
        if isinstance(key, str):
            return OrderedDict.__getitem__(self, key)
        return self.to_tuple()[key]

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in {f.name for f in fields(self)} and value is not None:
            OrderedDict.__setitem__(self, name, value)

    def __setitem__(self, key, value):
        OrderedDict.__setitem__(self, key, value)
        super().__setattr__(key, value)

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self[k] for k in self.keys())

    def __iter__(self):  # iterate over keys, as a dict (and as transformers' ModelOutput) does
        return super().__iter__()


@dataclass(eq=False)
class BaseModelOutputWithPast(ModelOutput):
    last_hidden_state: Any = None
    past_key_values: Any = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass(eq=False)
class CausalLMOutputWithPast(ModelOutput):
    loss: Any = None
    logits: Any = None
    past_key_values: Any = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass(eq=False)
class SequenceClassifierOutputWithPast(ModelOutput):
    loss: Any = None
    logits: Any = None
    past_key_values: Any = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass(eq=False)
class TokenClassifierOutput(ModelOutput):
    loss: Any = None
    logits: Any = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
