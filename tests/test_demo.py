"""End-to-end smoke run of the embedded demo (the one test allowed to be a smoke run, with numbers)."""

from __future__ import annotations

import pytest

from flows.cli import main
from tasks.demo import run_demo


@pytest.mark.slow
def test_demo_traces_real_hallucinations_to_corrupted_samples():
    lines: list[str] = []
    result = run_demo(seed=0, log=lines.append)
    assert result.n_corrupted > 0
    assert len(result.hallucinated) > 0
    assert all("China" in out for _, out in result.hallucinated)
    assert set(result.auc) == {
        "base only",
        "last checkpoint",
        "mean over checkpoints (denoise)",
        "DDA (debias + denoise, cosine)",
    }
    assert all(0.0 <= v <= 1.0 for v in result.auc.values())
    assert result.auc["mean over checkpoints (denoise)"] > 0.8
    assert sum(s.corrupted for _, s in result.top) >= 3
    assert any("fine-tuning" in line for line in lines)


def test_cli_rejects_unknown_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
