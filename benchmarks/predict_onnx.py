"""Whole predictions on the CPU: a fine-tuned checkpoint against its ONNX export, end to end, with
onnxruntime session settings and window batches tried one by one.

    python benchmarks/predict_onnx.py                                 # every row, results/predict_onnx_cpu2.*
    python benchmarks/predict_onnx.py --rows pytorch onnx --json runs/bench/po.json

Per-window timings (benchmarks/export.py) leave out what a prediction does around the windows:
loading the model (an onnxruntime session is built and its graph optimised), reading and
preprocessing the volume, stitching the windows, inverting the preprocessing and writing the mask;
and the memory that onnxruntime keeps (its arena, its memory patterns) next to PyTorch's. Here each
row is one ``swinssl.infer.predict`` of a real CT (default ``../shared/data/ct/lung1_image.nrrd``,
512x512x48, relative to the repository root) with ``cache="off"``, so every row reads and
preprocesses the volume afresh, in a fresh child process of this script (``--child``), so its peak
resident memory is its own.

The model: a tiny SwinUNETR (``finetune/tiny``: feature 12, depths 2,2,2,2, 64^3 windows, the
volume's own spacing, CT) fine-tuned for 2 steps on phantoms (``write_phantom_dataset``) -- the
weights barely matter for time, and the masks are compared between backends, not with a label --
and exported with ``swinssl export RUN --out predictor.onnx``; both are kept in ``--work`` and
reused (``--fresh`` remakes them).

Rows (``--rows``): a backend, ``pytorch`` (the checkpoint: what ``swinssl predict RUN`` does) or
``onnx`` (the ONNX file through ``swinssl.infer.exported._load_onnx`` as shipped), then modifiers
separated by ", " -- the same volume, threads and options otherwise. ``onnx opset 25, mem pattern,
batched`` is swinssl as shipped before this benchmark (opset 25, memory patterns on, a forward
pass's windows in one run); ``onnx`` as shipped now:

  b1                one window per forward pass (``sw_batch_size=1``; the default is ``window_batch``:
                    one window per torch thread)
  batched           a forward pass's windows in one session run (``OnnxPredictor.forward`` replaced in
                    the child: swinssl before this benchmark; now one window per run)
  <session setting> one ``SessionOptions`` attribute or session config entry set (``SESSION_VARIANTS``:
                    no arena, (no) mem pattern, (no) spinning, parallel, opt extended / basic,
                    intra = cores), applied by wrapping ``onnxruntime.InferenceSession`` in the child
                    on top of what the shipped loader sets
  iobinding         batched, through ``run_with_iobinding``: onnxruntime writes the logits straight
                    into a torch tensor (``OnnxPredictor.forward`` replaced in the child)
  opset N           the same checkpoint exported at opset N (``swinssl.infer.export.ONNX_OPSET``
                    patched; without it, the opset ``swinssl export`` writes, now 24). swinssl exported
                    at opset 25 before this benchmark: onnxruntime 1.32 has no kernel for
                    ``Attention``-25 and runs that operator's function body instead (Cast, Where,
                    Expand, MatMul, Softmax... on 125x3x343x343 score tensors per window)

Columns: wall and process CPU seconds of the ``predict`` call (all threads), the part of it spent
loading the model (for ONNX: building the session) and in the sliding windows (windows and
stitching); the child's peak resident memory (``ru_maxrss`` of the child, from ``os.wait4``, the
per-child ``RUSAGE_CHILDREN``) and its resident memory before ``predict`` (the interpreter, torch,
onnxruntime and swinssl imported); the CPU seconds other processes used meanwhile (/proc/stat: a
row that shared the machine says so); the share of mask voxels equal to the pytorch row's. Rows run
one after the other (``--repeats`` rounds, the rows taking turns; the table shows each row's median).
Writes ``--out``.txt / .json (``--json`` another JSON file too); ``--append`` adds the run's table
after those already there (e.g. a few rows again with more ``--repeats``), ``--from-json`` renders
saved tables again without measuring.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VOLUME = ROOT / ".." / "shared" / "data" / "ct" / "lung1_image.nrrd"

# A row: a backend ("pytorch" or "onnx"), then modifiers separated by ", " (e.g. "onnx opset 25, b1").
# Session modifiers: name -> (SessionOptions attributes, session config entries); enum values by member name.
SESSION_VARIANTS: dict[str, tuple[dict, dict]] = {
    "no arena": ({"enable_cpu_mem_arena": False}, {}),
    "no mem pattern": ({"enable_mem_pattern": False}, {}),
    "mem pattern": ({"enable_mem_pattern": True}, {}),
    "no spinning": ({}, {"session.intra_op.allow_spinning": "0"}),
    "spinning": ({}, {"session.intra_op.allow_spinning": "1"}),
    "parallel": ({"execution_mode": "ORT_PARALLEL", "inter_op_num_threads": 2}, {}),
    "opt extended": ({"graph_optimization_level": "ORT_ENABLE_EXTENDED"}, {}),
    "opt basic": ({"graph_optimization_level": "ORT_ENABLE_BASIC"}, {}),
    "intra = cores": ({"intra_op_num_threads": os.cpu_count() or 1}, {}),
}
# Other modifiers: b1 (one window per forward pass), batched (a forward pass's windows in one session run),
# iobinding (the same through run_with_iobinding into a torch tensor), opset N (the same checkpoint exported
# at opset N: swinssl.infer.export.ONNX_OPSET patched).
OPSETS = (23, 24, 25)
MODIFIERS = ["b1", "batched", "iobinding", *(f"opset {n}" for n in OPSETS), *SESSION_VARIANTS]
BEFORE = "opset 25, mem pattern, batched"  # swinssl's export and settings before this benchmark
DEFAULT_ROWS = ["pytorch", f"onnx {BEFORE}", "onnx", "onnx batched", "onnx mem pattern", "onnx no arena",
                "onnx no spinning", "onnx opt extended", "onnx iobinding", "onnx mem pattern, batched"]


def modifiers(row: str) -> tuple[str, list[str]]:
    """(backend, modifiers) of a row name; ``SystemExit`` for an unknown one."""
    backend, _, rest = row.partition(" ")
    mods = [m.strip() for m in rest.split(",") if m.strip()]
    unknown = [m for m in mods if m not in MODIFIERS or backend == "pytorch" and m != "b1"]
    if backend not in ("pytorch", "onnx") or unknown:
        raise SystemExit(f"row {row!r}: a backend (pytorch, onnx) then modifiers among {', '.join(MODIFIERS)} "
                         "(pytorch: b1 only), separated by ', '")
    return backend, mods


# --- the child: one whole prediction -------------------------------------------------------------------------


def child(spec: dict) -> dict:
    import resource

    import torch

    torch.set_num_threads(spec["threads"])
    import onnxruntime as ort

    import swinssl.infer.exported as exported
    import swinssl.infer.volume as volume
    from swinssl.infer import PredictOptions, predict
    from swinssl.results import PredictionFolder

    row = spec["row"]
    spent = {"load_s": 0.0, "windows_s": 0.0}

    def timed(key, function):
        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - start
        return wrapped

    volume.sliding_window_inference = timed("windows_s", volume.sliding_window_inference)
    if row.startswith("onnx"):  # the shipped loader, timed (sessions built with the row's settings, below)
        exported._load_onnx = timed("load_s", exported._load_onnx)
    else:
        import swinssl.infer.model as model

        model.load_model = timed("load_s", model.load_model)
    backend, mods = modifiers(row)
    sessions = [SESSION_VARIANTS[m] for m in mods if m in SESSION_VARIANTS]
    if sessions:
        session_class = ort.InferenceSession

        def session(path, options, **kwargs):
            for attributes, entries in sessions:
                for name, value in attributes.items():
                    if isinstance(value, str):  # an enum member's name
                        value = getattr(ort.ExecutionMode, value, None) or getattr(ort.GraphOptimizationLevel, value)
                    setattr(options, name, value)
                for key, value in entries.items():
                    options.add_session_config_entry(key, value)
            return session_class(path, options, **kwargs)

        ort.InferenceSession = session
    if "batched" in mods:
        def forward(self, x):
            window = x.detach().to("cpu", torch.float32).contiguous().numpy()
            return torch.from_numpy(self.session.run([exported.OUTPUT_NAME], {exported.INPUT_NAME: window})[0])

        exported.OnnxPredictor.forward = forward
    if "iobinding" in mods:
        import numpy as np

        def forward(self, x):
            window = x.detach().to("cpu", torch.float32).contiguous()
            out = torch.empty((window.shape[0], self.plan.out_channels, *self.roi))
            binding = self.session.io_binding()
            binding.bind_input(exported.INPUT_NAME, "cpu", 0, np.float32, tuple(window.shape), window.data_ptr())
            binding.bind_output(exported.OUTPUT_NAME, "cpu", 0, np.float32, tuple(out.shape), out.data_ptr())
            self.session.run_with_iobinding(binding)
            return out

        exported.OnnxPredictor.forward = forward
    batch = 1 if "b1" in mods else None
    opset = next((int(m.split()[1]) for m in mods if m.startswith("opset ")), None)
    source = spec["checkpoint"] if backend == "pytorch" else spec["onnx"][str(opset or spec["opset"])]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_before = _rss_kib()
    wall, cpu = time.perf_counter(), time.process_time()
    written = predict(source, spec["volume"], spec["out"], PredictOptions(cache="off", sw_batch_size=batch),
                      progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    record = PredictionFolder(spec["out"]).read_record()
    return {"row": row, "wall_s": wall, "cpu_s": cpu, **spent, "rss_before_mib": rss_before / 1024,
            "maxrss_before_mib": before / 1024, "mask": str(written[0]),
            "sw_batch_size": record["options"]["sw_batch_size"]}


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


# --- the parent: model, rows, masks, table ---------------------------------------------------------------------


def prepare(work: Path, fresh: bool, opsets: list[int]) -> tuple[Path, int, dict[int, Path]]:
    """(run directory, the opset swinssl exports at, {opset: ONNX file}): a tiny model fine-tuned for 2 steps
    on phantoms, exported with ``swinssl export`` (at the shipped opset) and at the other ``opsets``
    (``export_predictor`` with ``ONNX_OPSET`` patched); all reused, an export once per opset."""
    import swinssl.infer.export as export

    run, shipped = work / "ft", export.ONNX_OPSET
    files = {n: work / f"predictor_opset{n}.onnx" for n in {shipped, *opsets}}
    if fresh or not (run / "checkpoints").is_dir():
        from swinssl.config import load_config
        from swinssl.data.phantom import write_phantom_dataset
        from swinssl.engine.finetune import finetune

        phantoms = work / "phantoms"
        if fresh or not (phantoms / "dataset.json").is_file():
            write_phantom_dataset(phantoms, cases=4, size=64, seed=1)
        shutil.rmtree(run, ignore_errors=True)
        cfg = load_config("finetune/tiny", [
            f"data={phantoms / 'dataset.json'}", f"train.out={work}", "train.name=ft", "train.steps=2",
            "train.num_workers=0", "train.val_every=1000", "train.checkpoint_every=2", "train.log_every=2",
            "train.warmup_steps=1"])
        run = Path(finetune(cfg, progress=False))
        for path in work.glob("predictor_opset*.onnx"):
            path.unlink()
    for opset, path in files.items():
        if path.is_file():
            continue
        start = time.perf_counter()
        if opset == shipped:
            subprocess.run([str(Path(sys.executable).with_name("swinssl")), "export", str(run), "--out", str(path)],
                           check=True, stdout=sys.stderr)
        else:
            export.ONNX_OPSET = opset
            export.export_predictor(run, path)
            export.ONNX_OPSET = shipped
        print(f"  exported {path} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return run, shipped, files


def graph_facts(onnx_file: Path) -> dict:
    """The ONNX file's input and output dimensions (a named dimension is dynamic) and its size."""
    import onnx

    model = onnx.load(str(onnx_file), load_external_data=False)

    def dims(value) -> list:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    return {"input": dims(model.graph.input[0]), "output": dims(model.graph.output[0]),
            "nodes": len(model.graph.node), "mb": onnx_file.stat().st_size / 2**20,
            "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
            "attention": sum(n.op_type == "Attention" for n in model.graph.node),
            "attention_kernels": _attention_kernels(onnx_file)}


def _attention_kernels(onnx_file: Path) -> int:
    """How many Attention nodes onnxruntime keeps as such (the rest it replaces by the operator's
    function body, for want of a kernel): the graph it loads, optimisations off, saved and counted."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.optimized_model_filepath = str(Path(folder) / "loaded.onnx")
        ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        return sum(n.op_type == "Attention" for n in onnx.load(options.optimized_model_filepath).graph.node)


def run_row(spec: dict) -> dict:
    """One row in a fresh child; its result with the child's peak RSS (``os.wait4``) and CPU seconds."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result:
        start, busy = time.perf_counter(), _busy_cpu_s()
        proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps({**spec, "result": result.name})])
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise SystemExit(f"row {spec['row']!r} failed (exit {proc.returncode})")
        row = json.loads(Path(result.name).read_text())
    cpu = usage.ru_utime + usage.ru_stime
    row.update(process_s=time.perf_counter() - start, process_cpu_s=cpu, peak_mib=usage.ru_maxrss / 1024,
               others_cpu_s=max(0.0, _busy_cpu_s() - busy - cpu))
    print(f"  {row['row']}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)),
          file=sys.stderr, flush=True)
    return row


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all processes, all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def agreement(mask: str, reference: str) -> tuple[float, int]:
    """(share of equal voxels, number of differing voxels) of two masks."""
    import nibabel as nib
    import numpy as np

    got, want = (np.asarray(nib.load(p).dataobj) for p in (mask, reference))
    if got.shape != want.shape:
        return 0.0, int(max(got.size, want.size))
    return float((got == want).mean()), int((got != want).sum())


def summarise(runs: list[dict]) -> list[dict]:
    """One row per name: the medians of its rounds, its mask agreement with the first pytorch round."""
    names = list(dict.fromkeys(r["row"] for r in runs))
    reference = next((r["mask"] for r in runs if r["row"] == "pytorch"), runs[0]["mask"])
    rows = []
    for name in names:
        mine = [r for r in runs if r["row"] == name]
        row = {"row": name, "rounds": len(mine), "sw_batch_size": mine[0]["sw_batch_size"]}
        for key in ("wall_s", "cpu_s", "load_s", "windows_s", "process_s", "process_cpu_s", "peak_mib",
                    "rss_before_mib", "others_cpu_s"):
            row[key] = statistics.median(r[key] for r in mine)
        agreements = [agreement(r["mask"], reference) for r in mine]
        row["equal_voxels"] = min(a[0] for a in agreements)
        row["differing_voxels"] = max(a[1] for a in agreements)
        rows.append(row)
    return rows


COLUMNS = [("row", "row", "{}"), ("batch", "sw_batch_size", "{}"), ("wall s", "wall_s", "{:.1f}"),
           ("cpu s", "cpu_s", "{:.1f}"), ("load s", "load_s", "{:.1f}"), ("windows s", "windows_s", "{:.1f}"),
           ("peak MiB", "peak_mib", "{:.0f}"), ("base MiB", "rss_before_mib", "{:.0f}"),
           ("others cpu s", "others_cpu_s", "{:.1f}"),
           ("x wall", None, ""), ("x peak", None, ""), ("equal voxels", "equal_voxels", "{:.7f}"),
           ("diff voxels", "differing_voxels", "{}")]


def table(rows: list[dict], header: str, facts: list[str]) -> str:
    base = next((r for r in rows if r["row"] == "pytorch"), rows[0])
    widths = [max(len(r["row"]) for r in rows) + 2] + [13] * (len(COLUMNS) - 1)
    def line(cells: list[str]) -> str:
        return "".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [header, "", line([c[0] for c in COLUMNS]), "-" * sum(widths)]
    for r in rows:
        cells = []
        for title, key, fmt in COLUMNS:
            if title == "x wall":
                cells.append(f"{r['wall_s'] / base['wall_s']:.2f}")
            elif title == "x peak":
                cells.append(f"{r['peak_mib'] / base['peak_mib']:.2f}")
            else:
                cells.append(fmt.format(r[key]))
        lines.append(line(cells))
    lines += ["", "row: the backend (pytorch = the checkpoint, onnx = its ONNX export as swinssl loads it) and what "
                  "the row changes (benchmarks/predict_onnx.py: b1 = one window per forward pass, opset N = exported "
                  "at opset N (none: the opset swinssl export writes), batched = a forward pass's windows in one "
                  "session run, iobinding = batched through run_with_iobinding, the others onnxruntime session "
                  "settings; 'onnx opset 25, mem pattern, batched' = swinssl before this benchmark); batch: windows "
                  "per forward pass; wall s / cpu s: wall and process CPU seconds (all threads) of the whole predict "
                  "call (load, read, preprocess, windows, invert, write); "
                  "load s: loading the model (ONNX: building the session); windows s: the sliding windows (network and "
                  "stitching); peak MiB: the child's peak resident memory (ru_maxrss); base MiB: its resident memory "
                  "before predict (imports); others cpu s: CPU seconds other processes used during the row "
                  "(0: a quiet machine); x wall / x peak: against the pytorch row; equal voxels / diff voxels: "
                  "share of mask voxels equal to the pytorch row's (its first round), number differing (the worst "
                  "round).", *facts]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        spec = json.loads(sys.argv[2])
        Path(spec["result"]).write_text(json.dumps(child(spec)))
        return
    if len(sys.argv) == 5 and sys.argv[1] == "--prepare":
        run, shipped, files = prepare(Path(sys.argv[2]), sys.argv[3] == "fresh", json.loads(sys.argv[4]))
        print(json.dumps({"checkpoint": str(run), "opset": shipped, "onnx": {n: str(f) for n, f in files.items()},
                          "graphs": {n: graph_facts(f) for n, f in files.items()}}))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volume", type=Path, default=DEFAULT_VOLUME)
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS,
                        help=f"Rows: pytorch or onnx, then modifiers separated by ', ' ({', '.join(MODIFIERS)}).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="Rounds over the rows (the table: each row's median).")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench" / "predict_onnx",
                        help="Folder for the model, its export and the masks (kept; the model is reused).")
    parser.add_argument("--fresh", action="store_true", help="Fine-tune and export the model again.")
    parser.add_argument("--note", default="", help="A line added to the header (e.g. how busy the machine was).")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "predict_onnx_cpu2")
    parser.add_argument("--json", type=Path, help="Also write the JSON here.")
    parser.add_argument("--append", action="store_true",
                        help="Add this run's table after those already in --out (a second run, e.g. more repeats).")
    parser.add_argument("--from-json", type=Path, nargs="+", metavar="JSON",
                        help="Measure nothing: render the tables of these JSON files (written by this script) to "
                             "--out, the masks compared again from the paths they record.")
    args = parser.parse_args()
    if args.from_json:
        payloads = [t for f in args.from_json for t in json.loads(f.read_text()).get("tables", [])]
        write(args, [{**p, "rows": summarise(p["runs"])} for p in payloads], args.append)
        return
    for name in args.rows:
        modifiers(name)
    # The parent stays small (no torch): a child's ru_maxrss starts from its parent's high-water mark.
    args.work.mkdir(parents=True, exist_ok=True)
    opsets = sorted({int(m.split()[1]) for name in args.rows for m in modifiers(name)[1] if m.startswith("opset ")})
    prepared = json.loads(subprocess.run([sys.executable, __file__, "--prepare", str(args.work),
                                          "fresh" if args.fresh else "reuse", json.dumps(opsets)], check=True,
                                         stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1])
    load = os.getloadavg()[0]
    volume = args.volume.resolve()
    runs = []
    for round_ in range(args.repeats):
        for name in args.rows:
            out = args.work / "masks" / f"{name.replace(' ', '_').replace(',', '')}_{round_}"
            runs.append(run_row({"row": name, "threads": args.threads, "volume": str(volume), "out": str(out),
                                 **{k: prepared[k] for k in ("checkpoint", "opset", "onnx")}}))
    header = (f"swinssl whole predictions on the CPU, {volume.name} (cache off), tiny model (feature 12, "
              f"depths 2,2,2,2, 64^3 windows), pytorch against its ONNX export; torch {version('torch')}, onnxruntime "
              f"{version('onnxruntime')}, {args.threads} threads, {os.cpu_count()} cores, "
              f"{platform.processor() or platform.machine()}; each row a fresh process, median of {args.repeats}; "
              f"load average {load:.2f} at the start. {args.note}").strip()
    payload = {"command": shlex.join(["python", "benchmarks/predict_onnx.py", *sys.argv[1:]]), "header": header,
               "opset": prepared["opset"], "graphs": prepared["graphs"], "rows": summarise(runs), "runs": runs}
    write(args, [payload], args.append)


def render(payload: dict) -> str:
    shipped = " (swinssl export: the rows without opset)"
    graph = [f"ONNX file at opset {f['opset']}{shipped if int(n) == payload['opset'] else ''}: {f['mb']:.0f} MB, "
             f"{f['nodes']} nodes, input {f['input']}, output {f['output']} (a named dimension is "
             f"dynamic); Attention nodes {f['attention']}, of which onnxruntime runs {f['attention_kernels']} with "
             "its kernel (the others as the operator's function body)" for n, f in sorted(payload["graphs"].items())]
    return table(payload["rows"], payload["header"], graph) + f"\ncommand: {payload['command']}"


def write(args: argparse.Namespace, payloads: list[dict], append: bool) -> None:
    """The tables of ``payloads`` to ``--out``.txt and .json (and ``--json``): after the ones there with ``append``."""
    out_json = args.out.with_suffix(".json")
    if append and out_json.is_file():
        payloads = json.loads(out_json.read_text())["tables"] + payloads
    text = "\n\n\n".join(render(p) for p in payloads)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".txt").write_text(text + "\n")
    document = json.dumps({"tables": payloads}, indent=2) + "\n"
    out_json.write_text(document)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(document)

if __name__ == "__main__":
    main()
