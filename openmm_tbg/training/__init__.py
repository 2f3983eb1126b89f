"""Training of the transferable flows (``openmm-tbg train``).

An internal-coordinate flow (``--family internal-coordinate``) trains by maximum likelihood on MD frames
(:mod:`.likelihood`). The EGNN CNF (``--family egnn-cnf``) trains by conditional flow matching: this trains the
EGNN vector field of a :class:`~openmm_tbg.flow.TransferableFlow` on mixed-peptide batches of MD
frames (Lipman et al. 2023; Tong et al. 2023; Klein, Kraemer and Noe 2023):

    x_t = (1 - t) x0 + t x1 + sigma eps,    target u_t = x1 - x0,    loss = |v(t, x_t) - u_t|^2 (real atoms)

with x0 drawn from the flow's mean-free Gaussian prior and x1 a centred data frame in internal units
(nm / ``length_scale``). Two couplings of x0 and x1 are available: ``"independent"`` (TBG's choice for
dipeptides) and ``"ot"``, the equivariant optimal-transport coupling that permutes the prior sample within each
group of interchangeable atoms (Hungarian algorithm) and then rotates it onto the data frame (Kabsch), which
straightens the learned paths.

Checkpoints are written with :func:`openmm_tbg.checkpoint.save_model`; next to the model a resume file
``<out>.resume.pt`` holds the optimizer, schedule, EMA, RNG states and step so that an interrupted run
continues exactly (bit-for-bit on CPU). Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in
:class:`torch.nn.parallel.DistributedDataParallel`; each rank draws its own batches and only rank 0 writes files.

Command line::

    openmm-tbg train --data DIR --out model.pt --steps 20000 --batch-size 32 --layers 5 --hidden 64 --coupling ot
    torchrun --nproc_per_node 4 -m openmm_tbg.cli train --data DIR --out model.pt ...   # 4 GPUs
    openmm-tbg train --data DIR --out model.pt --resume                                 # continue exactly

Modules: :mod:`.config` (hyper-parameters, schedule), :mod:`.couplings` (prior, rotations, OT coupling),
:mod:`.batching` (mixed-peptide batches, loss), :mod:`.distributed` (DDP), :mod:`.resume` (the resume file),
:mod:`.model_setup` (model, parent model, EMA), :mod:`.loop` (:func:`train`) and :mod:`.cli`. The test-split
guard lives next to the data reader (:mod:`openmm_tbg.data.splits`) and is re-exported here.
"""

from ..data.splits import TestSplitError, check_not_test_split, load_training_data
from .batching import (FrameBatch, PeptideBatchSampler, TrainingBatch, estimate_length_scale, flow_matching_loss,
                       make_generators, make_training_batch)
from .cli import config_from_args, configure_parser, run_from_cli
from .config import COUPLINGS, TrainingConfig, lr_factor
from .couplings import (equivariant_ot_coupling, kabsch_rotation, masked_center, random_rotations,
                        sample_mean_free_gaussian)
from .loop import TrainingResult, train
from .model_setup import EMA, build_flow
from .resume import RESUME_FORMAT, RESUME_FORMAT_VERSION, resume_path

__all__ = [
    "COUPLINGS", "EMA", "FrameBatch", "PeptideBatchSampler", "RESUME_FORMAT", "RESUME_FORMAT_VERSION",
    "TestSplitError", "TrainingBatch", "TrainingConfig", "TrainingResult", "build_flow", "check_not_test_split",
    "config_from_args", "configure_parser", "equivariant_ot_coupling", "estimate_length_scale",
    "flow_matching_loss", "kabsch_rotation", "load_training_data", "lr_factor", "make_generators",
    "make_training_batch", "masked_center", "random_rotations", "resume_path", "run_from_cli",
    "sample_mean_free_gaussian", "train",
]
