"""The cosched command on tiny model files: compile/export, run with the runtime alone, bench, errors."""

import json
import os
import subprocess
import sys

import onnx
import pytest

from cosched.cli import main
from cosched.models import tiny_cnn


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    paths = []
    for i, name in enumerate(("left", "right")):
        path = folder / f"{name}.onnx"
        onnx.save(tiny_cnn(name, seed=i), str(path))
        paths.append(str(path))
    return paths


def test_compile_then_run_with_the_runtime(model_files, tmp_path, capsys):
    assert main(["compile", *model_files, "-o", str(tmp_path / "b"), "--streams", "2"]) == 0
    assert "exported to" in capsys.readouterr().out
    result = subprocess.run(
        [sys.executable, "-m", "cosched.cli", "run", str(tmp_path / "b"), "--repeat", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ},
    )
    assert result.returncode == 0, result.stderr
    assert "left: outputs [(1, 10)]" in result.stdout and "median" in result.stdout


def test_bench_prints_every_contender_with_ratios(model_files, tmp_path, capsys):
    report = tmp_path / "bench.json"
    assert main(["bench", *model_files, "--repeat", "3", "--threads", "2", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "bootstrap interval" in out  # three rounds: every ratio has its interval
    doc = json.loads(report.read_text())
    assert all(len(r["speedup_interval"]) == 2 for r in doc["results"]["results"])
    for m in doc["per_model"]:
        low, high = m["tvm_over_ort_interval"]
        assert low <= high and m["tvm_over_ort"] > 0
    for name in (
        "relax-vm-seq",
        "relax-vm-concurrent",
        "cosched-sequential",
        "cosched-round_robin",
        "cosched-breadth_first",
        "ort-seq",
        "ort-concurrent",
        "ort-seq-nospin",
        "ort-concurrent-nospin",
    ):
        assert name in out
    assert "machine :" in out and "versions:" in out and "1.00" in out
    # Each model alone against ONNX Runtime, and the headline ratios.
    assert "TVM/ORT" in out and "best cosched schedule" in out and "best of ONNX Runtime (ort-" in out
    assert sum(line.startswith(("left ", "right ")) for line in out.splitlines()) == 2


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    assert main(["compile", str(bad), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cosched: error: tenant 'bad'")
    assert not (tmp_path / "x").exists()


def test_tune_then_search_writes_database_and_searched_schedule(model_files, tmp_path, capsys):
    work = tmp_path / "db"
    assert main(["tune", *model_files, "--work-dir", str(work), "--trials", "1", "--schedule"]) == 0
    out = capsys.readouterr().out
    assert "distinct kernels" in out and "search:" in out
    assert (work / "cosched_target.json").exists()
    assert (work / "search" / "searched_schedule.json").exists()
    assert (work / "search" / "cost_model.json").exists()


def test_tune_starts_from_another_cpus_database(model_files, tmp_path, capsys):
    """``--start-from``: a database tuned for another CPU seeds an empty work dir, its records timed here."""
    source = tmp_path / "other"
    assert main(["tune", *model_files, "--work-dir", str(source), "--trials", "1"]) == 0
    meta = json.loads((source / "cosched_target.json").read_text())
    meta["target"]["mcpu"] = "cascadelake" if meta["target"]["mcpu"] != "cascadelake" else "znver4"
    (source / "cosched_target.json").write_text(json.dumps(meta))
    capsys.readouterr()
    work = tmp_path / "here"
    assert main(["tune", *model_files, "--work-dir", str(work), "--trials", "1", "--start-from", str(source)]) == 0
    assert "first timed its" in capsys.readouterr().out
    assert json.loads((work / "cosched_target.json").read_text())["started_from"]["target"] == meta["target"]
    missing = tmp_path / "missing"
    assert main(["tune", *model_files, "--work-dir", str(tmp_path / "x"), "--start-from", str(missing)]) == 2
    assert "no tuning database at" in capsys.readouterr().err


def test_tune_deep_pass_on_the_costliest(model_files, tmp_path, capsys, monkeypatch):
    """``--max-tasks`` reaches ``cosched.tune``: one workload tuned, the rest not reached."""
    from cosched import tuning

    caps = []
    real = tuning.tune
    monkeypatch.setattr(tuning, "tune", lambda *a, **kw: caps.append(kw["max_tasks"]) or real(*a, **kw))
    work = tmp_path / "db"
    assert main(["tune", *model_files, "--work-dir", str(work), "--trials", "1", "--max-tasks", "1"]) == 0
    assert caps == [1]
    out = capsys.readouterr().out
    assert " 1 trials on 1 of them in " in out and " not reached" in out and " 0 not reached" not in out
    assert "untuned -> " in out  # the one kernel's time, which it had none of before


def test_tune_kernels_that_name_nothing_are_refused(model_files, tmp_path, capsys):
    """``--kernels`` reaches ``cosched.tune``; a name no kernel has fails before a database is made."""
    work = tmp_path / "db"
    assert main(["tune", *model_files, "--work-dir", str(work), "--kernels", "fused_conv2d"]) == 2
    assert "no kernel of these models is named 'fused_conv2d'" in capsys.readouterr().err
    assert not work.exists()
