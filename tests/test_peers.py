"""benchmarks/peers.py: its pure helpers (fast), and one short end-to-end run against so3krates-torch (slow)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "peers.py"
CONFIG = {
    "species": [1, 6, 7],
    "cutoff": 5.0,
    "num_features": 64,
    "num_layers": 6,
    "num_heads": 4,
    "num_rbf": 16,
    "radial_hidden": 32,
    "tau_init": 10.0,
    "envelope_exponent": 6,
}


def _load():
    return load_script(SCRIPT, "peers_benchmark")


peers = _load()
HAVE_PEER = importlib.util.find_spec("so3krates_torch") is not None


def test_peer_constructor_maps_the_asked_hyperparameters():
    kw = peers.peer_constructor(CONFIG, avg_num_neighbors=13.5)
    assert (kw["num_features"], kw["num_layers"], kw["num_heads"]) == (64, 6, 4)
    assert kw["r_max"] == 5.0 and kw["num_radial_basis_fn"] == 16
    assert kw["degrees"] == [1]  # l_max = 1
    assert kw["radial_basis_fn"] == "bessel" and kw["cutoff_fn"] == "polynomial" and kw["cutoff_p"] == 6
    assert kw["dtype"] == "float32" and kw["avg_num_neighbors"] == 13.5
    lines = peers.mapping_lines(CONFIG, kw)
    assert "num_features=64 -> num_features=64" in lines and "cutoff=5.0 -> r_max=5.0" in lines
    assert any(line.startswith("radial_hidden=32 -> (none") for line in lines)
    assert peers.UNMATCHED and all(isinstance(u, str) and u for u in peers.UNMATCHED)


@pytest.mark.skipif(not HAVE_PEER, reason="so3krates-torch is not installed (pip install '.[bench]')")
def test_peer_constructor_is_accepted_by_so3krates_torch():
    import torch
    from so3krates_torch.modules.models import So3krates

    default = torch.get_default_dtype()
    try:
        model = So3krates(**peers.peer_constructor(CONFIG, avg_num_neighbors=13.5))
    finally:
        torch.set_default_dtype(default)  # its constructor sets the global default dtype
    assert len(model.euclidean_transformers) == 6 and model.r_max == 5.0
    assert next(model.parameters()).dtype == torch.float32


def test_rotated_orders_and_cpu_model():
    assert peers.rotated(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert peers.rotated(["a", "b", "c"], 4) == ["b", "c", "a"]
    text = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7763 64-Core Processor\n"
    assert peers.cpu_model(text) == "AMD EPYC 7763 64-Core Processor"
    assert peers.cpu_model("processor : 0\n") == "unknown"


def test_pairs_within_counts_directed_pairs():
    x = np.array([[0.0, 0, 0], [1.0, 0, 0], [10.0, 0, 0]])
    assert peers.pairs_within(x, 5.0) == 2
    assert peers.pairs_within(x, 20.0) == 6


def test_summarize_and_ratios():
    s = peers.summarize([3.0, 1.0, 2.0, 10.0, 2.5])
    assert s == {"ms": 2.5, "ms_min": 1.0, "ms_max": 10.0, "samples": 5}
    rows = [
        {"calculator": "so3krates-torch", "measure": "MD step", "threads": 1, "ms": 40.0},
        {"calculator": "gaq_calc", "measure": "MD step", "threads": 1, "ms": 5.0},
        {"calculator": "gaq_calc", "measure": "MD step", "threads": 2, "ms": 4.0},
        {"calculator": "so3krates-torch", "measure": "call (E+F)", "threads": 1, "ms": 30.0},
        {"calculator": "gaq_calc", "measure": "call (E+F)", "threads": 1, "ms": 6.0},
    ]
    out = peers.add_ratios(rows)
    assert out[0]["peer_over_this"] == 1.0 and out[1]["peer_over_this"] == 8.0
    assert out[2]["peer_over_this"] is None  # no so3krates-torch row at 2 threads
    assert out[4]["peer_over_this"] == 5.0


def test_refuses_without_the_peer_or_with_bad_arguments(monkeypatch):
    with pytest.raises(SystemExit):
        peers.main(["--steps", "0"])
    monkeypatch.setitem(sys.modules, "so3krates_torch", None)  # import fails as if not installed
    with pytest.raises(SystemExit, match="not installed"):
        peers.main(["--threads", "1"])


@pytest.mark.slow
def test_end_to_end_short_run(tmp_path):
    if not HAVE_PEER:
        pytest.skip("so3krates-torch is not installed (pip install '.[bench]')")
    out = tmp_path / "peers.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--steps",
            "10",
            "--blocks",
            "1",
            "--threads",
            "1",
            "--warmup",
            "2",
            "--calls",
            "3",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    md = [r for r in rows if r["measure"] == "MD step"]
    assert {r["calculator"] for r in md} == {"so3krates-torch", "gaq_calc"} and len(md) == 4
    assert {(r["model"], r["mode"]) for r in md if r["calculator"] == "gaq_calc"} == {
        ("azobenzene_w4a8.pt", "conservative"),
        ("azobenzene_w4a8.pt", "quantized"),
        ("azobenzene_fp32", "fp32"),
    }
    assert all(r["ms"] > 0 and r["peer_over_this"] > 0 for r in rows)
    assert all(r["calculations_per_step"] == 1.0 for r in md)  # one model evaluation per step for both
    assert len([r for r in rows if r["measure"] == "call (E+F)"]) == 2
    assert data["peer"]["constructor"]["num_features"] == 64 and data["peer"]["unmatched"]
    assert "| MD step | 1 | so3krates-torch |" in proc.stdout and "load average" in proc.stdout
