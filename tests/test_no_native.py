"""An install without the native extension (not built, GEMMA2NP_NO_NATIVE=1, or a broken build).

`backend="auto"` and the CLI run on NumPy with at most one warning line; `backend="native"` fails
with one line (NativeUnavailableError, a ValueError and an ImportError). The extension is hidden by
`sys.modules["gemma2np._native"] = None` (its import then raises ImportError), in a subprocess so
the rest of the suite keeps it.
"""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from gemma2np import Gemma2ForCausalLM, kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(ROOT, "gemma2np", "data", "gemma2-shakespeare")
HIDE = "import sys; sys.modules['gemma2np._native'] = None\n"


def _python(code: str):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", HIDE + code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def no_native(monkeypatch):
    monkeypatch.setattr(kernels, "_checked", True)
    monkeypatch.setattr(kernels, "_import_error", ImportError("simulated: no extension"))
    monkeypatch.setattr(kernels, "_warned", False)


def test_auto_runs_the_reference_with_one_warning(no_native):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = Gemma2ForCausalLM.from_pretrained(BUNDLED, backend="auto")
        again = Gemma2ForCausalLM.from_pretrained(BUNDLED, backend="auto")
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == [str(caught[0].message)]
    assert "native extension" in str(caught[0].message) and "\n" not in str(caught[0].message)
    assert model.backend.name == again.backend.name == "numpy"
    ids = np.array([[2, 40, 41, 42]])
    np.testing.assert_array_equal(model(input_ids=ids).logits,
                                  Gemma2ForCausalLM.from_pretrained(BUNDLED)(input_ids=ids).logits)
    assert model.generate(input_ids=ids, max_new_tokens=3).shape == (1, 7)


def test_native_is_one_clear_error(no_native):
    with pytest.raises(kernels.NativeUnavailableError, match="gemma2np._native cannot be imported") as e:
        Gemma2ForCausalLM.from_pretrained(BUNDLED, backend="native")
    assert isinstance(e.value, ValueError) and isinstance(e.value, ImportError) and "\n" not in str(e.value)


def test_auto_warning_is_one_line_on_stderr():
    r = _python(f"from gemma2np import Gemma2ForCausalLM as M\nm = M.from_pretrained({BUNDLED!r}, backend='auto')\n"
                "m(input_ids=[[2, 3]]); m = M.from_pretrained(%r, backend='auto')\nprint(m.backend.name)" % BUNDLED)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "numpy"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "RuntimeWarning" in lines[0] and "native extension" in lines[0], r.stderr


def test_cli_generate_without_the_extension():
    gen = "from gemma2np.cli import main\nsys.exit(main(['generate', '--prompt', 'ROMEO:', '--max-new-tokens', '3'%s]))"
    r = _python(gen % "")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert sum("warn" in line.lower() for line in r.stderr.splitlines()) <= 1, r.stderr
    assert "Traceback" not in r.stderr
    r = _python(gen % ", '--backend', 'native'")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "native" in lines[0] and "cannot be imported" in lines[0], r.stderr
