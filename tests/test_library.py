"""The public root: the README's library example runs as written, and the text format loads no torch."""

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_readmes_library_example_runs_as_written(monkeypatch):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Library", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert len(code.strip().splitlines()) <= 7
    monkeypatch.chdir(ROOT)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    printed = out.getvalue()
    assert "<seg>" in printed and "</seg>" in printed and printed.count("[") >= 16  # the answer, then the grid


def test_the_root_and_the_text_format_import_no_torch():
    probe = ("import sys, text4seg_demo; from text4seg_demo import encode, parse_answer; "
             "import numpy as np; text = encode(np.eye(4, dtype=int), ['others', 'x']); "
             "assert parse_answer('<seg>' + text + '</seg>', 4).grid.tolist() == np.eye(4, dtype=int).tolist(); "
             "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
