"""The demo job runs end to end (smoke size) and prints its table."""
from __future__ import annotations

from jobs import demo


def test_demo_smoke(capsys):
    assert demo.main(["--smoke-test"]) == 0
    out = capsys.readouterr().out
    assert "| ATS-6 |" in out and "| U-6 |" in out
