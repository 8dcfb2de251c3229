"""The command line: ``python -m fastdiff --help`` and ``python -m fastdiff demo --quick``."""

import subprocess
import sys

import pytest

from fastdiff.__main__ import build_parser, main
from fastdiff.samplers import SAMPLERS


def test_help_lists_every_command():
    result = subprocess.run(
        [sys.executable, "-m", "fastdiff", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for command in ("demo", "sample-many"):  # every command of fastdiff.__main__
        assert f"    {command}" in result.stdout
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample-many", "--help"])


def test_quick_demo_writes_both_plots_and_the_table(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "fastdiff", "demo", "--quick", "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for name in ("samples.png", "steps.png"):
        png = out / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(png) in result.stdout
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["sampler", "steps"])
    rows = {
        line.split()[0]: line.split() for line in lines[header + 2 : header + 3 + len(SAMPLERS)]
    }
    assert set(SAMPLERS) <= set(rows)
    for name in SAMPLERS:
        steps, loop_us, step_us, w2 = rows[name][1:5]
        assert int(steps) > 0 and float(loop_us) > 0 and float(step_us) > 0 and float(w2) >= 0


def test_bad_arguments_fail_cleanly(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--device", "tpu"])
    assert main(["demo", "--quick", "--n", "3", "--out", str(tmp_path)]) == 2
    assert "n must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([])
