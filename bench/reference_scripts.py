"""The real reference scripts, ready to run: their venv (built once from bench/reference-lock.txt under
the bench's work folder) and their source (read from git at the commit the lock file names; never
committed here).

The venv: `python3.11 -m venv` + `pip install -r bench/reference-lock.txt`, rebuilt when the lock
file changes (its hash is stamped in the venv). The source: `git show <commit>:<path>` from a clone
of the repository kept beside the venv, or from the git directory in `LORA_BENCH_<NAME>_GIT` (a
mirror already on the machine, e.g. LORA_BENCH_DIFFUSERS_GIT=/path/to/diffusers/.git).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

LOCK = Path(__file__).resolve().parent / "reference-lock.txt"
WORK = Path(os.environ.get("LORA_BENCH_HOME", Path.home() / ".cache" / "lora-scripts-bench"))
REPOS = {"diffusers": "https://github.com/huggingface/diffusers"}


def _lock_hash() -> str:
    return hashlib.sha256(LOCK.read_bytes()).hexdigest()[:16]


def reference_python() -> Path:
    """The reference venv's python, built on first use (minutes; about 6 GB)."""
    venv = WORK / "ref-venv"
    stamp = venv / ".lock-hash"
    python = venv / "bin" / "python"
    if stamp.is_file() and stamp.read_text() == _lock_hash() and python.is_file():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    WORK.mkdir(parents=True, exist_ok=True)
    base = shutil.which("python3.11") or shutil.which("python3")
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    print(f"building the reference venv in {venv} from {LOCK.name} (once) ...", flush=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(LOCK)], check=True)
    stamp.write_text(_lock_hash())
    return python


def _source_commit(name: str) -> str:
    for line in LOCK.read_text().splitlines():
        parts = line.lstrip("# ").split()
        if len(parts) == 3 and parts[0] == "source" and parts[1].endswith("/" + name):
            return parts[2]
    raise ValueError(f"{LOCK.name} names no source commit for {name}: add '# source <owner>/{name} <commit>'.")


def _git_dir(name: str) -> Path:
    given = os.environ.get(f"LORA_BENCH_{name.upper()}_GIT")
    if given:
        return Path(given)
    clone = WORK / "src" / f"{name}.git"
    if not clone.is_dir():
        subprocess.run(["git", "clone", "--bare", "--filter=blob:none", REPOS[name], str(clone)], check=True)
    return clone


def reference_script(name: str, path: str, dest: Path) -> Path:
    """`path` of repository `name` at the lock file's commit, written under `dest`."""
    commit = _source_commit(name)
    text = subprocess.run(["git", f"--git-dir={_git_dir(name)}", "show", f"{commit}:{path}"], check=True,
                          capture_output=True).stdout
    target = dest / Path(path).name
    dest.mkdir(parents=True, exist_ok=True)
    target.write_bytes(text)
    return target


def pinned_venv(name: str, lock: Path) -> Path:
    """A peer's own venv (`<WORK>/<name>-venv`, built once per version of `lock`): its pins on top of the
    reference venv's torch and torchvision, which a .pth file puts after the venv's own site-packages (so the
    peer's pins win and only what it does not pin comes from there). Returns its python."""
    venv = WORK / f"{name}-venv"
    python = venv / "bin" / "python"
    stamp = venv / ".lock-hash"
    digest = hashlib.sha256(lock.read_bytes()).hexdigest()[:16]
    if stamp.is_file() and stamp.read_text() == digest:
        return python
    ref = reference_python()
    subprocess.run(["python3.11", "-m", "venv", str(venv)], check=True)
    site = subprocess.run([str(ref), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    own = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                         capture_output=True, text=True).stdout.strip()
    Path(own, "_ref_venv.pth").write_text(site + "\n")
    print(f"building {name}'s venv in {venv} from {lock.name} (once) ...", flush=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(lock)], check=True)
    stamp.write_text(digest)
    return python


def source_tree(name: str, lock: Path, git: str, paths: list[str]) -> Path:
    """`paths` of a peer's repository at the commit `lock` names ('# source <owner>/<repo> <commit>'),
    unpacked once under `<WORK>/src/<name>-<commit>`; `git` is its git directory (LORA_BENCH_<NAME>_GIT
    overrides it)."""
    commit = next(line.split()[-1] for line in lock.read_text().splitlines() if line.startswith("# source "))
    dest = WORK / "src" / f"{name}-{commit[:12]}"
    if not (dest / ".unpacked").is_file():
        git = os.environ.get(f"LORA_BENCH_{name.upper().replace('-', '_')}_GIT", git)
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", f"--git-dir={git}", "archive", commit, *paths], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        (dest / ".unpacked").write_text(commit)
    return dest
