"""Studies as files: a TOML file names the model, the inputs (a task or prompts), the metric, the
seed, the output folder and the analyses (method, sites, options); :func:`run_study` runs it into a
report folder that holds a normalised copy of the study and the digest of every result, so
:func:`check_study` (``crosspatch run --check``) reruns it and compares bit for bit.

    title = "IOI"
    model = "ioi-gpt2-tiny"          # a zoo name or a checkpoint folder (relative to this file)
    metric = "logit_diff"            # logit_diff | probability | kl
    seed = 0
    pictures = true                  # PNGs besides the interactive page

    [inputs]
    task = "ioi"                     # or clean = [...], corrupt = [...], answer = " Mary", distractor = " John"
    n = 16

    [[analysis]]
    name = "heads"
    method = "activation_patching"
    sites = "head_out.*[head=*]"
    options = { normalize = true }

A VAE or CLIP-style model is studied on two images of the ``shapes`` task instead, named by how the
task draws them (``[inputs] pair = { factor = "colour", ... }``, or ``image`` and ``toward``), with
the metric ``closeness`` (VAE) or ``caption_logit_diff`` (CLIP).

Modules: ``spec`` (the dataclasses, reading and writing TOML), ``inputs`` (prompts and metric from a
study), ``images`` (the two images and the image metrics), ``analyses`` (the methods a study can
name), ``runner`` (run, write, check). Sits above the
methods (it runs them) and below the command line and the server.
"""

from .spec import Analysis, Inputs, Study, StudyError, load_study
from .runner import check_study, run_study

__all__ = ["Analysis", "Inputs", "Study", "StudyError", "load_study", "run_study", "check_study"]
