"""Static checks CI enforces: ``mypy --strict`` on the package (it ships ``py.typed``) and ruff.

Both tools come with the test extras (pyproject.toml); a missing tool is a failure, not a skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A user's script as the docs write it: build() into an AtomicFile, parse, measure.  It must
# type-check against the package's annotations as shipped.
USER_SCRIPT = textwrap.dedent('''\
    from igvm_builder.assemble import build
    from igvm_builder.config import load_config
    from igvm_builder.format import IgvmFile
    from igvm_builder.io import AtomicFile, commit_together


    def main(config: str, out: str) -> str:
        with AtomicFile(out) as fh:
            result = build(load_config(config), output=fh)
        f = IgvmFile.load(out)
        assert f.platforms
        commit_together(None)
        return result.sha256
''')


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          check=False)


def test_mypy_strict_clean(tmp_path: Path) -> None:
    script = tmp_path / "user_script.py"
    script.write_text(USER_SCRIPT)
    proc = _run("mypy", "--strict", "--cache-dir", str(ROOT / ".mypy_cache"), "igvm_builder", str(script))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success: no issues found" in proc.stdout


def test_mypy_catches_a_type_error(tmp_path: Path) -> None:
    """The check above is not vacuous: a wrong argument type to build() is reported."""
    script = tmp_path / "bad_script.py"
    script.write_text("from igvm_builder.assemble import build\n\nbuild('not a BuildConfig')\n")
    proc = _run("mypy", "--strict", "--cache-dir", str(ROOT / ".mypy_cache"), str(script))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert 'incompatible type "str"; expected "BuildConfig"' in proc.stdout


def test_ruff_clean() -> None:
    proc = _run("ruff", "check", "igvm_builder", "tests", "benchmarks")
    assert proc.returncode == 0, proc.stdout + proc.stderr
