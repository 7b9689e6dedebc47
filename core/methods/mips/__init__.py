"""MIPS: program synthesis from trained recurrent networks (normalise, find the lattice, regress, emit Python).

    from crosspatch.methods.mips import extract_program
    result = extract_program("rnn-parity-last2", out="report/")   # or a TaskRNN and a task name
    result.solved, result.program, result.verification

Follows Michaud et al. 2024 (arXiv 2402.05110); the lattice finder and the regression, which the
paper's repository did not publish, are written here from the paper's description. Modules: ``basis``
(exact changes of basis), ``normalise``, ``lattice``, ``fsm``, ``regress``, ``emit``, ``verify`` and
``extract`` (the pipeline). Imports the zoo's algorithmic tasks and networks.
"""

from .extract import Extraction, extract_program
from .inputs import Alphabet
from .tasks import TaskInfo, task_info
from .verify import Verification, verify_program

__all__ = ["Alphabet", "Extraction", "TaskInfo", "Verification", "extract_program", "task_info", "verify_program"]
