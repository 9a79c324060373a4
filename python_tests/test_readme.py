"""README.md's code runs as written on a CPU-only machine.

Every ```python block runs on its own (a fresh namespace: no block may rely on a name another one
defined), in a scratch folder, with DIA_FUSED_BACKEND unset. A block that imports the official
DIANet code (`models.cifar`, from a clone of gbup-group/DIANet) runs against its re-creation in
official_dianet.py; one that needs an optional package that is not installed is skipped with the
command that installs it (named at the end of the run); any other missing module fails.

The ```bash blocks name commands of this repository: every `python -m dia_fused...` module and
`python bench/...` script exists and takes the options the README gives it (its --help, run in this
process), and every gpu_session.sh phase named exists."""

import contextlib
import importlib.util
import io
import os
import re
import runpy
import shlex
import sys
import types
import warnings

import pytest

import official_dianet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
BLOCK = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
# packages a README block may need beyond the install's own, with the command that installs them
OPTIONAL = {
    "pytorchcv": "pip install --no-deps pytorchcv==0.0.74",
    "torchvision": "pip install torchvision",
    "timm": "pip install timm",
}
OFFICIAL = "models"  # the official DIANet repository's top-level package (models/cifar)


def readme() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def blocks(language: str):
    """(code, test id: line and heading) of README.md's fenced blocks in `language`."""
    text = readme()
    found = []
    for match in BLOCK.finditer(text):
        if match.group(1) != language:
            continue
        heading = re.findall(r"^#+ (.*)$", text[: match.start()], re.MULTILINE)
        line = text[: match.start()].count("\n") + 2
        found.append(pytest.param(match.group(2), id=f"line{line}-{heading[-1][:24]}"))
    return found


def test_every_fenced_block_is_python_or_bash():
    """A block in another language (```py, ```sh, ```) would not be run or checked here."""
    text = readme()
    languages = [m.group(1) for m in BLOCK.finditer(text)]
    assert text.count("\n```") == 2 * len(languages), "an unbalanced ``` fence in README.md"
    assert set(languages) <= {"python", "bash"}, languages
    assert languages.count("python") >= 3


def official_models_package() -> types.ModuleType:
    """`models` with `models.cifar.dia_resnet` as in the official repository, made of the
    re-created classes (their `.cuda()` state calls run only in the original forward)."""
    package = types.ModuleType(OFFICIAL)
    cifar = types.ModuleType(f"{OFFICIAL}.cifar")
    cifar.dia_resnet = lambda **kwargs: official_dianet.ResNet(**kwargs)
    package.cifar = cifar
    package.__path__ = []
    return package


@pytest.mark.parametrize("code", blocks("python"))
def test_readme_python_block_runs(code, monkeypatch, tmp_path):
    monkeypatch.delenv("DIA_FUSED_BACKEND", raising=False)
    monkeypatch.chdir(tmp_path)  # whatever a block writes stays out of the repository
    for module in re.findall(r"^\s*(?:from|import) (\w+)", code, re.MULTILINE):
        if module == OFFICIAL:
            package = official_models_package()
            monkeypatch.setitem(sys.modules, OFFICIAL, package)
            monkeypatch.setitem(sys.modules, f"{OFFICIAL}.cifar", package.cifar)
        elif importlib.util.find_spec(module) is None:
            if module not in OPTIONAL:
                pytest.fail(f"this README block imports {module}, which nothing installs")
            pytest.skip(
                f"this README block needs {module}, which is not installed ({OPTIONAL[module]})"
            )
    exec(compile(code, README, "exec"), {"__name__": "readme"})


def commands(code: str):
    """The command lines of a bash block: continuation lines joined, comments dropped, each `&&`
    part on its own."""
    lines = code.replace("\\\n", " ").splitlines()
    return [
        part.strip() for line in lines for part in line.split("#")[0].split("&&") if part.strip()
    ]


def help_text(words) -> str:
    """What `python WORDS... --help` prints, run in this process (the package is imported
    already: no interpreter start per command)."""
    target, rest = (words[1], words[2:]) if words[0] == "-m" else (words[0], words[1:])
    arguments = []
    for word in rest:  # the subcommand and positionals before the first option
        if word.startswith("-"):
            break
        arguments.append(word)
    out = io.StringIO()
    saved = sys.argv, list(sys.path)
    sys.argv = [target, *arguments, "--help"]
    if words[0] != "-m":  # as `python script`: the script's folder first on the path
        sys.path.insert(0, os.path.dirname(os.path.join(ROOT, target)))
    try:
        with contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: module imported already
            with pytest.raises(SystemExit) as exit_info:
                if words[0] == "-m":
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(os.path.join(ROOT, target), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved
    assert exit_info.value.code in (0, None), f"{target} {arguments} --help: {exit_info.value}"
    return out.getvalue()


def project_commands():
    """`python ...` commands of this repository in the bash blocks (torchrun's `-m` too)."""
    found = []
    for param in blocks("bash"):
        for line in commands(param.values[0]):
            words = shlex.split(line)
            while words and "=" in words[0]:  # VAR=value prefixes
                words = words[1:]
            if not words:
                continue
            if words[0] == "torchrun":
                words = ["python"] + words[words.index("-m") :]
            if words[0] != "python" or len(words) < 2:
                continue
            if words[1] == "-m" and words[2].startswith("dia_fused"):
                found.append(words[1:])
            elif words[1].startswith("bench/"):
                found.append(words[1:])
    return found


def test_readme_bash_commands_exist_with_their_options():
    found = project_commands()
    assert any(w[:2] == ["-m", "dia_fused"] for w in found) and any(
        w[0].startswith("bench/") for w in found
    ), found
    for words in found:
        text = help_text(words)
        for word in words[2:] if words[0] == "-m" else words[1:]:
            option = word.split("=")[0]
            if option.startswith("-"):
                assert re.search(rf"(^|[\s,\[]){re.escape(option)}\b", text), (
                    f"README: `python {' '.join(words)}`: {option} is not an option of it"
                )


def test_readme_gpu_session_phases_exist():
    with open(os.path.join(ROOT, "bench", "gpu_session.sh"), encoding="utf-8") as f:
        script = f.read()
    named = [
        phase
        for param in blocks("bash")
        for line in commands(param.values[0])
        if line.startswith("bash bench/gpu_session.sh")
        for phase in line.split()[2].split("|")
    ]
    assert named
    for phase in named:
        assert re.search(rf"^{re.escape(phase)}\)", script, re.MULTILINE), phase
