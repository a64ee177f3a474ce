"""torch.ops.gaq.energy_forces on bad input: a clear ValueError/RuntimeError, never a crash or wrong numbers.

The op trusts nothing it is given. Each bad input runs in a worker subprocess, so that a crash
(SIGSEGV, SIGFPE, SIGABRT) fails one case instead of killing pytest; a crashed worker is restarted
for the cases after the one that killed it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _valid_inputs(quantized: bool = False):
    """A tiny random model and a valid two-molecule batch, as the op's arguments (a dict)."""
    from helpers import randomize, tiny_config

    from gaq_calc.data.graphs import neighbour_graph
    from gaq_calc.kernels.fused import LAYOUT_VERSION, _cast_weights, gather_parameters
    from gaq_calc.model import GAQPotential

    torch.manual_seed(0)
    model = randomize(GAQPotential(tiny_config()), seed=2, scale=0.3).eval()
    weights, consts = gather_parameters(model)
    if quantized:  # linear int8 rounding of every Linear's input, frame rounding of the vector mix
        weights.update(_synthetic_quantizers(weights))
    mol = torch.tensor(
        [[0.0, 0.0, 0.0], [1.1, 0.0, 0.0], [-0.4, 1.0, 0.0], [0.2, -0.5, 0.9], [2.0, 1.0, -0.5]], dtype=torch.float64
    )
    species = torch.tensor([1, 0, 0, 2, 0, 1, 0, 0, 2, 0])
    pos = torch.cat([mol, mol + torch.tensor([20.0, 0.0, 0.0], dtype=torch.float64)])
    rcv, snd, sh = [], [], []
    for g in range(2):
        r, s, shift = neighbour_graph(mol.numpy(), 5.0)
        rcv.append(torch.from_numpy(r) + 5 * g)
        snd.append(torch.from_numpy(s) + 5 * g)
        sh.append(torch.from_numpy(shift))
    return dict(
        positions=pos.float(),
        species=species,
        receivers=torch.cat(rcv),
        senders=torch.cat(snd),
        shifts=torch.cat(sh).float(),
        batch=torch.tensor([0] * 5 + [1] * 5),
        n_graphs=2,
        layout=LAYOUT_VERSION,
        weights=_cast_weights(weights, torch.float32, True),
        consts=consts,
    )


LINEARS = [
    "radial.hidden",
    "radial.filter",
    "layers.0.qk",
    "layers.0.value",
    "layers.0.exchange_in",
    "layers.0.exchange_out",
    "layers.0.vector_mix",
]


def _synthetic_quantizers(weights):
    """Per Linear: {name}.act [kind, act step, qmax], int8 weight codes of the Linear's shape, per-row steps."""
    names = sorted(
        {
            k[: -len(".weight")]
            for k in weights
            if k.endswith(".weight") and k != "embedding.weight" and not k.endswith("norm.weight")
        }
    )
    out = {}
    gen = torch.Generator().manual_seed(0)
    for name in names:
        w = weights[name + ".weight"]
        kind = 2 if name.endswith("vector_mix") else 1
        out[name + ".act"] = torch.tensor([float(kind), 0.05, 127.0], dtype=torch.float64)
        out[name + ".codes"] = torch.randint(-7, 8, w.shape, generator=gen, dtype=torch.int8)
        out[name + ".wstep"] = torch.full((w.shape[0],), 0.02)
    return out


def _call(a):
    return torch.ops.gaq.energy_forces(
        a["positions"],
        a["species"],
        a["receivers"],
        a["senders"],
        a["shifts"],
        a["batch"],
        a["n_graphs"],
        a["layout"],
        a["weights"],
        a["consts"],
    )


def _set(key, value):
    def f(a):
        a[key] = value(a) if callable(value) else value

    return f


def _weight(name, value):
    """Replace (value: a function of the tensor) or drop (value None) one named weight."""

    def f(a):
        a["weights"] = dict(a["weights"])
        if value is None:
            del a["weights"][name]
        else:
            a["weights"][name] = value(a["weights"][name]) if callable(value) else value

    return f


def _weights(changes: dict):
    """Several named weights replaced at once (value "int8": the tensor cast to int8)."""

    def f(a):
        a["weights"] = dict(a["weights"])
        for name, value in changes.items():
            a["weights"][name] = a["weights"][name].to(torch.int8) if value == "int8" else value

    return f


def _with(key, i, v):
    def f(t):
        t = t.clone()
        t[i] = v
        return t

    return _set(key, lambda a: f(a[key]))


N_SPECIES, N_ATOMS = 3, 10
BIG = 1 << 40
# layer 0 of the parameter list starts at 5: ln g, ln b, Wqk, Wv, bv, log_tau, Win, bin, Wout, bout, Wvm
BAD = {
    # index ranges
    "species >= n_species": _with("species", 0, N_SPECIES),
    "species < 0": _with("species", 3, -1),
    "species far out": _with("species", 3, BIG),
    "receiver >= n_atoms": _with("receivers", 0, N_ATOMS),
    "receiver < 0": _with("receivers", 4, -1),
    "receiver far out": _with("receivers", 4, BIG),
    "sender >= n_atoms": _with("senders", -1, N_ATOMS),
    "sender < 0": _with("senders", 2, -3),
    "sender far out": _with("senders", 2, -BIG),
    "batch >= n_graphs": _with("batch", -1, 2),
    "batch < 0": _with("batch", 0, -1),
    "batch far out": _with("batch", 0, BIG),
    "n_graphs = 0": _set("n_graphs", 0),
    "n_graphs < 0": _set("n_graphs", -5),
    # non-finite coordinates (the int8 engine would round a NaN activation to code 0: a finite energy)
    "position NaN": _set("positions", lambda a: a["positions"].index_fill(0, torch.tensor([2]), float("nan"))),
    "position inf": _set("positions", lambda a: a["positions"].index_fill(0, torch.tensor([0]), float("inf"))),
    "shift NaN": _set("shifts", lambda a: a["shifts"].index_fill(0, torch.tensor([1]), float("nan"))),
    # lengths that do not match
    "senders short": _set("senders", lambda a: a["senders"][:-3]),
    "receivers short": _set("receivers", lambda a: a["receivers"][:-1]),
    "shifts short": _set("shifts", lambda a: a["shifts"][:-2]),
    "species short": _set("species", lambda a: a["species"][:-1]),
    "batch short": _set("batch", lambda a: a["batch"][:-4]),
    "batch long": _set("batch", lambda a: torch.cat([a["batch"], a["batch"]])),
    # shapes and dtypes
    "positions [n, 2]": _set("positions", lambda a: a["positions"][:, :2]),
    "positions [n, 3, 1]": _set("positions", lambda a: a["positions"][..., None]),
    "positions float16": _set("positions", lambda a: a["positions"].half()),
    "positions int64": _set("positions", lambda a: a["positions"].long()),
    "shifts [E, 2]": _set("shifts", lambda a: a["shifts"][:, :2]),
    "shifts [E]": _set("shifts", lambda a: a["shifts"][:, 0]),
    "shifts int64": _set("shifts", lambda a: a["shifts"].long()),
    "receivers float": _set("receivers", lambda a: a["receivers"].double()),
    "senders bool": _set("senders", lambda a: a["senders"] > 3),
    "species float": _set("species", lambda a: a["species"].float()),
    "batch [n, 1]": _set("batch", lambda a: a["batch"][:, None]),
    "receivers [E, 2]": _set("receivers", lambda a: torch.stack([a["receivers"], a["receivers"]], 1)),
    # the named weights, their layout version and the constants
    "one weight missing": _weight("reference_energies", None),
    "a layer's weight missing": _weight("layers.1.qk.weight", None),
    "no weights": _set("weights", {}),
    "unknown weight name": _weight("layers.0.qk.bias", torch.zeros(16)),
    "layout version 1": _set("layout", 1),
    "layout version from the future": _set("layout", 99),
    "embedding narrower": _weight("embedding.weight", lambda t: t[:, :-1]),
    "embedding 1-D": _weight("embedding.weight", lambda t: t[0]),
    "frequencies longer": _weight("rbf.frequencies", lambda t: torch.cat([t, t])),
    "radial hidden weight short": _weight("radial.hidden.weight", lambda t: t[:-1]),
    "radial hidden bias short": _weight("radial.hidden.bias", lambda t: t[:-1]),
    "radial filter weight short": _weight("radial.filter.weight", lambda t: t[:-5]),
    "layer norm gain short": _weight("layers.0.norm.weight", lambda t: t[:-1]),
    "query-key weight transposed": _weight("layers.0.qk.weight", lambda t: t.t()),
    "value weight short": _weight("layers.0.value.weight", lambda t: t[:-2]),
    "value bias short": _weight("layers.0.value.bias", lambda t: t[:-1]),
    "log tau short": _weight("layers.0.log_tau", lambda t: t[:-1]),
    "exchange-in weight short": _weight("layers.0.exchange_in.weight", lambda t: t[:, :-1]),
    "exchange-out bias long": _weight("layers.0.exchange_out.bias", lambda t: torch.cat([t, t])),
    "vector-mix weight short": _weight("layers.0.vector_mix.weight", lambda t: t[:-1]),
    "readout weight short": _weight("readout.hidden.weight", lambda t: t[:-1]),
    "readout output weight [2, F]": _weight("readout.out.weight", lambda t: torch.cat([t, t])),
    "energy scale empty": _weight("energy_scale", lambda t: t.reshape(-1)[:0]),
    "reference energies short": _weight("reference_energies", lambda t: t[:-1]),
    "integer parameter": _weight("layers.0.norm.bias", lambda t: t.long()),
    "heads = 0": _set("consts", lambda a: a["consts"][:4] + [0.0]),
    "heads do not divide features": _set("consts", lambda a: a["consts"][:4] + [3.0]),
    "heads negative": _set("consts", lambda a: a["consts"][:4] + [-2.0]),
    "consts short": _set("consts", lambda a: a["consts"][:3]),
}
BAD_QUANTIZED = {
    "position NaN, rounded activations": _set(
        "positions", lambda a: a["positions"].index_fill(0, torch.tensor([2]), float("nan"))
    ),
    "quantizer without its act": _weight("readout.out.act", None),
    "quantizer codes missing": _weight("layers.0.qk.codes", None),
    "quantizer codes transposed": _weight("layers.0.value.codes", lambda t: t.t().contiguous()),
    "quantizer codes short": _weight("layers.0.exchange_in.codes", lambda t: t[:-1]),
    "quantizer steps short": _weight("layers.0.qk.wstep", lambda t: t[:-1]),
    "quantizer qmax above int8 with int8 codes": _weights(
        {"layers.0.qk.act": torch.tensor([1.0, 0.05, 300.0], dtype=torch.float64), "layers.0.qk.codes": "int8"}
    ),
    "float codes whose sums are not exact": _weight(
        "layers.0.qk.act", torch.tensor([1.0, 0.05, float(1 << 22)], dtype=torch.float64)
    ),
    "float codes that are not integers": _weight("layers.0.value.codes", lambda t: t + 0.5),
    "quantizer step zero": _weight("layers.0.qk.act", torch.tensor([1.0, 0.0, 127.0], dtype=torch.float64)),
    "frame rounding on a scalar Linear": _weight(
        "layers.0.qk.act", torch.tensor([2.0, 0.05, 127.0], dtype=torch.float64)
    ),
    "frame rounding of the radial filter": _weight(
        "radial.filter.act", torch.tensor([2.0, 0.05, 127.0], dtype=torch.float64)
    ),
    "quantizer meta short": _weight("radial.hidden.act", lambda t: t[:2]),
}


def _worker(cases):
    """Run cases in order; one JSON line per case, flushed before the next starts. Stops after a case
    that returned (bad input accepted), since it may have corrupted memory."""
    from gaq_calc.kernels import load_extension

    load_extension()
    base = {False: _valid_inputs(False), True: _valid_inputs(True)}
    for name in cases:
        quantized = name in BAD_QUANTIZED
        a = dict(base[quantized])
        (BAD_QUANTIZED if quantized else BAD)[name](a)
        print(json.dumps({"start": name}), flush=True)
        try:
            energy, _forces = _call(a)
            result = {"case": name, "outcome": "returned", "energy": energy.tolist()}
        except Exception as err:
            result = {"case": name, "outcome": type(err).__name__, "message": str(err).splitlines()[0]}
        print(json.dumps(result), flush=True)
        if result["outcome"] == "returned":  # it may have written out of bounds: the next case runs afresh
            return


def _run_isolated(cases, case_seconds=60):
    """{case: result}; a case whose worker died gets {"outcome": "crashed", "returncode": rc}, one that ran
    longer than case_seconds {"outcome": "hung"} (the worker is killed and restarted after it)."""
    import selectors
    import time

    results, todo = {}, list(cases)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]), "OMP_NUM_THREADS": "1"}
    while todo:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, json, test_kernel_inputs as t; t._worker(json.loads(sys.argv[1]))",
                json.dumps(todo),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(HERE),
        )
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        started, deadline, hung = None, time.monotonic() + 600, False  # the first case also waits for the build
        while True:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                hung = True
                proc.kill()
                break
            line = proc.stdout.readline()
            if not line:
                break
            if not line.startswith("{"):
                continue
            msg = json.loads(line)
            if "start" in msg:
                started = msg["start"]
                deadline = time.monotonic() + case_seconds
            else:
                results[msg["case"]] = msg
                started = None
        sel.close()
        stderr = proc.stderr.read()
        proc.wait()
        if started is None and (hung or proc.returncode != 0):
            raise AssertionError(f"the worker failed outside a case (rc {proc.returncode}): {stderr[-2000:]}")
        if started is not None:
            results[started] = {
                "case": started,
                "outcome": "hung" if hung else "crashed",
                "returncode": proc.returncode,
                "stderr": stderr[-300:],
            }
        todo = [c for c in todo if c not in results]
    return results


def test_bad_inputs_raise_clear_errors_and_never_crash():
    results = _run_isolated(list(BAD) + list(BAD_QUANTIZED))
    wrong = {name: r for name, r in results.items() if r["outcome"] not in ("ValueError", "RuntimeError")}
    assert not wrong, "\n".join(f"{name}: {r}" for name, r in wrong.items())
    for r in results.values():  # one line, says what is wrong
        assert len(r["message"]) > 15 and "\n" not in r["message"]


def test_checks_name_the_problem():
    results = _run_isolated(
        [
            "receiver >= n_atoms",
            "batch >= n_graphs",
            "n_graphs = 0",
            "species >= n_species",
            "shifts short",
            "value weight short",
            "layout version 1",
            "unknown weight name",
            "a layer's weight missing",
            "position NaN",
        ]
    )
    assert "must be finite" in results["position NaN"]["message"]
    assert "receivers" in results["receiver >= n_atoms"]["message"]
    assert "batch" in results["batch >= n_graphs"]["message"]
    assert "n_graphs" in results["n_graphs = 0"]["message"]
    assert "species" in results["species >= n_species"]["message"]
    assert "shifts" in results["shifts short"]["message"]
    assert "layers.0.value.weight" in results["value weight short"]["message"]
    assert "layout version 1 is not supported" in results["layout version 1"]["message"]
    assert "unknown name 'layers.0.qk.bias'" in results["unknown weight name"]["message"]
    assert "'layers.1.qk.weight' is missing" in results["a layer's weight missing"]["message"]


def test_valid_inputs_still_run_bit_identically(ethanol_frames):
    """Valid variants the checks must let through: int32 indices, non-contiguous views, no edges, one
    graph, an empty graph at the end. The fused op is compared with itself (bits) and the reference."""
    from gaq_calc.kernels import load_extension

    load_extension()
    a = _valid_inputs()
    e0, f0 = _call(a)
    assert torch.isfinite(e0).all() and f0.abs().max() > 0
    b = dict(
        a,
        receivers=a["receivers"].int(),
        senders=a["senders"].int(),
        species=a["species"].int(),
        batch=a["batch"].int(),
    )
    e1, f1 = _call(b)
    assert torch.equal(e0, e1) and torch.equal(f0, f1)
    c = dict(a, positions=a["positions"].t().contiguous().t(), shifts=a["shifts"].t().contiguous().t())
    assert not c["positions"].is_contiguous()
    e2, f2 = _call(c)
    assert torch.equal(e0, e2) and torch.equal(f0, f2)
    # one more, empty graph: its energy is zero and nothing else changes
    e3, f3 = _call(dict(a, n_graphs=3))
    assert torch.equal(e3[:2], e0) and e3[2].item() == 0 and torch.equal(f3, f0)
    # no edges at all: atoms on their own
    none = torch.zeros(0, dtype=torch.long)
    e4, f4 = _call(dict(a, receivers=none, senders=none, shifts=torch.zeros(0, 3)))
    assert torch.isfinite(e4).all() and torch.equal(f4, torch.zeros_like(f4))
    # quantized mode, valid
    q = _valid_inputs(quantized=True)
    eq, fq = _call(q)
    assert torch.isfinite(eq).all() and torch.isfinite(fq).all()


# ---- item 6: a killed first build must not hang later processes -----------------------------------------

LOAD = """
import json, sys, time, warnings
t0 = time.monotonic()
from gaq_calc import GAQCalculator
from gaq_calc.kernels import KernelUnavailable
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        calc = GAQCalculator(sys.argv[1], kernel=sys.argv[2])
        kernel, error = calc.kernel, None
    except KernelUnavailable as err:
        kernel, error = None, str(err)
print(json.dumps({"kernel": kernel, "error": error, "seconds": time.monotonic() - t0,
                  "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]}))
"""


@pytest.fixture
def extensions_dir(tmp_path, monkeypatch):
    """A private TORCH_EXTENSIONS_DIR holding a copy of this source's build (so that a test that gets to
    build runs ninja on up-to-date files instead of compiling), and its build folder."""
    import shutil

    from torch.utils import cpp_extension

    from gaq_calc.kernels.fused import build_spec, load_extension

    load_extension()  # the shared build exists
    name, _ = build_spec()
    shared = Path(cpp_extension._get_build_directory(name, False))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    build = Path(cpp_extension._get_build_directory(name, False))
    shutil.copytree(shared, build, dirs_exist_ok=True, ignore=shutil.ignore_patterns("lock", "*.lock"))
    return build


def _load_in_subprocess(model, kernel, wait_seconds, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GAQ_KERNEL_BUILD_WAIT": str(wait_seconds)}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", LOAD, str(model), kernel],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            cwd=str(ROOT),
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"loading the kernel hung for over {timeout} s") from None
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _hold_build_lock(build):
    """A process that takes the build lock the way a builder does and then sleeps (the test kills it)."""
    from gaq_calc.kernels.fused import BUILD_LOCK

    code = (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644); "
        "fcntl.flock(fd, fcntl.LOCK_EX); open(sys.argv[2], 'w').close(); print('held', flush=True); "
        "time.sleep(600)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(build / BUILD_LOCK), str(build / "lock")], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_build_in_progress_is_waited_for_a_bounded_time(extensions_dir, tiny_model_file):
    """Another live process is building: wait GAQ_KERNEL_BUILD_WAIT seconds, then the reference kernel
    with a RuntimeWarning ("auto") or KernelUnavailable ("fused"), instead of waiting forever."""
    holder = _hold_build_lock(extensions_dir)
    try:
        auto = _load_in_subprocess(tiny_model_file, "auto", wait_seconds=3, timeout=120)
        fused = _load_in_subprocess(tiny_model_file, "fused", wait_seconds=1, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert auto["kernel"] == "reference" and auto["seconds"] < 60
    assert any("building the fused kernel" in w and "reference kernel" in w for w in auto["warnings"]), auto
    assert fused["kernel"] is None and "building the fused kernel" in fused["error"]


def test_a_lock_left_by_a_killed_build_is_taken_over(extensions_dir, tiny_model_file):
    """The builder was killed (SIGKILL, no cleanup): its lock file stays, fresh, but its owner is dead.
    The next process notices at once, removes it with a warning and builds (here: finds it built)."""
    holder = _hold_build_lock(extensions_dir)
    holder.kill()
    holder.wait()
    assert (extensions_dir / "lock").exists()
    result = _load_in_subprocess(tiny_model_file, "auto", wait_seconds=3)
    assert result["kernel"] == "fused", result
    assert any("interrupted build" in w for w in result["warnings"]), result
    assert not (extensions_dir / "lock").exists()


def test_compilers_left_by_a_killed_build_are_not_raced(extensions_dir, tiny_model_file):
    """A killed build can leave its compiler running in the build folder: wait for it (bounded), and if
    it outlives the wait, run the reference kernel rather than build over it."""
    (extensions_dir / "lock").touch()
    leftover = subprocess.Popen(["sleep", "120"], cwd=str(extensions_dir))
    try:
        result = _load_in_subprocess(tiny_model_file, "auto", wait_seconds=3, timeout=120)
    finally:
        leftover.kill()
        leftover.wait()
    assert result["kernel"] == "reference", result
    assert any(str(leftover.pid) in w for w in result["warnings"]), result
    result = _load_in_subprocess(tiny_model_file, "auto", wait_seconds=3)  # the leftover is gone: build
    assert result["kernel"] == "fused", result
