"""What a run is measured by and what a method returns.

``metrics`` turn a model output into one number per batch row; ``result`` is the one labelled
:class:`Result` every method returns (save, load, pandas, plots); ``report`` writes an HTML page of
results; ``formats`` reads the JSON files crosspatch writes with one error naming file and field, and
``tensor_folder`` writes and reads a saved module's folder (a JSON config beside a safetensors file:
TaskRNNs, SAEs, transcoders, trainable interventions). Independent of the engine: it imports only
the site vocabulary.
"""

from .result import Result, collect_versions

__all__ = ["Result", "collect_versions"]
