"""Small helpers shared by the package: files, devices, OpenMM platforms, seeding, units, frames, machine.

Each helper exists once, here. Heavy dependencies (torch, openmm) are imported inside the functions that need
them, so that importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import platform as _platform
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional, Sequence, Union

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "default_file_mode", "atomic_write", "file_sha256", "resolve_device", "PLATFORM_PREFERENCE",
    "select_platform", "as_numpy_rng", "as_torch_generator", "torch_generator_from", "spawn_generators", "in_unit", "to_nm",
    "evenly_spaced", "cpu_model", "device_name", "machine_info", "machine_line", "portable_path",
    "portable_command",
]

PathLike = Union[str, os.PathLike]

#: OpenMM platforms in order of preference (fastest first).
PLATFORM_PREFERENCE = ("CUDA", "OpenCL", "CPU", "Reference")


# ----------------------------------------------------------------------------------------------------- files
#: Default torch CPU threads of `BoltzmannGeneratorSampler` (issue 21, item 2): a dipeptide's flow works on
#: tensors too small to share among threads. Issue 21's fresh-clone run (2-core Intel Xeon VM, loaded, 2026-12-03)
#: measured sample(1000) of AA at 9.7-25 s on torch's default (every core) against 3.8-11.9 s on one thread.
DEFAULT_TORCH_THREADS = 1


def check_threads(threads: Optional[int], name: str = "threads") -> Optional[int]:
    """``threads`` as a positive int, or None (leave torch's setting alone); a ValueError otherwise."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"{name} must be a positive integer (torch CPU threads) or None (keep torch's own "
                         f"setting, torch.get_num_threads()), got {threads!r}.")
    return int(threads)


@contextlib.contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """Run the block with torch on ``threads`` CPU threads and restore the previous count afterwards.

    Parameters
    ----------
    threads : int or None
        Intra-op threads inside the block; None leaves torch's setting as it is.
    """
    import torch

    if threads is None or threads == torch.get_num_threads():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def default_file_mode() -> int:
    """Mode of a newly created regular file under the process umask (e.g. ``0o644`` for umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Write a file so that readers see either the old or the complete new content, never a partial file.

    ``write(fh)`` fills a temporary file with a unique name in the same directory; it is flushed, fsync'ed,
    given the usual umask-based mode and moved into place with :func:`os.replace` (atomic on POSIX). On any
    error the temporary file is removed and the old file, if any, is left untouched.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file; its directory must exist.
    write : callable
        Called once with the open binary file handle.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, default_file_mode())  # mkstemp makes 0600 files; give the usual umask-based mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def file_sha256(path: PathLike) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------- devices
def resolve_device(device: Any = "auto", *, check_only: bool = False):
    """A ``torch.device`` from ``"auto"``/None (CUDA when available, else CPU), a name or a device.

    Parameters
    ----------
    device : None, str or torch.device
        ``"auto"`` (or None), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    check_only : bool
        Only check the spelling: do not require CUDA to be present for a CUDA device.

    Raises
    ------
    ValueError
        An unknown or unsupported device, or CUDA requested where it is not available.
    """
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"Invalid device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from err
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"Unsupported device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'.")
    if dev.type == "cuda" and not check_only and not torch.cuda.is_available():
        raise ValueError(f"Device {device!r} was requested but CUDA is not available; use device 'cpu' or 'auto'.")
    return dev


def select_platform(platform=None):
    """An OpenMM Platform: the given one, or the fastest available (CUDA > OpenCL > CPU > Reference).

    Parameters
    ----------
    platform : None, str or openmm.Platform
        None picks the fastest available platform; a name picks that platform.

    Raises
    ------
    ValueError
        A named platform is not available; the message lists the available ones.
    """
    import openmm

    if isinstance(platform, openmm.Platform):
        return platform
    available = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
    if platform is not None:
        if platform not in available:
            raise ValueError(f"OpenMM platform {platform!r} is not available here; available platforms are "
                             f"{available}. Pass one of these, or platform=None to pick the fastest.")
        return openmm.Platform.getPlatformByName(platform)
    for name in PLATFORM_PREFERENCE:
        if name in available:
            return openmm.Platform.getPlatformByName(name)
    return openmm.Platform.getPlatform(0)


# ----------------------------------------------------------------------------------------------------- seeding
def as_numpy_rng(seed: Union[None, int, np.random.Generator, np.random.SeedSequence]) -> np.random.Generator:
    """``seed`` itself if it is a numpy Generator, else ``numpy.random.default_rng(seed)``."""
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def as_torch_generator(generator=None):
    """``generator`` itself if it is a ``torch.Generator``; else a new CPU generator seeded with the int, or with
    fresh operating-system entropy for None (never the global torch RNG). Every family's ``sample`` uses it."""
    import torch

    if isinstance(generator, torch.Generator):
        return generator
    g = torch.Generator()
    if generator is None:
        g.seed()
    else:
        g.manual_seed(int(generator))
    return g


def torch_generator_from(seed_sequence: np.random.SeedSequence):
    """A CPU ``torch.Generator`` seeded with 63 bits drawn from ``seed_sequence``."""
    import torch

    return torch.Generator().manual_seed(int(seed_sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)))


def spawn_generators(seed: Union[None, int, Sequence[int], np.random.SeedSequence], *,
                     torch_first: bool = False):
    """Independent numpy and torch generators from one seed.

    The seed sequence (``numpy.random.SeedSequence(seed)``, or ``seed`` itself) spawns two children: the first
    seeds numpy and the second torch, or the other way round with ``torch_first``.

    Parameters
    ----------
    seed : None, int, sequence of int or numpy.random.SeedSequence
        None draws fresh entropy.
    torch_first : bool
        Which child seeds which generator (kept per caller so that seeded streams stay as they were).

    Returns
    -------
    numpy.random.Generator, torch.Generator
    """
    seq = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    first, second = seq.spawn(2)
    np_seed, torch_seed = (second, first) if torch_first else (first, second)
    return np.random.default_rng(np_seed), torch_generator_from(torch_seed)


# ----------------------------------------------------------------------------------------------------- units
def in_unit(value, target_unit, name: str) -> float:
    """A scalar as a float in ``target_unit``: Quantities are converted, plain numbers taken as that unit.

    Raises
    ------
    ValueError
        A Quantity whose unit is not compatible with ``target_unit``.
    """
    from openmm import unit

    if unit.is_quantity(value):
        if not value.unit.is_compatible(target_unit):
            raise ValueError(f"{name} has unit {value.unit}, which is not compatible with {target_unit}.")
        return float(value.value_in_unit(target_unit))
    return float(value)


def to_nm(positions, *, name: str = "positions", dtype=np.float64) -> np.ndarray:
    """Positions as a numpy array in nm: a length Quantity is converted, a plain array is taken as nm.

    Raises
    ------
    TypeError
        A Quantity whose unit is not a length.
    """
    from openmm import unit

    if unit.is_quantity(positions):
        if not positions.unit.is_compatible(unit.nanometer):
            raise TypeError(f"{name} have units of {positions.unit}, not lengths; pass nm or a length Quantity.")
        positions = positions.value_in_unit(unit.nanometer)
    return np.asarray(positions, dtype=dtype)


# ----------------------------------------------------------------------------------------------------- frames
def evenly_spaced(n: int, k: Optional[int]) -> np.ndarray:
    """At most ``k`` indices evenly spaced over ``range(n)``, first and last included (all when ``k`` is None)."""
    if k is None or k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, int(k)).round().astype(np.int64))


# ----------------------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return _platform.processor() or _platform.machine() or "unknown CPU"


def device_name(device) -> str:
    """The GPU's name for a CUDA device, the CPU model otherwise."""
    import torch

    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def machine_info() -> dict[str, Any]:
    """Description of this machine: host, CPU model and cores, GPU, library versions, ISO date (JSON-able)."""
    info: dict[str, Any] = {"node": _platform.node(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                            "platform": _platform.platform(), "python": _platform.python_version()}
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        info["torch"] = str(torch.__version__)
        info["torch_threads"] = torch.get_num_threads()
    except Exception:  # torch missing or a broken CUDA: the description is informational only
        info.setdefault("gpu", "unknown GPU")
    try:
        import openmm

        info["openmm"] = openmm.__version__
    except Exception:  # informational only
        pass
    info["date"] = datetime.datetime.now().isoformat(timespec="seconds")
    return info


def machine_line(info: Optional[dict[str, Any]] = None) -> str:
    """One line from :func:`machine_info`: host, CPU model, cores, GPU, torch and openmm versions, date."""
    i = machine_info() if info is None else info
    return (f"{i['node']}, {i['cpu']}, {i['cpu_count']} cores, {i.get('gpu', 'unknown GPU')}, "
            f"torch {i.get('torch', '?')}, openmm {i.get('openmm', '?')}, {i['date']}")


def portable_path(path: Optional[PathLike]) -> Optional[str]:
    """A path as a published report may cite it: never where it lies on the machine that wrote the report.

    A file of the installed package reads ``openmm_tbg/...``; a path under the current directory is made
    relative to it; anything else keeps only its last component (a data set's own name, a model file's name).
    ``None`` stays ``None``.
    """
    if path is None:
        return None
    p = Path(os.path.abspath(os.fspath(path)))
    package = Path(os.path.abspath(__file__)).parent
    for root, prefix in ((package, Path(package.name)), (Path(os.path.abspath(os.getcwd())), Path("."))):
        try:
            return (prefix / p.relative_to(root)).as_posix()
        except ValueError:
            continue
    return p.name


def portable_command(argv: Sequence[str]) -> str:
    """A shell-quoted command line with every absolute path argument (also ``--opt=/path``) made portable
    (:func:`portable_path`), and the program by its name only."""
    import shlex

    out = []
    for i, arg in enumerate(argv):
        if i == 0:
            out.append(os.path.basename(arg))
            continue
        key, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if value.startswith("/"):
            value = portable_path(value)
        out.append(shlex.quote(key + eq + value))
    return " ".join(out)
