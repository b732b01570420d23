"""The README's code blocks work as written, in the way of doctest.

* ```python blocks run, each in a fresh namespace, in a temporary working directory.
* Command lines (```bash blocks, the usage synopsis, `$ ...` lines of docs/bundled-model.md): every
  `gemma2np` command names a real subcommand and only options its argparse parser has; the cheap ones
  run for real (the first-command `generate`, and the bundled-model doc's example, whose output must be
  the one the doc shows). pip and pytest lines are checked to be the documented forms, not run.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gemma2np.cli import DEFAULT_MODEL_DIR, build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BUNDLED_DOC = ROOT / "docs" / "bundled-model.md"
_FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.S | re.M)


def blocks(path: Path, lang: str | None = None) -> list[str]:
    return [body for tag, body in _FENCE.findall(path.read_text(encoding="utf-8")) if lang is None or tag == lang]


def _bundled_ready() -> bool:
    d = Path(DEFAULT_MODEL_DIR)
    return (d / "config.json").is_file() and (d / "tokenizer.model").is_file()


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _options(p: argparse.ArgumentParser) -> set[str]:
    return set(p._option_string_actions)


def _run_cli(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "gemma2np", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _shell_commands(text: str) -> list[str]:
    """The commands of a bash block: lines joined at trailing backslashes, split at &&, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line.startswith("$ "):
            line = line[2:]
        if line and not line.startswith("#"):
            out.extend(part.strip() for part in line.split("&&"))
    return out


def _gemma2np_argv(cmd: str) -> list[str] | None:
    argv = shlex.split(cmd)
    if argv[:1] in (["mpiexec"], ["srun"]) and "gemma2np" in argv:  # a launcher's options, then the command
        argv = argv[argv.index("gemma2np"):]
    if argv[:1] == ["gemma2np"]:
        return argv[1:]
    if argv[:3] == ["python", "-m", "gemma2np"]:
        return argv[3:]
    return None


# ---------------------------------------------------------------------------- python blocks


def test_readme_has_python_and_bash_blocks():
    assert len(blocks(README, "python")) >= 1 and len(blocks(README, "bash")) >= 2


@pytest.mark.parametrize("i", range(len(blocks(README, "python"))))
def test_python_block_runs(i, tmp_path, monkeypatch):
    from gemma2np.kernels import native_available

    code = blocks(README, "python")[i]
    if not _bundled_ready():
        pytest.skip("the README's snippets use the bundled model, which is not installed")
    if 'backend="native"' in code and not native_available():
        pytest.skip("the snippet loads the native backend, and the C extension is not built here")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, f"README.md python block {i}", "exec"), namespace)  # noqa: S102 - our own README


# ---------------------------------------------------------------------------- command lines


def test_bash_blocks_use_real_commands_and_options():
    subs = _subparsers()
    seen = 0
    for body in blocks(README, "bash"):
        for cmd in _shell_commands(body):
            argv = _gemma2np_argv(cmd)
            if argv is None:
                assert re.fullmatch(r'pip install (\.|-e "\.\[test(,mpi)?\]")|python -m pytest -q', cmd), (
                    f"README runs a command this test does not know how to check: {cmd!r}")
                continue
            seen += 1
            assert argv and argv[0] in subs, cmd
            build_parser().parse_args(argv)  # argparse exits (SystemExit) on an unknown option or bad value
    assert seen >= 1


def test_usage_synopsis_names_only_real_options():
    subs = _subparsers()
    synopsis = [b for b in blocks(README, "") if b.lstrip().startswith("gemma2np ")]
    assert synopsis, "the Command line section's usage block is missing"
    checked = 0
    for body in synopsis:
        current = None
        for line in body.splitlines():
            code = line.split(" # ", 1)[0]
            if code.startswith("gemma2np "):
                current = code.split()[1]
                assert current in subs, line
            assert current is not None, line
            for flag in re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", code):
                assert flag in _options(subs[current]), f"{flag} is not an option of `gemma2np {current}`: {line}"
                checked += 1
    assert checked > 10


def test_first_command_runs():
    """The README's first command (after `pip install .`): generate on the bundled model."""
    if not _bundled_ready():
        pytest.skip("the bundled model is not installed")
    cmds = [c for b in blocks(README, "bash") for c in _shell_commands(b) if _gemma2np_argv(c)]
    argv = _gemma2np_argv(cmds[0])
    assert argv[0] == "generate"
    r = _run_cli(argv)
    assert r.returncode == 0, r.stderr
    prompt = argv[argv.index("--prompt") + 1]
    assert r.stdout.startswith(prompt) and len(r.stdout) > len(prompt) + 20  # echoed prompt, then text


def test_bundled_model_doc_example_prints_what_the_doc_shows():
    """docs/bundled-model.md shows a `$ gemma2np generate ...` line and its output: greedy decoding, so the
    output is determined; it must be what the command prints (trailing blank lines aside)."""
    if not _bundled_ready():
        pytest.skip("the bundled model is not installed")
    shown = [b for b in blocks(BUNDLED_DOC, "") if b.startswith("$ gemma2np ")]
    assert shown
    subs = _subparsers()
    for body in shown:
        first, _, expected = body.partition("\n")
        argv = _gemma2np_argv(first[2:])
        assert argv[0] in subs
        build_parser().parse_args(argv)
        r = _run_cli(argv)
        assert r.returncode == 0, r.stderr
        assert r.stdout.rstrip() == expected.rstrip(), r.stdout
