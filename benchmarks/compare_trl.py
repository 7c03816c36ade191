#!/usr/bin/env python3
"""Side-by-side speed of TRL's DPOTrainer and `tr-align train`: DPO and TR-DPO on the same work.

    python benchmarks/compare_trl.py --workload trl --repeats 2 [--trl-python /path/venv/bin/python]
    python benchmarks/compare_trl.py --workload hh  --repeats 2
    python benchmarks/compare_trl.py --smoke        # seconds-scale check of the plumbing

Builds (or reads, ``--assets DIR``) a random-init Llama, a BPE tokenizer and preference pairs
(benchmarks/assets.py), then runs, interleaved for ``--repeats`` rounds, each as its own
process: TRL DPO, TRL TR-DPO (sync_ref_model, alpha 0.6, tau 1), tr-align DPO
(trust_region.enabled=False) and tr-align TR-DPO (soft, alpha 0.6, tau 1), with the settings
of benchmarks/configs/compare.py (mirrored by benchmarks/trl_runner.py). Both are timed the
same way (benchmarks/measure.py). A parity check first trains both systems on the same 8
pairs (every step then sees the same batch in both) and compares the losses.

Writes ``--out``/<workload>.json and .md (default benchmarks/results/). The TRL side runs in
``--trl-python`` (default: this interpreter when it can import trl and torch; otherwise TRL is
skipped and only tr-align is measured); tr-align runs as ``python -m tr_align train`` of
``--tr-align-python`` (default: this interpreter).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import assets as assets_lib  # noqa: E402
import measure  # noqa: E402

CONFIG = HERE / "configs" / "compare.py"
MODES = ("dpo", "trdpo")
SYSTEMS = ("trl", "tr_align")
THREADS = 2


# ------------------------------------------------------------------------------ processes


class CpuSampler(threading.Thread):
    """Samples machine-wide busy CPU and one process's CPU every ``period`` s (/proc)."""

    def __init__(self, pid: int, period: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.period, self.samples = pid, period, []
        self.tick = os.sysconf("SC_CLK_TCK")
        self._halt = threading.Event()

    def _read(self):
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)  # incl. steal
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            own = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        except (OSError, IndexError):
            return None
        return time.time(), time.perf_counter(), busy / self.tick, own / self.tick

    def run(self):
        while not self._halt.is_set():
            s = self._read()
            if s is not None:
                self.samples.append(s)
            self._halt.wait(self.period)

    def stop(self):
        self._halt.set()
        self.join()

    def foreign_cores(self, t0: float, t1: float, clock: int) -> float | None:
        """CPU cores used by other processes between t0 and t1 (clock 0: time.time(),
        1: perf_counter()), from the samples nearest inside the interval."""
        inside = [s for s in self.samples if t0 <= s[clock] <= t1]
        if len(inside) < 2:
            return None
        a, b = inside[0], inside[-1]
        wall = b[clock] - a[clock]
        return round(max(0.0, ((b[2] - a[2]) - (b[3] - a[3])) / wall), 3) if wall > 0 else None


def _busy_s() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / os.sysconf(
        "SC_CLK_TCK"
    )


def settle(max_wait: float, below: float = 0.3, window: float = 2.0) -> float:
    """Waits (at most ``max_wait`` s) until other processes use < ``below`` cores over a
    ``window``; returns the seconds waited. The machine is shared: this keeps runs from
    starting in the middle of someone else's burst (it cannot stop one mid-run)."""
    t0 = time.perf_counter()
    while True:
        a = _busy_s()
        time.sleep(window)
        if (_busy_s() - a) / window < below or time.perf_counter() - t0 >= max_wait:
            return round(time.perf_counter() - t0, 1)


def child_env() -> dict:
    env = dict(os.environ)
    # one CPU device, as a user's run gets (pytest's conftest asks for 8 virtual ones)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    if flags.strip():
        env["XLA_FLAGS"] = flags.strip()
    else:
        env.pop("XLA_FLAGS", None)
    env.update(
        OMP_NUM_THREADS=str(THREADS),
        MKL_NUM_THREADS=str(THREADS),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cpu"),
    )
    return env


def run_process(cmd: list[str], log: Path, cwd: Path = REPO) -> dict:
    """Runs ``cmd`` (stdout -> log.out, stderr -> log.err) and returns its exit status, wall
    time, peak RSS (wait4's ru_maxrss of this child) and the CPU sampler."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=str(cwd), env=child_env())
        sampler = CpuSampler(proc.pid)
        sampler.start()
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        sampler.stop()
    return {
        "rc": proc.returncode,
        "wall_s": round(wall, 2),
        "peak_rss_mib": round(ru.ru_maxrss / 1024, 1),  # Linux: KiB
        "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
        "sampler": sampler,
        "stdout": log.with_suffix(".out"),
        "stderr": log.with_suffix(".err"),
    }


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------- one run each


def trl_run(py, assets_dir, mode, work, *, steps, batch, max_length, data=None) -> dict:
    cmd = [
        py,
        str(HERE / "trl_runner.py"),
        "--assets",
        str(assets_dir),
        "--mode",
        mode,
        "--steps",
        str(steps),
        "--batch",
        str(batch),
        "--max-length",
        str(max_length),
    ]
    if data:
        cmd += ["--data", str(data)]
    p = run_process(cmd, work / "log")
    if p["rc"] != 0:
        raise RuntimeError(f"TRL {mode} failed (rc {p['rc']}):\n{_tail(p['stderr'])}")
    lines = [x for x in p["stdout"].read_text().splitlines() if x.startswith("{")]
    rec = json.loads(lines[-1])
    conv = lambda d: {int(k): v for k, v in d.items()}  # noqa: E731
    for k in ("step_end", "real", "padded", "pairs", "loss", "learning_rate"):
        rec[k] = conv(rec[k])
    rec["clock"] = 1  # perf_counter
    rec["proc"] = p
    return rec


def tr_align_run(
    py,
    assets_dir,
    mode,
    work,
    *,
    steps,
    batch,
    max_length,
    max_prompt_length,
    cache_dir,
    data=None,
    extra=(),
) -> dict:
    workdir = work / "workdir"
    if workdir.exists():  # a fresh run, never a resume
        import shutil

        shutil.rmtree(workdir)
    cmd = [
        py,
        "-m",
        "tr_align",
        "train",
        f"--config={CONFIG}:{mode}",
        f"--workdir={workdir}",
        f"--config.model.pretrained={assets_dir / 'model'}",
        f"--config.data.tokenizer={assets_dir / 'tokenizer'}",
        f"--config.data.path={data or assets_dir / 'prefs.jsonl'}",
        f"--config.data.cache_dir={cache_dir}",
        f"--config.data.max_length={max_length}",
        f"--config.data.max_prompt_length={max_prompt_length}",
        f"--config.train.steps={steps}",
        f"--config.train.batch_size={batch}",
        *extra,
    ]
    p = run_process(cmd, work / "log")
    if p["rc"] != 0:
        raise RuntimeError(f"tr-align {mode} failed (rc {p['rc']}):\n{_tail(p['stderr'])}")
    with open(workdir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    rec = measure.tr_align_steps(records, batch)
    rec.update(system="tr_align", mode=mode, steps=steps, clock=0, proc=p)
    return rec


def summarize_run(rec: dict, steps: list[int], last_step: int) -> dict:
    s = measure.summarize(rec["step_end"], steps, rec.get("real"), rec.get("padded"))
    clock = rec["clock"]
    t0, t1 = rec["step_end"][steps[0] - 1], rec["step_end"][steps[-1]]
    p = rec["proc"]
    s.update(
        peak_rss_mib=p["peak_rss_mib"],
        wall_s=p["wall_s"],
        foreign_cpu_cores=p["sampler"].foreign_cores(t0, t1, clock),
        loss_first5=[round(rec["loss"][k], 6) for k in range(1, 6) if k in rec["loss"]],
        loss_last=round(rec["loss"][last_step], 6) if last_step in rec["loss"] else None,
        lr_first=rec["learning_rate"].get(1),
        lr_last=rec["learning_rate"].get(last_step),
    )
    return s


# ------------------------------------------------------------------------------ machine


def machine(tr_py: str, trl_versions: dict | None) -> dict:
    model, flags = "unknown", ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    vers = subprocess.run(
        [
            tr_py,
            "-c",
            "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) "
            "for p in ['jax', 'jaxlib', 'flax', 'optax', 'transformers']}))",
        ],
        capture_output=True,
        text=True,
        env=child_env(),
    )
    try:
        tr_versions = json.loads(vers.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tr_versions = {}
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "avx512f": " avx512f" in flags,
        "python": platform.python_version(),
        "tr_align_side": tr_versions,
        "trl_side": trl_versions,
        "threads": f"torch.set_num_threads({THREADS}); XLA CPU: its default thread pool "
        f"(all {os.cpu_count()} cores), one CPU device",
        "xla_flags": child_env().get("XLA_FLAGS", ""),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def trl_available(py: str) -> bool:
    if py == sys.executable:
        return all(importlib.util.find_spec(m) is not None for m in ("trl", "torch"))
    r = subprocess.run([py, "-c", "import trl, torch"], capture_output=True)
    return r.returncode == 0


# ------------------------------------------------------------------------------ report


def _median(xs):
    xs = [x for x in xs if x is not None]
    return round(measure.median(xs), 4) if xs else None


def aggregate(runs: list[dict]) -> dict:
    """Per system and mode: medians over the repeats, and the ratios."""
    agg = {}
    for sysname in SYSTEMS:
        for mode in MODES:
            rs = [r for r in runs if r["system"] == sysname and r["mode"] == mode]
            if not rs:
                continue
            agg[f"{sysname}/{mode}"] = {
                "repeats": len(rs),
                "steps_per_s": _median([r["steps_per_s"] for r in rs]),
                "median_step_ms": _median([r["median_step_ms"] for r in rs]),
                "tokens_per_s": _median([r["tokens_per_s"] for r in rs]),
                "padded_tokens_per_s": _median([r["padded_tokens_per_s"] for r in rs]),
                "tokens_per_step": _median([r["tokens_per_step"] for r in rs]),
                "padded_tokens_per_step": _median([r["padded_tokens_per_step"] for r in rs]),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                "foreign_cpu_cores": _median([r["foreign_cpu_cores"] for r in rs]),
                "loss_first5": rs[0]["loss_first5"],
                "loss_last": rs[0]["loss_last"],
            }
    ratios = {}
    for mode in MODES:
        a, b = agg.get(f"tr_align/{mode}"), agg.get(f"trl/{mode}")
        if a and b:
            ratios[f"tr_align/trl {mode}"] = {
                "steps_per_s": measure.ratio(a["steps_per_s"], b["steps_per_s"]),
                "tokens_per_s": measure.ratio(a["tokens_per_s"], b["tokens_per_s"]),
                "peak_rss": measure.ratio(a["peak_rss_mib"], b["peak_rss_mib"]),
            }
    for sysname in SYSTEMS:
        a, b = agg.get(f"{sysname}/trdpo"), agg.get(f"{sysname}/dpo")
        if a and b:
            ratios[f"{sysname} trdpo/dpo step time"] = measure.ratio(
                a["median_step_ms"], b["median_step_ms"]
            )
    return {"by_run": agg, "ratios": ratios}


def fmt(x, nd=1):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return str(x)


def markdown(res: dict) -> str:
    m, w = res["machine"], res["workload"]
    lines = [
        f"# compare_trl: workload `{w['name']}`",
        "",
        f"{m['date']}; {m['cpu']}, {m['cores']} cores (AVX-512: {'yes' if m['avx512f'] else 'no'}); "
        f"tr_align side: jax {m['tr_align_side'].get('jax', '?')}, flax "
        f"{m['tr_align_side'].get('flax', '?')}; TRL side: "
        + (", ".join(f"{k} {v}" for k, v in (m["trl_side"] or {}).items()) or "not run")
        + f". Threads: {m['threads']}.",
        "",
        f"Work: {w['n_params']:,}-parameter Llama, {w['pairs']} pairs, {w['batch']} pairs/step, "
        f"{w['steps']} steps, timed steps {w['timed_steps']}; data: {w['lengths']}. Expected "
        f"real tokens per step from the data: {w['tokens']['expected_tokens_per_step']:,.0f}. "
        f"Rounds: {res.get('rounds_done', res['repeats'])} of {res['repeats']}, order per round: {', '.join(res['order'])}.",
        "",
        "| system | mode | steps/s | median step ms | real tok/s | padded tok/s | real tok/step "
        "| padded tok/step | peak RSS MiB | foreign cores | loss steps 1-5 | loss last |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, a in res["summary"]["by_run"].items():
        sysname, mode = key.split("/")
        lines.append(
            f"| {sysname} | {mode} | {fmt(a['steps_per_s'], 3)} | {fmt(a['median_step_ms'])} | "
            f"{fmt(a['tokens_per_s'], 0)} | {fmt(a['padded_tokens_per_s'], 0)} | "
            f"{fmt(a['tokens_per_step'], 0)} | {fmt(a['padded_tokens_per_step'], 0)} | "
            f"{fmt(a['peak_rss_mib'], 0)} | {fmt(a['foreign_cpu_cores'], 2)} | "
            f"{', '.join(f'{x:.4f}' for x in a['loss_first5'])} | {fmt(a['loss_last'], 4)} |"
        )
    lines += ["", "| ratio | value |", "| --- | --- |"]
    for k, v in res["summary"]["ratios"].items():
        if isinstance(v, dict):
            v = ", ".join(f"{kk} {fmt(vv, 3)}" for kk, vv in v.items())
        else:
            v = fmt(v, 3)
        lines.append(f"| {k} | {v} |")
    par = res.get("parity")
    if par:
        lines += [
            "",
            f"Parity ({par['pairs']} pairs, {par['steps']} steps: both systems train on the "
            "same batch every step):",
            "",
            "| mode | TRL losses | tr_align losses | max abs diff |",
            "| --- | --- | --- | --- |",
        ]
        for mode, p in par["modes"].items():
            lines.append(
                f"| {mode} | {', '.join(f'{x:.6f}' for x in p['trl'])} | "
                f"{', '.join(f'{x:.6f}' for x in p['tr_align'])} | {p['max_abs_diff']:.2e} |"
            )
    lines += [
        "",
        "Per run (in run order):",
        "",
        "| # | system | mode | steps/s | mean steps/s | real tok/s | peak RSS MiB | wall s "
        "| foreign cores | slow steps |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, r in enumerate(res["runs"], 1):
        lines.append(
            f"| {i} | {r['system']} | {r['mode']} | {fmt(r['steps_per_s'], 3)} | "
            f"{fmt(r['mean_steps_per_s'], 3)} | {fmt(r['tokens_per_s'], 0)} | "
            f"{fmt(r['peak_rss_mib'], 0)} | {fmt(r['wall_s'])} | {fmt(r['foreign_cpu_cores'], 2)} "
            f"| {r['slow_steps'] or ''} |"
        )
    for note in res["notes"]:
        lines += ["", f"- {note}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workload", choices=sorted(assets_lib.WORKLOADS), default="trl")
    ap.add_argument(
        "--assets",
        type=Path,
        default=None,
        help="read the work from DIR (model/, tokenizer/, prefs.jsonl), building it "
        "there when absent (default: WORK/assets)",
    )
    ap.add_argument(
        "--work", type=Path, default=None, help="scratch folder (default benchmarks/.work/WORKLOAD)"
    )
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10, help="untimed first steps")
    ap.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    ap.add_argument("--systems", default="trl,tr_align")
    ap.add_argument("--modes", default="dpo,trdpo")
    ap.add_argument("--trl-python", default=None)
    ap.add_argument("--tr-align-python", default=sys.executable)
    ap.add_argument(
        "--settle",
        type=float,
        default=300.0,
        help="before each run, wait up to this many seconds for the machine to be "
        "quiet (other processes < 0.3 cores); 0: never wait",
    )
    ap.add_argument("--parity-steps", type=int, default=3, help="0: no parity check")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny: workload smoke, 6 steps, 1 repeat, parity 2 steps",
    )
    args = ap.parse_args(argv)
    if args.smoke:
        args.workload, args.steps, args.warmup, args.repeats = "smoke", 6, 2, 1
        args.parity_steps, args.settle = min(args.parity_steps, 2), 0.0

    work = args.work or HERE / ".work" / args.workload
    assets_dir = (args.assets or work / "assets").resolve()
    work = work.resolve()
    print(f"[compare] assets in {assets_dir}", file=sys.stderr)
    manifest = assets_lib.ensure(assets_dir, args.workload)
    wl = assets_lib.WORKLOADS[args.workload]
    wl_cfg = manifest.get("workload", {})
    max_length = wl_cfg.get("max_length", wl.max_length)
    max_prompt_length = wl_cfg.get("max_prompt_length", wl.max_prompt_length)

    systems = [s for s in args.systems.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    notes = []
    trl_py = args.trl_python or sys.executable
    if "trl" in systems and not trl_available(trl_py):
        systems.remove("trl")
        notes.append(f"TRL side skipped: {trl_py} cannot import trl and torch (pass --trl-python).")
        print(f"[compare] {notes[-1]}", file=sys.stderr)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(assets_dir / "tokenizer"))
    pairs = measure.read_pairs(assets_dir / "prefs.jsonl")
    encode = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    pair_tok = measure.pair_tokens(pairs, encode, tok.eos_token_id, max_length)
    tokens = measure.dataset_tokens(pair_tok, args.batch)
    cache_dir = work / "tokenized"
    common = dict(steps=args.steps, batch=args.batch, max_length=max_length)
    tra_common = dict(common, max_prompt_length=max_prompt_length, cache_dir=cache_dir)

    # ---- parity: the same 8 pairs every step in both systems
    parity = None
    if args.parity_steps > 0 and "trl" in systems and "tr_align" in systems:
        pfile = work / "parity" / "prefs.jsonl"
        pfile.parent.mkdir(parents=True, exist_ok=True)
        pfile.write_text("".join(json.dumps(p) + "\n" for p in pairs[: args.batch]))
        parity = {"pairs": args.batch, "steps": args.parity_steps, "modes": {}}
        pc = dict(common, steps=args.parity_steps)
        for mode in modes:
            print(f"[compare] parity {mode}", file=sys.stderr)
            if args.settle > 0:
                settle(args.settle)
            a = trl_run(trl_py, assets_dir, mode, work / "parity" / f"trl_{mode}", data=pfile, **pc)
            # eval_split set: tr-align reads the whole file for both splits (files have no
            # splits), so all 8 pairs train, as in TRL
            b = tr_align_run(
                args.tr_align_python,
                assets_dir,
                mode,
                work / "parity" / f"tra_{mode}",
                data=pfile,
                extra=["--config.data.eval_split=train"],
                **dict(tra_common, steps=args.parity_steps),
            )
            la = [a["loss"][k] for k in range(1, args.parity_steps + 1)]
            lb = [b["loss"][k] for k in range(1, args.parity_steps + 1)]
            parity["modes"][mode] = {
                "trl": [round(x, 6) for x in la],
                "tr_align": [round(x, 6) for x in lb],
                "max_abs_diff": max(abs(x - y) for x, y in zip(la, lb)),
            }

    # ---- the interleaved runs
    steps = measure.timed_steps(args.steps, args.warmup)
    order = [(s, m) for s in SYSTEMS if s in systems for m in modes]
    runs, trl_versions, token_checks = [], None, []

    def write(final):  # reads the current runs / trl_versions at each call
        write_results(args, manifest, pairs, tokens, assets_dir, steps, max_length, order,
                      runs, parity, token_checks, notes, trl_versions, final=final)  # fmt: skip

    for rep in range(1, args.repeats + 1):
        for sysname, mode in order:
            print(f"[compare] round {rep}/{args.repeats}: {sysname} {mode}", file=sys.stderr)
            rdir = work / f"r{rep}_{sysname}_{mode}"
            waited = settle(args.settle) if args.settle > 0 else 0.0
            if sysname == "trl":
                rec = trl_run(trl_py, assets_dir, mode, rdir, **common)
                trl_versions = rec["versions"]
                # TRL's non-pad counts against the data's own (tokenized here)
                bad = [
                    s
                    for s, idx in rec["pairs"].items()
                    if -1 in idx or sum(sum(pair_tok[i]) for i in idx) != rec["real"][s]
                ]
                token_checks.append(len(bad))
            else:
                rec = tr_align_run(args.tr_align_python, assets_dir, mode, rdir, **tra_common)
                if rec["real"] is not None:
                    lo, hi = tokens["min_tokens_per_step"], tokens["max_tokens_per_step"]
                    token_checks.append(sum(not lo <= v <= hi for v in rec["real"].values()))
            s = summarize_run(rec, steps, args.steps)
            s.update(system=sysname, mode=mode, repeat=rep, settle_wait_s=waited)
            runs.append(s)
            write(final=False)
            print(
                f"[compare]   {s['steps_per_s']} steps/s, {s['tokens_per_s']} tok/s, "
                f"{s['peak_rss_mib']} MiB, foreign {s['foreign_cpu_cores']}",
                file=sys.stderr,
            )

    write(final=True)
    return 0


def write_results(
    args,
    manifest,
    pairs,
    tokens,
    assets_dir,
    steps,
    max_length,
    order,
    runs,
    parity,
    token_checks,
    notes,
    trl_versions,
    *,
    final,
):
    """Writes OUT/<workload>.json and .md (also after each run: an interrupted comparison
    keeps what it measured, marked incomplete)."""
    notes = list(notes)
    if not final:
        notes.insert(0, f"INCOMPLETE: {len(runs)} of {args.repeats * len(order)} runs so far.")
    if any(token_checks):
        notes.append(f"token-count check failed in {sum(token_checks)} steps (see runs)")
    notes.append(
        "Timing: steps_per_s = 1 / median interval between consecutive step ends over the timed "
        "steps. TRL: a callback's on_step_end (after the reference sync). tr-align: the `time` of "
        "each metrics.jsonl train record, written when that step's metrics reach the host, which "
        "the loop does after dispatching the next step: the same cadence, one step late."
    )
    notes.append(
        "Real tokens: non-pad tokens of the step's chosen and rejected rows (prompt + completion "
        "+ EOS). TRL: its batch's attention mask (checked against the data tokenized here). "
        "tr-align: data/real_tokens (and data/rows x data/length padded) from metrics.jsonl. The two "
        "systems draw their batches in their own random orders, so per-step counts differ; "
        "tr-align holds out 1 pair for its (unavoidable) eval, TRL trains on all."
    )
    notes.append(
        "foreign cores: CPU used by other processes during the timed steps (machine-wide "
        "/proc/stat minus the run's own CPU); anything well above 0 slowed that run down."
    )
    result = {
        "workload": {
            "name": args.workload,
            "n_params": manifest.get("n_params"),
            "pairs": len(pairs),
            "batch": args.batch,
            "steps": args.steps,
            "timed_steps": f"{steps[0]}-{steps[-1]}",
            "max_length": max_length,
            "lengths": ", ".join(
                f"{k} {v['min']}-{v['max']} (mean {v['mean']})"
                for k, v in manifest.get("lengths_tokens", {}).items()
            ),
            "tokens": tokens,
            "assets": str(assets_dir),
        },
        "machine": machine(args.tr_align_python, trl_versions),
        "repeats": args.repeats,
        "rounds_done": len(runs) // max(1, len(order)),
        "order": [f"{s} {m}" for s, m in order],
        "summary": aggregate(runs),
        "parity": parity,
        "runs": runs,
        "token_check_failures": sum(token_checks),
        "notes": notes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.workload}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (args.out / f"{args.workload}.md").write_text(md)


if __name__ == "__main__":
    sys.exit(main())
