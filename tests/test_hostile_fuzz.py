"""Issue #15: the bounded, seeded fuzz harness every CI run executes.

``tests/fuzz_pipeline.py`` mutates the reference vectors (bytes and model fields) and runs every
accepted file through parse -> dump -> measure -> lint -> diff -> verify -> sign/verify; it
raises on anything but the project's one-line errors, on an accepted file that does not
round-trip and on a signed file that does not verify.  Same seed, same inputs: a failure here
reproduces with the seed.  ``benchmarks/fuzz_campaign.py`` runs the same harness for longer.
"""

from __future__ import annotations

import pytest
from fuzz_pipeline import PipelineFailure, campaign

from igvm_builder.measure.engine import IMPLIED_PAGES_ENV

SEED = 15
EXECUTIONS = 2000


@pytest.fixture(autouse=True)
def _small_work_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # mutated parameter areas and error ranges hit the limit path instead of seconds of hashing
    monkeypatch.setenv(IMPLIED_PAGES_ENV, "4096")


def test_fuzz_pipeline_bounded() -> None:
    result = campaign(SEED, EXECUTIONS, sign_every=4)
    assert result.failures == []
    assert result.executions == EXECUTIONS
    assert result.pipelines >= EXECUTIONS // 10, result  # the mutations do reach the pipeline


def test_fuzz_is_deterministic() -> None:
    a, b = campaign(SEED + 1, 150), campaign(SEED + 1, 150)
    assert (a.executions, a.parsed, a.pipelines) == (b.executions, b.parsed, b.pipelines)


def test_harness_reports_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-project exception anywhere in the pipeline is a failure (the harness can fail)."""
    import igvm_builder.lint

    def broken(*_a: object, **_k: object) -> None:
        raise KeyError("injected")

    monkeypatch.setattr(igvm_builder.lint, "lint", broken)
    with pytest.raises(PipelineFailure, match="lint: KeyError"):
        campaign(SEED, 200)


def test_runs_seed_holds_every_kind_of_page_run() -> None:
    """The seed the mutations start from for format/pages.py: the parser folds it into runs of a
    contiguous buffer, of one repeated page and of data-less pages."""
    from fuzz_pipeline import runs_seed

    from igvm_builder.format import IgvmFile
    from igvm_builder.format.pages import PageRun

    runs = [x for x in IgvmFile.from_bytes(runs_seed()).directives.items() if isinstance(x, PageRun)]
    assert len(runs) >= 9
    assert any(r.source is not None and r.count > 1 for r in runs)
    assert any(r.source is None and len(r.fill) == 4096 and r.count > 1 for r in runs)
    assert any(r.source is None and len(r.fill) == 0 and r.count > 1 for r in runs)
