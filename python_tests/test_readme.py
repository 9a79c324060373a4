"""README.md's Python blocks run as written, each on its own (a fresh namespace: no block may rely
on a name another one defined)."""

import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def python_blocks():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        heading = re.findall(r"^#+ (.*)$", text[: match.start()], re.MULTILINE)
        line = text[: match.start()].count("\n") + 2
        blocks.append(pytest.param(match.group(1), id=f"line{line}-{heading[-1][:24]}"))
    return blocks


def test_readme_has_python_blocks():
    assert len(python_blocks()) >= 3


@pytest.mark.parametrize("code", python_blocks())
def test_readme_python_block_runs(code, monkeypatch):
    monkeypatch.delenv("DIA_FUSED_BACKEND", raising=False)
    for module in re.findall(r"^\s*(?:from|import) (\w+)", code, re.MULTILINE):
        if importlib.util.find_spec(module) is None:
            pytest.skip(
                f"this README block needs {module}, which is not installed "
                f"(pip install --no-deps pytorchcv==0.0.74)"
                if module == "pytorchcv"
                else f"this README block needs {module}, which is not installed"
            )
    exec(compile(code, README, "exec"), {"__name__": "readme"})
