"""bench/probe.py and bench/train_throughput.py on the CPU: the files a GPU session's scheduler reads.

The scheduler picks the fastest training path from throughput.json's "best" and the MFU peak from
probe.json, so these tests check the fields, the paths (train_mlm.py flags) and the skip rules.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import train_throughput
from tinytlm.common import UserError

REPO = Path(__file__).resolve().parents[1]
EAGER = {"compile": False, "compile_mode": "default", "kernels": "torch", "mask_cap": 0}


def test_probe_smoke_writes_the_device_facts_and_a_labelled_cpu_rate(tmp_path):
    r = subprocess.run([sys.executable, "bench/probe.py", "--smoke", "--device", "cpu", "--out", str(tmp_path)],
                       cwd=REPO, env={**os.environ, "PYTHONPATH": "."}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    p = json.loads((tmp_path / "probe.json").read_text())
    for key in ("date", "device", "driver", "cuda", "sm_count", "memory_gib", "versions", "matmul", "matmul_tflops"):
        assert key in p, key
    assert p["date"].endswith("Z") and p["device"].startswith("cpu") and p["device_type"] == "cpu"
    assert p["sm_count"] is None and p["memory_gib"] is None  # CUDA facts only on CUDA
    assert set(p["versions"]) == {"python", "torch", "triton", "transformers"}
    mm = p["matmul"]
    assert (mm["n"], mm["dtype"]) == (512, "float32") and "NOT a GPU rate" in mm["label"]
    assert p["matmul_tflops"] == mm["tflops"] > 0
    assert mm["tflops"] == pytest.approx(2 * 512 ** 3 / (mm["best_ms"] / 1e3) / 1e12, rel=1e-2)
    assert "NOT a GPU rate" in (tmp_path / "probe.md").read_text()


def test_json_records_paths_best_and_peak_and_a_failing_stack_stops_nothing(tmp_path, monkeypatch):
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"matmul_tflops": 0.5, "matmul": {"label": "test peak"}}))

    def broken_hf(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(train_throughput, "hf_stack", broken_hf)
    out = tmp_path / "t.json"
    train_throughput.main(["--smoke", "--device", "cpu", "--cases", "tiny:2", "--stacks", "hf,eager,graphs",
                           "--json", str(out), "--probe", str(probe)])
    res = json.loads(out.read_text())  # valid JSON, as the scheduler reads it
    assert res["complete"] and res["peak_tflops"] == 0.5 and "test peak" in res["peak_source"]
    hf, eager, graphs = res["cases"]
    assert hf["status"] == "failed" and hf["note"].startswith("FAILED: RuntimeError: boom") and hf["path"] is None
    assert eager["status"] == "ok" and eager["path"] == EAGER and eager["seq_per_s"] > 0
    assert eager["mfu"] == pytest.approx(eager["gflop_per_step"] / eager["ms_per_step"] / 0.5)
    # on CPU the CUDA-graph stack is not run (reduce-overhead would silently be plain compile)
    cap = res["config"]["per_row"]
    assert graphs["status"] == "n/a" and "needs CUDA" in graphs["note"] and graphs["seq_per_s"] is None
    assert graphs["path"] == {"compile": True, "compile_mode": "reduce-overhead", "kernels": "torch", "mask_cap": cap}
    best = res["best"]["tiny"]
    assert best["stack"] == "eager" and best["path"] == EAGER and best["B"] == 2
    assert best["seq_per_s"] == eager["seq_per_s"] > 0 and best["first_step_s"] > 0
    assert best["infer_seq_per_s"] == res["infer"]["tiny"]["seq_per_s"] > 0


def test_time_limit_skips_every_case_after_the_first(tmp_path):
    out, md = tmp_path / "t.json", tmp_path / "t.md"
    train_throughput.main(["--smoke", "--device", "cpu", "--cases", "tiny:2,tiny:3", "--stacks", "eager",
                           "--time_limit", "0", "--json", str(out), "--out", str(md)])
    cases = json.loads(out.read_text())["cases"]
    assert [(c["B"], c["status"]) for c in cases] == [(2, "ok"), (3, "skipped")]
    assert cases[1]["note"].startswith("skipped: time limit") and cases[1]["seq_per_s"] is None
    assert "skipped: time limit" in md.read_text()


def test_gpu_session_preset_order_and_failed_kernel_tests():
    bc = train_throughput.parse_config(["--gpu_session"])
    assert (bc.warmup, bc.steps) == (3, 10)
    order = [(e["model"], e["B"], e["stack"]) for e in train_throughput.plan(bc)]
    # one of each family first at bert6 batch 32 (HF as the paper runs it, our eager, compiled with CUDA graphs,
    # Triton, unpadded + Triton), then bert1, then batch 256, then variants: a time limit cuts variants first
    families = ("hf", "eager", "graphs", "graphs+triton", "graphs+triton+unpad")
    assert order[:10] == [("bert6", 32, s) for s in families] + [("bert1", 32, s) for s in families]
    assert order[10:14] == [("bert6", 256, s) for s in ("hf", "graphs", "graphs+triton", "graphs+triton+unpad")]
    assert {m for m, _, _ in order[14:]} >= {"bert6", "bert1", "bert1-cl2-d64-3x3-h12"}
    assert train_throughput.plan(train_throughput.parse_config(["--gpu_session", "--unpad"])) == \
        train_throughput.plan(bc)  # the preset names its unpadded stacks: --unpad adds no twins
    plan = train_throughput.plan(train_throughput.parse_config(["--gpu_session", "--kernels_ok", "false"]))
    skipped = {e["stack"] for e in plan if e["skip"] == "skipped: the attention kernels did not pass their checks"}
    assert skipped == {"graphs+triton", "graphs+triton+unpad", "triton"}
    assert all(e["skip"] is None for e in plan if "triton" not in e["stack"])
    graphs = next(e for e in plan if e["stack"] == "graphs+triton")["path"]
    assert graphs == {"compile": True, "compile_mode": "reduce-overhead", "kernels": "triton", "mask_cap": 32}
    assert train_throughput.flags(graphs) == "--compile reduce-overhead --kernels triton --mask_cap 32"


@pytest.mark.parametrize("flag, skipped", [
    ("--unpad_ok", {("bert6", "graphs+triton+unpad"), ("bert1", "graphs+triton+unpad"), ("bert6", "eager+unpad"),
                    ("bert6", "graphs+unpad"), ("bert1", "graphs+unpad")}),
    ("--graphs_ok", {("bert6", "graphs+triton"), ("bert1", "graphs+triton"), ("bert6", "graphs+triton+unpad"),
                     ("bert1", "graphs+triton+unpad"), ("bert1-cl2-d64-3x3-h12", "graphs+triton")}),
    ("--conv_ok", {("bert1-cl2-d64-3x3-h12", "graphs+triton")})])
def test_a_failed_kernel_path_skips_only_its_stacks(flag, skipped):
    plan = train_throughput.plan(train_throughput.parse_config(["--gpu_session", flag, "false"]))
    assert {(e["model"], e["stack"]) for e in plan if e["skip"]} == skipped


@pytest.mark.parametrize("argv", [["--cases", "bert6"], ["--cases", "nosuchmodel:32"], ["--cases", "bert6:0"],
                                  ["--gpu_session", "--cases", "bert6:32"], ["--stacks", "eager,cudagraphs"]])
def test_bad_plans_are_one_line_errors(argv):
    with pytest.raises(UserError):
        train_throughput.parse_config(argv)


def test_an_unusable_probe_falls_back_to_the_default_peak(tmp_path, capsys):
    from bench.common import read_peak
    bad = tmp_path / "probe.json"
    bad.write_text(json.dumps({"matmul_tflops": None}))
    for probe in (str(tmp_path / "missing.json"), str(bad)):
        peak, source = read_peak(probe, 790.0)
        assert peak == 790.0 and "unusable" in source
    assert "warning" in capsys.readouterr().err


def test_cpu_quick_writes_every_section_with_positive_finite_ratios(tmp_path, roots):
    """bench/cpu.py --quick (shrunk sizes): the JSON holds every section, the facts a reader needs (command, CPU
    model and flags, revision, load), and its ratios are positive and finite. Speeds are not asserted. The steps
    section's workers made the round trip: each variant in its own process, the baseline's tinytlm imported from
    a temporary tree of revision 0cb7440 (not this checkout) and without kept freed memory, today's with it."""
    import math
    raw, _ = roots
    out = tmp_path / "cpu.json"
    r = subprocess.run([sys.executable, "bench/cpu.py", "--quick", "--raw", str(raw), "--json", str(out), "--out",
                        str(tmp_path / "cpu.md")], cwd=REPO, env={**os.environ, "PYTHONPATH": "."},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["complete"] and res["command"].startswith("PYTHONPATH=. python bench/cpu.py --quick")
    assert res["cpu"]["model"] and res["cpu"]["flags"] and res["git"] and len(res["load_before"]) == 3
    assert {"peaks_gflops", "steps", "members", "hf", "compile", "load_after"} <= set(res)
    cases = res["steps"]["cases"]
    ratios = list(res["peaks_gflops"].values())
    ratios += [x for c in cases for x in (*c["x_pre_issue"].values(), *c["x_fp32"].values())]
    ratios += [t["of_peak"] for c in cases for t in c["timings"].values()]
    ratios += [res["members"]["stacked_over_single"]]
    ratios += [x for c in res["hf"]["cases"] for x in c["ours_over_hf"].values()]
    ratios += [c["steady_speedup"] for c in res["compile"]["cases"]]
    assert len(ratios) == 2 + 2 * 8 + 2 * 4 + 1 + 2 + 4 and all(math.isfinite(x) and x > 0 for x in ratios), ratios
    assert [(c["kind"], c["goal"]) for c in cases] == [("mlm", 2.5), ("cls", 2.0)]  # tiny's: issue 21's goals
    assert res["steps"]["baseline_commit"].startswith("0cb7440")
    assert res["steps"]["variants"]["baseline"] == {"precision": "fp32", "head": "plain", "compile": "off",
                                                    "members": 1, "name": "fp32 eager plain-head"}
    assert res["steps"]["variants"]["fp32"]["precision"] == "fp32"
    for c in cases:
        t = c["timings"]
        assert c["x_pre_issue"]["baseline"] == 1.0 and c["x_fp32"]["fp32"] == 1.0
        assert not Path(t["baseline"]["tinytlm"]).is_relative_to(REPO) and "tinytlm-rev-" in t["baseline"]["tinytlm"]
        assert [Path(t[k]["tinytlm"]).parent for k in ("default", "bf16", "fp32")] == [REPO / "tinytlm"] * 3
        assert [t[k]["keeps_freed_memory"] for k in ("default", "bf16", "fp32", "baseline")] == [True] * 3 + [False]
    md = (tmp_path / "cpu.md").read_text()
    assert "K = 2 stacked vs 2 single runs" in md and "BertForMaskedLM" in md and "flags of note" in md
    assert "revision `0cb7440`" in md and "its own worker process" in md and "goal 2.5x" in md


def test_cpu_steps_baseline_rev_must_be_a_commit():
    from bench import cpu
    with pytest.raises(UserError, match="--baseline_rev 'no-such-rev'"):
        cpu.parse(["--sections", "steps", "--baseline_rev", "no-such-rev"])


def test_cpu_rows_are_real_or_synthetic_and_real_rows_are_128_long():
    from bench import cpu
    with pytest.raises(UserError, match="--rows 'fake'"):
        cpu.parse(["--sections", "peaks", "--rows", "fake"])
    with pytest.raises(UserError, match="--seq_len 64"):
        cpu.parse(["--sections", "peaks", "--seq_len", "64"])
    assert cpu.parse(["--sections", "peaks", "--quick"]).rows == "synthetic"


def test_cpu_real_rows_are_the_users_rows(roots, tmp_path):
    """--rows real: MLM on the Wikipedia shard's rows (masked), fine-tuning on AG News rows with their labels;
    both have the padding synthetic rows lack."""
    from bench.cpu_steps import real_batch
    from tinytlm.model import BertConfig
    raw, _ = roots
    cfg = BertConfig.preset("tiny")
    mlm, cls = (real_batch(k, cfg, 8, 0, raw, tmp_path / "data") for k in ("mlm", "cls"))
    assert mlm["x"].shape == cls["x"].shape == (8, 128)
    assert ((mlm["y"] != -100) & ~mlm["am"]).sum() == 0 and (mlm["y"] != -100).any()  # targets on real tokens
    assert set(cls["y"].tolist()) <= {0, 1, 2, 3} and cls["am"].float().mean() < 0.9  # AG News rows are short


def test_cpu_worker_rounds_rotate_and_a_failed_worker_reports_its_error(tmp_path):
    """The workers' rounds come in interleaved_times's rotating order; a worker that fails to build its step
    raises here with its own traceback (not a hang), and its tree goes with the block."""
    from bench.common import rotations
    from bench.cpu_rounds import revision_tree, workers
    assert list(rotations(["a", "b", "c"], 4)) == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"],
                                                  ["a", "b", "c"]]
    spec = {"kind": "mlm", "model": "tiny", "overrides": {}, "batch": str(tmp_path / "missing.pt"),
            "variant": "pre-issue"}
    with pytest.raises(RuntimeError, match="missing.pt"):
        with revision_tree("HEAD") as (tree, commit), workers({"baseline": (spec, tree)}):
            pass
    assert not tree.exists() and len(commit) == 40


def test_a_worker_steps_from_its_own_tree_and_one_importing_another_tinytlm_is_refused(tmp_path):
    """A worker round trip: built from its tree (HEAD's tinytlm, not this process's), a positive ms per `go`,
    exit 0 at `quit`. A worker whose tinytlm is not its tree's (here a link to this checkout's; in life the
    editable install of another checkout): an error, not a silent measurement of the wrong code."""
    import torch
    from bench.cpu_rounds import interleaved_rounds, revision_tree, workers
    from bench.cpu_steps import batch
    from tinytlm.model import BertConfig
    small = {"n_layer": 1, "n_head": 2, "head_dim": 32}
    torch.save(batch("mlm", BertConfig.preset("tiny", **small), 4, 16, 0), tmp_path / "b.pt")
    spec = {"kind": "mlm", "model": "tiny", "overrides": small, "batch": str(tmp_path / "b.pt"), "variant": "pre-issue"}
    with revision_tree("HEAD") as (tree, _), workers({"w": (spec, tree)}) as ws:
        assert Path(ws["w"].facts["tinytlm"]) == tree.resolve() / "tinytlm" / "__init__.py"
        assert ws["w"].facts["keeps_freed_memory"]  # HEAD's open_device keeps freed memory on a CPU
        times = interleaved_rounds(ws, 2)["w"]
    assert len(times) == 2 and all(t > 0 for t in times) and ws["w"].p.returncode == 0
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "tinytlm").symlink_to(REPO / "tinytlm")
    with pytest.raises(RuntimeError, match="imported tinytlm from"):
        with workers({"stray": (spec, tmp_path / "stray")}):
            pass


def test_unpad_ab_blocks_list_and_a_bad_one_names_the_option(roots, capsys):
    # two short rounds on the prepared Wikipedia rows: every arm is printed with its ratio to the padded one
    from bench import unpad_ab
    for bad in ("", "0", "2,x"):
        with pytest.raises(UserError, match="--blocks"):
            unpad_ab.main(["--blocks", bad])
    _, data = roots
    unpad_ab.main(["--model", "tiny", "--batch_size", "2", "--rounds", "1", "--data", str(data), "--blocks", "1,3"])
    out = capsys.readouterr().out
    assert all(arm in out for arm in ("padded", "unpadded ", "unpadded 3 blocks")), out
