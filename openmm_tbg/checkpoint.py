"""Saving and loading trained flows.

A checkpoint is a ``torch.save`` of a plain dict::

    {"format": "openmm_tbg.checkpoint", "format_version": 1, "encoding_version": ENCODING_VERSION,
     "family": flow.family, "flow_config": flow.config, "state_dict": flow.state_dict(), "metadata": {...}}

``family`` names the model family (`openmm_tbg.model.FAMILIES`) whose class rebuilds the flow; files written
before families existed have none and are EGNN CNFs.

It is read with ``torch.load(weights_only=True)``, so loading a file never executes pickled code. Corrupt,
foreign and incompatible files raise :class:`CheckpointError` with the reason.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .utils import atomic_write, file_sha256  # file_sha256 stays importable from here

logger = logging.getLogger(__name__)

__all__ = ["CheckpointError", "save_model", "load_model", "resolve_model", "DEFAULT_MODEL_PATH", "SHIPPED_MODELS",
           "DEFAULT_FAMILY", "FORMAT",
           "FORMAT_VERSION"]

FORMAT = "openmm_tbg.checkpoint"
FORMAT_VERSION = 1
MODELS_DIR = Path(__file__).resolve().parent / "models"
#: The pretrained models shipped with the package, by family; ``load_model(name)`` loads them by these names.
SHIPPED_MODELS = {"egnn-cnf": MODELS_DIR / "tbg_dipeptides.pt",
                  "internal-coordinate": MODELS_DIR / "ic_dipeptides.pt"}
#: The family whose shipped model measured better on the test peptides (README, "The shipped models").
DEFAULT_FAMILY = "internal-coordinate"
#: the pretrained model loaded by ``load_model()`` and used by default everywhere
DEFAULT_MODEL_PATH = SHIPPED_MODELS[DEFAULT_FAMILY]


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, not an openmm_tbg checkpoint, or incompatible with this version."""


def _check_metadata(value: Any, where: str = "metadata") -> None:
    """Metadata must survive ``torch.load(weights_only=True)``: plain Python containers, numbers, strings."""
    if value is None or isinstance(value, (bool, int, str, torch.Tensor)):
        return
    if isinstance(value, float):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_metadata(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"save_model: {where} has a non-string key {key!r}; use string keys.")
            _check_metadata(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"save_model: {where} is of type {type(value).__name__}, which a weights_only checkpoint cannot hold; "
        "convert it to a plain int/float/str/bool/None/list/dict (e.g. float(x), array.tolist())."
    )


def save_model(flow, path: str | os.PathLike, metadata: dict | None = None) -> str:
    """Write a flow to a checkpoint file (atomically) and return its sha256.

    Parameters
    ----------
    flow : Flow
        A flow of a registered family (`openmm_tbg.model.FAMILIES`) with a ``config``.
    path : str or os.PathLike
        Output file (conventionally ``*.pt``); parent directories are created.
    metadata : dict, optional
        JSON-like information stored with the model (training data, metrics, hardware, ...).

    Returns
    -------
    str
        sha256 hex digest of the written file.
    """
    from openmm_tbg.encoding import ENCODING_VERSION

    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise TypeError(f"save_model: metadata must be a dict or None, got {type(metadata).__name__}.")
    _check_metadata(metadata)
    from openmm_tbg.model import family_of

    family = family_of(flow)
    config = flow.config  # raises TypeError for vector fields that cannot be rebuilt
    state = {k: v.detach().cpu() for k, v in flow.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"save_model: parameters {bad[:5]} contain NaN or inf; refusing to save a broken model.")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "encoding_version": ENCODING_VERSION,
        "family": family,
        "flow_config": config,
        "state_dict": state,
        "metadata": metadata,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A crash never leaves a half-written model; the file gets the usual umask-based mode.
    atomic_write(path, lambda fh: torch.save(payload, fh))
    digest = file_sha256(path)
    logger.info("saved model to %s (sha256 %s)", path, digest)
    return digest


def _read_payload(path: Path) -> dict:
    """The checked top-level dict of a checkpoint file (readable, openmm_tbg format, readable format version)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, truncated file, foreign pickle with classes, plain text ...
        # torch's own message is left out (and the chain cut): for foreign pickles it suggests loading with
        # weights_only=False, which would execute code from an untrusted file and is never needed for a model.
        raise CheckpointError(
            f"{path} is not a valid openmm_tbg checkpoint (sha256 {file_sha256(path)}, {os.path.getsize(path)} "
            f"bytes): torch.load(weights_only=True) could not read it ({type(exc).__name__}), so it is corrupt "
            "(truncated or damaged) or a different kind of file. An openmm_tbg checkpoint is a torch.save zip "
            f"archive of a plain dict with format {FORMAT!r}, format_version {FORMAT_VERSION}, flow_config, "
            "state_dict and metadata, written by openmm_tbg.save_model. Compare the sha256 with the one "
            "published for the model, then re-download it or re-create it with openmm_tbg.save_model."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path} is a PyTorch file but not an openmm_tbg model checkpoint (format {found!r}, expected "
            f"{FORMAT!r}). Pass a file written by openmm_tbg.save_model (a training resume file *.resume.pt "
            "is not a model)."
        )
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format_version {version!r}, but this openmm_tbg reads version {FORMAT_VERSION}. "
            "Use the openmm_tbg version that wrote it, or re-save the model with this one."
        )
    missing = [k for k in ("flow_config", "state_dict", "metadata") if k not in payload]
    if missing:
        raise CheckpointError(f"{path} is an incomplete openmm_tbg checkpoint: missing entries {missing}.")
    if not isinstance(payload["state_dict"], dict):
        raise CheckpointError(f"{path}: state_dict is a {type(payload['state_dict']).__name__}, expected a dict "
                              "of tensors.")
    return payload


_UPGRADABLE = ("tbg-full-v1",)


def upgrade_model(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Rewrite a ``tbg-full-v1`` checkpoint for the current atom encoding, without changing what it computes.

    Encoding ``tbg-full-v2`` splits some v1 hydrogen classes by the heavy atom they sit on (see
    :mod:`openmm_tbg.encoding`). Each new class gets a copy of the embedding row of the v1 class it came from, so
    the upgraded model gives the same vector field, samples and likelihoods as the original on every peptide;
    training it further (``init_from``) then lets the split classes differ.

    Parameters
    ----------
    src : path
        A model file written with encoding ``tbg-full-v1``.
    dst : path
        Output model file.

    Returns
    -------
    str
        sha256 of the written file.

    Raises
    ------
    CheckpointError
        ``src`` is not a readable openmm_tbg checkpoint of an upgradable encoding version.
    """
    from openmm_tbg.encoding import ATOM_NAME_CLASSES, ATOM_NAME_CLASSES_V1, ENCODING_VERSION, v1_class_of
    from openmm_tbg.flow import TransferableFlow

    src = Path(src)
    payload = _read_payload(src)
    version = payload.get("encoding_version")
    if version == ENCODING_VERSION:
        raise CheckpointError(f"{src} already uses encoding {ENCODING_VERSION!r}; there is nothing to upgrade.")
    if version not in _UPGRADABLE:
        raise CheckpointError(f"{src} uses encoding {version!r}; only {list(_UPGRADABLE)} can be upgraded.")
    key = "vector_field.embed_atom_class.weight"
    try:
        config = dict(payload["flow_config"])
        vf = dict(config["vector_field"])
        state = dict(payload["state_dict"])
        old = state[key]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{src} holds an invalid flow configuration or weights ({type(exc).__name__}: {exc}); it cannot be "
            "upgraded. Re-save the model with the openmm_tbg version that trained it."
        ) from exc
    n_v1 = len(ATOM_NAME_CLASSES_V1)
    if vf.get("n_atom_classes") != n_v1 or not torch.is_tensor(old) or tuple(old.shape[:1]) != (n_v1,):
        raise CheckpointError(f"{src}: {vf.get('n_atom_classes')} atom classes, expected the {n_v1} of "
                              f"{version!r}.")
    rows = [ATOM_NAME_CLASSES_V1.index(v1_class_of(c)) for c in ATOM_NAME_CLASSES]
    state[key] = old[rows].clone()
    vf["n_atom_classes"] = len(ATOM_NAME_CLASSES)
    config["vector_field"] = vf
    try:
        flow = TransferableFlow.from_config(config)
        flow.load_state_dict(state, strict=True)
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{src}: the stored weights do not fit the stored model configuration "
                              f"({str(exc).splitlines()[0]}); it cannot be upgraded.") from exc
    metadata = dict(payload.get("metadata") or {})
    metadata["upgraded_from"] = {"path": str(src.resolve()), "sha256": file_sha256(src), "encoding_version": version}
    return save_model(flow, dst, metadata=metadata)


def load_model(path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """Load a flow from a checkpoint file.

    Parameters
    ----------
    path : str or os.PathLike, optional
        Checkpoint written by :func:`save_model`, or the family name of a shipped model (``"egnn-cnf"``,
        ``"internal-coordinate"``; `SHIPPED_MODELS`); None loads the default shipped model
        (`DEFAULT_MODEL_PATH`).
    device : str or torch.device
        Device for the returned flow.

    Returns
    -------
    Flow
        The flow (of the family named in the file) in eval mode, with attributes ``checkpoint_path`` (absolute path), ``checkpoint_sha256`` and
        ``checkpoint_metadata``.

    Raises
    ------
    FileNotFoundError
        The file does not exist (or, for ``path=None``, no pretrained model ships with this installation).
    CheckpointError
        The file is corrupt, not an openmm_tbg checkpoint, or incompatible with this version of openmm_tbg.
    """
    from openmm_tbg.encoding import ENCODING_VERSION
    from openmm_tbg.model import FAMILIES, flow_class

    if isinstance(path, str) and path in SHIPPED_MODELS and not Path(path).exists():
        path = SHIPPED_MODELS[path]  # a shipped model by its family name
    if path is None:
        path = DEFAULT_MODEL_PATH
        if not path.exists():
            raise FileNotFoundError(
                f"No pretrained model ships with this installation of openmm_tbg yet (expected {path}). Train one "
                "with `openmm-tbg train` (or openmm_tbg.training.train) and pass its file, e.g. "
                "load_model('my_model.pt') or BoltzmannGeneratorSampler(system, topology, model='my_model.pt')."
            )
    path = Path(path)
    if not path.is_file():
        import difflib

        # a mistyped family name ("egnn") is the common case: name the accepted ones
        close = difflib.get_close_matches(str(path), list(SHIPPED_MODELS), n=1, cutoff=0.4)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise FileNotFoundError(
            f"load_model: {str(path)!r} is neither a shipped model nor an existing checkpoint file.{hint} Pass a "
            f"shipped model's name ({', '.join(SHIPPED_MODELS)}) or the path of a file written by "
            "openmm_tbg.save_model, openmm-tbg train or openmm-tbg refine.")
    payload = _read_payload(path)
    encoding_version = payload.get("encoding_version")
    if encoding_version != ENCODING_VERSION:
        hint = (f" Convert it with openmm_tbg.checkpoint.upgrade_model({str(path)!r}, 'upgraded.pt'), which keeps "
                "its outputs exactly, then fine-tune it (`openmm-tbg train --init-from upgraded.pt`) so that it "
                "learns the finer classes." if encoding_version in _UPGRADABLE else "")
        raise CheckpointError(
            f"{path} was trained with atom encoding {encoding_version!r}, but this openmm_tbg encodes atoms as "
            f"{ENCODING_VERSION!r}: the model's tokens would mean different atoms. Use the matching openmm_tbg "
            "version or retrain the model." + hint
        )
    family = payload.get("family", "egnn-cnf")  # files from before model families are EGNN CNFs
    if family not in FAMILIES:
        raise CheckpointError(f"{path} holds a model of family {family!r}, which this openmm_tbg does not know "
                              f"(known: {sorted(FAMILIES)}). Use the openmm_tbg version that wrote it.")
    try:
        flow = flow_class(family).from_config(payload["flow_config"])
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path} holds an invalid flow configuration ({exc}).") from exc
    state = payload["state_dict"]
    try:
        flow.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: the stored weights do not fit the stored model configuration ({str(exc).splitlines()[0]} "
            "...). The file was edited or written by an incompatible version; re-save the model."
        ) from exc
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path}: parameters {bad[:5]} contain NaN or inf; the model is broken.")
    flow = flow.to(device).eval()
    flow.checkpoint_path = str(path.resolve())
    flow.checkpoint_sha256 = file_sha256(path)
    flow.checkpoint_metadata = payload["metadata"]
    logger.info("loaded model %s (sha256 %s)", path, flow.checkpoint_sha256)
    return flow


def resolve_model(model, device) -> tuple[Any, str | None, str | None]:
    """Return ``(flow, checkpoint path or None, sha256 or None)`` for ``model`` = None (the shipped model), a
    checkpoint path or a flow object of a registered family (moved to ``device``)."""
    from openmm_tbg.model import FAMILIES, is_flow

    if is_flow(model):
        return model.to(device), getattr(model, "checkpoint_path", None), getattr(model, "checkpoint_sha256", None)
    if model is None or isinstance(model, (str, os.PathLike)):
        flow = load_model(None if model is None else os.fspath(model), device=str(device))
        # load_model records where the weights came from; TBGMove stores that to reload them.
        return flow, flow.checkpoint_path, flow.checkpoint_sha256
    raise TypeError(f"model must be None (the shipped pretrained model), a checkpoint path or a flow model "
                    f"(TransferableFlow, InternalCoordinateFlow: the families {sorted(FAMILIES)}), got "
                    f"{type(model).__name__}.")
