"""The GPU report (issue 26): the figures that need an accelerator, measured in priority
order within a time budget, for a machine lent for minutes.

    bash scripts/gpu_report.sh OUT_DIR [--smoke]          (the wrapper: cache dir, deadline)
    python -m scripts.gpu_report OUT_DIR [--smoke] [--budget-s S] [--sections a,b]

Sections, in order: environment (copy bandwidth), decode (1.5b, batch 1), command_buffers,
batch8, kernel (Pallas), train (1.5b), decode_125m. Each runs in a worker process
(`gpu_report_sections.py`) under a budget of its own, cut to the time left of the global
one; a section that fails, dies or runs out of time is recorded with its error (and what it
had measured so far) and the next one runs in a fresh worker. `OUT_DIR/gpu_report.json` and
`gpu_report.md` are rewritten after every section and every partial result, so a kill
leaves what was measured. `--smoke` runs every section on tiny float32 shapes (on CPU, in
a minute or two): the same keys, for the test and for a check before GPU time is spent.
This process never imports jax: only the workers touch the device.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import queue
import re
import signal
import subprocess
import sys
import threading
import time

from nvium_jax.paths import atomic_write_text

REPO = pathlib.Path(__file__).resolve().parent.parent
COMMAND_BUFFER_FLAGS = "--xla_gpu_enable_command_buffer=+CONDITIONAL,+WHILE"
# Smoke only: one CPU device (as on the one-GPU machine, whatever the tests simulate) and a
# quick compile (the smoke run checks the plumbing, not the speed).
_SMOKE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S+")
BUDGET_S = {"gpu": 480.0, "smoke": 300.0}
MIN_SECTION_S = 5.0  # a section with less time left than this is skipped


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    title: str
    gpu_s: float  # budget on the GPU
    smoke_s: float
    xla_flags: str = ""  # XLA flags of its own: it runs in a worker started with them


SECTIONS = (
    Section("environment", "Environment, copy bandwidth", 30, 60),
    Section("decode", "Decode, batch 1", 180, 120),
    Section("command_buffers", "Decode, batch 1, command buffers", 90, 120, COMMAND_BUFFER_FLAGS),
    Section("batch8", "Decode, batch 8", 60, 120),
    Section("kernel", "Pallas cache attention", 45, 90),
    Section("train", "Training", 120, 120),
    Section("decode_125m", "Decode, batch 1, small model", 60, 60),
)


class Worker:
    """A `gpu_report_sections` process: requests on its stdin, events from its stdout (read
    by a thread into a queue, so that waiting for one can time out)."""

    def __init__(self, xla_flags: str, smoke: bool, log_path: pathlib.Path):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        flags = env.get("XLA_FLAGS", "")
        if smoke:
            flags = f"{_DEVICE_COUNT_FLAG.sub('', flags)} {_SMOKE_FLAGS}"
        env["XLA_FLAGS"] = f"{flags} {xla_flags}".strip()
        self.xla_flags = xla_flags
        self.log_path = log_path
        with open(log_path, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "scripts.gpu_report_sections", *(["--smoke"] if smoke else [])],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, cwd=REPO, text=True)
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.events.put(json.loads(line))
        self.events.put(None)  # end of stream: the worker exited

    def run(self, name: str, earlier: dict, limit_s: float, on_partial) -> dict:
        """Runs one section; returns {"status", "error", "result"}."""
        stop = time.monotonic() + limit_s
        try:
            self.proc.stdin.write(json.dumps({"section": name, "earlier": earlier}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died: the end of its stream says how
        result = None
        while True:
            try:
                event = self.events.get(timeout=max(0.0, stop - time.monotonic()))
            except queue.Empty:
                return {"status": "timeout", "error": f"timed out after {limit_s:.0f} s", "result": result}
            if event is None:
                code = self.proc.wait()
                return {"status": "error", "result": result,
                        "error": f"worker exited with code {code}; worker.log ends: {self._log_tail()}"}
            if event["event"] == "partial":
                result = event["result"]
                on_partial(result)
            elif event["event"] == "done":
                return {"status": "ok", "error": None, "result": event["result"]}
            else:
                return {"status": "error", "error": event["error"], "result": result}

    def _log_tail(self, lines: int = 3) -> str:
        return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])

    def close(self, kill: bool = False) -> None:
        if not kill:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                pass
        self.proc.kill()
        self.proc.wait()


def earlier_results(report: dict) -> dict:
    return {name: entry["result"] for name, entry in report["sections"].items() if entry.get("result")}


def write_report_files(out_dir: pathlib.Path, report: dict) -> None:
    atomic_write_text(out_dir / "gpu_report.json", json.dumps(report, indent=1) + "\n")
    try:
        markdown = render_markdown(report)
    except Exception as error:  # noqa: BLE001 — the JSON holds the figures; never lose a run to a table
        markdown = f"# GPU report\n\nthe table failed ({error!r}): see gpu_report.json\n"
    atomic_write_text(out_dir / "gpu_report.md", markdown)


def run(out_dir: pathlib.Path, smoke: bool, budget_s: float, names: list[str]) -> dict:
    started = time.monotonic()
    deadline = started + budget_s
    report = {"command": " ".join(sys.argv), "smoke": smoke, "budget_s": budget_s,
              "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "elapsed_s": 0.0, "sections": {}}

    def save(name: str, entry: dict) -> None:
        report["sections"][name] = entry
        report["elapsed_s"] = round(time.monotonic() - started, 1)
        write_report_files(out_dir, report)

    worker = None
    try:
        for section in (s for s in SECTIONS if s.name in names):
            left = deadline - time.monotonic()
            limit = min(section.smoke_s if smoke else section.gpu_s, left)
            if limit < MIN_SECTION_S:
                save(section.name, {"status": "skipped", "error": f"{max(left, 0):.0f} s of the budget left",
                                    "seconds": 0.0, "limit_s": round(limit, 1), "result": None})
                continue
            if worker is not None and worker.xla_flags != section.xla_flags:
                worker.close()
                worker = None
            if worker is None:
                worker = Worker(section.xla_flags, smoke, out_dir / "worker.log")
            begun = time.monotonic()
            base = {"status": "running", "error": None, "limit_s": round(limit, 1)}
            partial = lambda result: save(section.name, {**base, "seconds": round(time.monotonic() - begun, 1),
                                                         "result": result})
            save(section.name, {**base, "seconds": 0.0, "result": None})
            outcome = worker.run(section.name, earlier_results(report), limit, partial)
            if outcome["error"]:
                outcome["error"] = outcome["error"][:2000]
            save(section.name, {**base, **outcome, "seconds": round(time.monotonic() - begun, 1)})
            print(f"gpu_report: {section.name}: {outcome['status']} in {time.monotonic() - begun:.1f} s"
                  + (f" — {outcome['error'][:300]}" if outcome["error"] else ""), file=sys.stderr)
            if outcome["status"] == "timeout" or worker.proc.poll() is not None:
                worker.close(kill=True)  # timed out or died: the next section gets a fresh worker
                worker = None
    except BaseException as stop:  # SIGTERM from the wrapper's deadline, ^C: say so, keep the rest
        running = [n for n, e in report["sections"].items() if e["status"] == "running"]
        for name in running:
            save(name, {**report["sections"][name], "status": "killed", "error": f"killed ({stop!r})"})
        raise
    finally:
        if worker is not None:
            worker.close(kill=True)
    return report


# ---- Markdown ---------------------------------------------------------------------------
def _f(x, spec: str = ".3g", scale: float = 1.0) -> str:
    return "–" if x is None else format(x * scale, spec)


def _model_name(config: str) -> str:
    return pathlib.Path(config.split()[0]).stem


def _headline(name: str, r: dict) -> str:
    if name == "environment":
        return (f"{r['device_kind']} ({r['backend']}), jax {r['jax_version']}, copy "
                f"{_f(r['copy_bandwidth_bytes_per_s'], '.0f', 1e-9)} GB/s")
    if name == "kernel":
        return "; ".join(f"B={x['batch']} T={x['queries']}: err {_f(x['max_abs_err_out'], '.1e')}, "
                         f"Pallas {_f(x['pallas_speedup'], '.2f')}× the reference" for x in r["rows"])
    if name == "train":
        return (f"step N-vium/baseline {_f(r['step_ratio'], '.3f')}, MFU baseline "
                f"{_f(r['baseline_mfu'], '.1%')} / N-vium {_f(r['nvium_mfu'], '.1%')} "
                f"(micro-batch {r['micro_batch']})")
    text = "; ".join(f"B={x['batch']} P={x['prompt_tokens']}: {_f(x['speedup'], '.2f')}× baseline "
                     f"(ideal {_f(x['ideal_speedup'], '.2f')}, efficiency {_f(x['efficiency'], '.2f')}), "
                     f"baseline at {_f(x['baseline_roofline_fraction'], '.0%')} of roofline" for x in r["rows"])
    if name == "command_buffers":
        text += (f"; tokens/s vs default: deferred {_f(r.get('nvium_vs_default'), '.2f')}×, "
                 f"baseline {_f(r.get('baseline_vs_default'), '.2f')}×")
    return text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def _details(name: str, r: dict) -> list[str]:
    if name == "kernel":
        return _table(["batch", "queries", "max abs err out", "max abs err lse", "Pallas µs", "reference µs"],
                      [[str(x["batch"]), str(x["queries"]), _f(x["max_abs_err_out"], ".1e"),
                        _f(x["max_abs_err_lse"], ".1e"), _f(x["pallas_s"], ".1f", 1e6),
                        _f(x["reference_s"], ".1f", 1e6)] for x in r["rows"]])
    if name == "train":
        return _table(["model", "step s", "tokens/s", "MFU", "model TFLOP/s"],
                      [[m, _f(r[f"{m}_step_s"], ".4g"), _f(r[f"{m}_tokens_per_s"], ".4g"),
                        _f(r[f"{m}_mfu"], ".1%"), _f(r[f"{m}_model_tflops_per_s"], ".3g")]
                       for m in ("nvium", "baseline")])
    if name == "environment":
        return []
    return _table(["batch", "prompt", "new", "deferred tok/s", "dense tok/s", "baseline tok/s", "speedup",
                   "vs dense", "ideal", "efficiency", "baseline GB/s", "roofline"],
                  [[str(x["batch"]), str(x["prompt_tokens"]), str(x["new_tokens"]),
                    _f(x["nvium_tokens_per_s"], ".1f"), _f(x["dense_tokens_per_s"], ".1f"),
                    _f(x["baseline_tokens_per_s"], ".1f"), _f(x["speedup"], ".3f"),
                    _f(x["speedup_vs_dense"], ".3f"), _f(x["ideal_speedup"], ".3f"), _f(x["efficiency"], ".3f"),
                    _f(x["baseline_bytes_per_s"], ".1f", 1e-9), _f(x["baseline_roofline_fraction"], ".1%")]
                   for x in r["rows"]])


def render_markdown(report: dict) -> str:
    lines = [f"# GPU report{' (smoke: tiny shapes, not figures)' if report['smoke'] else ''}", "",
             f"`{report['command']}` — started {report['started_utc']}, {report['elapsed_s']} s of "
             f"a {report['budget_s']:.0f} s budget.", ""]
    titles = {s.name: s.title for s in SECTIONS}
    rows = []
    for i, (name, entry) in enumerate(report["sections"].items(), 1):
        headline = _headline(name, entry["result"]) if entry["result"] else ""
        if entry["result"] and "config" in entry["result"]:
            headline = f"{_model_name(entry['result']['config'])}: {headline}"
        if entry["error"]:
            headline = f"{headline} **{entry['status']}: {entry['error'][:200]}**".strip()
        rows.append([str(i), titles[name], entry["status"], f"{entry['seconds']:.0f}", headline])
    lines += _table(["#", "section", "status", "s", "figures"], rows)
    for name, entry in report["sections"].items():
        details = _details(name, entry["result"]) if entry["result"] else []
        if details:
            model = f" — {_model_name(entry['result']['config'])}" if "config" in entry["result"] else ""
            lines += [f"## {titles[name]}{model}", "", *details]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--smoke", action="store_true", help="tiny float32 shapes (CPU, a minute or two)")
    parser.add_argument("--budget-s", type=float, help="global budget in seconds (default 480; 300 with --smoke)")
    parser.add_argument("--sections", default=",".join(s.name for s in SECTIONS),
                        help="comma-separated subset, run in the fixed priority order")
    args = parser.parse_args(argv)
    names = args.sections.split(",")
    unknown = sorted(set(names) - {s.name for s in SECTIONS})
    if unknown:
        parser.error(f"--sections {','.join(unknown)}: choose from {', '.join(s.name for s in SECTIONS)}")
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s or BUDGET_S["smoke" if args.smoke else "gpu"]
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # `timeout`'s kill
    report = run(out_dir, args.smoke, budget, names)
    print((out_dir / "gpu_report.md").read_text())
    return 0 if all(e["status"] == "ok" for e in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
