"""`make bench-train` (benchmarks/train_speed.py) and `make profile` (benchmarks/profile_step.py) on tiny models.

Timings are never asserted (the machine is shared); what is checked is the structure of the reports and their FLOP
counts, which are deterministic: the lens with one drawn pair costs 1/k of the exact lens on top of KD only, and the
per-pair rows of the profile add up to the lens row.
"""

from __future__ import annotations

import json
import sys

import pytest
from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import profile_step  # noqa: E402
import teacher_targets  # noqa: E402
import train_speed  # noqa: E402


def test_bench_train_reports_every_objective_and_precision_with_flop_ratios(tmp_path):
    record = train_speed.main(["--workload", "tiny", "--rounds", "1", "--out", str(tmp_path)])
    rows = {(r["objective"], r["precision"]): r for r in record["rows"]}
    assert set(rows) == {(o, p) for o in ("kd", "exact", "m1", "eager") for p in ("fp32", "bf16")}
    pairs = len(train_speed.WORKLOADS["tiny"].student_layers)
    for precision in ("fp32", "bf16"):
        kd, exact, m1 = (rows[o, precision]["flops"] for o in ("kd", "exact", "m1"))
        assert kd < m1 < exact
        assert exact - kd == pytest.approx(pairs * (m1 - kd), rel=1e-6)  # m = 1 projects one pair's rows of k
        assert rows["kd", precision]["time_vs_kd"] == 1.0
        assert rows["exact", precision]["flop_limit_vs_kd"] == pytest.approx(exact / kd)
    assert (
        rows["exact", "fp32"]["flops"] == rows["exact", "bf16"]["flops"]
    )  # autocast changes dtypes, not work
    assert (
        rows["eager", "fp32"]["flops"] == rows["exact", "fp32"]["flops"]
    )  # the kernels' fusion changes no work
    for row in rows.values():
        assert row["tokens_per_sec"] > 0 and row["gflops_per_sec"] > 0 and len(row["seconds"]) == 1
    saved = json.loads((tmp_path / "train_speed_tiny_cpu.json").read_text())
    assert len(saved["rows"]) == 8


def test_profile_times_every_part_of_a_step_and_matches_the_modules_objective(tmp_path):
    data = REPO / "data" / "instructions"
    report = profile_step.main(
        [
            "--config", str(REPO / "configs" / "tiny.yaml"), "--rounds", "1", "--grad-check", "--out", str(tmp_path),
            "--model.layers.student", "[1, 2]", "--model.layers.teacher", "[2, 4]", "--model.loss.ce_weight", "0.5",
            "--trainer.precision", "bf16-mixed", "--data.train", str(data / "train.jsonl"),
            "--data.validation", str(data / "validation.jsonl"), "--data.cache_dir", str(tmp_path / "cache"),
        ]
    )  # fmt: skip
    rows = {r["part"]: r for r in report["rows"]}
    parts = ["data", "teacher fwd", "student fwd", "ce", "kd", "lens", "backward", "optimizer"]
    assert [p for p in rows if rows[p]["in_step"]] == parts
    assert {"  lens s1_t2", "  lens s2_t4"} <= set(rows)
    assert rows["lens"]["gflop"] == pytest.approx(
        rows["  lens s1_t2"]["gflop"] + rows["  lens s2_t4"]["gflop"]
    )
    for part in ("teacher fwd", "student fwd", "kd", "lens", "backward"):
        assert rows[part]["gflop"] > 0, part
    assert report["step_seconds"] == pytest.approx(sum(rows[p]["seconds"] for p in parts))
    assert report["precision"] == "bf16-mixed"
    assert report["module_objective_relative_difference"] < 1e-3
    check = report["grad_check"]
    assert check["loss_relative_difference"] < 5e-2 and check["gradient_cosine"] > 0.99
    assert (tmp_path / "profile_tiny_bf16-mixed.json").is_file()


def test_onpolicy_cost_times_each_fraction_and_generates_only_when_drawn(tmp_path):
    """benchmarks/onpolicy_cost.py's speed part on configs/tiny.yaml (the fits skipped): fraction 0 never generates,
    fraction 1 generates in every timed round."""
    import onpolicy_cost

    record = onpolicy_cost.main(
        [
            "--config",
            str(REPO / "configs" / "tiny.yaml"),
            "--rounds",
            "1",
            "--steps",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    speed = record["speed"]
    assert set(speed) == {0.0, 0.5, 1.0} and record["fits"] == {}
    assert (
        speed[0.0]["gen_s"] == 0
        and speed[0.0]["gen_length"] is None
        and speed[0.0]["steps_generating"] == "0/1"
    )
    assert speed[1.0]["steps_generating"] == "1/1" and 0 < speed[1.0]["gen_length"] <= 64
    assert all(len(row["seconds"]) == 1 and row["step_s"] > 0 for row in speed.values())
    assert (tmp_path / "onpolicy" / "onpolicy.json").is_file()


def test_bench_teacher_times_and_measures_every_kind_of_targets(tmp_path):
    """`make bench-teacher` on tiny models: a row per kind; the top-k variants hold no teacher weight while they
    train, hidden holds its head only; the byte counts are the cache layout's (checked against a built cache in
    tests/test_teacher_cache.py)."""
    names = ["live", "hidden", "topk4"]
    out = ["--workload", "tiny", "--k", "4", "--out", str(tmp_path)]
    speed = teacher_targets.main(["speed", "--rounds", "1", *out])
    assert [row["variant"] for row in speed["rows"]] == names
    assert speed["rows"][0]["speedup_vs_live"] == 1.0 and all(
        r["seconds_per_step"] > 0 for r in speed["rows"]
    )
    memory = {row["variant"]: row for row in teacher_targets.main(["memory", "--steps", "1", *out])["rows"]}
    assert list(memory) == names and not any("error" in row for row in memory.values()), memory
    live, hidden = memory["live"]["teacher_bytes_in_memory"], memory["hidden"]["teacher_bytes_in_memory"]
    assert live > hidden > 0 and memory["topk4"]["teacher_bytes_in_memory"] == 0
    sizes = {
        (r["shape"][:7], r["kind"]): r["bytes_per_token"]
        for r in teacher_targets.main(["bytes", *out])["rows"]
    }
    assert sizes["default", "hidden bf16"] == 6 * 576 * 2 and sizes["GPT-2 1", "topk4"] == 6 * (4 * 8 + 4)
