"""The benchmark scripts still run against the library, on small settings, and their correctness checks hold.

Speed is theirs to report (`make bench`); these tests assert nothing about time, only that each
script runs, prints its JSON, and that ours and Hugging Face's computed the same thing.
"""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, script, *args], cwd=BENCHMARKS, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_sampling_benchmark_runs_and_our_greedy_completion_equals_hf():
    report = run("sampling.py", "--quick", "--cases", "tiny", "--threads", "1")
    tiny = report["threads"]["1"]["tiny"]
    assert tiny["greedy_check"] == {"pixels": 128, "equal": True}  # every generated pixel, as HF's generate()
    for batch in ("1", "8"):
        assert tiny["batches"][batch]["ours_px_per_s"] > 0 and tiny["batches"][batch]["hf_px_per_s"] > 0
        assert tiny["batches"][batch]["int8_ratio"] > 0
    assert 0 <= tiny["int8_greedy_agreement"]["equal_fraction"] <= 1
    trained = report["int8_trained_run"]  # int8 against fp32 on a digits run the script trains
    assert abs(trained["bits_per_token"]["relative_difference"]) < 0.01


def test_quantize_benchmark_runs_and_gives_hf_ids():
    report = run("quantize.py", "--quick")
    assert all(check["identical"] for check in report["ids_check"].values())


def test_probe_benchmark_runs_and_its_features_equal_hf_hidden_states():
    report = run("probe.py", "--layers", "2", "--width", "64", "--heads", "4", "--size", "16", "--grid-checkpoints", "1",
                 "--grid-layers", "2", "--grid-width", "16", "--paper-rows", "2000", "--paper-width", "32",
                 "--paper-iters", "3", "--s-shape", "2,64,4,16", "--s-images", "4", "--s-batch", "2", "--s-rounds", "2")
    assert report["agreement"]["allclose_atol_1e-4"] and report["agreement"]["naive_equals_one_pass"]
    s_row = report["igpt_s"]  # at a small shape here: the fp32 path equals HF's, "auto" stays close to it
    assert s_row["agreement"]["fp32_max_abs_diff_vs_hf"] < 1e-4 and s_row["agreement"]["auto_min_cosine_vs_fp32"] > 0.99
    assert all(len(rates) == 2 for rates in s_row["images_per_second_each_round"].values())
    grid = report["probe_grid"]
    assert grid["fits"] == 5 and grid["workers_equal_one_process"]  # raw pixels + 2 models × 2 layers
    assert report["paper_sized"]["seconds_per_lbfgs_iteration"]["1_thread"] > 0


def test_training_benchmark_runs_from_equal_logits():
    report = run("training.py", "--quick")
    assert report["logits_max_abs_diff"] < 1e-4
    assert report["ours"]["tokens_per_s"] > 0 and report["hf"]["tokens_per_s"] > 0


def test_analysis_views_benchmark_runs_and_its_cka_map_equals_pairwise_cka():
    report = run("analysis_views.py", "--layers", "3", "--width", "8", "--images", "30")
    maps = report["cka_maps"]
    assert maps["max_abs_diff"] < 1e-9 and maps["ours_s"] > 0 and maps["pairwise_s"] > 0


def test_concurrency_benchmark_serves_every_request():
    report = run("concurrency.py", "--quick", "--rounds", "2")
    assert report["requests_answered"] == {"complete": 2, "inside": 1}  # the rounds after each user's warm-up
    assert report["rss_mb"]["end"] > 0 and report["temp_files"]["end"] >= report["temp_files"]["after_warm_up"]


def test_precision_benchmark_compares_bf16_with_fp32_and_with_noise_of_the_same_size(tiny_run, runs_dir):
    report = run("precision.py", tiny_run.name, "--runs-dir", str(runs_dir), "--checkpoints", "2")
    (measured,) = report["runs"]
    rows = measured["rows"]
    assert measured["checkpoints"] == 2 and len(rows) == 2 * measured["layers"]
    for row in rows:
        assert all(0 <= row[kind] <= 100 for kind in ("fp32", "bf16", "noise", "bf16_at_fp32_C"))
        assert 0 <= row["feature_relative_error_mean"] < 2e-2  # bf16's own error: small, and never zero past layer 0
        assert row["feature_relative_error_mean"] > 0 or row["layer"] == 0
    for kind in ("bf16", "noise", "bf16_at_fp32_C"):
        assert measured["change_vs_fp32"][kind]["max_points"] >= measured["change_vs_fp32"][kind]["mean_points"] >= 0
