"""Test-session set-up shared by every module.

The tools the project installs into its virtual environment (``sev-snp-measure`` from PyPI, the
``igvm-builder`` script) live in the environment's ``bin`` directory, which is on ``PATH`` only
when the environment is activated (``./dev test`` does that).  Running the suite as
``.venv/bin/python -m pytest`` must find them too, so that directory is put first on ``PATH``
here, before any test module is collected (issue #15, finding 13).
"""

from __future__ import annotations

import os
import sys

import pytest

_BIN = os.path.dirname(sys.executable)
if _BIN and _BIN not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = os.pathsep.join(p for p in (_BIN, os.environ.get("PATH", "")) if p)


@pytest.hookimpl(trylast=True)  # after pytest's tmp_path plugin: the recorder keeps its files there
def pytest_configure(config: object) -> None:
    """Every IGVM file the session builds goes through the reference implementations
    (``oracles.OracleRecorder``; a disagreement fails the run)."""
    from oracles import OracleRecorder

    config.pluginmanager.register(OracleRecorder(config), "igvm-oracle-recorder")  # type: ignore[attr-defined]
