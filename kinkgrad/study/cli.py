"""`kinkgrad study` / `python -m kinkgrad.study`: argument parsing, progress, summary.

Exit status: 0 done; 1 a run failed; 2 bad settings or an unusable run directory
(nothing was trained); 3 the run directory is in use by another study; 130 interrupted
by Ctrl-C, 143 by SIGTERM (rerun to resume).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .config import (
    BIAS_MODES,
    DATASETS,
    DEVICES,
    EXECUTORS,
    MODELS,
    OPTIMIZERS,
    PRECISIONS,
    ConfigError,
)

EXIT_FAILED, EXIT_CONFIG, EXIT_LOCKED, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 3, 130, 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so it unwinds like Ctrl-C: the results are
    saved, the workers stopped and the lock removed on the way out."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


def _say(console: Any, word: str, problem: Any) -> None:
    """One line on stderr (never wrapped; brackets in the text kept as they are)."""
    console.print(
        f"[bold red]kinkgrad study: {word}:[/] {escape(str(problem))}",
        highlight=False,
        soft_wrap=True,
    )


def _list(cast=str):
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        try:
            return [cast(t) for t in items]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _onoff(text: str) -> bool:
    t = text.lower()
    if t in ("on", "yes", "true", "1", "bn"):
        return True
    if t in ("off", "no", "false", "0", "none"):
        return False
    raise ValueError(f"batchnorm: {text!r} is not one of on, off")


def _kink(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text  # an alias ("left", "mid", ...) or an error make_frame will name


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kinkgrad study",
        description=(
            "Does the derivative at the kink matter? Trains paired runs that differ only in "
            "ReLU'(0) (and the max-pool tie rule), plus a one-ulp noise-floor pair and (for "
            "the first seed) a run trained with certified gradients that counts the kinks "
            "each SGD step crosses, over a grid of models, precisions, bias modes, batch "
            "norm and seeds, and writes a report. Rerun the same command to resume an "
            "interrupted study."
        ),
        epilog="Lists are comma-separated. Precedence: defaults < --quick < --config < flags.",
    )
    g = p.add_argument_group("grid axes")
    g.add_argument("--models", type=_list(), help=f"of {', '.join(MODELS)} (default: both)")
    g.add_argument("--precisions", type=_list(), help=f"of {', '.join(PRECISIONS)} (default: all)")
    g.add_argument("--bias", type=_list(), help=f"of {', '.join(BIAS_MODES)} (default: both)")
    g.add_argument("--batchnorm", type=_list(_onoff), help="of off, on (default: both)")
    g.add_argument("--seeds", type=_list(int), help="seeds (default: 0,1,2)")
    g = p.add_argument_group("paper protocol (Bertoin et al. 2021, section 3; see paper.py)")
    g.add_argument(
        "--protocol",
        choices=("both", "paper", "lockstep"),
        help="paper: the published bifurcation experiment (frozen weights, one pass, "
        "share of initialisations in S); lockstep: paired training runs; both (default)",
    )
    g.add_argument("--inits", type=int, help="initialisations per setting (default: 200; "
                   "the paper: 1000)")
    g.add_argument("--depths", type=_list(int), help="hidden layers (default: 3; the paper "
                   "sweeps 1,2,3,5,6)")
    g.add_argument("--widths", type=_list(int), help="hidden units (default: 256; the paper "
                   "sweeps 16,64,256,512,1024)")
    g.add_argument("--batch-sizes", type=_list(int), help="minibatch sizes of the paper "
                   "protocol (default: 256; the paper sweeps 16,64,256,512,1024)")
    g = p.add_argument_group("policies")
    g.add_argument(
        "--kinks",
        type=_list(_kink),
        help="ReLU'(0) of each run, reference first (default: 0,1); numbers or left/mid/right",
    )
    g.add_argument(
        "--ties", type=_list(), help="max-pool tie rule of each run (default: first,split)"
    )
    g.add_argument(
        "--extra-policies",
        type=_list(),
        help="further registered policies by name, or none (default: certified: trained "
        "with kinkgrad.certified_backward, recording the kinks each SGD step crosses)",
    )
    g.add_argument(
        "--extra-seeds",
        type=int,
        help="train the extra policies for the first N seeds only; 0: every seed (default: 1)",
    )
    g.add_argument(
        "--crossings-every",
        type=int,
        metavar="K",
        help="measure a certified run's kink crossings every K-th step; 0: never (default: 1)",
    )
    g.add_argument(
        "--no-noise-floor",
        dest="noise_floor",
        action="store_false",
        default=None,
        help="skip the one-ulp noise-floor run",
    )
    g = p.add_argument_group("training")
    g.add_argument(
        "--data",
        help=f"{' or '.join(DATASETS)}, for every protocol (default: mnist for the paper "
        "protocol, digits for the lockstep study)",
    )
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--width", type=int, help="MLP hidden units")
    g.add_argument("--channels", type=int, help="CNN channels of the first block")
    g.add_argument("--train-size", type=int, help="use the first N training samples (0: all)")
    g.add_argument("--test-size", type=int, help="use the first N test samples (0: all)")
    g.add_argument("--optimizer", help=f"{' or '.join(OPTIMIZERS)} (default: sgd with momentum)")
    g.add_argument("--lr", type=float, help="learning rate (default: sgd 0.05, adam 0.002)")
    g.add_argument("--momentum", type=float)
    g = p.add_argument_group("running")
    g.add_argument("--config", metavar="FILE", help="TOML file with any of the settings above")
    g.add_argument(
        "--quick",
        action="store_true",
        help="the reduced CI grid (paper protocol: 10 initialisations per precision)",
    )
    g.add_argument("--out", metavar="DIR", help="run directory (default: runs/study-DATA[-quick])")
    g.add_argument("--device", help=f"{' or '.join(DEVICES)} (default: cpu)")
    g.add_argument("--jobs", type=int, help="worker processes (default: one per CPU core)")
    g.add_argument(
        "--executor",
        help=f"{' or '.join(EXECUTORS)}: where configurations run; ray: each one a Ray task "
        "(pip install 'kinkgrad[ray]'; default: local)",
    )
    g.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="join the Ray cluster at ADDR (e.g. auto, or HEAD:6379) instead of starting "
        "a local Ray with --jobs CPUs",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="discard the results already in --out and start again",
    )
    g.add_argument(
        "--report-only", action="store_true", help="rewrite the report from saved results"
    )
    return p


FLAG_FIELDS = (
    "models precisions bias batchnorm seeds kinks ties extra_policies extra_seeds "
    "crossings_every noise_floor data epochs batch_size width channels train_size test_size "
    "optimizer lr momentum device jobs executor ray_address"
).split()


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    from .config import load_toml

    values: dict[str, Any] = {}
    if args.config:
        values.update(load_toml(args.config))
    for name in FLAG_FIELDS:
        v = getattr(args, name)
        if v is not None:
            values[name] = v
    if [str(v).lower() for v in values.get("extra_policies") or ()] == ["none"]:
        values["extra_policies"] = []
    return values


def cli(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from rich.console import Console

    out_console = Console()
    err = Console(stderr=True)
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # argparse: 0 for --help, 2 for bad flags
        return int(e.code or 0)

    from .config import build

    try:
        cfg = build(settings_from(args), quick=args.quick)
        if args.out is not None and not args.out.strip():
            raise ConfigError("--out: the directory name is empty; give a directory")
        protocol = args.protocol or "both"
        pcfg = _paper_config(args, cfg)
        name = {"both": "study", "paper": "study-paper", "lockstep": f"study-{cfg.data}"}[protocol]
        out = Path(args.out or f"runs/{name}{'-quick' if cfg.quick else ''}")
        if not args.report_only:
            usable_out(out)
    except ConfigError as e:
        _say(err, "error", e)
        return EXIT_CONFIG
    os.environ["KINKGRAD_STUDY_COMMAND"] = " ".join(["kinkgrad study", *argv])
    if args.report_only:
        from . import paper_report

        if protocol == "paper" or not (out / "results.jsonl").exists():
            if paper_report.exists(out):
                # flags given with --report-only choose which settings to report
                names = ("precisions", "inits", "depths", "widths", "batch_sizes")
                grid = {n: getattr(pcfg, n) for n in names if getattr(args, n) is not None}
                console_paths = paper_report.write(out, grid or None)
                out_console.print(f"report: {console_paths[0]}", highlight=False)
                return 0
    elif protocol != "lockstep" and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        code = _paper(pcfg, cfg, out, args, out_console, err)
        if code or protocol == "paper":
            return code

    dist_rank = _init_distributed(cfg)
    previous = _install(signal.SIGTERM, _on_sigterm)
    try:
        if dist_rank > 0:
            from .runner import follow_study

            return follow_study(cfg)
        return _lead(cfg, out, args, out_console, err)
    finally:
        _install(signal.SIGTERM, previous)
        _end_distributed()


def _install(signum: int, handler: Any) -> Any:
    """Set a signal handler where that is possible (the main thread); return the old one."""
    import threading

    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signum, handler)


def usable_out(out: Path) -> None:
    """Raise ConfigError unless `out` is (or can be made) a directory this process can
    write: not a file, not under a file, not read-only, not in /proc or /sys."""
    import errno
    import tempfile

    from . import results

    resolved = out.resolve()
    if resolved.parts[1:2] in (("proc",), ("sys",)):
        raise ConfigError(f"--out: {str(out)!r} is in /{resolved.parts[1]}, not a place for files")
    if resolved.exists() and not resolved.is_dir():
        raise ConfigError(f"--out: {str(out)!r} is a file, not a directory")
    try:
        resolved.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=resolved):
            pass
    except OSError as e:
        why = {
            errno.ENOTDIR: "a file stands where a directory of the path belongs",
            errno.EROFS: "it is on a read-only file system",
            errno.EACCES: "permission denied",
            errno.EEXIST: "a file of that name exists",
        }.get(e.errno, e.strerror or str(e))
        raise ConfigError(f"--out: cannot write to {str(out)!r}: {why}") from None
    for name in (results.RESULTS, results.MANIFEST, results.LOCK):
        path = resolved / name
        if (path.exists() or path.is_symlink()) and not path.is_file():
            raise ConfigError(
                f"--out: {str(out / name)!r} is not a regular file; move it away or use "
                "another --out"
            )


def _paper_config(args, cfg):
    """The paper protocol's settings from the flags (shared: precisions, data, seeds, jobs)."""
    from .paper_run import QUICK_INITS, PaperConfig

    values: dict[str, Any] = {"jobs": cfg.jobs}
    if args.precisions:
        values["precisions"] = tuple(args.precisions)
    if args.data:
        values["data"] = args.data
    if args.seeds:
        values["seed"] = args.seeds[0]
    if args.train_size:
        values["train_size"] = args.train_size
    if args.quick:
        values["inits"] = QUICK_INITS
    for name in ("inits", "depths", "widths", "batch_sizes"):
        v = getattr(args, name)
        if v is not None:
            values[name] = tuple(v) if isinstance(v, list) else v
    pcfg = PaperConfig(**values)
    pcfg.validate()
    return pcfg


def _loggers(err: Any) -> tuple[Callable[[str], None], Callable[[str], None]]:
    """log and warn to stderr; messages are text (paths may hold brackets), not markup."""
    log = lambda msg: err.print(escape(msg), highlight=False)
    warn = lambda msg: err.print(
        f"[yellow]warning:[/] {escape(msg)}", highlight=False, soft_wrap=True
    )
    return log, warn


def _progress(label: str, err: Any, *extra: Any) -> Progress:
    """The study's progress bar on stderr: done / total, elapsed, eta (+ `extra` columns)."""
    return Progress(
        TextColumn(f"[bold]{label}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        *extra,
        console=err,
        transient=False,
    )


def _paper(pcfg, cfg, out: Path, args, console, err) -> int:
    """Run (or, with --report-only, report) the paper protocol into `out`."""

    from . import paper_report, paper_run, results

    log, warn = _loggers(err)
    n = len(pcfg.grid())
    log(
        f"kinkgrad study, paper protocol: {n} settings x {pcfg.inits} initialisations on "
        f"{pcfg.data} -> {out}"
    )
    bar = _progress("paper", err)
    try:
        with bar:
            task = bar.add_task("", total=len(pcfg.tasks()))
            rows, manifest = paper_run.run(
                pcfg, out, log=log, warn=warn, overwrite=args.overwrite,
                progress=lambda k, total: bar.update(task, completed=k),
                executor=cfg.executor, address=cfg.ray_address or None,
            )
    except results.LockedError as e:
        _say(err, "refused", e)
        return EXIT_LOCKED
    except ConfigError as e:
        _say(err, "error", e)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        err.print(
            f"\n[bold yellow]interrupted:[/] the finished chunks are saved in {out}; run the "
            "same command again to finish the rest",
            highlight=False,
        )
        return EXIT_INTERRUPTED
    paper_report.print_table(rows, console)
    console.print(
        f"paper protocol: {manifest['wall_seconds']:.1f} s wall clock, {manifest['jobs']} "
        f"worker(s); {out / paper_run.ROWS}",
        highlight=False,
    )
    if (args.protocol or "both") == "paper":
        paths = paper_report.write(out)
        console.print(f"report: {paths[0]}", highlight=False)
    return 0


def _lead(cfg, out: Path, args, console, err) -> int:
    from . import report, results
    from .runner import run_study

    if args.report_only:
        return _report_only(out, cfg, console, err)


    log, warn = _loggers(err)
    grid = cfg.grid()
    start = time.perf_counter()
    progress = _progress("study", err, TextColumn("{task.description}"))
    log(f"kinkgrad study: {len(grid)} configurations -> {out}")
    try:
        with progress:
            task = progress.add_task("", total=len(grid))

            def advance(rec: dict[str, Any]) -> None:
                progress.update(task, advance=1, description=rec["id"])

            def on_resume(n: int) -> None:
                progress.update(task, completed=n)

            records, manifest = run_study(
                cfg,
                out,
                log=log,
                warn=warn,
                progress=advance,
                overwrite=args.overwrite,
                on_resume=on_resume,
            )
    except results.LockedError as e:
        _say(err, "refused", e)
        return EXIT_LOCKED
    except ConfigError as e:
        _say(err, "error", e)
        return EXIT_CONFIG
    except OSError as e:  # e.g. the disk filled up: say so in one line; rerun resumes
        _say(err, "error", e)
        return EXIT_FAILED
    except KeyboardInterrupt as e:
        _install(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut this short
        saved = results.ResultStore(out)
        saved.load(rerun=False)
        n = len(saved.done(cfg.settings_hash(_world())))
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        err.print(
            f"\n[bold yellow]{what}:[/] {n} of {len(grid)} configurations are saved in "
            f"{out}; run the same command again to finish the rest",
            highlight=False,
        )
        return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED
    train_s = time.perf_counter() - start
    t0 = time.perf_counter()
    manifest["wall_seconds"] = round(train_s, 2)
    paths = report.write(out, records, manifest)
    manifest["report_seconds"] = round(time.perf_counter() - t0, 2)
    results.write_manifest(out, manifest)
    summary_table(records, console)
    console.print(
        f"done in {time.perf_counter() - start:.1f} s (training {train_s:.1f} s, report "
        f"{manifest['report_seconds']:.1f} s). Report: {paths[0]} and {paths[1]}",
        highlight=False,
    )
    return 0


def _e(x: float) -> str:
    return "n/a" if x != x else "0" if x == 0 else f"{x:.0e}"


def _report_only(out: Path, cfg, console, err) -> int:
    """Rewrite CSV, plots and report from the results saved in `out`."""
    from . import report, results

    try:
        with results.lock(out):
            manifest = results.read_manifest(out)
            store = results.ResultStore(out)
            for w in store.load(rerun=False):
                err.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
            done = store.done(manifest.get("settings_hash")) if manifest else {}
            if not done:
                err.print(
                    f"[bold red]kinkgrad study: error:[/] no results in {out}", soft_wrap=True
                )
                return EXIT_CONFIG
            records = [done[k.id] for k in cfg.grid() if k.id in done] or list(done.values())
            store.write_csv(records)
            paths = report.write(out, records, manifest)
    except (FileNotFoundError, NotADirectoryError):
        err.print(f"[bold red]kinkgrad study: error:[/] no results in {out}", soft_wrap=True)
        return EXIT_CONFIG
    except ConfigError as e:
        _say(err, "error", e)
        return EXIT_CONFIG
    except results.LockedError as e:
        _say(err, "refused", e)
        return EXIT_LOCKED
    console.print(f"report: {paths[0]}  {paths[1]}")
    return 0


SHORT = {"float64": "fp64", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def summary_table(records: list[dict[str, Any]], console) -> None:
    """One row per model and precision, pooled over bias modes, batch norm and seeds."""
    from rich import box
    from rich.table import Table

    from . import analysis as A
    from .report import pct, per_million

    alts = A.alt_names(records)
    alt = alts[0] if alts else None
    t = Table(
        title="Does the derivative at the kink matter?",
        title_justify="left",
        caption=(
            "ReLU 0s: exact hits per 1e6 ReLU inputs; ties: share of max-pool windows with "
            "a tie (reference run). grad Δ: share of minibatches whose gradient changes "
            "bitwise with the policy, same weights. Δacc: final accuracy change in points, "
            "mean±sd, kink pair and 1-ulp pair. drift: final relative L2 distance."
        ),
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1),
    )
    for col in ("run", "n", "ReLU 0s", "ties", "grad Δ", "Δacc kink", "Δacc ulp", "drift k/u"):
        t.add_column(col, justify="left" if col == "run" else "right", no_wrap=True)
    compact = lambda ms: "n/a" if not ms[2] else f"{ms[0]:+.1f}±{ms[1]:.1f}"
    for (m, p), rs in A.group(records, "model", "precision").items():
        c = A.cell(rs, alt) if alt else None
        watch = any(r["watch"] for r in rs)
        t.add_row(
            f"{m.upper()} {SHORT.get(p, p)}",
            str(len(rs)),
            per_million(c["hits"], "relu") if watch and c else "n/a",
            pct(A.rate(c["hits"], "pool"), 0) if watch and c and m == "cnn" else "",
            pct(c["differ_fraction"], 0) if c else "",
            compact(c["delta_alt"]) if c else "",
            compact(c["delta_ulp"]) if c else "",
            f"{_e(c['rel_l2_alt'])}/{_e(c['rel_l2_ulp'])}" if c else "",
        )
    console.print(t)
    for name in A.certified_names(records):
        parts = []
        for (m,), rs in A.group(records, "model").items():
            c = A.certified_cell(rs, name)
            if c["measured_steps"]:
                parts.append(
                    f"{m.upper()} {c['crossings_mean']:.0f} kinks crossed per SGD step "
                    f"(mean), {pct(c['stay_share'], 0)} of steps stay on one linear piece, "
                    f"radius {pct(c['radius_median'])} of the step, "
                    f"{pct(c['certified_share'], 0)} of steps certified"
                )
        if parts:
            console.print(f"Certified run: {'; '.join(parts)}.", highlight=False, soft_wrap=True)


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _init_distributed(cfg) -> int:
    """Under torchrun (WORLD_SIZE > 1): join the process group; return this rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if cfg.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cfg.device == "cuda" else "gloo")
    return dist.get_rank()


def _end_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
