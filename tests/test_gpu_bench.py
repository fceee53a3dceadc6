"""bench/gpu.py, the prepared GPU measurement run, exercised as ``--device cpu --tiny`` so it never rots: it exits 0,
prints its table and writes one JSON per part; parts that need CUDA are recorded as skipped with the reason, and a
part that fails is recorded and the run goes on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_bench_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.py"
PARTS = ["prune_time", "mask_agreement", "shrink_speed", "semi_structured_24", "host_syncs", "zero3_fit"]
RECORD_KEYS = {"part", "status", "reason", "seconds", "environment", "results", "rows"}


def test_tiny_cpu_run_exits_0_prints_the_table_and_writes_every_part(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout[done.stdout.index("bench/gpu.py on cpu") :]
    assert "part" in table and "status" in table and "figures" in table
    records = {}
    for part in PARTS:
        assert part in table
        record = json.loads((tmp_path / f"{part}.json").read_text())
        assert set(record) >= RECORD_KEYS and record["part"] == part
        assert record["environment"]["device"] == "cpu" and record["environment"]["tiny"] is True
        records[part] = record

    for part in ("prune_time", "mask_agreement", "shrink_speed"):  # these run on the CPU too
        assert records[part]["status"] == "ok", records[part].get("traceback")
    runs = records["prune_time"]["results"]["runs"]
    assert set(runs) == {f"{r}/{d}" for r in ("wanda", "sparsegpt", "mosaic (sparsegpt+mosaic)")
                         for d in ("bfloat16", "float32")}  # fmt: skip
    for entry in runs.values():
        assert entry["prune_s"] > 0 and entry["forward_s"] > 0
        assert entry["prune_over_forward"] == entry["prune_s"] / entry["forward_s"]
    for method in ("wanda", "sparsegpt"):
        agreement = records["mask_agreement"]["results"]["methods"][method]
        assert 0.9 <= agreement["entries_equal"] <= 1 and 0.9 <= agreement["pruned_in_both"] <= 1
    shrink = records["shrink_speed"]["results"]
    assert shrink["compacted"]["params"] < shrink["dense"]["params"]
    assert abs(shrink["achieved_sparsity"] - 0.3) < 0.01
    for key in ("prefill_tokens_per_s", "decode_b1_tokens_per_s", "decode_b8_tokens_per_s"):
        assert shrink["dense"][key] > 0 and shrink["compacted"][key] > 0
    assert shrink["dense"]["decode_b8_peak_mb"] is None  # no GPU memory to report on the CPU

    for part in ("semi_structured_24", "host_syncs", "zero3_fit"):  # need CUDA: skipped, saying so
        assert records[part]["status"] == "skipped" and "CUDA" in records[part]["reason"]


def _load_bench():
    return load_bench_script("gpu")


def test_a_failing_part_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    gpu = _load_bench()

    def broken(args):
        raise RuntimeError("simulated failure")

    monkeypatch.setitem(gpu.PART_FUNCTIONS, "prune_time", broken)
    assert gpu.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--parts",
                     "prune_time,semi_structured_24"]) == 0  # fmt: skip
    failed = json.loads((tmp_path / "prune_time.json").read_text())
    assert failed["status"] == "skipped" and failed["reason"] == "failed: RuntimeError: simulated failure"
    assert "simulated failure" in failed["traceback"]
    assert json.loads((tmp_path / "semi_structured_24.json").read_text())["status"] == "skipped"
    assert "failed: RuntimeError: simulated failure" in capsys.readouterr().out


def test_unknown_parts_are_refused_naming_the_allowed_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _load_bench().main(["--tiny", "--device", "cpu", "--parts", "nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "nope" in err and "prune_time" in err
