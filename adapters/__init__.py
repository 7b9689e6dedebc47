"""Built-in adapters, one package per architecture family.

Each registers through the ``crosspatch`` entry-point group exactly as a third-party plugin does,
and imports its library (transformers, diffusers, open_clip) only when it serves a model.
"""
