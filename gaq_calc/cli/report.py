"""gaq-report: regenerate README's tables from the model cards (models/*/card.json; QM9: models/qm9_*), the quantization
baselines' cards (results/quant_baselines/*/card.json, written by scripts/baseline.sh) and the benchmark
results (benchmarks/results/{md_step,deploy,kernel_agreement,peers}.json). Also writes results/quant_table.md
and .json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gaq_calc.cli import one_line_errors
from gaq_calc.io import write_text_atomic
from gaq_calc.models_dir import models_dir

RESULTS = ("<!-- results:start -->", "<!-- results:end -->")
QUANT = ("<!-- quant:start -->", "<!-- quant:end -->")
MD = ("<!-- md:start -->", "<!-- md:end -->")
DEPLOY = ("<!-- deploy:start -->", "<!-- deploy:end -->")
SPEED = ("<!-- speed:start -->", "<!-- speed:end -->")
KERNELS = ("<!-- kernels:start -->", "<!-- kernels:end -->")
PEERS = ("<!-- peers:start -->", "<!-- peers:end -->")
SCALING = ("<!-- scaling:start -->", "<!-- scaling:end -->")
ABLATION = ("<!-- ablation:start -->", "<!-- ablation:end -->")
SENSITIVITY = ("<!-- sensitivity:start -->", "<!-- sensitivity:end -->")
LEE_FLIPS = ("<!-- lee-flips:start -->", "<!-- lee-flips:end -->")
SAMPLING = ("<!-- sampling:start -->", "<!-- sampling:end -->")
HEATING = ("<!-- heating:start -->", "<!-- heating:end -->")
QUANTIZED_SPEED = ("<!-- quantized-speed:start -->", "<!-- quantized-speed:end -->")
REPO = Path(__file__).resolve().parents[2]


def _relative(path) -> str:
    """A card's path relative to the repository (the JSON tables are committed; absolute paths would
    change with the checkout's location)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def results_table(root: Path) -> str:
    rows = [
        "| model | test set | frames | E MAE (meV) | F MAE (meV/Å) | params | epochs | train time | "
        "F MAE after first N min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for card_path in sorted(root.glob("*/card.json")):
        c = json.loads(card_path.read_text())
        if "force_mae_meV_per_A" not in c:  # energy-only models (QM9) have their own table
            continue
        t = c.get("training", {})
        snap = c.get("snapshot")
        snap_txt = f"{snap['force_mae_meV_per_A']:.1f} ({snap['train_minutes']:.0f} min)" if snap else "–"
        rows.append(
            f"| {c['model']} | {Path(c['test_data']).name} {c['split']} | {c['n_frames']} | "
            f"{c['energy_mae_meV']:.2f} | {c['force_mae_meV_per_A']:.2f} | {c['n_parameters']:,} | "
            f"{t.get('epochs')} (best {t.get('selected_epoch')}) | {t.get('train_minutes', 0):.0f} min | {snap_txt} |"
        )
    return "\n".join(rows)


def _converged(log_csv: Path, column: str = "val_force_mae_meV_per_A") -> str:
    """QAT runs: "yes" when every logged validation error is finite and the last epoch's validation
    F-MAE (`column`: E-MAE for energy-only models) lies within 25% of the best after the run's first
    fifth; "no" otherwise. PTQ: "–"."""
    import csv
    import math

    if not log_csv.exists():
        return "–"
    rows = list(csv.DictReader(log_csv.open()))
    f = [float(r[column]) for r in rows if r.get(column)]
    e = [float(r["val_energy_mae_meV"]) for r in rows if r.get("val_energy_mae_meV")]
    if not f or not all(math.isfinite(x) for x in f + e):
        return "no (diverged)"
    late = f[max(1, -(-len(f) // 5)) :] or f  # after the first fifth: staged warm-up epochs come first
    return "yes" if f[-1] <= 1.25 * min(late) else f"no (last {f[-1]:.1f} vs best {min(late):.1f})"


def _bits(card: dict) -> str:
    q = (card.get("quantization") or {}).get("config")
    if not q:
        return "FP32"
    acts = lambda b: "FP" if b is None else str(b)
    floats = q.get("float_act_layers") or []
    return (
        f"W{q['vector_weight_bits']}/{q['scalar_weight_bits']} "
        f"A{acts(q['scalar_act_bits'])}/{acts(q['vector_act_bits'])}"
        + (f" (A FP: {', '.join(p.rstrip('.') for p in floats)})" if floats else "")
    )


def quant_cards(models: Path, baselines: Path, molecule: str = "azobenzene") -> list[tuple[dict, Path]]:
    cards = []
    for card_path in sorted(models.glob("*/card*.json")) + sorted(baselines.glob("*/card.json")):
        card = json.loads(card_path.read_text())
        if card.get("test_data") == molecule:
            card["_card_file"] = str(card_path)
            cards.append((card, card_path.parent))
    return cards


def packed_bytes(card: dict) -> int | None:
    """Packed size of a card's model on today's basis (quant.storage_bytes of its architecture and
    quantization config; sizes do not depend on trained values). Cards written before issue 14 counted
    dead per-layer codebooks that current model files no longer hold, so the card's own number is used
    only where the card lacks the configs; artifacts report their file size."""
    import dataclasses

    from gaq_calc.model import GAQPotential
    from gaq_calc.model.config import ModelConfig
    from gaq_calc.quant import QuantConfig, prepare, storage_bytes

    size = card.get("size") or {}
    if card.get("artifact"):
        return size.get("file_bytes")
    if not card.get("model_config"):
        return size.get("packed_bytes")
    model = GAQPotential(ModelConfig.from_dict(card["model_config"]))
    config = ((card.get("quantization") or {}).get("config")) or None
    if config:
        known = {f.name for f in dataclasses.fields(QuantConfig)}
        model = prepare(model, QuantConfig(**{k: v for k, v in config.items() if k in known}))
    return storage_bytes(model)["packed_bytes"]


def quant_table(cards: list[tuple[dict, Path]]) -> tuple[str, list[dict]]:
    """Markdown and JSON rows of the quantization results table."""
    fp32 = next((c for c, _ in cards if not c.get("quantization")), None)
    fp_bytes = packed_bytes(fp32) if fp32 else None
    rows, records = (
        [
            "| model | method | training | inference | bits W(vec/scal) A(scal/vec) | l=1 activations | E MAE (meV) | "
            "F MAE (meV/Å) | LEE fp32 (meV/Å) | LEE fp64 (meV/Å) | converged | epochs | packed size (KiB) | vs FP32 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ],
        [],
    )
    for card, folder in cards:
        card_file = card.pop("_card_file", str(folder / "card.json"))
        q = card.get("quantization") or {}
        config = q.get("config") or {}
        size = packed_bytes(card)
        record = {
            "model": (
                Path(card["model_file"]).name
                if card.get("artifact")
                else card["model"]
                if folder.parent.name != "quant_baselines"
                else folder.name
            ),
            "inference": card.get("mode") or ("–" if not q else "quantized"),
            "method": q.get("preset") or "fp32",
            "mode": q.get("mode", "FP32 training"),
            "bits": _bits(card) if card.get("mode") != "conservative" else _bits(card).split(" A")[0] + " A unrounded",
            "vector_activations": (
                "unrounded"
                if card.get("mode") == "conservative"
                else (config.get("vector_method") if config.get("vector_act_bits") else "FP")
            )
            if q
            else "FP",
            "energy_mae_meV": card["energy_mae_meV"],
            "force_mae_meV_per_A": card["force_mae_meV_per_A"],
            "lee_meV_per_A": card.get("lee_meV_per_A"),
            "lee_float64_meV_per_A": card.get("lee_float64_meV_per_A"),
            "converged": _converged(folder / "log.csv") if q.get("mode") != "PTQ" else "– (PTQ)",
            "epochs": ((card.get("training") or {}).get("epochs") or "–") if q.get("mode") != "PTQ" else 0,
            "packed_bytes": size,
            "size_ratio_vs_fp32": (fp_bytes / size) if (fp_bytes and size) else None,
            "card": _relative(card_file),
        }
        records.append(record)
        fmt = lambda x, f: "–" if x is None else format(x, f)
        rows.append(
            f"| {record['model']} | {record['method']} | {record['mode']} | {record['inference']} | {record['bits']} | "
            f"{record['vector_activations']} | {record['energy_mae_meV']:.2f} | {record['force_mae_meV_per_A']:.2f} | "
            f"{fmt(record['lee_meV_per_A'], '.3g')} | {fmt(record['lee_float64_meV_per_A'], '.1e')} | "
            f"{record['converged']} | {record['epochs']} | {fmt(size and size / 1024, '.0f')} | "
            f"{fmt(record['size_ratio_vs_fp32'], '.2f')}{'x' if record['size_ratio_vs_fp32'] else ''} |"
        )
    return "\n".join(rows), records


def _levers(card: dict) -> str:
    """The QAT levers of a run, read from its preset and training config."""
    q = card.get("quantization") or {}
    config = (card.get("training") or {}).get("config") or {}
    levers = []
    if (q.get("config") or {}).get("float_act_layers"):
        levers.append("mixed precision")
    if config.get("distill_from"):
        levers.append(f"distillation ({config.get('distill_weight', 1.0):g} x {config['distill_from']})")
    if any((card.get("reference_fit") or {}).get("quantized_shift_eV") or []):
        levers.append("quantized-mode reference energies refitted")
    return ", ".join(levers) or ("shipped recipe" if q else "–")


def ablation_table(
    models: Path, ablation: Path, fp32: str = "azobenzene_fp32", baseline: str = "azobenzene_w4a8"
) -> tuple[str, list[dict]]:
    """Issue 12's QAT ablation: the FP32 model, the shipped W4A8, each run in results/qat_ablation/NAME/
    (card.json: quantized mode; card_conservative.json: conservative mode) and the shipped W8A8 models (the
    issue's "the same for W8A8"), with the targets' ratios."""
    entries = [(fp32, models / fp32), (baseline, models / baseline)]
    entries += [(p.name, p) for p in sorted(ablation.glob("*")) if (p / "card.json").exists()]
    entries += [(p.name, p) for p in sorted(models.glob("azobenzene_w8a8*")) if (p / "card.json").exists()]
    ref = json.loads((models / fp32 / "card.json").read_text()) if (models / fp32 / "card.json").exists() else None
    rows = [
        "| run | levers | bits W(vec/scal) A(scal/vec) | E MAE (meV) | F MAE (meV/Å) | vs FP32 (E, F) | "
        "conservative E / F | LEE fp32 (meV/Å) | LEE fp64 (meV/Å) | converged | epochs | train min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    records = []
    fmt = lambda x, f: "–" if x is None else format(x, f)
    for name, folder in entries:
        if not (folder / "card.json").exists():
            continue
        card = json.loads((folder / "card.json").read_text())
        cons_path = folder / "card_conservative.json"
        cons = json.loads(cons_path.read_text()) if cons_path.exists() else None
        training = card.get("training") or {}
        record = {
            "run": name,
            "levers": _levers(card),
            "bits": _bits(card),
            "energy_mae_meV": card["energy_mae_meV"],
            "force_mae_meV_per_A": card["force_mae_meV_per_A"],
            "energy_ratio_vs_fp32": ref and card["energy_mae_meV"] / ref["energy_mae_meV"],
            "force_ratio_vs_fp32": ref and card["force_mae_meV_per_A"] / ref["force_mae_meV_per_A"],
            "conservative": cons and [cons["energy_mae_meV"], cons["force_mae_meV_per_A"]],
            "lee_meV_per_A": card.get("lee_meV_per_A"),
            "lee_float64_meV_per_A": card.get("lee_float64_meV_per_A"),
            "converged": _converged(folder / "log.csv") if card.get("quantization") else "–",
            "epochs": training.get("epochs"),
            "cpu_minutes": training.get("train_minutes"),
            "card": _relative(folder / "card.json"),
        }
        records.append(record)
        rows.append(
            f"| {name} | {record['levers']} | {record['bits']} | {record['energy_mae_meV']:.2f} | "
            f"{record['force_mae_meV_per_A']:.2f} | {fmt(record['energy_ratio_vs_fp32'], '.2f')}x, "
            f"{fmt(record['force_ratio_vs_fp32'], '.2f')}x | "
            + (f"{cons['energy_mae_meV']:.2f} / {cons['force_mae_meV_per_A']:.2f}" if cons else "–")
            + f" | {fmt(record['lee_meV_per_A'], '.3g')} | {fmt(record['lee_float64_meV_per_A'], '.1e')} | "
            f"{record['converged']} | {fmt(record['epochs'], '')} | {fmt(record['cpu_minutes'], '.0f')} |"
        )
    return "\n".join(rows), records


def sensitivity_table(path: Path) -> str:
    """The group and bit-width rows of scripts/quant_sensitivity.py's JSON (its .md beside it has every layer)."""
    if not path.exists():
        return "(not run yet)"
    data = json.loads(path.read_text())
    rows = [
        f"`{data['command']}`, {data['frames']} test frames; every layer's row is in "
        f"`{path.with_suffix('.md').relative_to(REPO) if path.is_relative_to(REPO) else path.with_suffix('.md')}`:",
        "",
        "| rounded activations | bits | E MAE (meV) | E MAE, offset removed (meV) | F MAE (meV/Å) |",
        "|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        if r["kind"] in ("baseline", "bits", "group only", "group off"):
            label = r["label"] if r["kind"] != "group only" else f"only {r['label']}"
            rows.append(
                f"| {label} | {'A' + str(r['act_bits']) if r['act_bits'] else '–'} | {r['e_mae']:.2f} | "
                f"{r['e_mae_offset_removed']:.2f} | "
                f"{r['f_mae']:.2f} |"
            )
    return "\n".join(rows)


def lee_flips_markdown(result: dict) -> str:
    """The table of one scripts/lee_flips.py result (its JSON)."""
    rows = [
        f"`{result['command']}`: {result['frames']} test frames x {result['rotations']} rotations; per pair, the "
        'mean over atoms of |F(Rx) - R F(x)| (meV/Å); "no flip": pairs below '
        f"{result['no_flip_below_meV_per_A']} meV/Å.",
        "",
        "| rounded activations | quantizers on | LEE = mean | median | 90th pct. | max | pairs with no flip |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        rows.append(
            f"| {r['label']} | {r['rounded']} | {r['lee_mean']:.3g} | {r['median']:.3g} | {r['p90']:.3g} | "
            f"{r['max']:.3g} | {100 * r['no_flip_share']:.0f}% |"
        )
    return "\n".join(rows)


def tables_per_result(root: Path, table) -> str:
    """One table per result JSON in root (table(path) -> markdown), each headed by its file's stem."""
    paths = sorted(root.glob("*.json"))
    return "\n\n".join(f"**{p.stem}**: " + table(p) for p in paths) or "(not run yet)"


def lee_flips_table(root: Path) -> str:
    """Every results/lee_flips/*.json, one table each."""
    return tables_per_result(root, lambda p: lee_flips_markdown(json.loads(p.read_text())))


def sampling_table(path: Path) -> str:
    """md_protocols/sampling.py's table (its .md beside the JSON) and histogram figure."""
    if not path.with_suffix(".json").exists():
        return "(not run yet)"
    figure = path.with_suffix(".png").relative_to(REPO) if path.is_relative_to(REPO) else path.with_suffix(".png")
    return path.with_suffix(".md").read_text().rstrip() + f"\n\n![NVT sampling: distributions]({figure})"


def heating_table(root: Path) -> str:
    """scripts/heating_vs_act_bits.py's table (heating.md beside heating.json), its command and figure."""
    path = root / "heating.json"
    if not path.exists():
        return "(not run yet)"
    result = json.loads(path.read_text())
    figure = _relative(root / "heating.png")
    return (
        f"`{result['command']}`\n\n{(root / 'heating.md').read_text().rstrip()}\n\n"
        f"![NVE energy drift against the activation bits]({figure})"
    )


def write_table(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def write_quant_table(results: Path, markdown: str, records: list[dict]) -> None:
    write_table(results / "quant_table.md", markdown + "\n")
    write_table(results / "quant_table.json", json.dumps(records, indent=1) + "\n")


def md_table(root: Path) -> str:
    """Drift table of the NVE runs in results/md/*/summary.json (written by md_protocols/nve.py)."""
    summaries = sorted(root.glob("*/summary.json"))
    if not summaries:
        return "(no MD results yet)"
    rows = [
        "| run | model | mode | status | simulated ps | drift (meV/atom/ps) | ± std. error | E_tot std (meV/atom) | "
        "mean T (K) | steps/s | ns/day | protocol overhead |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda x, f: "–" if x is None else format(x, f)
    for path in summaries:
        s = json.loads(path.read_text())
        rows.append(
            f"| {path.parent.name} | {s.get('model')} | {s.get('mode') or '–'} | {s.get('status')} | "
            f"{fmt(s.get('simulated_ps'), '.1f')} | {fmt(s.get('energy_drift_meV_per_atom_per_ps'), '.2g')} | "
            f"{fmt(s.get('energy_drift_stderr_meV_per_atom_per_ps'), '.1g')} | "
            f"{fmt(s.get('total_energy_std_meV_per_atom'), '.3f')} | {fmt(s.get('mean_temperature_K'), '.0f')} | "
            f"{fmt(s.get('steps_per_second'), '.1f')} | {fmt(s.get('ns_per_day'), '.3f')} | "
            f"{fmt(s.get('overhead_fraction') and 100 * s['overhead_fraction'], '.1f')}% |"
        )
    return "\n".join(rows)


def speed_table(path: Path) -> str:
    """The table of benchmarks/md_step.py --json."""
    if not path.exists():
        return "(no benchmark results yet)"
    data = json.loads(path.read_text())
    rows = [
        f"`{data['command']}` on {data['machine']}, torch {data['torch']}, {data['atoms']} atoms:",
        "",
        "| variant | threads | ms / call (E+F) | speed-up vs eager | ASE MD steps/s |",
        "|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        rows.append(
            f"| {r['variant']} | {r['threads']} | {r['ms_per_call']:.2f} | {r['speedup_vs_eager']:.2f}x | "
            f"{r['md_steps_per_s']:.0f} |"
        )
    return "\n".join(rows)


def peers_markdown(data: dict) -> str:
    """The table of benchmarks/peers.py --json: so3krates-torch and gaq_calc, MD steps and calls."""
    fmt = lambda x, f: "–" if x is None else format(x, f)
    st, peer, load = data.get("settings", {}), data.get("peer", {}), data.get("load_average", {})
    load_txt = lambda xs: " / ".join(f"{x:.2f}" for x in xs) if xs else "?"
    lines = [
        f"`{data['command']}` on {data['machine']} ({data.get('cpu_model', 'unknown CPU')}), torch {data['torch']}, "
        f"so3krates-torch {data.get('so3krates_torch', '?')}, ASE {data.get('ase', '?')}; "
        "load average (1 / 5 / 15 min) "
        f"{load_txt(load.get('start'))} at the start, {load_txt(load.get('end'))} at the end.",
        "",
        f"{data.get('atoms', '?')}-atom {data.get('structure', 'azobenzene')}, ASE VelocityVerlet at "
        f"{st.get('timestep_fs', 0.5):g} fs, float32. **MD step**: ms per step, median of {st.get('blocks', '?')} "
        f"blocks of {st.get('steps_per_block', '?')} steps after {st.get('warmup_steps', '?')} warm-up steps; every "
        f"block restarts from the same positions and {st.get('temperature_K', 300):g} K velocities, and the "
        "calculators take turns block by block in one process per thread count. **call (E+F)**: one energy + "
        f"forces `calc.calculate`, no integrator, median of {st.get('calls', '?')}. so3krates-torch: "
        f"{fmt(peer.get('parameters'), ',')} parameters, random weights, run through "
        f"{peer.get('calculator_kind', 'its own ASE calculator')}: `{peer.get('calculator', '?')}`. gaq_calc "
        f"({fmt(data.get('gaq', {}).get('parameters'), ',')} parameters): `GAQCalculator`, default kernel. "
        "Ratio: so3krates-torch's ms over the row's, same measure and threads.",
        "",
        "| measure | threads | calculator | model | mode | kernel | ms (median) | min–max | so3krates-torch / this | "
        "in calculate | pairs < cutoff |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        share = r.get("calculate_share")
        lines.append(
            f"| {r['measure']} | {r['threads']} | {r['calculator']} | {r['model']} | {r['mode']} | {r['kernel']} | "
            f"{r['ms']:.2f} | {r['ms_min']:.2f}–{r['ms_max']:.2f} | {fmt(r.get('peer_over_this'), '.2f')}"
            f"{'x' if r.get('peer_over_this') else ''} | {fmt(share and 100 * share, '.0f')}{'%' if share else ''} | "
            f"{fmt(r.get('pairs_at_block_end'), '.0f')} |"
        )
    if peer.get("constructor"):
        args = ", ".join(f"{k}={v!r}" for k, v in peer["constructor"].items())
        lines += ["", f"so3krates-torch model: `So3krates({args})`."]
    if peer.get("mapping"):
        lines += ["", "Mapping (gaq_calc -> so3krates-torch): " + "; ".join(peer["mapping"]) + "."]
    if peer.get("unmatched"):
        lines += ["", "Not matched:", ""] + [f"- {u}" for u in peer["unmatched"]]
    return "\n".join(lines)


def peers_table(path: Path) -> str:
    """README's peers block, from benchmarks/peers.py --json."""
    if not path.exists():
        return "(not run yet: `python benchmarks/peers.py --json benchmarks/results/peers.json`)"
    return peers_markdown(json.loads(path.read_text()))


def scaling_table(path: Path) -> str:
    """README's large-systems block, from benchmarks/scaling.py --json: time per atom of gaq_calc and
    so3krates-torch on clusters and periodic boxes of azobenzene."""
    if not path.exists():
        return "(not run yet: `python benchmarks/scaling.py --peer --json benchmarks/results/scaling.json`)"
    data = json.loads(path.read_text())
    fmt = lambda x, f: "–" if x is None else format(x, f)
    load = data.get("load_average") or {}
    load_txt = lambda xs: " / ".join(f"{x:.2f}" for x in xs) if xs else "?"
    lines = [
        f"`{data['command']}` on {data['machine']}, torch {data['torch']}, so3krates-torch "
        f"{data.get('so3krates_torch') or '–'}, {data['threads']} thread(s), {data['model']}, molecules "
        f"{data['spacing_A']:g} Å apart; load average (1 / 5 / 15 min) {load_txt(load.get('start'))} at the start, "
        f"{load_txt(load.get('end'))} at the end.",
        "",
        "| structure | atoms | edges / atom | gaq_calc ms / call | gaq_calc µs / atom | so3krates-torch ms / call | "
        "so3krates-torch µs / atom | so3krates-torch / gaq_calc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        kind = "periodic box" if r["periodic"] else "cluster"
        peer = r.get("peer_ms_per_call")
        lines.append(
            f"| {kind} of {r['molecules']} | {r['atoms']} | {r['edges_per_atom']:.1f} | {r['gaq_ms_per_call']:.1f} | "
            f"{r['gaq_us_per_atom']:.1f} | {fmt(peer, '.1f')} | {fmt(r.get('peer_us_per_atom'), '.1f')} | "
            f"{fmt(peer and peer / r['gaq_ms_per_call'], '.2f')}{'x' if peer else ''} |"
        )
    return "\n".join(lines)


def replace_block(text: str, markers: tuple[str, str], body: str, source: str) -> str:
    start, end = markers
    if start not in text or end not in text:
        raise SystemExit(f"README has no {start} ... {end} block")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n<!-- generated by gaq-report from {source}; do not edit -->\n{body}\n{end}{tail}"


def update_readme(
    readme: Path, table: str, speed: str, quant: str, md: str, ablation: str = "", qm9: str | None = None
) -> None:
    from gaq_calc.cli.qm9_table import MARKERS as QM9

    text = replace_block(readme.read_text(), RESULTS, table, "models/*/card.json")
    if ABLATION[0] in text:
        text = replace_block(text, ABLATION, ablation, "models/*/card*.json and results/qat_ablation/*/card*.json")
    if SENSITIVITY[0] in text:
        body = tables_per_result(REPO / "results" / "quant_sensitivity", sensitivity_table)
        text = replace_block(text, SENSITIVITY, body, "results/quant_sensitivity/*.json")
    if SAMPLING[0] in text:
        text = replace_block(
            text, SAMPLING, sampling_table(REPO / "results" / "md" / "sampling"), "results/md/sampling.md"
        )
    if HEATING[0] in text:
        body = heating_table(REPO / "results" / "md_heating")
        text = replace_block(text, HEATING, body, "results/md_heating/heating.json")
    if LEE_FLIPS[0] in text:
        text = replace_block(
            text, LEE_FLIPS, lee_flips_table(REPO / "results" / "lee_flips"), "results/lee_flips/*.json"
        )
    if qm9 is not None and QM9[0] in text:
        text = replace_block(text, QM9, qm9, "models/qm9_*/card*.json and log.csv")
    text = replace_block(text, MD, md, "results/md/*/summary.json")
    for markers, name in ((DEPLOY, "deploy"), (KERNELS, "kernel_agreement"), (QUANTIZED_SPEED, "quantized_speed")):
        path = REPO / "benchmarks" / "results" / f"{name}.json"
        if markers[0] in text:
            body = json.loads(path.read_text())["markdown"] if path.exists() else "(not run yet)"
            text = replace_block(text, markers, body, f"benchmarks/results/{name}.json")
    if PEERS[0] in text:
        text = replace_block(
            text, PEERS, peers_table(REPO / "benchmarks" / "results" / "peers.json"), "benchmarks/results/peers.json"
        )
    if SCALING[0] in text:
        source = "benchmarks/results/scaling.json"
        text = replace_block(text, SCALING, scaling_table(REPO / source), source)
    text = replace_block(text, QUANT, quant, "models/*/card.json and results/quant_baselines/*/card.json")
    text = replace_block(text, SPEED, speed, "benchmarks/results/md_step.json")
    write_text_atomic(readme, text)


@one_line_errors("gaq-report")
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="gaq-report", description=__doc__)
    parser.add_argument("--readme", default=str(REPO / "README.md"))
    parser.add_argument(
        "--results",
        default=str(REPO / "results"),
        help="folder of quant_baselines/*/card.json; quant_table.md/.json are written here",
    )
    parser.add_argument("--molecule", default="azobenzene", help="test set of the quantization table")
    parser.add_argument("--print", action="store_true", help="print the tables instead of writing files")
    args = parser.parse_args(argv)
    table = results_table(models_dir())
    results = Path(args.results)
    quant, records = quant_table(quant_cards(models_dir(), results / "quant_baselines", args.molecule))
    speed = speed_table(REPO / "benchmarks" / "results" / "md_step.json")
    md = md_table(results / "md")
    ablation, ablation_records = ablation_table(models_dir(), results / "qat_ablation")
    from gaq_calc.cli.qm9_table import qm9_table

    qm9 = qm9_table(models_dir())
    if args.print:
        print(table + "\n\n" + quant + "\n\n" + ablation + "\n\n" + md + "\n\n" + speed + "\n\n" + qm9)
    else:
        write_quant_table(results, quant, records)
        write_table(results / "qat_ablation.md", ablation + "\n")
        write_table(results / "qat_ablation.json", json.dumps(ablation_records, indent=1) + "\n")
        update_readme(Path(args.readme), table, speed, quant, md, ablation, qm9)
        print(f"updated {args.readme}, {results / 'quant_table.md'} and {results / 'quant_table.json'}")


if __name__ == "__main__":
    main()
