"""Long fuzzing run of the readers of untrusted files (issue 13 part 5): every distinct unexpected exception.

The strategies, seeds and readers are those of tests/test_fuzz_readers.py (the short, derandomized run in the test
suite). Here each reader runs in its own subprocess with the address space capped (RLIMIT_AS, --mem-gib) and a
hard per-example timer, so a blow-up shows up as a MemoryError or ExampleTimeout finding and a crash (a signal
in native code) as a dead worker with the mutation it was reading, instead of taking the machine down. Every
example runs to the end: all distinct unexpected exceptions are collected (keyed by type and the quantkit line
they escaped from), then each is shrunk by hypothesis to a minimal reproducing mutation.

Prints one row per reader (cases run, seconds, clean successes, QuantkitErrors, unexpected exceptions) and every
finding: reader, exception type, first message line, the quantkit file:line it escaped from, the innermost frame,
how often it was hit and the minimal mutation. Exits 1 when there is any finding.

    python benchmarks/fuzz_readers.py --examples 300 [--seconds 1200] [--seed 0] [--readers gguf,awq]
        [--mem-gib 4] [--example-timeout 20] [--shrink-seconds 30] [--json results.json]
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHUNK = 50  # examples per hypothesis run (each chunk has its own seed, so a finding can be replayed and shrunk)


def load_fuzz_module():
    """tests/test_fuzz_readers.py as a module (the one definition of seeds, mutations and readers)."""
    spec = importlib.util.spec_from_file_location("quantkit_fuzz_readers", REPO / "tests" / "test_fuzz_readers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ---- worker: one reader, in its own process ----

class _Match(Exception):
    """Raised while shrinking: this example reproduces the finding being shrunk."""


def _first_line(text: str, limit: int = 300) -> str:
    line = (text.strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[:limit] + "..."


def _normalized(text: str) -> str:
    """A QuantkitError message with paths and numbers blanked, so equal rejections count together."""
    import re

    text = _first_line(text, 160)
    text = re.sub(r"(/[^\s:'\"]+)+", "<path>", text)
    return re.sub(r"-?\d+(\.\d+)?", "N", text)


def worker(args) -> dict:
    import torch
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    torch.set_num_threads(1)
    fz = load_fuzz_module()
    reader = fz.READERS_BY_NAME[args.worker]
    tmp_root = Path(tempfile.mkdtemp(prefix="quantkit-fuzz-"))
    os.environ["HOME"] = str(tmp_root / "home")  # GGUF tokenizers are cached under ~/.cache
    seeds = fz.build_seeds(tmp_root / "seeds", tokenizer_gguf=reader.seed == "gguf-tokenizer")
    fz.run_example(reader, seeds, [], memory_headroom=None)  # the seed reads, and the first load warms up
    cap = int(args.mem_gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    progress = Path(args.progress)
    strategy = fz.mutations(reader, seeds)
    base = dict(database=None, deadline=None, derandomize=False, print_blob=False,
                suppress_health_check=list(HealthCheck))

    def outcome(ops):
        """('ok', None) | ('quantkit', error) | ('unexpected', exc) | ('harness', exc) for one mutation."""
        with tempfile.TemporaryDirectory(prefix="ex-", dir=tmp_root) as tmp:
            try:
                path = fz.materialize(seeds, reader.seed, ops, Path(tmp) / "x")
            except Exception as e:  # the fuzzer's own bug, reported apart from the readers'
                return "harness", e
            try:
                error = fz.read_guarded(reader, path, args.example_timeout, memory_headroom=None)
            except Exception as e:  # noqa: BLE001  (the point: anything but a QuantkitError is a finding)
                e.fuzz_dir = str(path)
                return "unexpected", e
            return ("quantkit", error) if error is not None else ("ok", None)

    def key_of(exc) -> tuple[str, str]:
        site, _ = fz.escape_site(exc)
        return type(exc).__name__, site

    outcomes: collections.Counter = collections.Counter()
    messages: collections.Counter = collections.Counter()  # the clean rejections, to see how deep mutations get
    findings: dict[tuple, dict] = {}
    cases = 0
    t0 = time.monotonic()
    t_end = t0 + args.seconds
    chunk = 0
    while cases < args.examples and time.monotonic() < t_end:
        n = min(CHUNK, args.examples - cases)
        chunk_seed = args.seed * 1_000_003 + chunk

        @settings(max_examples=n, phases=[Phase.generate], **base)
        @hseed(chunk_seed)
        @given(data=st.data())
        def explore(data):
            nonlocal cases
            ops = data.draw(strategy)
            if time.monotonic() > t_end or cases >= args.examples:
                return
            progress.write_text(repr(ops))
            kind, exc = outcome(ops)
            cases += 1
            if kind == "ok":
                outcomes["ok"] += 1
            elif kind == "quantkit":
                outcomes[type(exc).__name__] += 1
                messages[f"{type(exc).__name__}: {_normalized(str(exc))}"] += 1
            else:
                outcomes[kind] += 1
                key = (kind,) + key_of(exc)
                f = findings.get(key)
                if f is None:
                    site, inner = fz.escape_site(exc)
                    msg = str(exc).replace(getattr(exc, "fuzz_dir", "\0"), "<dir>")
                    findings[key] = f = {
                        "reader": reader.name, "kind": kind, "type": type(exc).__name__,
                        "message": _first_line(msg), "site": site, "inner": inner, "count": 0,
                        "first_ops": repr(ops), "chunk_seed": chunk_seed, "chunk_examples": n, "ops": ops,
                        "found_after_s": round(time.monotonic() - t0, 1),
                    }
                f["count"] += 1

        explore()
        chunk += 1
    explore_seconds = time.monotonic() - t0

    # shrink each finding: replay its chunk with the same seed; only that finding counts as a failure
    for key, f in findings.items():
        best = [f["ops"], None]  # the smallest reproducing mutation and its message
        t_stop = time.monotonic() + args.shrink_seconds

        @settings(max_examples=f["chunk_examples"], phases=[Phase.generate, Phase.shrink], **base)
        @hseed(f["chunk_seed"])
        @given(data=st.data())
        def shrink(data):
            ops = data.draw(strategy)
            if time.monotonic() > t_stop:
                return
            kind, exc = outcome(ops)
            if kind in ("unexpected", "harness") and (kind,) + key_of(exc) == key:
                if best[1] is None or len(repr(ops)) <= len(repr(best[0])):
                    best[0], best[1] = ops, _first_line(str(exc).replace(getattr(exc, "fuzz_dir", "\0"), "<dir>"))
                raise _Match()

        if args.shrink_seconds > 0:
            try:
                shrink()
            except Exception:  # _Match (shrunk), or hypothesis giving up on a flaky/timed-out replay
                pass
        f["reproducer"] = repr(best[0])
        if best[1] is not None:
            f["reproducer_message"] = best[1]
        del f["ops"]
    return {"reader": reader.name, "cases": cases, "seconds": round(explore_seconds, 1),
            "outcomes": dict(outcomes), "findings": list(findings.values()),
            "top_rejections": messages.most_common(12)}


# ---- parent: one worker per reader, then the table ----

def run_reader(name: str, args, budget: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="quantkit-fuzz-run-") as tmp:
        out, progress = Path(tmp) / "result.json", Path(tmp) / "progress.txt"
        cmd = [sys.executable, __file__, "--worker", name, "--examples", str(args.examples), "--seconds",
               f"{budget:.1f}", "--seed", str(args.seed), "--mem-gib", str(args.mem_gib), "--example-timeout",
               str(args.example_timeout), "--shrink-seconds", str(args.shrink_seconds), "--out", str(out),
               "--progress", str(progress)]
        limit = budget + args.example_timeout + 40 * args.shrink_seconds + 180
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit,
                                  env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
            rc, err = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, err = "timeout", (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else ""
        if rc == 0 and out.exists():
            return json.loads(out.read_text())
        last = progress.read_text() if progress.exists() else "(before the first example)"
        return {"reader": name, "cases": None, "seconds": round(time.monotonic() - t0, 1), "outcomes": {},
                "findings": [{"reader": name, "kind": "crash", "type": f"worker died (rc {rc})",
                              "message": _first_line(err.strip().splitlines()[-1] if err.strip() else ""),
                              "site": "?", "inner": "?", "count": 1, "reproducer": last,
                              "stderr_tail": err[-3000:]}]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=300, help="examples per reader")
    p.add_argument("--seconds", type=float, default=1800, help="time budget for all readers (shrinking apart)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--readers", default="", help="comma-separated reader names (default: all)")
    p.add_argument("--mem-gib", type=float, default=4.0, help="RLIMIT_AS of each worker")
    p.add_argument("--example-timeout", type=float, default=20.0, help="hard limit of one example, seconds")
    p.add_argument("--shrink-seconds", type=float, default=30.0, help="per finding; 0 keeps the first example")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("-v", "--verbose", action="store_true", help="also list each reader's most frequent rejections")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--progress", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        Path(args.out).write_text(json.dumps(worker(args), indent=1))
        return 0

    fz = load_fuzz_module()
    names = [n for n in args.readers.split(",") if n] or [r.name for r in fz.READERS]
    unknown = [n for n in names if n not in fz.READERS_BY_NAME]
    if unknown:
        p.error(f"unknown reader(s) {unknown}; choose from {', '.join(fz.READERS_BY_NAME)}")
    t_end = time.monotonic() + args.seconds
    results = []
    for i, name in enumerate(names):
        budget = max((t_end - time.monotonic()) / (len(names) - i), 5.0)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: up to {args.examples} examples, {budget:.0f} s", flush=True)
        results.append(run_reader(name, args, budget))
        r = results[-1]
        print(f"    {r['cases']} cases in {r['seconds']} s, {len(r['findings'])} distinct unexpected", flush=True)

    print()
    print(f"{'reader':<20} {'cases':>6} {'seconds':>8} {'ok':>5} {'QuantkitError':>13} {'unexpected':>10} "
          f"{'distinct':>8}")
    total = 0
    for r in results:
        oc = r["outcomes"]
        qk = sum(v for k, v in oc.items() if k not in ("ok", "unexpected", "harness"))
        unexpected = oc.get("unexpected", 0) + oc.get("harness", 0) + sum(
            f["count"] for f in r["findings"] if f["kind"] == "crash")
        total += len(r["findings"])
        cases = "-" if r["cases"] is None else r["cases"]
        print(f"{r['reader']:<20} {cases:>6} {r['seconds']:>8} {oc.get('ok', 0):>5} {qk:>13} {unexpected:>10} "
              f"{len(r['findings']):>8}")
    print()
    print("QuantkitErrors by class: " + ", ".join(
        f"{r['reader']}: " + " ".join(f"{k}={v}" for k, v in sorted(r["outcomes"].items())
                                      if k not in ("ok", "unexpected", "harness")) for r in results))
    if args.verbose:
        for r in results:
            print(f"\n{r['reader']}: most frequent clean rejections")
            for msg, n in r.get("top_rejections", []):
                print(f"  {n:>5}  {msg}")
    if total:
        print(f"\n{total} distinct unexpected exception(s):")
        for r in results:
            for f in r["findings"]:
                print(f"\n- [{f['reader']}] {f['type']}{' (fuzzer bug)' if f['kind'] == 'harness' else ''}: "
                      f"{f['message']}")
                print(f"    escaped from {f['site']}   (innermost: {f['inner']})   hit {f['count']}x")
                print(f"    reproducer: {f['reproducer']}")
                if f.get("reproducer_message", f["message"]) != f["message"]:
                    print(f"    (its message: {f['reproducer_message']})")
    else:
        print("\nno unexpected exceptions")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
