"""Smoke test of benchmarks/model.py at a toy size: it runs end to end and its figures are self-consistent."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "model.py"


def test_benchmark_runs_and_reports_consistent_figures(capsys):
    spec = importlib.util.spec_from_file_location("benchmark_model", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = [
        "--size",
        "tiny",
        "--shape",
        "8",
        "32",
        "32",
        "--batch",
        "1",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--matmul-n",
        "128",
        "--threads",
        "1",
    ]
    result = bench.main(argv)
    assert result["gflop_per_step"] > 0 and result["step_s"] > 0
    assert 0 < result["utilisation"] < 10
    assert result["tokens_per_s"] == pytest.approx(8 / result["step_s"])  # 2 x 2 x 2 tokens, batch 1
    assert "utilisation" in capsys.readouterr().out
