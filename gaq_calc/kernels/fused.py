"""The fused CPU kernel (fused_cpu.cpp): energy and forces of a GAQPotential in one C++ call.

The C++ source is compiled on first use with torch.utils.cpp_extension (a C++ compiler and ninja are
needed; the build is cached per user) and registers the TorchScript-callable op
torch.ops.gaq.energy_forces. FusedEnergyForces gathers a model's weights once (eager FP32, eager QAT
in conservative mode, or an exported artifact in either mode) and calls the op. Without activation
rounding, forces are the exact gradient of the returned energy, written out in C++ and tested against
autograd. In an artifact's quantized mode the inputs of
every Linear are rounded to int8 codes (linear, or in the equivariant local frame for l=1 features),
multiplied with the int4/int8 weight codes in integer arithmetic (exact integer products and sums, one
rescale per output) and the forces are QAT's straight-through gradient, as in the reference path.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from gaq_calc.quant.kinds import FUSED_KINDS, ActKind
from gaq_calc.quant.primitives import qrange

SOURCE = Path(__file__).with_name("fused_cpu.cpp")
_lock = threading.Lock()
_loaded = False
_gave_up = False  # a wait for another process's build timed out: later calls do not wait again


class KernelUnavailable(RuntimeError):
    """The fused kernel cannot be built or does not support this model/mode."""


def load_extension(verbose: bool = False, wait_seconds: Optional[float] = None) -> None:
    """Compile (once per source version, cached) and load the op library; KernelUnavailable on failure.

    Processes that build at the same time take turns on a lock in the build folder. One that cannot get
    the lock within `wait_seconds` (default: the GAQ_KERNEL_BUILD_WAIT environment variable, else
    BUILD_WAIT_SECONDS) raises KernelUnavailable instead of waiting forever, and so does one that finds a
    killed build's compiler still running there; later calls in that process do not wait again."""
    global _loaded, _gave_up
    with _lock:
        if _loaded:
            return
        from torch.utils import cpp_extension

        if wait_seconds is None:
            wait_seconds = 0.0 if _gave_up else _default_wait()
        name, flags = build_spec()
        try:
            _ninja_on_path()
            build_dir = Path(cpp_extension._get_build_directory(name, verbose))
            with _build_lock(build_dir, wait_seconds):
                cpp_extension.load(
                    name=name, sources=[str(SOURCE)], extra_cflags=flags, is_python_module=False, verbose=verbose
                )
        except KernelUnavailable:
            _gave_up = True
            raise
        except Exception as err:  # no compiler, no ninja, read-only cache, ...
            raise KernelUnavailable(f"the fused CPU kernel could not be built ({type(err).__name__}: {err})") from err
        _loaded = True


def int8_simd() -> bool:
    """Whether the built kernel multiplies int8 codes with AVX512-VNNI (compiled with -march=native)."""
    load_extension()
    return bool(torch.ops.gaq.int8_simd())


def _cpu_identity() -> bytes:
    """The CPU's model name and feature flags (Linux), or the platform's processor string elsewhere."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor().encode()
    keep = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    return "\n".join(keep).encode()


def build_spec() -> Tuple[str, List[str]]:
    """(extension name, compiler flags): one build folder per source version and flags, so a rebuild
    never overwrites a library that a running process (a long MD run) has loaded."""
    flags = ["-O3", "-fno-math-errno", "-fopenmp-simd"]
    if os.uname().machine in ("x86_64", "AMD64"):
        flags.append("-march=native")  # compiled on the machine that runs it
    # -march=native compiles for this CPU: a build folder shared with another CPU (a shared home, an
    # image) must not hand it instructions it lacks, so the CPU's identity is part of the key
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode() + _cpu_identity()).hexdigest()[:12]
    return f"gaq_fused_cpu_{digest}", flags


BUILD_LOCK = "gaq_build.lock"  # in the build folder, beside torch's own "lock"
BUILD_WAIT_SECONDS = 300.0  # a build takes about a minute on 2 busy cores; then the reference kernel


def _default_wait() -> float:
    value = os.environ.get("GAQ_KERNEL_BUILD_WAIT")
    if value is None:
        return BUILD_WAIT_SECONDS
    try:
        return max(0.0, float(value))
    except ValueError:
        raise KernelUnavailable(f"GAQ_KERNEL_BUILD_WAIT must be a number of seconds, not {value!r}") from None


@contextlib.contextmanager
def _build_lock(build_dir: Path, wait_seconds: float) -> Iterator[None]:
    """Hold the build folder's lock (an flock, which the kernel releases when its holder dies, even by
    SIGKILL) around torch's build and load.

    torch's own lock is a bare file that waits forever once a build is killed. Every builder holds this
    lock while torch's file exists, so whoever gets this lock and finds torch's file knows its owner is
    dead: the file is removed (with a RuntimeWarning) once no leftover compiler of the killed build still
    runs in the folder. Waits at most `wait_seconds` in all, then KernelUnavailable."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's lock alone
        yield
        return
    import time

    deadline = time.monotonic() + wait_seconds
    fd = os.open(build_dir / BUILD_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # held by a live process
                if time.monotonic() >= deadline:
                    raise KernelUnavailable(
                        f"waited {wait_seconds:g} s for another process building the fused kernel "
                        f"(lock {build_dir / BUILD_LOCK}; GAQ_KERNEL_BUILD_WAIT sets the wait)"
                    ) from None
                time.sleep(0.1)
                continue
            except OSError:  # a file system without locks: torch's lock alone, as before
                break
            _clear_dead_build(build_dir, deadline)
            break
        yield
    finally:
        os.close(fd)  # releases the lock


def _clear_dead_build(build_dir: Path, deadline: float) -> None:
    """Remove torch's lock file of a killed build, after waiting (until `deadline`) for any process
    still running in the folder (its compiler or ninja, orphaned by the kill) to finish."""
    import time
    import warnings

    lock = build_dir / "lock"
    if not lock.exists():
        return
    while True:
        leftover = _processes_in(build_dir)
        if not leftover:
            break
        if time.monotonic() >= deadline:
            raise KernelUnavailable(f"processes {leftover} of an interrupted build still run in {build_dir}")
        time.sleep(0.2)
    warnings.warn(f"removing a build lock left by an interrupted build: {lock}", RuntimeWarning, stacklevel=2)
    lock.unlink(missing_ok=True)


def _processes_in(folder: Path) -> List[int]:
    """Ids of other processes whose working directory is `folder` (Linux /proc; [] where unreadable)."""
    folder = os.path.realpath(folder)
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if os.readlink(f"/proc/{entry}/cwd") == folder:
                found.append(int(entry))
        except OSError:  # gone, or another user's
            continue
    return found


def _ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the pip package's binary is not on it when the venv is
    not activated (.venv/bin/python -m ...), so add its folder (this process only) if ninja is missing."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _rounds(module) -> bool:
    """Whether a quantized layer rounds its inputs now (mode "quantized")."""
    act = module.act_quantizer
    return act.kind != ActKind.NONE and act.enabled


def _linear_weights(module) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias or empty) of nn.Linear, a QuantLinear with unrounded activations, or a PackedLinear
    (an artifact's or a converted model's layer: dequantized weights)."""
    if hasattr(module, "packed"):  # PackedLinear (eager or scripted)
        return module.dequantized_weight(), (module.bias if module.has_bias else torch.zeros(0))
    bias = module.bias if module.bias is not None else torch.zeros(0)
    if hasattr(module, "weight_quantizer"):  # QuantLinear (eager QAT model)
        if _rounds(module):
            raise KernelUnavailable(
                "activations are rounded (quantized mode) in an eager QAT model: "
                "use its exported artifact or the reference kernel"
            )
        return module.weight_quantizer(module.weight), bias
    return module.weight, bias


LAYOUT_VERSION = 2  # the kernel's weight layout (fused_cpu.cpp, kLayoutVersion): names listed there


def _activation_quantizer(module) -> List[torch.Tensor]:
    """[meta (kind, act step, qmax), weight codes int8, weight steps] of one Linear; kind NONE = no rounding.
    The kind is quant.ActKind's value (the C++ source numbers kinds the same way; tests/test_kernels.py)."""
    off = [torch.tensor([float(ActKind.NONE), 1.0, 0.0], dtype=torch.float64), torch.zeros(0, dtype=torch.int8),
           torch.zeros(0)]  # fmt: skip
    if not hasattr(module, "packed") or not _rounds(module):
        return off
    act = module.act_quantizer
    if act.kind not in FUSED_KINDS:  # MDDQ: codebook directions, not in the fused kernel
        raise KernelUnavailable("MDDQ activation rounding runs on the reference kernel only")
    codes = module.codes().to(torch.int8)  # [out, in]
    steps = module.weight_step.reshape(-1).expand(codes.shape[0]).contiguous()
    meta = torch.tensor([float(act.kind), float(act.step), float(qrange(act.bits)[1])], dtype=torch.float64)
    return [meta, codes, steps]


def _reference_energies(potential) -> torch.Tensor:
    """The reference energies of the network's inference mode (quant.set_mode)."""
    if getattr(potential, "conservative", False) and hasattr(potential, "conservative_reference_energies"):
        return potential.conservative_reference_energies
    return potential.reference_energies


def _type_name(module) -> str:
    """The class name of an eager module, or of the module a scripted one was compiled from."""
    return getattr(module, "original_name", None) or type(module).__name__


def _is_linear(module) -> bool:
    """nn.Linear, QuantLinear or an artifact's PackedLinear, eager or scripted."""
    return (
        hasattr(module, "packed")
        or hasattr(module, "weight_quantizer")
        or isinstance(module, torch.nn.Linear)
        or _type_name(module) == "Linear"
    )


def _children(sequential, kind) -> list:
    """The children of a Sequential that are Linear layers (kind="linear") or LayerNorms (kind="norm"),
    in order, found by type rather than by position (eager or scripted)."""
    if kind == "norm":
        return [m for m in sequential.children() if isinstance(m, torch.nn.LayerNorm) or _type_name(m) == "LayerNorm"]
    return [m for m in sequential.children() if _is_linear(m)]


def gather_parameters(potential) -> Tuple[Dict[str, torch.Tensor], List[float]]:
    """The kernel's weights as named tensors (layout LAYOUT_VERSION: names and shapes in fused_cpu.cpp)
    and constants [cutoff, envelope p, rbf prefactor, layer-norm eps, heads], from a GAQPotential or the
    `potential` submodule of an artifact. Activation quantizers are named {linear}.act / .codes / .wstep,
    present only where an activation is rounded (none: FP32, weights-only, or the conservative mode)."""
    weights: Dict[str, torch.Tensor] = {}
    quant: Dict[str, List[torch.Tensor]] = {}

    def linear(name: str, module, bias: bool = True) -> None:
        w, b = _linear_weights(module)
        weights[f"{name}.weight"] = w
        if bias and b.numel():
            weights[f"{name}.bias"] = b
        quant[name] = _activation_quantizer(module)

    with torch.no_grad():
        weights["embedding.weight"] = potential.embedding.weight
        weights["rbf.frequencies"] = potential.rbf.frequencies
        radial = _children(potential.radial, "linear")
        if len(radial) == 2:
            linear("radial.hidden", radial[0])
        elif len(radial) != 1:
            raise KernelUnavailable(f"unexpected radial network with {len(radial)} Linear layers")
        linear("radial.filter", radial[-1], bias=False)
        eps = heads = None
        for index, (_, layer) in enumerate(potential.layers.named_children()):  # (a scripted ModuleList has no iter)
            eps = float(layer.norm.eps) if eps is None else eps
            heads = int(layer.num_heads)
            p = f"layers.{index}."
            weights[p + "norm.weight"], weights[p + "norm.bias"] = layer.norm.weight, layer.norm.bias
            linear(p + "qk", layer.qk_proj, bias=False)
            linear(p + "value", layer.value_proj)
            weights[p + "log_tau"] = layer.log_tau
            linear(p + "exchange_in", layer.exchange_in)
            linear(p + "exchange_out", layer.exchange_out)
            linear(p + "vector_mix", layer.vector_mix, bias=False)
        norms, linears = _children(potential.readout, "norm"), _children(potential.readout, "linear")
        if len(norms) != 1 or len(linears) != 2:
            raise KernelUnavailable(f"unexpected readout with {len(norms)} LayerNorms and {len(linears)} Linears")
        weights["readout.norm.weight"], weights["readout.norm.bias"] = norms[0].weight, norms[0].bias
        linear("readout.hidden", linears[0])
        linear("readout.out", linears[1])
        weights["energy_scale"] = potential.energy_scale
        weights["reference_energies"] = _reference_energies(potential)
        weights = {k: t.detach().contiguous() for k, t in weights.items()}
        if any(float(q[0][0]) != 0 for q in quant.values()):
            for name, (meta, codes, steps) in quant.items():
                if float(meta[0]) != 0:
                    weights[f"{name}.act"], weights[f"{name}.codes"], weights[f"{name}.wstep"] = meta, codes, steps
    consts = [
        float(potential.cutoff),
        float(potential.envelope.p),
        float(potential.rbf.prefactor),
        1e-5 if eps is None else eps,
        float(heads if heads is not None else 1),
    ]
    return weights, consts


def _cast_weights(weights: Dict[str, torch.Tensor], dtype: torch.dtype, float_codes: bool) -> Dict[str, torch.Tensor]:
    """Cast once, not per call: weights to the compute dtype (reference energies stay float64), quantizer
    meta to float64, and the weight codes to the compute dtype where the kernel may multiply them in
    floating-point units exactly, that is where every partial sum in * max|activation code| * max|weight
    code| is an integer the dtype holds (else int8: the int32 loop). Activation codes wider than int8 (qmax
    above 127: a study of finer steps, quant.api.round_at_bits) run in floating-point units whatever
    `float_codes` says, and only where that is exact."""
    exact_below = 2.0 ** (24 if dtype == torch.float32 else 53)
    out = {}
    for name, t in weights.items():
        if name == "reference_energies" or name.endswith(".act"):
            out[name] = t.to(torch.float64).contiguous()
        elif name.endswith(".codes"):
            codes = t.to(torch.int8).contiguous()
            qmax = float(weights[name[: -len(".codes")] + ".act"][2])
            exact = not codes.numel() or codes.shape[1] * qmax * float(codes.abs().max()) < exact_below
            if qmax > 127 and not exact:
                raise KernelUnavailable(
                    f"{name[: -len('.codes')]}: {int(qmax)}-level activation codes are not int8, and their sums "
                    f"are not exact in {dtype}: use the reference kernel"
                )
            if (float_codes or qmax > 127) and codes.numel() and exact:
                codes = codes.to(dtype)
            out[name] = codes
        else:
            out[name] = t.to(dtype).reshape(t.shape).contiguous()
    return out


class FusedEnergyForces:
    """Same call as EnergyForces (species, positions, receivers, senders, shifts, batch, n_graphs) ->
    (energies [n_graphs] float64, forces [n_atoms, 3]) through the fused kernel.

    Weights are gathered at construction: build it again after changing the model or its mode.

    `int_gemm` picks how integer codes are multiplied in quantized mode: "float" runs the integer
    products and sums through the BLAS sgemm, exactly (every partial sum is an integer below 2^24), and
    "int32" as int8 codes with int32 sums: vpdpbusd (64 products per instruction) where the kernel was
    built for a CPU with AVX512-VNNI (`int8_simd()`), a portable loop elsewhere. All give identical bits.
    "auto" (the default) takes "int32" where the SIMD loop exists and "float" elsewhere, the faster of
    the two on each (benchmarks/quantized_speed.py; benchmarks/deploy.py's fused-float and fused-int32 rows).
    "int32-portable" is "int32" without the SIMD loop (for tests: the same bits).
    """

    INT_GEMMS = ("auto", "float", "int32", "int32-portable")

    def __init__(self, potential, dtype: torch.dtype = torch.float32, int_gemm: str = "auto"):
        if int_gemm not in self.INT_GEMMS:
            raise ValueError(f"int_gemm must be one of {self.INT_GEMMS}, not {int_gemm!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, not {dtype}")
        load_extension()
        if int_gemm == "auto":
            int_gemm = "int32" if int8_simd() else "float"
        weights, self.consts = gather_parameters(potential)
        self.int_gemm = int_gemm
        self.weights = _cast_weights(weights, dtype, int_gemm == "float")
        self.dtype = dtype
        # checked and cast once; keeps one workspace per graph size across calls
        self.model = torch.classes.gaq.Model(LAYOUT_VERSION, self.weights, self.consts, dtype == torch.float64)
        self.rounds_activations = bool(self.model.quantized())
        if int_gemm == "int32-portable":
            self.model.drop_int8_simd()
        self.int8_simd = self.rounds_activations and int_gemm == "int32" and int8_simd()

    def __call__(self, species, positions, receivers, senders, shifts, batch, n_graphs: int):
        if positions.device.type != "cpu":
            raise KernelUnavailable("the fused kernel runs on CPU")
        return self.model.energy_forces(positions, species, receivers, senders, shifts, batch, int(n_graphs))

    def profile(self, on: bool = True) -> None:
        """Time every stage of the kernel (forward and backward per stage) from now on; stage_seconds reads."""
        self.model.set_profile(bool(on))

    def stage_seconds(self) -> Dict[str, float]:
        """Seconds per kernel stage summed over the profiled calls since the last read ("calls": how many)."""
        return dict(self.model.stage_seconds())
