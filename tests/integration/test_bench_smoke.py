"""Every ``lorapool bench`` sub-command runs briefly on TorchBackend (or the simulator) through
the real CLI: its JSON carries meta (machine, versions, configuration) and its results, and its
PNG plots are valid images."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from .cli import run_bench

pytestmark = pytest.mark.slow

pytest.importorskip("matplotlib")


def _meta_ok(data: dict[str, Any], **config: Any) -> None:
    meta = data["meta"]
    assert meta["machine"]["cpus"] >= 1 and meta["machine"]["arch"]
    assert meta["versions"]["python"] and meta["versions"]["lorapool"]
    for key, value in config.items():
        assert meta["config"][key] == value, key


def _png_ok(path: Path) -> None:
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", path
    assert raw[12:16] == b"IHDR"
    width, height = struct.unpack(">II", raw[16:24])
    assert width > 100 and height > 100
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0  # not a blank canvas


def test_serve(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    args = ("--duration", "3", "--rate", "2", "--adapters", "1,2", "--slots", "2", "--seed", "3")
    run_bench("serve", *args, "--plots", str(tmp_path), "--json", str(out), cwd=tmp_path)
    data = json.loads(out.read_text())
    _meta_ok(data, seed=3, workload="slora", slots=2)
    assert [(r["target"], r["adapters"]) for r in data["runs"]] == [("torch", 1), ("torch", 2)]
    for r in data["runs"]:
        assert r["completed"] == r["requests"] > 0 and r["errors"] == {}
        assert 0 < r["ttft_s"]["p50"] <= r["ttft_s"]["p90"] <= r["ttft_s"]["p99"]
        assert r["itl_s"]["p50"] is not None and r["output_tokens_per_s"] > 0
        assert 0 <= r["slo_attainment"] <= 1 and r["device_loads"] >= 1
        assert set(r["hit_ratio"]) >= {"device"} and r["tenants"]
    for name in ("serve-ttft-cdf.png", "serve-throughput.png", "serve-tenant-ttft.png"):
        _png_ok(tmp_path / name)


def test_trace_replay(tmp_path: Path) -> None:
    trace = tmp_path / "azure.csv"
    trace.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,20,4\n"
        "2023-11-16 18:15:47.1000000,30,3\n"
        "2023-11-16 18:15:47.9000000,12,5\n"
    )
    out = tmp_path / "trace.json"
    run_bench(
        "serve", "--workload", f"trace:{trace}", "--adapters", "2", "--json", str(out), cwd=tmp_path
    )
    runs = json.loads(out.read_text())["runs"]
    assert runs[0]["requests"] == runs[0]["completed"] == 3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine(tmp_path: Path, dtype: str) -> None:
    out = tmp_path / "engine.json"
    args = ("--rounds", "1", "--batch", "4", "--max-tokens", "4", "--adapters", "1,2", "--no-peft")
    run_bench("engine", *args, "--dtype", dtype, "--json", str(out), cwd=tmp_path)

    def no_nan(constant: str) -> None:
        raise AssertionError(f"{constant} in the JSON (not standard JSON)")

    data = json.loads(out.read_text(), parse_constant=no_nan)
    _meta_ok(data, rounds=1, batch=4, dtype=dtype)
    assert data["rows"]
    # Without PEFT there is no PEFT ratio: null, not NaN.
    assert all(row["x_peft"] is None for row in data["rows"])


def test_engine_contention(tmp_path: Path) -> None:
    """Quiet and contended rows with ratios, for base-only and each adapter count; the
    burner runs only in contended runs and is gone when the benchmark has exited."""
    import os

    from lorapool.bench.contention import BURNER_TAG

    out = tmp_path / "contention.json"
    cpu = str(max(os.sched_getaffinity(0)))
    args = ("--contention", "--engines", "torch", "--burners", cpu, "--rounds", "1")
    args += ("--batch", "2", "--max-tokens", "2", "--adapters", "1,2")
    done = run_bench("engine", *args, "--json", str(out), cwd=tmp_path, timeout=600)
    data = json.loads(out.read_text())
    _meta_ok(data, contention=True, rounds=1, batch=2, burners=cpu)
    rows = {(r["configuration"], r["condition"]): r for r in data["rows"]}
    configurations = ("base", "1 adapter", "2 adapters")
    assert set(rows) == {(c, q) for c in configurations for q in ("quiet", "contended")}
    for c in configurations:
        quiet, contended = rows[(c, "quiet")], rows[(c, "contended")]
        assert quiet["x_quiet"] == 1.0 and quiet["burners"] == []
        assert quiet["burner_cpus"] == 0.0, "a paused burner uses no CPU"
        assert contended["burners"] == [int(cpu)] and contended["engine"] == "torch"
        assert contended["x_quiet"] == contended["tok_per_s"] / quiet["tok_per_s"] > 0
        assert f"torch float32 {c} quiet" in done.stdout
        assert f"torch float32 {c} 1 burner" in done.stdout
    assert "x quiet" in done.stdout
    (torch_settings,) = data["contention"]["engines"]
    assert torch_settings["threads"] >= 1 and torch_settings["kernel_schedule"]
    pids = data["contention"]["burner_pids"]
    assert pids
    for pid in pids:  # gone (or the id reused by something else)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert BURNER_TAG.encode() not in cmdline, f"burner {pid} left running"


def test_engine_contention_wait_policies_side_by_side(tmp_path: Path) -> None:
    """``--waits``: TorchBackend under each OpenMP wait setting in a child process of its
    own (the runtime reads the setting once), their rounds interleaved in one run; each row
    carries its setting and its ratio to the first setting's row."""
    import os

    out = tmp_path / "waits.json"
    cpu = str(max(os.sched_getaffinity(0)))
    args = ("--contention", "--engines", "torch", "--burners", cpu, "--rounds", "1")
    args += ("--batch", "2", "--max-tokens", "2", "--adapters", "2")
    args += ("--waits", "passive,spin:1000,default")
    done = run_bench("engine", *args, "--json", str(out), cwd=tmp_path, timeout=600)
    data = json.loads(out.read_text())
    rows = {(r["wait"], r["configuration"], r["condition"]): r for r in data["rows"]}
    waits = ("passive", "spin 1000", "default")
    configurations = ("base", "2 adapters")
    assert set(rows) == {
        (w, c, q) for w in waits for c in configurations for q in ("quiet", "contended")
    }
    for (wait, _, _), row in rows.items():
        assert row["tok_per_s"] > 0 and len(row["rounds"]) == 1
        if wait == "passive":
            assert row["x_first_wait"] == 1.0
        else:
            first = rows[("passive", row["configuration"], row["condition"])]
            assert row["x_first_wait"] == row["tok_per_s"] / first["tok_per_s"]
    settings = {s["wait"]: s for s in data["contention"]["engines"]}
    assert settings["passive"]["omp_wait_policy"] == "OMP_WAIT_POLICY=PASSIVE"
    assert settings["passive"]["gomp_spincount"] == "unset"
    assert settings["spin 1000"]["gomp_spincount"] == "1000"
    from lorapool.backends.torch.threads import SPIN_COUNT

    assert settings["default"]["omp_wait_policy"] == (
        f"OMP_WAIT_POLICY=PASSIVE, GOMP_SPINCOUNT={SPIN_COUNT}"
    )
    assert "torch float32 [spin 1000] 2 adapters 1 burner" in done.stdout
    assert "x passive" in done.stdout


def test_prefix(tmp_path: Path) -> None:
    """Both workloads, TorchBackend with its prefix cache on and off, one round: a row per
    workload and side, the on/off ratios, and raw vLLM skipped with the reason said when
    there is no vLLM venv."""
    out = tmp_path / "prefix.json"
    args = ("--tenants", "2", "--agent-requests", "2", "--system-tokens", "160")
    args += ("--agent-output", "fixed:3", "--turns", "2", "--chat-system-tokens", "32")
    args += ("--chat-output", "3", "--rounds", "1", "--vllm-python", str(tmp_path / "none"))
    done = run_bench("prefix", *args, "--json", str(out), cwd=tmp_path)
    data = json.loads(out.read_text())
    _meta_ok(data, tenants=2, turns=2, rounds=1, seed=0)
    rows = {(r["workload"], r["side"]): r for r in data["rows"]}
    sides = ("torch cache on", "torch cache off")
    assert set(rows) == {(w, s) for w in ("agent", "chat") for s in sides}
    for (workload, side), r in rows.items():
        assert r["requests"] == r["completed"] == 4 and r["errors"] == {}, (workload, side)
        assert 0 < r["ttft_s"]["p50"] <= r["ttft_s"]["p99"]
        assert r["ttft_after_first_s"]["p50"] is not None
        assert r["output_tokens_per_s"] > 0 and r["requests_per_s"] > 0
    for workload in ("agent", "chat"):
        assert not rows[(workload, "torch cache off")]["cached_token_share"]
        assert rows[(workload, "torch cache on")]["cached_token_share"] > 0
        torch = data["ratios"][workload]["torch"]
        assert torch["ttft_p50_off_over_on"] > 0 and torch["throughput_on_over_off"] > 0
        assert data["ratios"][workload]["torch_on_ttft_p50_over_raw_vllm"] is None
    assert data["workloads"]["agent"]["requests"] == 4
    assert data["workloads"]["chat"]["history"] is True
    assert "no vLLM venv" in data["skipped"]["raw vLLM-CPU"]
    assert "agent: torch TTFT p50 off/on" in done.stdout
    assert "skipped raw vLLM-CPU" in done.stdout


def test_cache(tmp_path: Path) -> None:
    out = tmp_path / "cache.json"
    run_bench("cache", "--requests", "2000", "--jobs", "1", "--json", str(out), cwd=tmp_path)
    data = json.loads(out.read_text())
    _meta_ok(data, requests=2000, seed=0)
    assert len(data) > 1


def test_store(tmp_path: Path) -> None:
    out = tmp_path / "store.json"
    run_bench("store", "--rounds", "2", "--json", str(out), cwd=tmp_path)
    data = json.loads(out.read_text())
    _meta_ok(data, rounds=2)
    assert {"sizes", "disk_to_host", "store"} <= set(data)


def test_fairness(tmp_path: Path) -> None:
    out, plot = tmp_path / "fairness.json", tmp_path / "ttft.png"
    args = (
        "--parts",
        "noisy,overhead",
        "--duration",
        "3",
        "--noisy-rate",
        "3",
        "--quiet-rate",
        "0.7",
        "--max-tokens",
        "4",
        "--more-seeds",
        "1",
        "--overhead-tenants",
        "100",
        "--overhead-requests",
        "500",
    )
    run_bench("fairness", *args, "--plot", str(plot), "--json", str(out), cwd=tmp_path)
    data = json.loads(out.read_text())
    _meta_ok(data, seed=0, duration=3.0)
    summary = data["noisy"]["quiet_p99"]
    assert {"fcfs", "fair", "vtc", "no_preempt", "preemptions"} <= set(summary)
    pooled = summary["fair_pooled"]
    assert pooled["seeds"] == [0, 1] and set(pooled["per_seed_x"]) == {"0", "1"}
    assert pooled["quiet_requests"] > len(
        [r for r in data["noisy"]["requests"]["no-noise fair"] if r["tenant"] != "noisy"]
    )
    assert "noisy no-preempt" in data["noisy"]["tokens_per_s"]
    _png_ok(plot)


def test_report_regenerates_the_page(tmp_path: Path) -> None:
    done = run_bench(
        "report", "--quick", "--only", "cache,serve", "--out", str(tmp_path), cwd=tmp_path
    )
    page = (tmp_path / "performance.md").read_text()
    assert "## Cache policy simulator" in page and "## Serving a workload" in page
    assert "## Engine" not in page  # --only
    assert "lorapool bench serve" in page and "FAILED" not in page
    assert json.loads((tmp_path / "bench-serve.json").read_text())["runs"]
    _png_ok(tmp_path / "serve-ttft-cdf.png")
    assert "wrote" in done.stdout
    # Re-running one section keeps the others, and the page says which one was re-run.
    serve_part = page[page.index("## Serving a workload") :]
    run_bench("report", "--quick", "--only", "cache", "--out", str(tmp_path), cwd=tmp_path)
    again = (tmp_path / "performance.md").read_text()
    assert again.index("## Cache policy") < again.index("## Serving a workload")
    assert again[again.index("## Serving a workload") :] == serve_part
    cache_part = again[: again.index("## Serving a workload")]
    assert "Re-run alone at" in cache_part and "--only cache" in cache_part
    assert again.startswith(page[: page.index("## Cache policy")])  # the header is kept
