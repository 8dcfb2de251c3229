"""The command line: ``python -m fastdiff --help`` and ``python -m fastdiff demo --quick``."""

import subprocess
import sys

import pytest

from fastdiff.__main__ import build_parser, main
from fastdiff.demo import DEMO_SAMPLERS
from fastdiff.flow_samplers import FLOW_SAMPLERS
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
        line.split()[0]: line.split()
        for line in lines[header + 2 : header + 3 + len(DEMO_SAMPLERS)]
    }
    assert set(SAMPLERS) | set(FLOW_SAMPLERS) == set(DEMO_SAMPLERS) <= set(rows)
    for name in DEMO_SAMPLERS:
        steps, loop_us, step_us, w2 = rows[name][1:5]
        assert int(steps) > 0 and float(loop_us) > 0 and float(step_us) > 0 and float(w2) >= 0
    # The flow rows fit the mixture as well as the VP rows do: each within 1.5x of its VP peer
    # on the same steps (same ODE solver, another path; 1 step would be ~9x off) and, as every
    # VP row, within 2x of the floor of n exact samples (deterministic: seed 0).
    w2 = {name: float(row[-1]) for name, row in rows.items()}
    floor = w2["true"]  # the "true mixture" row
    # (UniPC, multistep of order 2 with a corrector, beside DPM-Solver++(2M))
    peers = (("flow_euler", "euler"), ("flow_dpmpp_2m", "dpmpp_2m"), ("flow_unipc", "dpmpp_2m"))
    for flow, vp in peers:
        assert rows[flow][1] == rows[vp][1]
        assert w2[vp] / 1.5 < w2[flow] < 1.5 * w2[vp], (flow, w2[flow], vp, w2[vp])
    for name in DEMO_SAMPLERS:
        assert w2[name] < 2 * floor, (name, w2[name], floor)


def test_bad_arguments_fail_cleanly(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--device", "tpu"])
    assert main(["demo", "--quick", "--n", "3", "--out", str(tmp_path)]) == 2
    assert "n must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([])
