"""The model classes, one job per module (docs/ARCHITECTURE.md, layer 4):

    validation.py  InputError and the checks of every model-call argument
    pretrained.py  Gemma2PreTrainedModel: load / save / random init, the recording hook
    decoder.py     Gemma2Model: the decoder math (read it beside gemma2np/ops.py)
    heads.py       the causal-LM, sequence- and token-classification heads and their losses
    embeddings.py  resize_token_embeddings' procedure (transformers' mean resizing)

Import the public names from gemma2np (or gemma2np.modeling, transformers' module name).
"""
