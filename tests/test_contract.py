"""Contract tests (in the style of nequip's model tests): one parametrized suite over every inference
backend x mode. Each backend is loaded through gaq_calc.loading.load_energy_forces.

Backends: eager (autograd), torchscript (the scripted network: FP32 checkpoint, or a converted quantized
model), artifact (an exported file's own TorchScript), fused-float (the C++ kernel without rounding),
fused-int (the C++ kernel's integer path, quantized mode), shipped (models/azobenzene_w4a8.pt on the default
kernel). Modes: fp32 (a tiny FP32 model), conservative and quantized (a tiny W4A8 model with l=1 activations
rounded in the local frame). float64 wherever the backend allows it; artifacts are float32.

Contract:
- forces are -dE/dx (finite differences of the backend's own energy) where activations are not rounded; in
  quantized mode they are the straight-through gradient, i.e. the eager network's autograd forces;
- rotations: E(Rx) = E(x), F(Rx) = R F(x), exact in float64 (for quantized mode too: the frame method);
  float32 within its rounding (and, with rounded activations, the few rounding decisions that flip);
- translation and permutation invariance;
- a batch of structures gives each structure's energy and forces.
"""

import numpy as np
import pytest
import torch
from helpers import calibrated_qat, call, ethanol_batch, randomize, tiny_config
from scipy.spatial.transform import Rotation

from gaq_calc.data import GraphDataset, read_frames
from gaq_calc.loading import load_energy_forces
from gaq_calc.model.network import EnergyForces
from gaq_calc.quant import convert

CASES = [
    ("eager", "fp32"), ("eager", "conservative"), ("eager", "quantized"),
    ("torchscript", "fp32"), ("torchscript", "conservative"), ("torchscript", "quantized"),
    ("artifact", "fp32"), ("artifact", "conservative"), ("artifact", "quantized"),
    ("fused-float", "fp32"), ("fused-float", "conservative"),
    ("fused-int", "quantized"),
    ("shipped", "conservative"), ("shipped", "quantized"),
]  # fmt: skip
FRAMES = (1, 2, 7)  # structures of the batch test; the others use the first


class Backend:
    def __init__(self, energy_forces, dtype, molecule, reference=None):
        self.energy_forces, self.dtype, self.molecule = energy_forces, dtype, molecule
        self.reference = reference  # quantized mode: the eager network whose autograd forces are the contract
        self.exact = dtype == torch.float64

    def __call__(self, b):
        with torch.enable_grad():
            e, f = call(self.energy_forces, b)
        return e.detach().double(), f.detach().double()


@pytest.fixture(scope="module")
def files(tmp_path_factory, ethanol_frames):
    """Tiny FP32 and W4A8 (frame) model files with forces of order 0.1-1 eV/Å, and their artifacts."""
    from gaq_calc.data import fit_reference_energies
    from gaq_calc.export import export_artifact
    from gaq_calc.model import GAQPotential
    from gaq_calc.model.serialization import save_model

    root = tmp_path_factory.mktemp("contract")
    fp32 = randomize(GAQPotential(tiny_config(tau_init=2.0)), seed=3, scale=0.3).eval()
    fp32.set_energy_reference(fit_reference_energies(ethanol_frames, [1, 6, 8]), 0.7)
    save_model(root / "fp32" / "model.pt", fp32, {"train_data": "ethanol"})
    qat = calibrated_qat(ethanol_frames, "w4a8_frame", calibration=(0, 3, 4, 5, 6))
    save_model(root / "w4a8" / "model.pt", qat, {"train_data": "ethanol"})
    out = {"fp32": root / "fp32" / "model.pt", "quantized": root / "w4a8" / "model.pt"}
    for name, path in list(out.items()):
        out[name + ".pt"] = root / f"{name}.pt"
        export_artifact(path, out[name + ".pt"])
    return out


_cache = {}


@pytest.fixture
def backend(request, files):
    name, mode = request.param
    key = (name, mode)
    if key not in _cache:
        _cache[key] = _build(name, mode, files)
    return _cache[key]


def _build(name: str, mode: str, files) -> Backend:
    model_mode = None if mode == "fp32" else mode
    file = files["fp32" if mode == "fp32" else "quantized"]
    f64 = torch.float64
    reference = None
    if mode == "quantized":  # the straight-through forces of the eager network are the contract
        dtype = torch.float32 if name in ("artifact", "shipped") else f64
        source = "azobenzene_w4a8" if name == "shipped" else file
        reference = load_energy_forces(source, dtype, mode=mode, kernel="eager").energy_forces
    if name == "eager":
        return Backend(load_energy_forces(file, f64, mode=model_mode, kernel="eager").energy_forces, f64, "ethanol",
                       reference)  # fmt: skip
    if name == "torchscript":
        if mode == "fp32":
            loaded = load_energy_forces(file, f64, kernel="reference", jit=True)
            assert isinstance(loaded.energy_forces, torch.jit.ScriptModule)
            return Backend(loaded.energy_forces, f64, "ethanol")
        network = convert(load_energy_forces(file, f64, mode=model_mode, kernel="eager").potential)
        return Backend(torch.jit.script(EnergyForces(network)), f64, "ethanol", reference)
    if name == "artifact":
        loaded = load_energy_forces(files[("fp32" if mode == "fp32" else "quantized") + ".pt"], "float32",
                                    mode=model_mode, kernel="reference")  # fmt: skip
        assert isinstance(loaded.energy_forces, torch.jit.ScriptModule)
        return Backend(loaded.energy_forces, torch.float32, "ethanol", reference)
    if name == "fused-float":
        loaded = load_energy_forces(file, f64, mode=model_mode, kernel="fused")
        assert not loaded.energy_forces.rounds_activations
        return Backend(loaded.energy_forces, f64, "ethanol")
    if name == "fused-int":  # a converted model in memory, in float64
        network = convert(load_energy_forces(file, f64, kernel="eager").potential)
        loaded = load_energy_forces(network, f64, mode=mode, kernel="fused")
        assert loaded.energy_forces.rounds_activations
        return Backend(loaded.energy_forces, f64, "ethanol", reference)
    loaded = load_energy_forces("azobenzene_w4a8.pt", "float32", mode=mode)  # shipped, default kernel
    assert loaded.kernel == "fused"
    return Backend(loaded.energy_forces, torch.float32, "azobenzene", reference)


def _batch(backend, ks, positions=None):
    if backend.molecule == "ethanol":
        return ethanol_batch(_ethanol(), ks, backend.dtype, positions)
    frames = read_frames("azobenzene", "test").subset(list(ks))
    if positions is not None:
        frames.positions = [np.asarray(p) for p in positions]
    return GraphDataset(frames, [1, 6, 7], 5.0).collate(list(range(len(ks)))).to("cpu", backend.dtype)


_frames = {}


def _ethanol():
    if "ethanol" not in _frames:
        _frames["ethanol"] = read_frames("ethanol", "train").subset(np.arange(0, 1000, 50))
    return _frames["ethanol"]


def _positions(backend, k=0) -> np.ndarray:
    frames = _ethanol() if backend.molecule == "ethanol" else read_frames("azobenzene", "test")
    return np.asarray(frames.positions[k], dtype=np.float64)


def _tolerance(backend, mode, what):
    """(energy eV, force eV/Å) tolerances: float64 is exact to summation order; float32 has its rounding,
    and with rounded activations a last-bit difference may flip a rounding decision."""
    if backend.exact:
        return 1e-9, 1e-9
    if mode == "quantized":
        return {"symmetry": (2e-4, 2e-3), "batch": (2e-4, 2e-3)}[what]
    return 1e-4, 1e-4


parametrize = pytest.mark.parametrize("backend", CASES, indirect=True, ids=[f"{b}-{m}" for b, m in CASES])


@parametrize
def test_forces_are_the_energy_gradient(backend, request):
    mode = request.node.callspec.params["backend"][1]
    b = _batch(backend, [0])
    e, f = backend(b)
    assert e.shape == (1,) and f.shape == b.positions.shape and f.abs().max() > 1e-3
    if backend.reference is not None:  # quantized: the straight-through gradient of the eager network
        _, f_ref = call(backend.reference, b)
        atol = 1e-9 if backend.exact else 1e-4
        torch.testing.assert_close(f, f_ref.detach().double(), rtol=0, atol=atol)
        return
    # float32: energy rounding / eps, and the curvature of stiff bonds (eps^2 f'''), relative to |F|
    eps, atol, rtol = (1e-4, 1e-7, 0.0) if backend.exact else (1e-2, 2e-4, 5e-3)
    for atom, axis in ((0, 0), (3, 1), (7, 2)):
        shifted = []
        for sign in (1, -1):
            x = b.positions.clone()
            x[atom, axis] += sign * eps
            shifted.append(backend(_replace(b, positions=x))[0].item())
        numeric = -(shifted[0] - shifted[1]) / (2 * eps)
        expect = f[atom, axis].item()
        assert abs(numeric - expect) < atol + rtol * abs(expect), (mode, atom, axis, numeric, expect)


@parametrize
def test_rotation_equivariance(backend, request):
    mode = request.node.callspec.params["backend"][1]
    x = _positions(backend)
    e0, f0 = backend(_batch(backend, [0]))
    te, tf = _tolerance(backend, mode, "symmetry")
    for seed in range(3):
        R = Rotation.random(random_state=seed).as_matrix()
        e1, f1 = backend(_batch(backend, [0], [x @ R.T]))
        assert abs(e1.item() - e0.item()) < te
        torch.testing.assert_close(f1, f0 @ torch.from_numpy(R).T, rtol=0, atol=tf)


@parametrize
def test_translation_invariance(backend, request):
    mode = request.node.callspec.params["backend"][1]
    x = _positions(backend)
    e0, f0 = backend(_batch(backend, [0]))
    e1, f1 = backend(_batch(backend, [0], [x + np.array([0.3, -1.0, 2.0])]))
    te, tf = _tolerance(backend, mode, "symmetry")
    assert abs(e1.item() - e0.item()) < te
    torch.testing.assert_close(f1, f0, rtol=0, atol=tf)


@parametrize
def test_permutation_invariance(backend, request):
    mode = request.node.callspec.params["backend"][1]
    b = _batch(backend, [0])
    e0, f0 = backend(b)
    n = len(b.species)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(n))  # new atom i is old atom perm[i]
    new_index = torch.empty_like(perm)
    new_index[perm] = torch.arange(n)
    edges = torch.from_numpy(np.random.default_rng(1).permutation(len(b.receivers)))
    permuted = _replace(b, species=b.species[perm], positions=b.positions[perm],
                        receivers=new_index[b.receivers][edges], senders=new_index[b.senders][edges],
                        shifts=b.shifts[edges])  # fmt: skip
    e1, f1 = backend(permuted)
    te, tf = _tolerance(backend, mode, "symmetry")
    assert abs(e1.item() - e0.item()) < te
    torch.testing.assert_close(f1, f0[perm], rtol=0, atol=tf)


@parametrize
def test_a_batch_equals_its_structures(backend, request):
    mode = request.node.callspec.params["backend"][1]
    batch = _batch(backend, FRAMES)
    e, f = backend(batch)
    assert e.shape == (len(FRAMES),) and e.dtype == torch.float64
    te, tf = _tolerance(backend, mode, "batch")
    start = 0
    for i, k in enumerate(FRAMES):
        e1, f1 = backend(_batch(backend, [k]))
        assert abs(e[i].item() - e1.item()) < te
        torch.testing.assert_close(f[start : start + len(f1)], f1, rtol=0, atol=tf)
        start += len(f1)


def _replace(b, **changes):
    from dataclasses import replace

    return replace(b, **changes)
