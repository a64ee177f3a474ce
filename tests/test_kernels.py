"""The fused CPU kernel against the reference path (autograd through the network)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import calibrated_qat, call, ethanol_batch, randomize, tiny_config
from scipy.spatial.transform import Rotation

from gaq_calc.export import export_artifact, load_artifact
from gaq_calc.kernels import FusedEnergyForces, KernelUnavailable
from gaq_calc.model import GAQPotential, energy_and_forces
from gaq_calc.model.network import EnergyForces
from gaq_calc.model.serialization import save_model
from gaq_calc.quant import set_mode


@pytest.mark.parametrize("radial_hidden", [8, 0])
def test_fused_equals_autograd_in_float64(ethanol_frames, radial_hidden):
    torch.manual_seed(0)  # the network's initial weights: the force scale checked below must not hang on test order
    model = randomize(GAQPotential(tiny_config(radial_hidden=radial_hidden)), seed=3, scale=0.3).double().eval()
    model.set_energy_reference([-13.6, -1029.8, -2041.2], 0.7)
    b = ethanol_batch(ethanol_frames, [0, 5, 9])  # three molecules in one graph: per-graph energies
    e_ref, f_ref = call(EnergyForces(model), b)
    e_fused, f_fused = call(FusedEnergyForces(model, torch.float64), b)
    assert e_fused.dtype == torch.float64 and e_fused.shape == (3,)
    torch.testing.assert_close(e_fused, e_ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(f_fused, f_ref, rtol=0, atol=1e-11)
    assert f_ref.abs().max() > 1e-3  # the comparison is not between zeros


def test_fused_float32_matches_and_is_equivariant(ethanol_frames):
    model = randomize(GAQPotential(tiny_config()), seed=4, scale=0.3).eval()
    b64 = ethanol_batch(ethanol_frames, [2])
    e_ref, f_ref = call(EnergyForces(model.double()), b64)
    fused32 = FusedEnergyForces(model.float(), torch.float32)
    e32, f32 = call(fused32, b64)
    assert f32.dtype == torch.float32
    assert abs(e32.item() - e_ref.item()) < 1e-4
    torch.testing.assert_close(f32.double(), f_ref, rtol=0, atol=1e-4)
    # exact equivariance in float64: rotate and translate the molecule
    fused64 = FusedEnergyForces(model.double(), torch.float64)
    R = torch.from_numpy(Rotation.random(random_state=7).as_matrix())
    rotated = ethanol_batch(ethanol_frames, [2])
    rotated.positions = b64.positions @ R.T + torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    e0, f0 = call(fused64, b64)
    e1, f1 = call(fused64, rotated)
    assert abs(e1.item() - e0.item()) < 1e-10
    torch.testing.assert_close(f1, f0 @ R.T, rtol=0, atol=1e-11)


def test_fused_forces_are_finite_differences_of_its_energy(ethanol_frames):
    model = randomize(GAQPotential(tiny_config()), seed=6, scale=0.3).double().eval()
    fused = FusedEnergyForces(model, torch.float64)
    b = ethanol_batch(ethanol_frames, [4])
    _, forces = call(fused, b)
    eps = 1e-5
    for atom, axis in [(0, 0), (3, 1), (7, 2)]:
        plus, minus = ethanol_batch(ethanol_frames, [4]), ethanol_batch(ethanol_frames, [4])
        plus.positions[atom, axis] += eps
        minus.positions[atom, axis] -= eps
        numeric = -(call(fused, plus)[0] - call(fused, minus)[0]).item() / (2 * eps)
        assert abs(numeric - forces[atom, axis].item()) < 1e-7


def test_fused_runs_quantized_models_in_both_modes(tmp_path, ethanol_frames):
    q = calibrated_qat(ethanol_frames, "w4a8_frame", calibration=(0, 3, 4))
    b = ethanol_batch(ethanol_frames, [6], torch.float32)
    with pytest.raises(KernelUnavailable, match="quantized mode"):
        FusedEnergyForces(q)  # an eager QAT model with rounded activations: its artifact or the reference
    set_mode(q, "conservative")
    e_ref, f_ref = energy_and_forces(q, b)
    e_fused, f_fused = call(FusedEnergyForces(q), b)
    assert abs(e_fused.item() - e_ref.item()) < 1e-4
    torch.testing.assert_close(f_fused, f_ref.detach(), rtol=0, atol=2e-5)
    # the exported artifact: packed weights, dequantized once
    path = tmp_path / "q" / "model.pt"
    save_model(path, q, {"train_data": "ethanol"})
    export_artifact(path, tmp_path / "q.pt")
    module, _ = load_artifact(tmp_path / "q.pt")
    set_mode(module, "conservative")
    e_art, f_art = call(module, b)
    fused = FusedEnergyForces(module.potential)
    assert not fused.rounds_activations
    e_fa, f_fa = call(fused, b)
    assert abs(e_fa.item() - e_art.item()) < 1e-4
    torch.testing.assert_close(f_fa, f_art, rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", ["w4a8_frame", "naive_int8"])
def test_integer_kernel_matches_the_fake_quantized_artifact(tmp_path, ethanol_frames, name):
    """Quantized mode: int8 activation codes x weight codes with int32 accumulation against the
    reference path's float matmul of fake-quantized values. Accumulation order differs in the last
    bits, which can flip a rounding decision downstream now and then: most frames agree to float
    tolerance, and all agree to within a few activation steps."""
    q = calibrated_qat(ethanol_frames, name, calibration=(0, 3, 4))
    path = tmp_path / name / "model.pt"
    save_model(path, q, {"train_data": "ethanol"})
    export_artifact(path, tmp_path / f"{name}.pt")
    module, _ = load_artifact(tmp_path / f"{name}.pt")
    set_mode(module, "quantized")
    fused = FusedEnergyForces(module.potential, int_gemm="float")  # integer GEMMs through sgemm, exact
    int32 = FusedEnergyForces(module.potential, int_gemm="int32")  # int8 codes, int32 sums (VNNI or a loop)
    auto = FusedEnergyForces(module.potential)  # the calculator's choice
    portable = FusedEnergyForces(module.potential, int_gemm="int32-portable")  # int32 loop even with VNNI
    assert not portable.int8_simd
    assert fused.rounds_activations
    codes = [k for k in fused.weights if k.endswith(".codes")]
    assert codes and all(fused.weights[k].dtype == torch.float32 for k in codes)  # every GEMM in sgemm
    assert all(int32.weights[k].dtype == torch.int8 for k in codes)
    # -march=native: the SIMD loop exists exactly where the CPU has AVX512-VNNI; "auto" takes it there
    assert int32.int8_simd == (cpu_flags() >= {"avx512f", "avx512bw", "avx512_vnni"})
    assert auto.int_gemm == ("int32" if int32.int8_simd else "float") and not fused.int8_simd
    close, worst = 0, 0.0
    for k in range(10, 20):
        b = ethanol_batch(ethanol_frames, [k], torch.float32)
        e_ref, f_ref = call(module, b)
        e_int, f_int = call(fused, b)
        e_i32, f_i32 = call(int32, b)
        assert torch.equal(e_int, e_i32) and torch.equal(f_int, f_i32)  # the same integers, the same bits
        e_auto, f_auto = call(auto, b)
        assert torch.equal(e_int, e_auto) and torch.equal(f_int, f_auto)
        e_port, f_port = call(portable, b)
        assert torch.equal(e_int, e_port) and torch.equal(f_int, f_port)
        err = abs(e_int.item() - e_ref.item())
        close += err < 1e-4 and (f_int - f_ref).abs().max().item() < 1e-4
        worst = max(worst, err)
    assert close >= 7
    assert worst < 0.05
    set_mode(module, "conservative")
    assert not FusedEnergyForces(module.potential).rounds_activations
    with pytest.raises(ValueError, match="int_gemm"):
        FusedEnergyForces(module.potential, int_gemm="int4")


@pytest.mark.parametrize("bits", [6, 10])
def test_fused_kernel_rounds_at_other_bit_widths_as_the_reference(ethanol_frames, bits):
    """quant.api.round_at_bits on a converted model (the activation-step study of
    scripts/heating_vs_act_bits.py): codes of up to 8 bits keep the integer engines, wider ones run in
    floating-point units, exact; either way the fused kernel agrees with the reference path as at 8 bits."""
    from gaq_calc.quant import convert
    from gaq_calc.quant.api import round_at_bits

    model = convert(calibrated_qat(ethanol_frames, "w4a8_frame", calibration=(0, 3, 4)))
    set_mode(model, "quantized")
    rounding = [m.act_quantizer for m in model.modules() if hasattr(m, "packed") and m.act_quantizer.kind != 0]
    assert rounding
    for q in rounding:
        round_at_bits(q, bits)
    fused = FusedEnergyForces(model)
    codes = [k for k in fused.weights if k.endswith(".codes")]
    assert codes and all(float(fused.weights[k[: -len(".codes")] + ".act"][2]) == 2 ** (bits - 1) - 1 for k in codes)
    if bits > 8:  # not int8: every GEMM in floating-point units, whatever engine was asked for
        assert all(fused.weights[k].dtype == torch.float32 for k in codes)
    close, worst = 0, 0.0
    for k in range(10, 20):
        b = ethanol_batch(ethanol_frames, [k], torch.float32)
        e_ref, f_ref = energy_and_forces(model, b)
        e, f = call(fused, b)
        err = abs(e.item() - e_ref.item())
        close += err < 1e-4 and (f - f_ref).abs().max().item() < 1e-4
        worst = max(worst, err)
    assert close >= 7 and worst < 0.05
    for q in rounding:  # 16 bits: sums of float32 products no longer exact, a clear refusal
        round_at_bits(q, 16)
    with pytest.raises(KernelUnavailable, match="not exact in torch.float32: use the reference kernel"):
        FusedEnergyForces(model)
    assert FusedEnergyForces(model, dtype=torch.float64).rounds_activations  # exact below 2^53


def cpu_flags() -> set:
    """This CPU's feature flags as Linux names them (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


def test_mddq_rounding_stays_on_the_reference_kernel(tmp_path, ethanol_frames):
    from gaq_calc import GAQCalculator

    q = calibrated_qat(ethanol_frames, "w4a8", calibration=(0, 3, 4))  # MDDQ vectors
    path = tmp_path / "mddq" / "model.pt"
    save_model(path, q, {"train_data": "ethanol"})
    export_artifact(path, tmp_path / "mddq.pt")
    module, _ = load_artifact(tmp_path / "mddq.pt")
    set_mode(module, "quantized")
    with pytest.raises(KernelUnavailable, match="MDDQ"):
        FusedEnergyForces(module.potential)
    assert GAQCalculator(str(tmp_path / "mddq.pt"), mode="quantized").kernel == "reference"
    assert GAQCalculator(str(tmp_path / "mddq.pt"), mode="conservative").kernel == "fused"


def test_calculator_kernels_agree(tiny_model_file, ethanol_frames):
    from ase import Atoms

    from gaq_calc import GAQCalculator

    atoms = Atoms(numbers=ethanol_frames.numbers[1], positions=ethanol_frames.positions[1])
    fused = GAQCalculator(str(tiny_model_file), kernel="fused", dtype="float64")
    ref = GAQCalculator(str(tiny_model_file), kernel="reference", dtype="float64")
    assert fused.kernel == "fused" and ref.kernel == "reference"
    assert GAQCalculator(str(tiny_model_file)).kernel == "fused"  # auto picks it on CPU
    assert abs(fused.get_potential_energy(atoms) - ref.get_potential_energy(atoms)) < 1e-9
    np.testing.assert_allclose(fused.get_forces(atoms), ref.get_forces(atoms), rtol=0, atol=1e-11)
    with pytest.raises(ValueError, match="kernel must be"):
        GAQCalculator(str(tiny_model_file), kernel="cuda-int4")


def test_the_cpp_kernel_numbers_quantizer_kinds_as_quant_does():
    """fused.py passes quant.ActKind's values; the C++ source must give them the same meaning. (Until the
    C++ side names its constants, its messages spell the numbering out: "0 (none), 1 (linear), 2 (frame)".)"""
    import re

    from gaq_calc.kernels.fused import SOURCE
    from gaq_calc.quant.kinds import FUSED_KINDS, ActKind

    source = SOURCE.read_text()
    pairs = set(re.findall(r"\b(\d) \((none|linear|frame)\)", source))
    assert {name for _, name in pairs} == {"none", "linear", "frame"}, pairs
    assert {(int(number), name) for number, name in pairs} == {(int(k), k.name.lower()) for k in FUSED_KINDS}
    assert set(FUSED_KINDS) == {ActKind.NONE, ActKind.LINEAR, ActKind.FRAME}


@pytest.mark.parametrize("name, mode", [("fp32", None)])
def test_scripted_and_eager_artifacts_give_the_same_named_weights(name, mode):
    """gather_parameters finds modules by type and attribute, in the eager rebuild and in the file's
    TorchScript alike. (Quantized artifacts reach the kernel only through their eager rebuild,
    gaq_calc.loading.load_energy_forces; the shipped ones' format-1 TorchScript layers are not read.)"""
    from pathlib import Path

    from gaq_calc.kernels.fused import LAYOUT_VERSION, gather_parameters, load_extension

    load_extension()
    path = Path(__file__).resolve().parents[1] / "models" / f"azobenzene_{name}.pt"
    scripted, _ = load_artifact(path, scripted=True)
    eager, _ = load_artifact(path, scripted=False)
    if mode:
        set_mode(scripted, mode)
        set_mode(eager, mode)
    ws, cs = gather_parameters(scripted.potential)
    we, ce = gather_parameters(eager.potential)
    assert sorted(ws) == sorted(we) and cs == ce
    assert all(torch.equal(ws[k], we[k]) for k in ws)
    assert any(k.endswith(".act") for k in ws) == (mode == "quantized")
    assert torch.ops.gaq.layout_version() == LAYOUT_VERSION


def _edges(b, order):
    """b with its edges (receivers, senders, shifts) taken in `order` (a permutation or a subset)."""
    import copy

    out = copy.copy(b)
    out.receivers, out.senders, out.shifts = b.receivers[order], b.senders[order], b.shifts[order]
    return out


def test_fused_takes_edges_in_any_order_and_one_way_edges(ethanol_frames):
    # the kernel groups edges by receiver and sender and shares distance work between an edge and its
    # reverse: shuffled edges, and edges whose reverse is missing, must give the autograd numbers, also
    # when one Model sees these edge lists one after the other (its edge structure is rebuilt)
    model = randomize(GAQPotential(tiny_config()), seed=8, scale=0.3).double().eval()
    fused, ref = FusedEnergyForces(model, torch.float64), EnergyForces(model)
    b = ethanol_batch(ethanol_frames, [1, 6])
    rng = np.random.default_rng(0)
    shuffled = _edges(b, torch.from_numpy(rng.permutation(len(b.receivers))))
    one_way = _edges(b, torch.from_numpy(np.sort(rng.choice(len(b.receivers), len(b.receivers) - 7, replace=False))))
    for graph in (b, shuffled, one_way, b):
        e_ref, f_ref = call(ref, graph)
        e, f = call(fused, graph)
        torch.testing.assert_close(e, e_ref, rtol=0, atol=1e-9)
        torch.testing.assert_close(f, f_ref, rtol=0, atol=1e-11)


def test_fused_periodic_images_match_autograd(ethanol_frames):
    # in a small box an atom meets its own images and a pair has several edges with different shifts:
    # an edge's reverse is the one with the negated shift
    from gaq_calc.data.graphs import neighbour_graph

    model = randomize(GAQPotential(tiny_config()), seed=9, scale=0.3).double().eval()
    b = ethanol_batch(ethanol_frames, [3])
    cell, pbc = np.eye(3) * 4.5, np.array([True, True, False])
    r, s, shifts = neighbour_graph(b.positions.numpy(), 5.0, cell, pbc)
    b.receivers, b.senders = torch.from_numpy(r), torch.from_numpy(s)
    b.shifts = torch.from_numpy(shifts).double()
    assert (b.receivers == b.senders).any() and b.shifts.abs().max() > 0
    e_ref, f_ref = call(EnergyForces(model), b)
    e, f = call(FusedEnergyForces(model, torch.float64), b)
    torch.testing.assert_close(e, e_ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(f, f_ref, rtol=0, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_gives_the_same_bits_at_any_thread_count(ethanol_frames, dtype):
    # edge loops split over atoms and GEMMs over fixed row blocks: no atomics, sums in a fixed order
    model = randomize(GAQPotential(tiny_config()), seed=10, scale=0.3).to(dtype).eval()
    fused = FusedEnergyForces(model, dtype)
    b = ethanol_batch(ethanol_frames, list(range(12)), dtype)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3, 1):
            torch.set_num_threads(threads)
            results.append(call(fused, b))
    finally:
        torch.set_num_threads(before)
    for e, f in results[1:]:
        assert torch.equal(e, results[0][0]) and torch.equal(f, results[0][1])
