"""The study's report: Markdown, and self-contained HTML with the plots embedded.

The report is built once as a list of blocks (`render.py`) and rendered twice. When the
run directory holds paper-protocol results (`paper.json`), their section comes first
(`paper_report.py`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .._files import atomic_write
from . import analysis as A
from . import plots
from .config import PRECISIONS
from .render import Block, count, pct, pm, sci, to_html, to_markdown
from .report_certified import _seeds_text, certified_headline, certified_tables

PAPER = "Bertoin et al., NeurIPS 2021"
BOUSTANY = "Boustany, TMLR 2024"


def per_million(hits: dict[str, dict[str, int]], kind: str) -> str:
    return sci(1e6 * A.rate(hits, kind))


# --------------------------------------------------------------------------------------
# content
# --------------------------------------------------------------------------------------


def _precisions(records) -> list[str]:
    present = {r["key"]["precision"] for r in records}
    return [p for p in PRECISIONS if p in present]


def build(records: list[dict[str, Any]], manifest: dict[str, Any], figures) -> list[Block]:
    cfg = manifest["config"]
    settings = manifest["settings"]
    alts = A.alt_names(records)
    alt = alts[0] if alts else None
    labels = records[0]["policies"]
    ref_label = labels["ref"]
    alt_label = labels.get(alt, "?")
    precisions = _precisions(records)
    by_p = {p: [r for r in records if r["key"]["precision"] == p] for p in precisions}
    cells = {p: A.cell(rs, alt) for p, rs in by_p.items()}
    models = [m for m in ("mlp", "cnn") if any(r["key"]["model"] == m for r in records)]
    by_pm = {
        (p, m): A.cell([r for r in by_p[p] if r["key"]["model"] == m], alt)
        for p in precisions
        for m in models
        if any(r["key"]["model"] == m for r in by_p[p])
    }
    watch = any(r["watch"] for r in records)
    seeds = sorted({r["key"]["seed"] for r in records})
    opt = settings["optimizer"]
    opt_text = f"SGD (momentum {settings['momentum']})" if opt == "sgd" else "Adam"
    blocks: list[Block] = [
        ("h1", f"Does the derivative at the kink matter? kinkgrad study on {settings['data']}"),
        (
            "p",
            f"**Answer in numbers.** {len(records)} configurations ({', '.join(models)} x "
            f"{len(precisions)} precisions x bias modes x batch norm x {len(seeds)} seeds), "
            f"each trained {settings['epochs']} epochs with {opt_text}, lr {settings['lr']:g}, "
            f"batch {settings['batch_size']}, in lockstep under `{ref_label}` (reference) and "
            f"`{alt_label}`, plus a noise-floor run whose only difference is one initial "
            f"weight nudged by one ulp.",
        ),
    ]
    bullets = _headline(records, cells, by_pm, alt, alt_label, models, precisions, watch)
    bullets += certified_headline(records, models, precisions)
    blocks.append(("ul", bullets))
    blocks += _comparison(records, cells, by_pm, alt, models, precisions, watch)
    blocks += _tables(records, alt, models, precisions, watch)
    blocks += certified_tables(records, models, precisions)
    blocks.append(("h2", "Plots"))
    for name, title, caption in figures:
        blocks.append(("h3", title))
        blocks.append(("img", f"plots/{name}", title))
        blocks.append(("p", caption))
    blocks += _where(records, alt, models, precisions)
    if watch:
        blocks += _layers(records, models, precisions)
    blocks += _setup(records, manifest, cfg, settings, alt_label, ref_label)
    return blocks


def _signs(s: tuple[int, int, int]) -> str:
    lower, higher, same = s
    return f"{lower} lower, {higher} higher, {same} unchanged"


def _headline(records, cells, by_pm, alt, alt_label, models, precisions, watch) -> list[str]:
    """The report's opening bullets: every question answered with a number."""
    bullets = []
    if watch:
        parts = []
        for p in precisions:
            relu = cells[p]["hits"].get("relu", {})
            parts.append(
                f"{p} {per_million(cells[p]['hits'], 'relu')} ({count(relu.get('exact', 0))} "
                f"of {count(relu.get('sites', relu.get('elements', 0)))})"
            )
        text = (
            "**How often kinks were hit**: ReLU inputs exactly 0, per million ReLU "
            "evaluations of the reference runs: " + "; ".join(parts) + "."
        )
        if "cnn" in models:
            ties = [
                pct(A.rate(by_pm[(p, "cnn")]["hits"], "pool"), 0)
                for p in precisions
                if (p, "cnn") in by_pm
            ]
            text += (
                f" Max-pool windows with a tied maximum (CNN): {', '.join(ties)} of all windows "
                f"in {', '.join(p for p in precisions if (p, 'cnn') in by_pm)} (mostly "
                "all-zero windows after the ReLU, from the digits' blank background)."
            )
        bullets.append(text)
    else:
        bullets.append("**Kink hits**: not counted (kinkgrad.watch was not available).")
    if alt is None:
        return bullets
    per_model = []
    for m in models:
        parts = [
            f"{p} {pct(by_pm[(p, m)]['differ_fraction'])}" for p in precisions if (p, m) in by_pm
        ]
        per_model.append(f"{m.upper()} " + ", ".join(parts))
    bullets.append(
        "**Share of minibatches in which the choice changed the gradient** (both policies at "
        "the same weights on the same minibatch, compared bitwise): " + "; ".join(per_model) + "."
    )
    parts = [
        f"{p} {pm(cells[p]['delta_alt'])} ({_signs(cells[p]['signs_alt'])})" for p in precisions
    ]
    n = cells[precisions[0]]["configs"]
    bullets.append(
        f"**How much it changed final test accuracy**, `{alt_label}` minus the reference, in "
        f"points (mean ± sd over the {n} configurations of each precision, i.e. over seeds, "
        "models, bias modes and batch norm): " + "; ".join(parts) + "."
    )
    parts = [
        f"{p} {pm(cells[p]['delta_ulp'])} ({_signs(cells[p]['signs_ulp'])})" for p in precisions
    ]
    bullets.append(
        "**The noise floor**, one initial weight nudged by one ulp instead: "
        + "; ".join(parts)
        + ". Final relative L2 distance of the weights, kink pair vs ulp pair (median): "
        + "; ".join(
            f"{p} {sci(cells[p]['rel_l2_alt'])} vs {sci(cells[p]['rel_l2_ulp'])}"
            for p in precisions
        )
        + "."
    )
    bullets.append("**Verdict**: " + _verdicts(cells, by_pm, models, precisions))
    return bullets


def _kind(c: dict[str, Any], precision: str) -> str:
    """'identical', 'rounding' or 'effect' for one cell."""
    if c["differ_fraction"] == 0 and c["diverged_alt"] == 0:
        return "identical"
    eps = A.EPS.get(precision, math.inf)
    if c["max_change"] <= A.ROUNDING * eps and c["absdelta_alt"][0] == 0:
        return "rounding"
    return "effect"


def _verdicts(cells, by_pm, models, precisions) -> str:
    quiet, loud = [], []
    for p in precisions:
        kinds = {m: _kind(by_pm[(p, m)], p) for m in models if (p, m) in by_pm}
        if all(k != "effect" for k in kinds.values()):
            quiet.append((p, kinds))
        else:
            loud.append(p)
    out = []
    if quiet:
        names = " and ".join(", ".join(p for p, _ in quiet).rsplit(", ", 1))
        details = []
        for p, kinds in quiet:
            for m, k in kinds.items():
                c = by_pm[(p, m)]
                if k == "identical":
                    details.append(f"{m.upper()} {p}: bit-identical throughout")
                else:
                    details.append(
                        f"{m.upper()} {p}: gradients changed by at most {sci(c['max_change'])} "
                        "of the gradient's largest entry, weights drifted "
                        f"{sci(c['rel_l2_alt'])} (ulp pair {sci(c['rel_l2_ulp'])})"
                    )
        out.append(
            f"in {names} the choice did not change the result beyond rounding ("
            + "; ".join(details)
            + ")."
        )
    if loud:
        parts = []
        # Holm over every sign test the report could make: precisions x models x
        # (kink, ulp) pairs, so one lucky split among many is not a finding.
        tests = len(precisions) * len(models) * 2
        p_signs = [A.sign_test(*cells[p]["signs_alt"][:2]) for p in loud]
        p_holm = dict(zip(loud, A.holm(p_signs, family=tests)))
        for p in loud:
            c = cells[p]
            a, u = c["absdelta_alt"][0], c["absdelta_ulp"][0]
            word = A.compare_word(a, u)  # 0.00 vs 0.00 is "as little as", not a ratio
            models_txt = ", ".join(
                f"{m.upper()} {by_pm[(p, m)]['absdelta_alt'][0]:.2f} vs "
                f"{by_pm[(p, m)]['absdelta_ulp'][0]:.2f}"
                for m in models
                if (p, m) in by_pm
            )
            text = (
                f"in {p} it moved final accuracy {word} the one-ulp nudge did (mean |change| "
                f"{a:.2f} vs {u:.2f} points; {models_txt})"
            )
            lo, hi, _ = c["signs_alt"]
            p_kink, p_adj = A.sign_test(lo, hi), p_holm[p]
            if p_adj < 0.05:
                ulo, uhi, _ = c["signs_ulp"]
                text += (
                    f", but in one direction: {'lower' if lo > hi else 'higher'} in "
                    f"{max(lo, hi)} of the {lo + hi} configurations it changed (sign test "
                    f"p = {p_kink:.2g}, Holm-adjusted over {tests} tests p = {p_adj:.2g}; "
                    f"the nudge: {ulo} lower, {uhi} higher, p = {A.sign_test(ulo, uhi):.2g})"
                )
            parts.append(text)
        out.append("; ".join(parts) + ".")
    return " ".join(o[0].upper() + o[1:] for o in out)


def _comparison(records, cells, by_pm, alt, models, precisions, watch) -> list[Block]:
    if alt is None:
        return []
    rows = []
    mlp = lambda p, k: by_pm[(p, "mlp")][k] if (p, "mlp") in by_pm else math.nan
    cnn = lambda p, k: by_pm[(p, "cnn")][k] if (p, "cnn") in by_pm else math.nan
    published_s = {"float64": "0%", "float32": "35.1-48.8%", "float16": "100%"}
    for p in precisions:
        if p in published_s and "mlp" in models:
            rows.append(
                [
                    f"MLP ({p}): share of initialisations whose first-layer weight gradients "
                    "differ on some minibatch of the first epoch",
                    f"{published_s[p]} (MNIST MLP, {PAPER})",
                    f"{pct(mlp(p, 'first_epoch_share_first_layer'), 0)} of "
                    f"{by_pm[(p, 'mlp')]['n_alt']} configurations (any parameter: "
                    f"{pct(mlp(p, 'first_epoch_share'), 0)})",
                ]
            )
    if watch:
        published_rate = {"float32": "2.9e-9", "float16": "8.3e-8"}
        for p in precisions:
            if p in published_rate and "mlp" in models:
                h = by_pm[(p, "mlp")]["hits"]
                rows.append(
                    [
                        f"MLP ({p}): rate of ReLU inputs exactly 0",
                        f"{published_rate[p]} (MNIST MLPs, 100 epochs, {PAPER})",
                        sci(A.rate(h, "relu")),
                    ]
                )
    published_pool = {"float64": "0%", "float32": "55.2%", "float16": "100%"}
    for p in precisions:
        if p in published_pool and "cnn" in models:
            rows.append(
                [
                    f"CNN ({p}): share of minibatches whose gradient changes with the tie rule",
                    f"{published_pool[p]} (VGG11 / CIFAR-10, one epoch, {BOUSTANY})",
                    f"{pct(cnn(p, 'differ_fraction'))} (ReLU'(0) and tie rule varied together)",
                ]
            )
    return [
        ("h2", "Compared with published figures"),
        (
            "p",
            "The published protocol is the same bitwise test at a much larger scale (MNIST "
            "and CIFAR-10, 1000 initialisations, 784-input MLPs, VGG11); this study is "
            "laptop-sized (8x8 digits, a 64-32-32-10 MLP, a 4/8-channel CNN), so expect the "
            "direction, not the digits, to agree: Bertoin et al. report the share rising "
            "with width (2.1% at 16 units to 87.3% at 1024 in float32), and our MLP is "
            "narrow. The rows below put our closest number next to each published one.",
        ),
        ("table", ["quantity", "published", "this run"], rows),
        *_cnn_note(by_pm, precisions, models),
        (
            "p",
            "Final accuracy in the paper (ResNet18 / CIFAR-10 / SGD without batch norm): "
            "90.14% with ReLU'(0) = 0, training fails at ReLU'(0) >= 0.5; with batch norm "
            "91.87% (0) vs 89.81% (1). Those effects come from thousands of kink hits per "
            "step in a deep network over 200 epochs; compare them with the accuracy changes "
            "above only for their sign.",
        ),
    ]


def _cnn_note(by_pm, precisions, models) -> list[Block]:
    if "cnn" not in models or ("float64", "cnn") not in by_pm:
        return []
    c = by_pm[("float64", "cnn")]
    if not c["differ_fraction"]:
        return []
    return [
        (
            "p",
            f"Why our CNN changes its gradient in {pct(c['differ_fraction'])} of float64 "
            "minibatches where VGG11 on CIFAR-10 changes it in none: the digits have a blank "
            "background, so whole max-pool windows hold the same value (after a convolution "
            "of zeros, the bias) and ties are everywhere. Splitting such a window's gradient "
            "instead of giving it all to the first element moves it between inputs that "
            "carry the same value, and the measured changes are rounding-level: the largest "
            f"was {sci(c['max_change'])} of the gradient's largest entry, and the runs "
            f"drifted apart by {sci(c['rel_l2_alt'])} (one-ulp pair: "
            f"{sci(c['rel_l2_ulp'])}).",
        )
    ]


def _tables(records, alt, models, precisions, watch) -> list[Block]:
    if alt is None:
        return []
    header = [
        "model",
        "precision",
        "bias",
        "BN",
        "configs",
        "ReLU zeros / 1e6",
        "pool windows tied",
        "gradient changed",
        "first change (median step)",
        "Δacc kink choice (points)",
        "Δacc 1-ulp nudge (points)",
        "rel. L2 kink / ulp",
    ]
    rows = []
    for (m, p, b, bn), rs in A.group(records, "model", "precision", "bias", "batchnorm").items():
        c = A.cell(rs, alt)
        rows.append(
            [
                m.upper(),
                p,
                b,
                "yes" if bn else "no",
                str(c["configs"]),
                per_million(c["hits"], "relu") if watch else "n/a",
                pct(A.rate(c["hits"], "pool"), 0) if watch and m == "cnn" else "",
                pct(c["differ_fraction"]),
                "never" if c["diverged_alt"] == 0 else f"{c['first_div_alt']:g}",
                pm(c["delta_alt"]),
                pm(c["delta_ulp"]),
                f"{sci(c['rel_l2_alt'])} / {sci(c['rel_l2_ulp'])}",
            ]
        )
    order = {p: i for i, p in enumerate(PRECISIONS)}
    rows.sort(key=lambda r: (models.index(r[0].lower()), order[r[1]], r[2], r[3]))
    return [
        ("h2", "By configuration group"),
        (
            "p",
            "One row per model, precision, bias mode and batch-norm setting, pooled over "
            "seeds. 'gradient changed': share of minibatches whose gradient (any parameter) "
            "differs bitwise between the two policies at the same weights. 'first change': "
            "the step at which the independently trained runs' gradients first differed. "
            "Δacc: final test accuracy minus the reference run's, mean ± sd over seeds.",
        ),
        ("table", header, rows),
    ]


def _where(records, alt, models, precisions) -> list[Block]:
    if alt is None:
        return []
    rows = []
    for m in models:
        for p in precisions:
            rs = [r for r in records if (r["key"]["model"], r["key"]["precision"]) == (m, p)]
            steps = sum(r["steps"] for r in rs)
            for name, (n, rel) in A.where_changed(rs, alt).items():
                rows.append([m.upper(), p, f"`{name}`", pct(n / steps), sci(rel)])
    if not rows:
        return [
            ("h2", "Where the gradient changed"),
            ("p", "Nowhere: no gradient of any parameter changed with the policy."),
        ]
    return [
        ("h2", "Where the gradient changed"),
        (
            "p",
            "Per parameter: the share of minibatches in which its gradient changed with the "
            "policy (same weights), and the largest change relative to the largest entry of "
            "the whole gradient. A relative change of the order of the precision's machine "
            "epsilon (float64 2.2e-16, float32 1.2e-7, bfloat16 7.8e-3, float16 9.8e-4) is "
            "a rounding-level difference, e.g. the same contributions summed in another order.",
        ),
        (
            "table",
            ["model", "precision", "parameter", "minibatches", "largest relative change"],
            rows,
        ),
    ]


def _layers(records, models, precisions) -> list[Block]:
    rows = []
    for m in models:
        for p in precisions:
            rs = [r for r in records if (r["key"]["model"], r["key"]["precision"]) == (m, p)]
            tot: dict[str, dict[str, int]] = {}
            for r in rs:
                for layer, d in A.counts_by_layer(r).items():
                    t = tot.setdefault(layer, {})
                    for k, v in d.items():
                        t[k] = t.get(k, 0) + v
            for layer, d in tot.items():
                rows.append(
                    [
                        m.upper(),
                        p,
                        f"`{layer}`",
                        count(d.get("sites") or d.get("elements", 0)),
                        count(d.get("exact", 0)),
                        count(d.get("effective", 0)),
                        count(d.get("near", 0)),
                    ]
                )
    return [
        ("h2", "Kink hits per layer"),
        (
            "p",
            "Reference run, summed over epochs, seeds, bias modes and batch-norm settings. "
            "sites: ReLU inputs, or max-pool windows; exact: sites exactly on a kink (a ReLU "
            "input equal to 0, a window whose maximum is tied); effective: exact "
            "hits whose upstream gradient was non-zero, i.e. where the policy changes the "
            "gradient; near: within kinkgrad.watch's default tolerance of a kink.",
        ),
        ("table", ["model", "precision", "layer", "sites", "exact", "effective", "near"], rows),
    ]


def _setup(records, manifest, cfg, settings, alt_label, ref_label) -> list[Block]:
    env = manifest.get("environment", {})
    seconds = manifest.get("train_seconds_all_configs")
    wall = manifest.get("wall_seconds")
    data = manifest.get("data") or settings["data"]
    lines = [
        f"Data: {data}; the split is fixed, seeds vary the initial weights and the "
        "minibatch order.",
        f"Models: MLP with two hidden ReLU layers of {settings['width']} units; CNN with two "
        f"conv(3)-ReLU-maxpool(2) blocks of {settings['channels']} and "
        f"{2 * settings['channels']} channels and a linear output layer. Batch norm (when on) "
        "sits before every ReLU. Bias 'fused': `F.linear` / `F.conv2d` add it inside the op; "
        "'separate': matmul (or convolution) first, bias added after (two roundings).",
        f"Policies: reference `{ref_label}` (PyTorch's own choices), compared with "
        f"`{alt_label}`; ReLU'(0) and the max-pool tie rule change together.",
        "Lockstep: every run of a configuration starts from the same initial weights (one "
        "seeded torch.Generator) and sees the same minibatches (another), with no other "
        "random draw. At each step the reference weights' gradient is also computed under "
        "the other policy on a shadow copy, and compared bit for bit.",
        "Noise floor: the reference policy from initial weights that differ in one weight "
        "(the output layer's first) by one ulp of the precision (`torch.nextafter`).",
        "Precision: parameters, optimizer state and data are cast to the precision and every "
        "op runs in it on the CPU (no autocast, no master weights, no loss scaling).",
        f"Grid: models {cfg['models']}, precisions {cfg['precisions']}, bias {cfg['bias']}, "
        f"batch norm {cfg['batchnorm']}, seeds {cfg['seeds']}; epochs {settings['epochs']}, "
        f"batch {settings['batch_size']}, {settings['optimizer']} lr {settings['lr']:g}.",
    ]
    cpu = manifest.get("cpu_seconds_all_configs")
    if seconds is not None:
        lines.append(
            (f"Time: {wall:.0f} s wall clock for training" if wall else "Time:")
            + f" with {manifest.get('jobs', 1)} worker process(es); the configurations took "
            f"{seconds:.0f} s"
            + (
                f" ({cpu:.0f} s of CPU time: where elapsed exceeds CPU time, the cores were "
                "shared with other work)"
                if cpu
                else ""
            )
            + f". Python {env.get('python')}, torch {env.get('torch')}, kinkgrad "
            f"{env.get('kinkgrad')}, {env.get('cpu_count')} CPUs ({env.get('platform')})."
        )
    for name in A.certified_names(records):
        rs = [r for r in records if name in r.get("certified", {})]
        every = sorted({r["certified"][name].get("crossings_every") for r in rs})
        dirs = sorted({str(r["certified"][name].get("max_directions") or "?") for r in rs})
        lines.append(
            f"Certified run `{rs[0]['policies'][name]}` ({_seeds_text(records, name)}"
            + (
                f": {len(rs)} of {len(records)} configurations, so that the default study "
                "stays within its time budget; `--extra-seeds 0` trains it for every seed): "
                if len(rs) < len(records)
                else "): "
            )
            + "`kinkgrad.certified_backward` instead of `loss.backward()`, the random "
            "directions seeded from the configuration's seed and the step, at most "
            f"{'/'.join(dirs)} directions per step. Kink crossings: after the optimizer "
            "step, `kinkgrad.kink_crossings` at the old weights along the update (new minus "
            "old weights, step 1), from one forward-mode pass in the run's precision ("
            + ("every step" if every == [1] else f"every {'/'.join(map(str, every))}th step")
            + "; `--crossings-every K`). A "
            "crossing is a kink-op input (ReLU input, max-pool window element) whose "
            "first-order path reaches a kink within the step: a prediction from the "
            "tangents, exact for the first layer (linear in the weights). On the digits "
            "MLP it matches the ReLU sign changes actually seen between the old and the new "
            "weights to within 2% per step and 0.2% over an epoch (checked in "
            "`tests/test_study_certified.py`)."
        )
    lines.append(
        "Files: `results.jsonl` (one record per configuration, with per-epoch numbers and "
        "per-layer counts), `results.csv` (one row per configuration), `manifest.json`."
    )
    return [("h2", "How this was measured"), ("ul", lines)]


def write(directory: Path, records: list[dict[str, Any]], manifest: dict[str, Any]) -> list[Path]:
    """Plots, report.md and report.html into `directory`; returns the paths written."""
    from . import paper_report

    figures = plots.make_all(records, directory / "plots")
    blocks = build(records, manifest, figures)
    section, paper_figures = paper_report.blocks(directory)
    if section:  # the published experiment first, right under the title
        loaded = paper_report.paper_run.load(directory)
        paper_report.plot(loaded[1], directory / "plots" / "paper.png")
        figures = paper_figures + figures
        title = (
            "Does the derivative at the kink matter? kinkgrad study: the published experiment "
            f"on {loaded[0].data}, training in lockstep on {manifest['settings']['data']}"
        )
        blocks = [("h1", title), *section, ("h2", "Training in lockstep"), *blocks[1:]]
    md, page = directory / "report.md", directory / "report.html"
    atomic_write(md, to_markdown(blocks))
    atomic_write(page, to_html(blocks, directory))
    return [md, page] + [directory / "plots" / f[0] for f in figures]
