"""Model files as untrusted input (issue 18): loading runs no code from the file, every model file
carries a SHA-256 of its weights and metadata that is checked at load, and bad input gets a one-line
error (library: a clear exception; command lines: `prog: error: ...` and exit status 2)."""

import json
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import torch
from ase import Atoms
from helpers import calibrated_qat, ethanol_atoms, ethanol_batch
from torch import nn

from gaq_calc import GAQCalculator, ModelFileError
from gaq_calc.cli import evaluate
from gaq_calc.export import export_artifact, load_artifact
from gaq_calc.model.network import EnergyForces
from gaq_calc.model.serialization import read_model_file, save_model
from gaq_calc.models_dir import models_dir, resolve_model
from gaq_calc.quant import set_mode

# --- helpers -------------------------------------------------------------------------------------


class WritesOnDequantize(nn.Module):
    """A submodule whose TorchScript writes a file when its `dequantized_weight()` is called (which the
    old loader did for every submodule with a `round_activations` attribute, as format-1 PackedLinear had)."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.round_activations = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def dequantized_weight(self) -> torch.Tensor:
        return torch.from_file(self.marker, shared=True, size=8, dtype=torch.uint8)


class WritesOnSetstate(nn.Module):
    """A submodule whose scripted __setstate__ writes a file: torch.jit.load itself runs it."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.buf = torch.zeros(0, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return (self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        self.marker = state[0]
        self.training = state[1]
        self.buf = torch.from_file(state[0], shared=True, size=8, dtype=torch.uint8)


def _metadata(path) -> dict:
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("extra/gaq_metadata.json"))
        return json.loads(archive.read(name))


def _save_scripted(scripted, metadata: dict, out: Path) -> None:
    """Write a scripted module as an artifact with this metadata, with a valid integrity hash where the
    package stores one: a crafted file passes every integrity check, so only its code is under test."""
    from gaq_calc.export import artifact

    metadata = {k: v for k, v in metadata.items() if k != "sha256"}
    save = getattr(artifact, "save_artifact", None)
    if save is not None:
        save(scripted, metadata, out)
    else:  # the package before the fix had no hash
        torch.jit.save(scripted, str(out), _extra_files={"gaq_metadata.json": json.dumps(metadata)})


def _crafted_artifact(tmp_path, model_file, marker: Path, kind) -> Tuple[Path, Path]:
    """(legit artifact of model_file, the same network with a file-writing submodule added)."""
    from gaq_calc.loading import load_model
    from gaq_calc.quant import convert  # what gaq-export does to quantized layers

    legit = tmp_path / "legit.pt"
    export_artifact(model_file, legit)
    model, _ = load_model(model_file)
    model = (convert(model) if hasattr(model, "quant_config") else model).eval()
    model.extra = kind(str(marker))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(EnergyForces(model))
    crafted = tmp_path / "crafted.pt"
    _save_scripted(scripted, _metadata(legit), crafted)
    assert not marker.exists()
    return legit, crafted


def _small_data(tmp_path) -> Path:
    """Three labelled ethanol frames as extxyz (a quick --data for gaq-eval)."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    from gaq_calc.data import read_frames

    frames = read_frames("ethanol", "test")
    images = []
    for k in (0, 1, 2):
        atoms = Atoms(numbers=frames.numbers[k], positions=frames.positions[k])
        atoms.calc = SinglePointCalculator(atoms, energy=float(frames.energies[k]), forces=frames.forces[k])
        images.append(atoms)
    path = tmp_path / "three.extxyz"
    write(path, images)
    return path


def _flip_byte_in_place(path: Path, member_suffix: str) -> None:
    """Flip one byte in the middle of a zip member's stored data, in place (its CRC-32 then no longer
    matches; torch's reader does not look at it)."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(member_suffix))
        assert info.compress_type == zipfile.ZIP_STORED
    raw = bytearray(path.read_bytes())
    header = info.header_offset
    name_len = int.from_bytes(raw[header + 26 : header + 28], "little")
    extra_len = int.from_bytes(raw[header + 28 : header + 30], "little")
    offset = header + 30 + name_len + extra_len + info.file_size // 2
    raw[offset] ^= 0x01  # the lowest bit of one byte: a float changes in its mantissa
    path.write_bytes(bytes(raw))


def _rewrite_member(path: Path, out: Path, member_suffix: str, edit) -> None:
    """Copy an archive with one member's bytes edited (valid CRCs: only a content hash can tell)."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith(member_suffix):
                data = edit(data)
            dst.writestr(info, data)


def _largest_member(path: Path) -> str:
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    return "/" + info.filename.split("/", 1)[1]


def _one_line_error(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def qat_file(tmp_path, ethanol_frames):
    q = calibrated_qat(ethanol_frames, "w4a8_frame")
    path = tmp_path / "qat" / "model.pt"
    save_model(path, q, {"train_data": "ethanol"})
    return path


# --- 1. loading an artifact runs no code from the file ---------------------------------------------


@pytest.mark.parametrize("kind", [WritesOnDequantize, WritesOnSetstate])
def test_calculator_runs_no_code_of_a_crafted_artifact(tmp_path, qat_file, kind):
    marker = tmp_path / "marker"
    legit, crafted = _crafted_artifact(tmp_path, qat_file, marker, kind)
    try:
        calc = GAQCalculator(str(crafted))  # default kernel
    except ModelFileError:  # refusing the file is fine too; running its code is not
        calc = None
    assert not marker.exists(), "loading the artifact ran code from the file"
    if calc is not None:  # the network came from the file's tensors, not from its code
        atoms = ethanol_atoms(2)
        e_legit = GAQCalculator(str(legit)).get_potential_energy(atoms)
        assert calc.get_potential_energy(atoms) == e_legit
        assert not marker.exists()
    if kind is WritesOnSetstate:  # an object with its own state protocol is not a gaq_calc artifact
        assert calc is None


@pytest.mark.parametrize("kind", [WritesOnDequantize, WritesOnSetstate])
def test_gaq_eval_and_metadata_run_no_code_of_a_crafted_artifact(tmp_path, tiny_model_file, kind, capsys):
    marker = tmp_path / "marker"
    _, crafted = _crafted_artifact(tmp_path, tiny_model_file, marker, kind)
    args = [str(crafted), "--data", str(_small_data(tmp_path)), "--lee-frames", "0", "--card", str(tmp_path / "c.json")]
    try:
        evaluate.main(args)
    except SystemExit as exit_:
        assert exit_.code == 2
        _one_line_error(capsys, "gaq-eval")
    assert not marker.exists(), "gaq-eval ran code from the file"
    from gaq_calc.export import artifact_metadata

    assert artifact_metadata(crafted)["format"] == "gaq_calc.artifact"
    assert not marker.exists()


def test_default_load_is_eager_and_reference_load_is_checked(tmp_path, qat_file, ethanol_frames, monkeypatch):
    out = tmp_path / "q.pt"
    export_artifact(qat_file, out)
    eager, meta = load_artifact(out)
    assert not isinstance(eager, torch.jit.ScriptModule)  # rebuilt from data, nothing scripted
    scripted, meta2 = load_artifact(out, scripted=True)
    assert isinstance(scripted, torch.jit.ScriptModule) and meta2 == meta
    b = ethanol_batch(ethanol_frames, [3], torch.float32)
    for mode in ("quantized", "conservative"):
        set_mode(eager, mode)
        set_mode(scripted, mode)
        e1, f1 = eager(b.species, b.positions, b.receivers, b.senders, b.shifts, b.batch, 1)
        e2, f2 = scripted(b.species, b.positions, b.receivers, b.senders, b.shifts, b.batch, 1)
        assert torch.equal(e1, e2)  # the same function; TorchScript's autodiff differs in the last bits
        torch.testing.assert_close(f1, f2, rtol=0, atol=1e-5)
    # a scripted module whose tensors are not the verified payload (e.g. changed while loading) is refused
    real_load = torch.jit.load

    def tampering_load(*args, **kwargs):
        module = real_load(*args, **kwargs)
        with torch.no_grad():
            module.potential.embedding.weight.add_(1e-3)
        return module

    monkeypatch.setattr(torch.jit, "load", tampering_load)
    with pytest.raises(ModelFileError, match="differ"):
        load_artifact(out, scripted=True)


# --- 7. integrity of model files ------------------------------------------------------------------


def test_a_flipped_byte_in_a_model_file_is_refused(tmp_path, tiny_model_file):
    bad = tmp_path / "flipped.pt"
    shutil.copy(tiny_model_file, bad)
    _flip_byte_in_place(bad, _largest_member(bad))
    with pytest.raises(ModelFileError, match="integrity") as info:
        GAQCalculator(str(bad))
    assert "flipped.pt" in str(info.value) and "\n" not in str(info.value)


def test_edited_weights_or_metadata_of_a_model_file_are_refused(tmp_path, tiny_model_file):
    data = torch.load(tiny_model_file, weights_only=True)
    data["state_dict"]["reference_energies"][0] += 1e-4
    torch.save(data, tmp_path / "w.pt")
    data = torch.load(tiny_model_file, weights_only=True)
    data["metadata"]["train_data"] = "azobenzene"
    torch.save(data, tmp_path / "m.pt")
    for name in ("w.pt", "m.pt"):
        with pytest.raises(ModelFileError, match=f"{name}.*integrity"):
            read_model_file(tmp_path / name)


def test_a_flipped_byte_in_an_artifact_is_refused(tmp_path, qat_file):
    out = tmp_path / "q.pt"
    export_artifact(qat_file, out)
    in_place = tmp_path / "in_place.pt"
    shutil.copy(out, in_place)
    _flip_byte_in_place(in_place, _largest_member(in_place))
    rewritten = tmp_path / "rewritten.pt"  # the same edit with a valid CRC-32
    member = _largest_member(out)
    half = lambda d: len(d) // 2
    _rewrite_member(out, rewritten, member, lambda d: d[: half(d)] + bytes([d[half(d)] ^ 1]) + d[half(d) + 1 :])
    edited = tmp_path / "edited_metadata.pt"  # a metadata edit with a valid CRC-32
    _rewrite_member(out, edited, "extra/gaq_metadata.json", lambda d: d.replace(b'"cutoff": 5.0', b'"cutoff": 4.0'))
    for bad in (in_place, rewritten, edited):
        for load in (lambda p: load_artifact(p), lambda p: GAQCalculator(str(p))):
            with pytest.raises(ModelFileError, match="integrity") as info:
                load(bad)
            assert bad.name in str(info.value) and "\n" not in str(info.value)


def test_files_without_a_hash_load_with_a_warning(tmp_path, tiny_model_file, qat_file):
    from gaq_calc.model.serialization import UnverifiedModelWarning

    data = torch.load(tiny_model_file, weights_only=True)
    data.pop("sha256")
    old = tmp_path / "old.pt"
    torch.save(data, old)
    with pytest.warns(UnverifiedModelWarning, match="old.pt.*gaq-resave"):
        read_model_file(old)
    art = tmp_path / "q.pt"
    export_artifact(qat_file, art)
    old_art = tmp_path / "old_artifact.pt"
    _rewrite_member(
        art,
        old_art,
        "extra/gaq_metadata.json",
        lambda d: json.dumps({k: v for k, v in json.loads(d).items() if k != "sha256"}).encode(),
    )
    with pytest.warns(UnverifiedModelWarning, match="old_artifact.pt.*gaq-resave"):
        _module, meta = load_artifact(old_art)
    assert "sha256" not in meta


def test_gaq_resave_adds_a_hash_and_changes_no_number(tmp_path, tiny_model_file, qat_file, ethanol_frames):
    from gaq_calc.cli import resave
    from gaq_calc.model.serialization import UnverifiedModelWarning

    data = torch.load(tiny_model_file, weights_only=True)
    data.pop("sha256")
    old = tmp_path / "old.pt"
    torch.save(data, old)
    art = tmp_path / "q.pt"
    export_artifact(qat_file, art)
    old_art = tmp_path / "old_artifact.pt"
    _rewrite_member(
        art,
        old_art,
        "extra/gaq_metadata.json",
        lambda d: json.dumps({k: v for k, v in json.loads(d).items() if k != "sha256"}).encode(),
    )
    atoms = ethanol_atoms(4)
    with pytest.warns(UnverifiedModelWarning):
        files = ((old, "float64"), (old_art, "float32"))
        before = [GAQCalculator(str(p), dtype=dt).get_forces(atoms) for p, dt in files]
    resave.main([str(old), str(old_art)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedModelWarning)
        assert read_model_file(old)["metadata"] == data["metadata"]
        after = [GAQCalculator(str(p), dtype=dt).get_forces(atoms) for p, dt in files]
        module, meta = load_artifact(old_art)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    kept = {k: v for k, v in _metadata(art).items() if k != "sha256"}
    assert {k: v for k, v in meta.items() if k not in ("sha256", "rewritten")} == kept
    assert meta["rewritten"][-1]["command"].startswith("gaq-resave")
    # the rewritten artifact still loads without gaq_calc's loader (plain torch.jit.load)
    plain = torch.jit.load(str(old_art))
    b = ethanol_batch(ethanol_frames, [2], torch.float32)
    set_mode(module, "quantized")
    e_plain, _ = plain(b.species, b.positions, b.receivers, b.senders, b.shifts, b.batch, 1)
    assert torch.equal(e_plain, module(b.species, b.positions, b.receivers, b.senders, b.shifts, b.batch, 1)[0])


def test_trainer_best_pt_keeps_a_valid_hash_after_finalizing(tmp_path, tiny_model_file):
    from gaq_calc.train.loop import _finalize_best

    shutil.copy(tiny_model_file, tmp_path / "best.pt")
    _finalize_best(tmp_path, {"epochs_total": 3, "train_seconds_total": 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = read_model_file(tmp_path / "best.pt")
    assert data["metadata"]["epochs_total"] == 3 and "sha256" in data


def test_every_shipped_model_file_carries_a_verified_hash():
    from gaq_calc.export import artifact_metadata, is_artifact

    files = sorted(models_dir().glob("**/*.pt"))
    names = {str(p.relative_to(models_dir())) for p in files}
    assert {
        "azobenzene_fp32/model.pt",
        "azobenzene_fp32/snapshot_40min.pt",
        "azobenzene_w4a8.pt",
        "baselines/azobenzene_naive_int8.pt",
    } <= names
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unverified file warns: none may
        for path in files:
            if is_artifact(path):
                assert len(artifact_metadata(path)["sha256"]) == 64, path
            else:
                assert len(read_model_file(path)["sha256"]) == 64, path


# --- 9. clear errors from the calculator and the command lines ------------------------------------


def test_unknown_keyword_is_refused(tiny_model_file):
    with pytest.raises(TypeError, match="kernal.*kernel"):
        GAQCalculator(str(tiny_model_file), kernal="fused")
    calc = GAQCalculator(str(tiny_model_file), label="run1", directory=".")  # ASE's own arguments stay
    assert calc.label == "run1"


def test_quantized_mode_on_an_fp32_model_is_refused(tmp_path, tiny_model_file):
    art = tmp_path / "fp32.pt"
    export_artifact(tiny_model_file, art)
    for model in (tiny_model_file, art):
        with pytest.raises(ValueError, match="FP32 model"):
            GAQCalculator(str(model), mode="quantized")
        GAQCalculator(str(model), mode="conservative")  # the default: accepted, the same numbers


def test_gaq_eval_on_a_foreign_torchscript_file_is_a_one_line_error(tmp_path, capsys):
    foreign = tmp_path / "foreign.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(foreign))
    with pytest.raises(SystemExit) as exit_:
        evaluate.main([str(foreign)])
    assert exit_.value.code == 2
    assert "not a gaq_calc artifact" in _one_line_error(capsys, "gaq-eval")


def test_gaq_eval_accepts_a_training_run_folder(tmp_path, tiny_model_file, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_model_file, run / "best.pt")
    assert resolve_model(run) == run / "best.pt"
    shutil.copy(tiny_model_file, run / "model.pt")
    assert resolve_model(run) == run / "model.pt"  # a model folder's model.pt comes first
    (run / "model.pt").unlink()
    card = tmp_path / "card.json"
    evaluate.main([str(run), "--data", str(_small_data(tmp_path)), "--lee-frames", "0", "--card", str(card)])
    assert json.loads(card.read_text())["n_frames"] == 3


@pytest.mark.parametrize("cli", ["evaluate", "export", "quantize"])
def test_command_lines_turn_model_file_errors_into_one_line(tmp_path, capsys, cli):
    import importlib

    module = importlib.import_module(f"gaq_calc.cli.{cli}")
    argv = [str(tmp_path / "missing.pt")] + ([] if cli == "evaluate" else ["-o", str(tmp_path / "out.pt")])
    with pytest.raises(SystemExit) as exit_:
        module.main(argv)
    assert exit_.value.code == 2
    assert "no model file" in _one_line_error(capsys, "gaq-eval" if cli == "evaluate" else f"gaq-{cli}")


def test_gaq_eval_refuses_quantized_mode_for_an_fp32_model(tiny_model_file, capsys):
    with pytest.raises(SystemExit) as exit_:
        evaluate.main([str(tiny_model_file), "--mode", "quantized", "--lee-frames", "0"])
    assert exit_.value.code == 2
    assert "FP32" in _one_line_error(capsys, "gaq-eval")
