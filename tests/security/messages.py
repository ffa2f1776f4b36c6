"""What the security tests expect of an error: one line, no traceback, naming what went wrong."""

from __future__ import annotations


def one_error_line(capsys, *expected: str) -> str:
    """The command's stderr: one line, ``promoter-dist: error: ``, holding each expected text; no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("promoter-dist: error: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]
