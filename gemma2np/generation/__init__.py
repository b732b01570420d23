"""Text generation: transformers' `generate()` (greedy and multinomial sampling) for gemma2np models.

The package mirrors transformers' generation/ directory, one job per module:

    configuration.py      GenerationConfig, generation_config.json, defaults, checks of the settings
    logits_process.py     logits processors (repetition penalty, no-repeat n-grams, min lengths, temperature,
                          top-k, top-p, min-p)
    stopping_criteria.py  stopping criteria (max length, eos, stop strings)
    picking.py            the pick of the next token: greedy argmax or one multinomial draw per row
    streamers.py          TextStreamer and the adapter for plain callables
    loop.py               generate(): prepare -> prefill -> loop {processors -> pick -> stop? -> stream -> decode step}

Layer: generation sits above the model (it calls `model(...)`, the forward pass, and nothing else of it) and
never imports gemma2np.modeling; the model's `generate` method delegates to `loop.generate`.
"""

from .configuration import (
    GENERATION_CONFIG_NAME,
    GenerationConfig,
    GenerationError,
    GenerationTypeError,
    check_seed,
    get_generation_config,
    validate,
)
from .configuration import eos_list as _eos_list  # noqa: F401  (kept for callers of the old module)
from .configuration import validate as _validate  # noqa: F401
from .logits_process import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from .loop import GenerateDecoderOnlyOutput, generate
from .picking import pick_next_tokens, sample_rows
from .picking import sample_rows as _sample_rows  # noqa: F401
from .stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StopStringCriteria, StoppingCriteriaList
from .streamers import TextStreamer

__all__ = [
    "GENERATION_CONFIG_NAME",
    "GenerationConfig",
    "GenerationError",
    "GenerationTypeError",
    "get_generation_config",
    "check_seed",
    "validate",
    "generate",
    "LogitsProcessorList",
    "RepetitionPenaltyLogitsProcessor",
    "MinLengthLogitsProcessor",
    "MinNewTokensLengthLogitsProcessor",
    "TemperatureLogitsWarper",
    "TopKLogitsWarper",
    "TopPLogitsWarper",
    "MinPLogitsWarper",
    "NoRepeatNGramLogitsProcessor",
    "StoppingCriteriaList",
    "MaxLengthCriteria",
    "EosTokenCriteria",
    "StopStringCriteria",
    "pick_next_tokens",
    "sample_rows",
    "TextStreamer",
    "GenerateDecoderOnlyOutput",
]
