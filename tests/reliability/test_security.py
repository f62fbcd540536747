"""Nobody in: no pickle runs unless the user opts in, nothing phones home, the app stays local."""
from __future__ import annotations

import ast
import pickle
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [p for d in ("core", "ui", "tools") for p in (ROOT / d).rglob("*.py")] + [ROOT / "train.py"]


class _Boom:
    """A pickle that would run code when loaded."""

    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_every_torch_load_in_the_code_is_weights_only():
    for source in SOURCES:
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "load" and \
                    getattr(getattr(node.func, "value", None), "id", "") == "torch":
                kwargs = {k.arg: k.value for k in node.keywords}
                assert "weights_only" in kwargs and getattr(kwargs["weights_only"], "value", None) is True, \
                    f"{source.relative_to(ROOT)}:{node.lineno} torch.load without weights_only=True"
    for source in SOURCES:
        text = source.read_text(encoding="utf-8")
        assert not re.search(r"\bpickle\.loads?\(", text), f"{source} unpickles"


def test_a_malicious_ckpt_never_runs_even_when_named_as_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "model.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": _Boom()}))
    from core.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="allow_pickle"):
        config_from_dict({"train_data_dir": str(tmp_path), "base_model": str(evil)})
    # Even with the opt-in, loading goes through weights_only and refuses the code.
    from core.families.sd.load import ModelLoadError, load_sd_model

    with pytest.raises(ModelLoadError, match="holds Python objects besides the weights.*could run code"):
        load_sd_model(str(evil), allow_pickle=True)
    assert not (tmp_path / "PWNED").exists()


def test_a_pickled_lora_is_refused_by_inspect(tmp_path):
    from core.export.inspect import LoraReadError, inspect_lora

    evil = tmp_path / "lora.pt"
    evil.write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(LoraReadError, match=r"only \.safetensors LoRA files are read.*pickles that can run code"):
        inspect_lora(evil)
    assert not (tmp_path / "PWNED").exists()


def test_the_app_serves_on_localhost_without_share_or_analytics():
    from ui.app import parse_args

    args = parse_args([])
    assert not args.share and not args.listen
    text = (ROOT / "ui" / "app.py").read_text(encoding="utf-8")
    assert "GRADIO_ANALYTICS_ENABLED" in text
    assert "127.0.0.1" in text
