"""The deployable artifact: one TorchScript file (EnergyForces over a network whose quantized layers are
PackedLinear) plus a JSON metadata record stored inside it. It loads with torch.jit.load in a process
that never imports the training code.

gaq_calc itself reads an artifact as data: the zip archive's members are hashed and checked against
the SHA-256 in the metadata, the module's tensors are unpickled by a restricted reader that resolves no
class and calls no code of the file, and the network is rebuilt in eager PyTorch from the metadata's
model and quantization configs and those tensors (load_artifact's default). Only
load_artifact(..., scripted=True), the calculator's kernel="reference", runs the file's TorchScript;
its tensors are then checked against the verified ones."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pickle
import struct
import sys
import warnings
import zipfile
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from gaq_calc.io import atomic_path
from gaq_calc.model.network import EnergyForces
from gaq_calc.model.serialization import ModelFileError, UnverifiedModelWarning, unverified_warning, upgrade_state_dict
from gaq_calc.quant.modes import MODES
from gaq_calc.quant.modules import PackedLinear

ARTIFACT_FORMAT = "gaq_calc.artifact"
#: 2: quantized layers hold their activation quantizer as a submodule, and the network its reference
#: energies per mode without a live copy (issue 14). Format 1 files still load (upgrade_state_dict).
ARTIFACT_VERSION = 2
READABLE_VERSIONS = (1, 2)
METADATA_FILE = "gaq_metadata.json"
INTEGRITY_KEY = "sha256"
# archive members outside the integrity hash: the metadata record (which holds the hash) and the id
# torch draws anew at every save
UNHASHED_MEMBERS = (f"extra/{METADATA_FILE}", ".data/serialization_id")


def _script(model: nn.Module):
    with warnings.catch_warnings():  # torch 2.13 flags TorchScript as deprecated; it still runs
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(EnergyForces(model))


def export_artifact(model_path: str | Path, out: str | Path, extra: dict | None = None) -> dict:
    """Write the TorchScript artifact of a model file (FP32 or QAT/PTQ) to `out`; returns its metadata."""
    from gaq_calc.loading import load_model
    from gaq_calc.model.serialization import read_model_file
    from gaq_calc.quant import convert

    model_path = Path(model_path)
    if is_artifact(model_path):
        raise ModelFileError(
            f"{model_path} is an artifact already (gaq-export takes a model file; gaq-resave rewrites an artifact)"
        )
    raw = read_model_file(model_path)
    model, meta = load_model(model_path, dtype=torch.float32)
    if raw.get("quant_config"):
        model = convert(model)  # packed integer weights; the QAT activation quantizers, frozen
    scripted = _script(model.eval())
    metadata = {
        "format": ARTIFACT_FORMAT,
        "format_version": ARTIFACT_VERSION,
        "cutoff": float(model.cutoff),
        "species": [int(z) for z in model.atomic_numbers.tolist()],
        "dtype": "float32",
        "reference_energies_eV": [float(e) for e in model.reference_energies.tolist()],
        "conservative_reference_energies_eV": (
            [float(e) for e in model.conservative_reference_energies.tolist()]
            if hasattr(model, "conservative_reference_energies")
            else None
        ),
        "ptq": bool(meta.get("ptq")),
        "model_config": raw["model_config"],
        "quantization": raw.get("quant_config"),
        "quant_preset": meta.get("ptq_preset") or (meta.get("train_config") or {}).get("quant"),
        "modes": list(MODES) if raw.get("quant_config") else ["fp32"],
        "source_file": str(model_path),
        "source_sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
        "train_data": meta.get("train_data"),
        "torch": torch.__version__,
        **(extra or {}),
    }
    return save_artifact(scripted, metadata, out)


def save_artifact(scripted, metadata: dict, out: str | Path) -> dict:
    """Write a scripted EnergyForces with its metadata record and the SHA-256 of both (metadata "sha256");
    atomic. Returns the metadata as stored."""
    metadata = json.loads(json.dumps({k: v for k, v in metadata.items() if k != INTEGRITY_KEY}))
    with atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # the hash covers every archive member, so it is known once the archive is written: write it
        # once to learn it, then again with it (torch writes the same members both times; checked)
        torch.jit.save(scripted, str(tmp), _extra_files={METADATA_FILE: json.dumps(metadata)})
        digest = _artifact_digest(_read_members(tmp), metadata)
        stored = {**metadata, INTEGRITY_KEY: digest}
        torch.jit.save(scripted, str(tmp), _extra_files={METADATA_FILE: json.dumps(stored)})
        if _artifact_digest(_read_members(tmp), stored) != digest:
            raise RuntimeError("torch.jit.save wrote different archives for the same module; cannot stamp a hash")
    return stored


def rewrite_artifact(path: str | Path, out: str | Path, record: dict | None = None) -> dict:
    """Write an artifact again in the current format (with its integrity hash) from its own tensors and
    metadata, without its checkpoint and without running its code: every number and metadata entry stays
    (`record`, e.g. the command, is appended to metadata "rewritten"). Returns the stored metadata."""
    path = Path(path)
    file_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    with warnings.catch_warnings():  # rewriting an unverified file is how it gets its hash
        warnings.simplefilter("ignore", UnverifiedModelWarning)
        metadata, tensors, attrs = _read_artifact(path)
    potential = _rebuild(path, metadata, tensors, attrs)  # dequantized caches stay empty: codes only
    metadata = dict(metadata)
    metadata["format_version"] = ARTIFACT_VERSION  # written with the current layout
    metadata["rewritten"] = [
        *(metadata.get("rewritten") or []),
        {**(record or {}), "previous_file_sha256": file_sha256, "torch": torch.__version__},
    ]
    return save_artifact(_script(potential), metadata, out)


def is_artifact(path: str | Path) -> bool:
    """True for a TorchScript archive (torch.save files are zip archives too, without code/)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/", 1)[-1].startswith("code/") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


# --- reading an artifact as data ------------------------------------------------------------------


def _read_members(path: str | Path) -> dict:
    """{name inside the archive's root folder: bytes} of every member; the zip CRC-32s are checked."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            names = [info.filename for info in infos]
            if len({name.split("/", 1)[0] for name in names}) != 1 or any("/" not in name for name in names):
                raise ModelFileError(f"{path} is not a TorchScript archive (no single root folder)")
            if len(set(names)) != len(names):
                raise ModelFileError(f"{path} is not a TorchScript archive (a member name occurs twice)")
            if any(info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) for info in infos):
                raise ModelFileError(f"{path} is not a TorchScript archive (unsupported compression)")
            # torch stores tensors as they are and deflates only code: refuse a decompression bomb
            if sum(info.file_size for info in infos) > 64 * os.path.getsize(path) + 2**24:
                raise ModelFileError(f"{path} is not a TorchScript archive (members far larger than the file)")
            return {info.filename.split("/", 1)[1]: archive.read(info) for info in infos}
    except ModelFileError:
        raise
    except zipfile.BadZipFile as err:  # includes a member whose CRC-32 does not match its bytes
        raise ModelFileError(f"{path}: integrity check failed: corrupt archive ({_one_line(err)})") from err
    except Exception as err:  # unreadable file, truncated or malformed archive
        raise ModelFileError(
            f"{path} is not a readable gaq_calc artifact ({type(err).__name__}: {_one_line(err)})"
        ) from err


def _artifact_digest(members: dict, metadata: dict) -> str:
    """SHA-256 over every archive member (name and bytes; the module's code, its pickled state and its
    tensors) but the metadata record, and the metadata in canonical JSON without its own hash."""
    h = hashlib.sha256(b"gaq_calc.artifact content v1\0")
    for name in sorted(members):
        if name in UNHASHED_MEMBERS:
            continue
        encoded = name.encode()
        h.update(struct.pack("<Q", len(encoded)) + encoded + struct.pack("<Q", len(members[name])))
        h.update(members[name])
    record = {k: v for k, v in metadata.items() if k != INTEGRITY_KEY}
    h.update(json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode())
    return h.hexdigest()


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptClass:
    """Stands for a TorchScript class named in the pickle; its code is never looked up."""

    def __init__(self, name: str):
        self.name = name


class _ScriptObject:
    """A TorchScript object's attributes, as data."""

    def __init__(self, name: str):
        self.name = name
        self.state = None


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _identity(value):
    return value


def _rebuild_tensor(storage, offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """A tensor from a storage read out of the archive; bounds checked, a contiguous copy."""
    if not isinstance(storage, torch.Tensor) or not all(isinstance(x, int) for x in (offset, *size, *stride)):
        raise pickle.UnpicklingError("malformed tensor record")
    if len(size) != len(stride) or offset < 0 or any(x < 0 for x in (*size, *stride)):
        raise pickle.UnpicklingError("malformed tensor record")
    if 0 not in size and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.numel():
        raise pickle.UnpicklingError("tensor record reaches beyond its storage")
    if 0 in size:
        return torch.empty(size, dtype=storage.dtype)
    return torch.as_strided(storage, size, stride, offset).clone(memory_format=torch.contiguous_format)


class _DataOnlyUnpickler(pickle._Unpickler):
    """Reads a TorchScript module's data.pkl as plain data: TorchScript classes become _ScriptObjects
    (their code, including any __setstate__, is never run), tensors are rebuilt from the archive's
    storages, and no other global resolves. Only the opcodes TorchScript's pickler writes are accepted."""

    ALLOWED: ClassVar[dict] = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("collections", "OrderedDict"): collections.OrderedDict,
        **{
            ("torch.jit._pickle", name): _identity
            for name in (
                "build_intlist",
                "build_doublelist",
                "build_boollist",
                "build_tensorlist",
                "build_stringlist",
                "restore_type_tag",
            )
        },
    }
    CALLABLE = (_rebuild_tensor, collections.OrderedDict, _identity)

    def __init__(self, data: bytes, members: dict):
        import io

        super().__init__(io.BytesIO(data))
        self.members = members
        self.storages = {}

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptClass(f"{module}.{name}")
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refused global {module}.{name}")

    def persistent_load(self, pid):
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[4], int)
        ):
            raise pickle.UnpicklingError("malformed storage record")
        _, kind, key, _location, numel = pid
        if key not in self.storages:
            raw = self.members.get(f"data/{key}")
            itemsize = torch.empty((), dtype=kind.dtype).element_size()
            if raw is None or len(raw) != numel * itemsize:
                raise pickle.UnpicklingError(f"storage {key} is missing or has the wrong size")
            self.storages[key] = (
                torch.frombuffer(bytearray(raw), dtype=kind.dtype) if numel else torch.empty(0, dtype=kind.dtype)
            )
        storage = self.storages[key]
        if storage.dtype != kind.dtype:
            raise pickle.UnpicklingError(f"storage {key} is read with two dtypes")
        return storage

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        if isinstance(cls, _ScriptClass) and args == ():
            self.append(_ScriptObject(cls.name))
        elif cls is collections.OrderedDict and args == ():
            self.append(collections.OrderedDict())
        else:
            raise pickle.UnpicklingError("refused object construction")

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if not any(func is f for f in self.CALLABLE) or not isinstance(args, tuple):
            raise pickle.UnpicklingError("refused call")
        self.stack[-1] = func(*args)

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if not isinstance(inst, _ScriptObject) or inst.state is not None:
            raise pickle.UnpicklingError("refused object state")
        inst.state = state

    def load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        if not isinstance(self.stack[-1], dict):
            raise pickle.UnpicklingError("refused item assignment")
        self.stack[-1][key] = value

    def load_setitems(self):
        items = self.pop_mark()
        if not isinstance(self.stack[-1], dict):
            raise pickle.UnpicklingError("refused item assignment")
        for i in range(0, len(items), 2):
            self.stack[-1][items[i]] = items[i + 1]

    def load_append(self):
        value = self.stack.pop()
        if not isinstance(self.stack[-1], list):
            raise pickle.UnpicklingError("refused append")
        self.stack[-1].append(value)

    def load_appends(self):
        items = self.pop_mark()
        if not isinstance(self.stack[-1], list):
            raise pickle.UnpicklingError("refused append")
        self.stack[-1].extend(items)

    dispatch: ClassVar[dict] = {
        op[0]: pickle._Unpickler.dispatch[op[0]]
        for op in (
            pickle.PROTO,
            pickle.FRAME,
            pickle.STOP,
            pickle.MARK,
            pickle.POP,
            pickle.POP_MARK,
            pickle.DUP,
            pickle.NONE,
            pickle.NEWTRUE,
            pickle.NEWFALSE,
            pickle.INT,
            pickle.BININT,
            pickle.BININT1,
            pickle.BININT2,
            pickle.LONG,
            pickle.LONG1,
            pickle.LONG4,
            pickle.FLOAT,
            pickle.BINFLOAT,
            pickle.BINUNICODE,
            pickle.SHORT_BINUNICODE,
            pickle.BINUNICODE8,
            pickle.EMPTY_TUPLE,
            pickle.TUPLE,
            pickle.TUPLE1,
            pickle.TUPLE2,
            pickle.TUPLE3,
            pickle.EMPTY_LIST,
            pickle.LIST,
            pickle.EMPTY_DICT,
            pickle.DICT,
            pickle.BINPUT,
            pickle.LONG_BINPUT,
            pickle.MEMOIZE,
            pickle.BINGET,
            pickle.LONG_BINGET,
            pickle.GET,
            pickle.PUT,
            pickle.GLOBAL,
            pickle.BINPERSID,
        )
    }
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends


def _payload(path, members: dict) -> tuple[dict, dict]:
    """({dotted name: tensor}, {dotted name: plain attribute}) of the module pickled in data.pkl."""
    if "data.pkl" not in members:
        raise ModelFileError(f"{path} is not a TorchScript archive (no data.pkl)")
    order = members.get("byteorder", sys.byteorder.encode()).decode(errors="replace")
    if order != sys.byteorder:
        raise ModelFileError(f"{path}: stored {order}-endian; this machine is {sys.byteorder}-endian")
    try:
        root = _DataOnlyUnpickler(members["data.pkl"], members).load()
    except Exception as err:
        raise ModelFileError(
            f"{path}: the module's data is not a gaq_calc network ({type(err).__name__}: {_one_line(err)})"
        ) from err
    tensors, attrs, seen = {}, {}, set()

    def walk(obj, prefix: str) -> None:
        if not isinstance(obj.state, dict):  # a class with its own __getstate__/__setstate__
            raise ModelFileError(
                f"{path}: {obj.name} ({prefix.rstrip('.') or 'root'}) has its own state protocol; "
                "not a gaq_calc network"
            )
        if id(obj) in seen or prefix.count(".") > 32 or not all(isinstance(k, str) for k in obj.state):
            raise ModelFileError(f"{path}: malformed module structure at {prefix.rstrip('.') or 'root'}")
        seen.add(id(obj))
        for key, value in obj.state.items():
            if isinstance(value, torch.Tensor):
                tensors[prefix + key] = value
            elif isinstance(value, _ScriptObject):
                walk(value, prefix + key + ".")
            else:
                attrs[prefix + key] = value

    if not isinstance(root, _ScriptObject):
        raise ModelFileError(f"{path}: the archive holds no TorchScript module")
    walk(root, "")
    return tensors, attrs


def _read_artifact(path, payload: bool = True) -> tuple[dict, dict, dict]:
    """(metadata, tensors, attributes) of an artifact, integrity-checked; runs nothing from the file.
    payload=False: the metadata only (tensors and attributes empty)."""
    members = _read_members(path)
    record = members.get(f"extra/{METADATA_FILE}")
    if record is None or not any(name.startswith("code/") for name in members):
        raise ModelFileError(
            f"{path} is a TorchScript file but not a gaq_calc artifact (no metadata record)"
            if record is None
            else f"{path} is not a TorchScript archive (no code)"
        )
    try:
        metadata = json.loads(record)
    except ValueError as err:
        raise ModelFileError(f"{path}: unreadable metadata record ({_one_line(err)})") from err
    if not isinstance(metadata, dict) or metadata.get("format") != ARTIFACT_FORMAT:
        raise ModelFileError(f"{path} is a TorchScript file but not a gaq_calc artifact (no metadata record)")
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise ModelFileError(f"{path}: unsupported artifact version {metadata.get('format_version')}")
    stored = metadata.get(INTEGRITY_KEY)
    if stored is None:
        unverified_warning(path, "artifact")
    elif stored != _artifact_digest(members, metadata):
        raise ModelFileError(
            f"{path}: integrity check failed: the archive's code, tensors or metadata do not "
            "match the SHA-256 stored in it (corrupted or edited after export)"
        )
    if not payload:
        return metadata, {}, {}
    tensors, attrs = _payload(path, members)
    return metadata, tensors, attrs


def artifact_metadata(path: str | Path) -> dict:
    """The metadata record of an artifact, integrity-checked; runs nothing from the file."""
    return _read_artifact(path, payload=False)[0]


#: attributes of a PackedLinear (and of its activation quantizer) that must match the quantization config
PACKED_ATTRIBUTES = ("in_features", "weight_bits", "has_bias", "act_quantizer.kind", "act_quantizer.bits")
#: the same attributes in format 1, where the activation quantizer's lived on the layer
PACKED_ATTRIBUTES_V1 = {"act_kind": "act_quantizer.kind", "act_bits": "act_quantizer.bits"}


def _rebuild(path, metadata: dict, tensors: dict, attrs: dict) -> nn.Module:
    """The artifact's network in eager PyTorch (float32, on CPU): built from the metadata's model and
    quantization configs, exactly as gaq-export builds it, then filled with the file's tensors."""
    from gaq_calc.model import GAQPotential, ModelConfig
    from gaq_calc.quant import QuantConfig, QuantLinear, prepare

    try:
        model = GAQPotential(ModelConfig.from_dict(metadata["model_config"]))
        if metadata.get("quantization"):
            model = prepare(model, QuantConfig(**metadata["quantization"]))
            for module in list(model.modules()):
                for name, child in list(module.named_children()):
                    if isinstance(child, QuantLinear):  # the layout; the tensors come from the file
                        setattr(module, name, PackedLinear.from_quant(child, check=False))
            model._forward_pre_hooks.clear()  # training-only hooks (Degree-Quant's degree recorder)
    except Exception as err:
        raise ModelFileError(
            f"{path}: the metadata does not describe a gaq_calc network ({type(err).__name__}: {_one_line(err)})"
        ) from err
    module = EnergyForces(model).eval()
    tensors = upgrade_state_dict(module, tensors)  # format 1: the names of before issue 14
    expected = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    if set(expected) != set(tensors):
        extra, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
        raise ModelFileError(
            f"{path}: the module's tensors do not match its metadata's network "
            f"(unexpected: {extra[:3]}, missing: {missing[:3]})"
        )
    for name, target in expected.items():
        source = tensors[name]
        # artifacts exported before the per-mode reference energies were kept in float64 hold them in
        # float32; widening them is exact, and the network uses them as float64 either way
        widened = name.endswith("reference_energies") and (source.dtype, target.dtype) == (torch.float32, torch.float64)
        if (source.dtype != target.dtype and not widened) or source.shape != target.shape:
            raise ModelFileError(
                f"{path}: tensor {name} is {source.dtype} {list(source.shape)}, the network "
                f"needs {target.dtype} {list(target.shape)}"
            )
    renamed = {f"{layer}.{old}": f"{layer}.{new}" for layer, sub in module.named_modules()
               if isinstance(sub, PackedLinear) for old, new in PACKED_ATTRIBUTES_V1.items()}  # fmt: skip
    stored = {renamed.get(key, key): value for key, value in attrs.items()}
    for name, layer in module.named_modules():
        if isinstance(layer, PackedLinear):
            for attr in PACKED_ATTRIBUTES:
                key, expect = f"{name}.{attr}", _attribute(layer, attr)
                if key in stored and stored[key] != expect:
                    raise ModelFileError(f"{path}: {key} is {stored[key]!r}; the quantization config says {expect!r}")
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name])
    return module.potential


def _attribute(module: nn.Module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _dequantize(module: nn.Module) -> None:
    """Fill every PackedLinear's dequantized weight cache once, as ordinary tensors (package code)."""
    with torch.inference_mode(False), torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, PackedLinear):
                sub.dequantized_weight()


def load_artifact(path: str | Path, device: str | torch.device = "cpu", scripted: bool = False):
    """(EnergyForces, metadata) of an artifact; clear errors for anything else.

    Default: the network rebuilt in eager PyTorch from the file's verified tensors and metadata; no code
    from the file runs. scripted=True: the file's own TorchScript module (torch.jit.load runs code from
    the file: trust it like a program), checked to hold exactly the verified tensors."""
    path = Path(path)
    metadata, tensors, attrs = _read_artifact(path)
    potential = _rebuild(path, metadata, tensors, attrs)
    _dequantize(potential)
    if not scripted:
        return EnergyForces(potential).to(device).eval(), metadata
    try:
        with warnings.catch_warnings():  # torch 2.13 flags TorchScript as deprecated; it still runs
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device)
    except Exception as err:
        raise ModelFileError(
            f"{path} is not a readable gaq_calc artifact ({type(err).__name__}: {_one_line(err)})"
        ) from err
    loaded = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    if set(loaded) != set(tensors) or any(
        loaded[k].dtype != tensors[k].dtype or not torch.equal(loaded[k].cpu(), tensors[k]) for k in tensors
    ):
        raise ModelFileError(f"{path}: the TorchScript module's tensors differ from the artifact's verified data")
    packed = {f"potential.{name}": sub for name, sub in potential.named_modules() if isinstance(sub, PackedLinear)}
    for name, sub in module.named_modules():
        if name in packed:  # the dequantized weights as the package computed them, not the file's code
            sub.weight = packed[name].weight.to(device)
    return module.eval(), metadata


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
