"""The installed libraries against the tested set in `requirements-lock.txt`.

A fresh install goes through the lock, so it gets exactly the versions CI ran the suite
with. A user who upgrades one library by hand (or a `pip install` of another tool into
the same environment) can leave it outside that set; then the app and `train.py` say
which library, which version was tested, and the one command that restores the set,
before any training starts, instead of the library's own error deep inside a run.

Two levels:
- *untested*: a direct requirement's version differs from the lock. Training goes on,
  with a warning that names it.
- *incompatible*: a library's own declared floor is not met by another one installed
  (diffusers asking for a newer PEFT than the one installed), or a requirement is
  missing. Training is refused with the command to fix it.

Standard library only: launch.py and the app call it before the heavy imports.
"""
from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

ROOT = Path(__file__).resolve().parent.parent
LOCK_FILE = ROOT / "requirements-lock.txt"
REQUIREMENTS_FILE = ROOT / "requirements.txt"
RESTORE_COMMAND = "python launch.py --restore"
# Where a library whose PEFT integration we call states the lowest PEFT it works with:
# (library, module, constant). diffusers' `add_adapter` / `load_lora_weights` check it.
# transformers' floor is not here on purpose: its integration gates `add_adapter` on text
# encoders, which we do through PEFT's own `inject_adapter_in_model` (core/families/sd/lora.py).
PEFT_FLOORS = (("diffusers", "diffusers.utils.constants", "MIN_PEFT_VERSION"),)

VersionOf = Callable[[str], "str | None"]


@dataclass(frozen=True)
class LibraryProblem:
    """One library outside the tested set; `blocking` problems stop a run before it starts."""

    name: str
    installed: str | None
    tested: str
    reason: str = ""
    blocking: bool = False

    def describe(self) -> str:
        have = f"{self.name} {self.installed}" if self.installed else f"{self.name} is not installed"
        if self.reason:
            return f"{have}: {self.reason}"
        return f"{have} is installed; lora-scripts is tested with {self.tested}"


class IncompatibleLibrariesError(RuntimeError):
    """Installed libraries that cannot work together; `advice` holds the command that fixes it."""

    def __init__(self, problems: list[LibraryProblem]):
        super().__init__("Installed libraries do not work together: "
                         + "; ".join(p.describe() for p in problems) + ".")
        self.problems = problems
        self.advice = restore_advice()


def canonical_name(name: str) -> str:
    """PEP 503 normalisation, so `PyYAML`, `pyyaml` and `py_yaml` are one name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def public_version(version: str) -> str:
    """`2.13.0+cu128` -> `2.13.0`: a local build tag (CPU or CUDA torch) is the same release."""
    return version.split("+", 1)[0]


def read_pins(path: Path = LOCK_FILE) -> dict[str, str]:
    """The exact versions of a lock (`name==version` lines) by canonical name."""
    pins: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, _, version = line.partition("==")
            pins[canonical_name(name.split("[", 1)[0].strip())] = version.split(";", 1)[0].strip()
    return pins


def direct_requirements(path: Path = REQUIREMENTS_FILE) -> list[str]:
    """The canonical names of what requirements.txt asks for (what our code imports)."""
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.append(canonical_name(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0]))
    return names


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _version_key(version: str) -> tuple:
    """A comparable key for plain release versions (`0.22.0`, `5.23.0rc1` -> its release part)."""
    parts = re.match(r"\d+(\.\d+)*", public_version(version))
    return tuple(int(p) for p in parts.group(0).split(".")) if parts else ()


def version_at_least(version: str, floor: str) -> bool:
    key, low = _version_key(version), _version_key(floor)
    width = max(len(key), len(low))
    return key + (0,) * (width - len(key)) >= low + (0,) * (width - len(low))


def declared_peft_floors() -> dict[str, str]:
    """The PEFT floor each installed library declares (imports them: call before training only)."""
    import importlib

    floors = {}
    for library, module, constant in PEFT_FLOORS:
        try:
            floors[library] = str(getattr(importlib.import_module(module), constant))
        except (ImportError, AttributeError):
            continue  # the library moved its constant: nothing to compare, the pin still guards
    return floors


def library_problems(pins: dict[str, str] | None = None, wanted: list[str] | None = None,
                     version_of: VersionOf = installed_version,
                     peft_floors: dict[str, str] | None = None) -> list[LibraryProblem]:
    """Every direct requirement that is missing or differs from the lock, and unmet PEFT floors."""
    pins = read_pins() if pins is None else pins
    wanted = direct_requirements() if wanted is None else wanted
    problems = []
    for name in wanted:
        tested = pins.get(name)
        installed = version_of(name)
        if installed is None:
            problems.append(LibraryProblem(name, None, tested or "?", blocking=True,
                                           reason="it is required and not installed"))
        elif tested and public_version(installed) != public_version(tested):
            problems.append(LibraryProblem(name, installed, tested))
    peft = version_of("peft")
    for library, floor in (peft_floors or {}).items():
        if peft and not version_at_least(peft, floor):
            problems.append(LibraryProblem(
                "peft", peft, pins.get("peft", "?"), blocking=True,
                reason=f"{library} {version_of(library)} needs peft >= {floor}, so LoRA training cannot start"))
    return problems


def restore_advice() -> str:
    return (f"Restore the tested set of libraries with `{RESTORE_COMMAND}` (it reinstalls exactly the "
            "versions in requirements-lock.txt), then start again.")


def untested_message(problems: list[LibraryProblem]) -> str:
    """One sentence for a console, a banner or a warning: what differs from the tested set."""
    return "Libraries outside the tested set: " + "; ".join(p.describe() for p in problems) + "."


def check_before_training(pins: dict[str, str] | None = None, version_of: VersionOf = installed_version
                          ) -> list[LibraryProblem]:
    """Raise IncompatibleLibrariesError for blocking problems; return the untested ones to warn about."""
    problems = library_problems(pins, version_of=version_of, peft_floors=declared_peft_floors())
    blocking = [p for p in problems if p.blocking]
    if blocking:
        raise IncompatibleLibrariesError(blocking)
    return problems
