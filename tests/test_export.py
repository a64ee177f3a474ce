"""The deployable artifact: packed weights, TorchScript, metadata, modes; equal to the QAT model."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import calibrated_qat, ethanol_batch

from gaq_calc.export import export_artifact, is_artifact, load_artifact, pack_int4, unpack_int4
from gaq_calc.model import energy_and_forces
from gaq_calc.model.serialization import ModelFileError, save_model
from gaq_calc.quant import convert, preset, set_mode


@pytest.mark.parametrize("n", [1, 6, 7, 64])
def test_int4_pack_round_trip(n):
    codes = torch.randint(-8, 8, (5, n), dtype=torch.int8, generator=torch.Generator().manual_seed(n))
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (n + 1) // 2)
    assert torch.equal(unpack_int4(packed, n), codes)
    with pytest.raises(ValueError):
        pack_int4(torch.full((1, 2), 9, dtype=torch.int8))


def _qat_file(tmp_path, frames, name):
    q = calibrated_qat(frames, name)
    path = tmp_path / name / "model.pt"
    save_model(path, q, {"train_data": "ethanol"})
    return q, path


@pytest.mark.parametrize("name", ["w4a8_frame", "w8a8_frame", "w4a8", "naive_int8"])
def test_exported_artifact_equals_the_converted_qat_model(tmp_path, ethanol_frames, name):
    q, path = _qat_file(tmp_path, ethanol_frames, name)
    ints = convert(q)
    out = tmp_path / f"{name}.pt"
    meta = export_artifact(path, out)
    assert is_artifact(out) and not is_artifact(path)
    module, loaded = load_artifact(out)
    assert loaded == meta and loaded["quantization"]["vector_method"] == preset(name).vector_method
    assert loaded["species"] == [1, 6, 8] and loaded["cutoff"] == 5.0 and loaded["dtype"] == "float32"
    for k in (1, 2, 7):
        b = ethanol_batch(ethanol_frames, [k], torch.float32)
        e_a, f_a = module(b.species, b.positions, b.receivers, b.senders, b.shifts, b.batch, 1)
        e_i, f_i = energy_and_forces(ints, b)
        assert e_a.item() == e_i.item()  # the same function, bit for bit
        torch.testing.assert_close(f_a, f_i.detach(), rtol=0, atol=1e-6)
    # weights really are stored packed: 4-bit layers two codes per byte
    packed = {n: m for n, m in module.named_buffers() if n.endswith("packed")}
    vec = packed["potential.layers.0.vector_mix.packed"]
    expect = torch.uint8 if preset(name).vector_weight_bits == 4 else torch.int8
    assert vec.dtype == expect
    # the file holds no float copy of quantized weights (load_artifact fills the dequantized cache)
    fresh = torch.jit.load(str(out))
    caches = [b for n, b in fresh.named_buffers() if n.endswith("vector_mix.weight") or n.endswith("qk_proj.weight")]
    assert caches and all(b.numel() == 0 for b in caches)


def test_conservative_mode_forces_are_exact_gradients(tmp_path, ethanol_frames):
    from ase import Atoms
    from ase.calculators.fd import calculate_numerical_forces

    from gaq_calc import GAQCalculator

    _, path = _qat_file(tmp_path, ethanol_frames, "w4a8_frame")
    out = tmp_path / "w4a8.pt"
    export_artifact(path, out)
    atoms = Atoms(numbers=ethanol_frames.numbers[2], positions=ethanol_frames.positions[2])
    atoms.calc = GAQCalculator(str(out))  # default mode: conservative
    f_numeric = calculate_numerical_forces(atoms, eps=1e-3, iatoms=[0, 2])
    np.testing.assert_allclose(atoms.get_forces()[[0, 2]], f_numeric, atol=2e-3)  # float32 differences
    # the checkpoint in float64 with the same mode: exact to finite-difference precision
    atoms.calc = GAQCalculator(str(path), dtype="float64")
    f_numeric = calculate_numerical_forces(atoms, eps=1e-4, iatoms=[0, 2])
    np.testing.assert_allclose(atoms.get_forces()[[0, 2]], f_numeric, atol=1e-6)
    # the two modes differ: rounding really is off in conservative mode
    e_cons = GAQCalculator(str(out)).get_potential_energy(atoms)
    e_quant = GAQCalculator(str(out), mode="quantized").get_potential_energy(atoms)
    assert e_cons != e_quant
    e_ckpt = GAQCalculator(str(path), mode="quantized").get_potential_energy(atoms)
    assert abs(e_quant - e_ckpt) < 1e-5


def test_artifact_loads_in_a_fresh_process_without_gaq_calc(tmp_path, ethanol_frames):
    _, path = _qat_file(tmp_path, ethanol_frames, "w4a8_frame")
    out = tmp_path / "w4a8.pt"
    export_artifact(path, out)
    b = ethanol_batch(ethanol_frames, [1], torch.float32)
    np.savez(
        tmp_path / "g.npz",
        **{k: getattr(b, k).numpy() for k in ("species", "positions", "receivers", "senders", "shifts", "batch")},
    )
    ref, _ = load_artifact(out)[0](b.species, b.positions, b.receivers, b.senders, b.shifts, b.batch, 1)
    script = (
        "import json, sys, numpy as np, torch\n"
        f"extra = {{'gaq_metadata.json': ''}}\n"
        f"m = torch.jit.load({str(out)!r}, _extra_files=extra)\n"
        f"g = np.load({str(tmp_path / 'g.npz')!r})\n"
        "args = [torch.from_numpy(g[k]) for k in ('species', 'positions', 'receivers', 'senders', 'shifts', 'batch')]\n"
        "e, f = m(*args, 1)\n"
        "assert not [k for k in sys.modules if k.startswith('gaq_calc')]\n"
        "print(json.dumps({'energy': e.item(), 'cutoff': json.loads(extra['gaq_metadata.json'])['cutoff']}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out_json = json.loads(result.stdout.strip().splitlines()[-1])
    assert out_json["energy"] == ref.item() and out_json["cutoff"] == 5.0


def test_fp32_export_and_bad_files(tmp_path, tiny_model_file, ethanol_frames):
    from gaq_calc import GAQCalculator

    out = tmp_path / "fp32.pt"
    meta = export_artifact(tiny_model_file, out)
    assert meta["quantization"] is None and meta["modes"] == ["fp32"]
    from ase import Atoms

    atoms = Atoms(numbers=ethanol_frames.numbers[0], positions=ethanol_frames.positions[0])
    e_art = GAQCalculator(str(out)).get_potential_energy(atoms)
    e_ckpt = GAQCalculator(str(tiny_model_file)).get_potential_energy(atoms)
    assert abs(e_art - e_ckpt) < 1e-5
    with pytest.raises(ValueError, match="float32 artifact"):
        GAQCalculator(str(out), dtype="float64")
    foreign = tmp_path / "foreign.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(foreign))
    with pytest.raises(ModelFileError, match="not a gaq_calc artifact"):
        load_artifact(foreign)
    module, _ = load_artifact(out)
    with pytest.raises(ValueError, match="mode"):
        set_mode(module, "fast")


def test_format_1_artifacts_load_and_rewrite_to_the_same_numbers(tmp_path):
    """The shipped artifacts were written in format 1 (before issue 14: activation-quantizer tensors on the
    layer, a live copy of one mode's reference energies). They load as data and as their own TorchScript,
    both modes switch, and gaq-resave rewrites them in the current format with the same numbers."""
    from gaq_calc.data import GraphDataset, read_frames
    from gaq_calc.export import artifact_metadata, rewrite_artifact
    from gaq_calc.export.artifact import ARTIFACT_VERSION
    from gaq_calc.models_dir import models_dir
    from gaq_calc.quant import MODES

    source = models_dir() / "azobenzene_w4a8.pt"
    assert artifact_metadata(source)["format_version"] == 1
    out = tmp_path / "w4a8.pt"
    rewrite_artifact(source, out, {"command": "test"})
    assert artifact_metadata(out)["format_version"] == ARTIFACT_VERSION
    frames = read_frames("azobenzene", "test").subset([3])
    b = GraphDataset(frames, [1, 6, 7], 5.0).collate([0]).to("cpu", torch.float32)
    args = (b.species, b.positions, b.receivers, b.senders, b.shifts, b.batch, 1)
    energies = {}
    for mode in MODES:
        results = {}
        for path, scripted in ((source, False), (source, True), (out, False), (out, True)):
            module, _ = load_artifact(path, scripted=scripted)
            set_mode(module, mode)
            results[path.name, scripted] = module(*args)
        (e1, f1), (e2, f2) = results[source.name, False], results[out.name, False]
        assert torch.equal(e1, e2) and torch.equal(f1, f2)  # the same eager network
        for e, f in (results[source.name, True], results[out.name, True]):  # the files' own TorchScript
            assert torch.equal(e, e1)
            torch.testing.assert_close(f, f1, rtol=0, atol=1e-5)
        energies[mode] = e1.item()
    assert energies["quantized"] != energies["conservative"]
