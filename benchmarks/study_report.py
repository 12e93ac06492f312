"""The study's report: read every finished run of a study folder, compute per-arm statistics, write ``report.md``,
``results.json`` and the plots in ``plots/``. Called by :mod:`benchmarks.study` after each invocation; also
``python -m benchmarks.study_report STUDY_DIR`` on its own.

Statistics. The unit of replication is the seed (a whole RL run): each arm's accuracy is reported as the mean over
its seeds with a 95% Student-t confidence interval, ``mean +- t(0.975, n-1) * sd / sqrt(n)``. Arms are compared with
the reference arm (GRPO) by **paired** differences over the seeds both have finished (same seed = same RL prompt
order, sampling seeds and evaluation seeds), again with a t interval. The per-problem binomial standard error of one
evaluation (``se_eval``, about 0.7 points on 4,000 problems) is shown beside it: when the seed-to-seed spread is much
larger, more seeds, not more problems, tighten the interval. A difference whose interval excludes 0 is called a
difference; otherwise the report says the study cannot tell the arms apart at this size.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from lampo.files import atomic_write_text

# training metrics (TensorBoard tags under rl/) plotted for stability, and LamPO's pairwise diagnostics
STABILITY = {"reward_std": "reward std within the batch", "entropy": "token entropy", "response_len_mean":
             "mean response length (tokens)", "approx_kl": "approx. KL(old || new)", "clip_frac": "clipped fraction "
             "(low + high)", "accuracy": "training accuracy (outcome reward)"}
PAIRWISE = {"pairwise_weight_mean": "mean pair weight", "pairwise_discordant_frac": "pairs the policy orders wrongly",
            "pairwise_score_gap_mean": "mean |s_i - s_j| over pairs", "uniform_group_frac": "groups with equal rewards"}


# --------------------------------------------------------------------------------------------------------------------
# statistics


def t_interval(xs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of a Student-t interval over ``xs``; one value gives an interval of (nan, nan)."""
    from scipy import stats

    n = len(xs)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(xs) / n
    if n == 1:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def paired(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, float, int]:
    """Mean difference a - b over the seeds both have, its t interval, and how many seeds were paired."""
    common = sorted(set(a) & set(b))
    m, lo, hi = t_interval([a[s] - b[s] for s in common])
    return m, lo, hi, len(common)


# --------------------------------------------------------------------------------------------------------------------
# reading a study folder


def _results(path: Path) -> dict[str, Any] | None:
    p = path / "results.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _responses_accuracy(eval_dir: Path, bench: str, ids: set[str]) -> float | None:
    """Greedy accuracy over the problems ``ids`` from an evaluation's ``responses.jsonl`` (the curve set is a prefix
    of the final evaluation's problems)."""
    p = eval_dir / bench / "responses.jsonl"
    if not p.is_file():
        return None
    got = {}
    for line in p.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r["problem_id"] in ids and r.get("sample", 0) == 0:
            got[r["problem_id"]] = bool(r["correct"])
    return sum(got.values()) / len(got) if len(got) == len(ids) else None


def _scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    """Every ``rl/*`` scalar of a run: {name: {step: value}}; a step logged twice (a resumed run) keeps its last."""
    if not tb_dir.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    ea.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in ea.Tags()["scalars"]:
        if tag.startswith("rl/"):
            series = out.setdefault(tag[3:], {})
            for ev in sorted(ea.Scalars(tag), key=lambda e: e.wall_time):
                series[ev.step] = ev.value
    if "clip_frac_low" in out:
        out["clip_frac"] = {k: v + out.get("clip_frac_high", {}).get(k, 0.0) for k, v in out["clip_frac_low"].items()}
    return out


def _metric(res: dict[str, Any] | None, bench: str, key: str) -> float | None:
    if res is None:
        return None
    m = res["benchmarks"].get(bench, {}).get("metrics", {})
    return m.get(key)


def collect(study_dir: Path, arms: list[str] | None = None) -> dict[str, Any]:
    """Everything the report shows, as plain data (also written to ``results.json``); ``arms``: only these (and the
    reference arm, which the paired differences need), in this order."""
    from evaluation.benchmarks import load_benchmark

    design = json.loads((study_dir / "study.json").read_text())
    if arms:
        unknown = [a for a in arms if a not in design["arms"]]
        if unknown:
            raise ValueError(f"arm(s) {', '.join(unknown)} are not in {study_dir / 'study.json'}; it has "
                             f"{', '.join(design['arms'])}")
        ref = design.get("reference_arm", "grpo")
        keep = arms + ([ref] if ref in design["arms"] and ref not in arms else [])
        design = {**design, "arms": {a: design["arms"][a] for a in keep}}
    ev = design["evaluation"]
    bench = ev["benchmarks"][0]
    curve_ids = {p.id for p in load_benchmark(bench, data_dir=ev.get("data_dir"), limit=ev["curve_limit"]).problems}
    k = ev["sample_k"]
    sft_g, sft_s = _results(study_dir / "sft_eval" / "greedy"), _results(study_dir / "sft_eval" / "sampled")
    data: dict[str, Any] = {
        "design": design, "benchmark": bench,
        "sft": {"greedy": _metric(sft_g, bench, "avg@1"), f"avg@{k}": _metric(sft_s, bench, f"avg@{k}"),
                f"pass@{k}": _metric(sft_s, bench, f"pass@{k}"),
                "curve": _responses_accuracy(study_dir / "sft_eval" / "greedy", bench, curve_ids),
                "se_eval": _metric(sft_g, bench, "avg@1_se")},
        "runs": {},
    }
    for arm, spec in design["arms"].items():
        for seed in design["seeds"]:
            d = study_dir / "runs" / arm / f"seed_{seed}"
            g, s = _results(d / "final_eval" / "greedy"), _results(d / "final_eval" / "sampled")
            if g is None or s is None:
                continue
            stage = "sft" if spec["kind"] == "sft" else "rl"
            curve = {}
            for it_dir in sorted((d / "eval").glob("rl_iter_*")):
                acc = _metric(_results(it_dir), bench, "avg@1")
                if acc is not None:
                    curve[int(it_dir.name.rsplit("_", 1)[1])] = acc
            scal = _scalars(d / "tensorboard")
            final_step = max(scal["reward_mean"]) if scal.get("reward_mean") else None
            if final_step is None and stage == "sft":
                final_step = json.loads((d / "state" / "sft.json").read_text())["step"]
            fin = _responses_accuracy(d / "final_eval" / "greedy", bench, curve_ids)
            if final_step is not None and fin is not None:
                curve[final_step] = fin
            if data["sft"]["curve"] is not None:
                curve[0] = data["sft"]["curve"]
            data["runs"].setdefault(arm, {})[str(seed)] = {
                "greedy": _metric(g, bench, "avg@1"), f"avg@{k}": _metric(s, bench, f"avg@{k}"),
                f"pass@{k}": _metric(s, bench, f"pass@{k}"), "se_eval": _metric(g, bench, "avg@1_se"),
                "curve": {str(i): v for i, v in sorted(curve.items())},
                "train": {name: {str(i): v for i, v in sorted(series.items())} for name, series in scal.items()
                          if name in STABILITY or name in PAIRWISE or name == "response_len_mean"},
                "tokens_per_iteration": _tokens(scal, design, arm),
            }
    data["summary"] = summarize(data)
    return data


def _tokens(scal: dict[str, dict[int, float]], design: dict[str, Any], arm: str) -> dict[str, float]:
    """Generated tokens per iteration: mean response length x sequences per iteration (from the arm's config)."""
    if "response_len_mean" not in scal:
        return {}
    from pipeline.config import load_config

    cfg = load_config(design["config"], [*design["overrides"], *design["arms"][arm]["overrides"]])
    n = cfg.rl.prompts_per_iteration * cfg.rollout.n_samples
    return {str(i): v * n for i, v in sorted(scal["response_len_mean"].items())}


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    k = data["design"]["evaluation"]["sample_k"]
    ref = data["design"].get("reference_arm", "grpo")
    metrics = ["greedy", f"avg@{k}", f"pass@{k}"]
    out: dict[str, Any] = {}
    for arm, runs in data["runs"].items():
        per = {m: {int(s): r[m] for s, r in runs.items() if r[m] is not None} for m in metrics}
        row: dict[str, Any] = {"seeds": sorted(int(s) for s in runs)}
        for m in metrics:
            mean, lo, hi = t_interval(list(per[m].values()))
            row[m] = {"mean": mean, "low": lo, "high": hi, "values": per[m]}
            if ref in data["runs"] and arm != ref:
                rper = {int(s): r[m] for s, r in data["runs"][ref].items() if r[m] is not None}
                d, dlo, dhi, n = paired(per[m], rper)
                row[m]["vs_ref"] = {"mean": d, "low": dlo, "high": dhi, "n": n}
            base = data["sft"].get(m)
            if base is not None:
                mean, lo, hi = t_interval([v - base for v in per[m].values()])
                row[m]["vs_sft"] = {"mean": mean, "low": lo, "high": hi}
        out[arm] = row
    return out


# --------------------------------------------------------------------------------------------------------------------
# writing


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _ci(d: dict[str, float] | None, signed: bool = False) -> str:
    if not d or math.isnan(d["mean"]):
        return "-"
    fmt = (lambda x: f"{100 * x:+.1f}") if signed else (lambda x: f"{100 * x:.1f}")
    if math.isnan(d["low"]):
        return fmt(d["mean"]) + " (1 seed)"
    return f"{fmt(d['mean'])} [{fmt(d['low'])}, {fmt(d['high'])}]"


def verdict(arm: str, d: dict[str, float] | None, ref: str) -> str:
    if not d or d.get("n", 0) < 2 or math.isnan(d["low"]):
        return f"{arm} vs {ref}: fewer than 2 paired seeds, no interval"
    gap = (f"{100 * d['mean']:+.1f} points, 95% CI [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}], "
           f"{d['n']} paired seeds")
    if d["low"] > 0:
        return f"**{arm} beats {ref}**: {gap}"
    if d["high"] < 0:
        return f"**{arm} is worse than {ref}**: {gap}"
    return f"{arm} vs {ref}: no detectable difference ({gap}; the interval includes 0)"


def command_of(design: dict[str, Any]) -> str:
    import shlex

    arms = ",".join(design["arms"])
    ev = design["evaluation"]
    parts = ["python -m benchmarks.study", design["config"], *design["overrides"], f"--arms {arms}",
             f"--seeds {','.join(map(str, design['seeds']))}", f"--eval-limit {ev['eval_limit']}",
             f"--sample-limit {ev['sample_limit']}", f"--sample-k {ev['sample_k']}",
             f"--curve-limit {ev['curve_limit']}", f"--curve-every {ev['curve_every']}"]
    return " ".join(shlex.quote(p) if " " not in p else p for p in parts)


def render(data: dict[str, Any], plots: list[str]) -> str:
    design, summ, sft = data["design"], data["summary"], data["sft"]
    ev, k, ref = design["evaluation"], design["evaluation"]["sample_k"], design.get("reference_arm", "grpo")
    lines = [f"# Study: {Path(design['config']).name} ({data['benchmark']})", "",
             f"Command (resumable; arms and seeds may be added later): `{command_of(design)}`", "",
             "## Design (fixed in `study.json` before any run)", "",
             f"Seeds: {', '.join(map(str, design['seeds']))}. Every arm starts from one shared SFT checkpoint; arms "
             "with the same seed see the same RL prompts in the same order and the same sampling seeds.", "",
             "| arm | overrides | what it tests |", "| --- | --- | --- |"]
    for arm, a in design["arms"].items():
        lines.append(f"| {arm} | `{' '.join(a['overrides']) or '-'}` | {a['about']} |")
    lines += ["", f"Evaluation: the first {ev['eval_limit']} held-out problems greedy (avg@1); the first "
              f"{ev['sample_limit']} with {k} samples at T={ev['sample_temperature']} (avg@{k}, pass@{k}); learning "
              f"curves on the first {ev['curve_limit']} (greedy) every {ev['curve_every']} iterations. One "
              f"evaluation's binomial standard error: {_pct(sft['se_eval'])} points at the SFT checkpoint.", "",
              "## Held-out accuracy (%, mean over seeds [95% CI])", "",
              f"| arm | seeds | greedy | avg@{k} | pass@{k} | greedy vs {ref} (paired) | greedy vs SFT |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
              f"| SFT checkpoint (start) | - | {_pct(sft['greedy'])} | {_pct(sft[f'avg@{k}'])} | "
              f"{_pct(sft[f'pass@{k}'])} | - | - |"]
    for arm, row in summ.items():
        lines.append(f"| {arm} | {len(row['seeds'])} | {_ci(row['greedy'])} | {_ci(row[f'avg@{k}'])} | "
                     f"{_ci(row[f'pass@{k}'])} | {_ci(row['greedy'].get('vs_ref'), True)} | "
                     f"{_ci(row['greedy'].get('vs_sft'), True)} |")
    lines += ["", "## Reading (computed from the table, not written by hand)", ""]
    for arm, row in summ.items():
        if arm != ref:
            lines.append("- " + verdict(arm, row["greedy"].get("vs_ref"), ref))
    for arm, row in summ.items():
        d = row["greedy"].get("vs_sft")
        if d and not math.isnan(d["low"]):
            word = "gains over SFT" if d["low"] > 0 else "loses against SFT" if d["high"] < 0 else \
                "does not differ detectably from SFT"
            lines.append(f"- {arm} {word}: {_ci(d, True)} points; per seed "
                         + ", ".join(f"{100 * v:+.1f}" for v in (x - sft['greedy'] for x in
                                                                 row['greedy']['values'].values())))
    lines += ["", "## Plots", ""] + [f"![{p}](plots/{p})" for p in plots]
    lines += ["", "## Every run (greedy / avg@k / pass@k, %)", "", "| arm | " + " | ".join(
        f"seed {s}" for s in design["seeds"]) + " |", "| --- |" + " ---: |" * len(design["seeds"])]
    for arm, runs in data["runs"].items():
        cells = []
        for s in design["seeds"]:
            r = runs.get(str(s))
            cells.append(f"{_pct(r['greedy'])} / {_pct(r[f'avg@{k}'])} / {_pct(r[f'pass@{k}'])}" if r else "-")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _band(series: list[dict[str, float]]) -> tuple[list[float], list[float], list[float], list[float]]:
    """x, mean, min, max over runs at the x values every run has."""
    xs = sorted(set.intersection(*(set(map(int, s)) for s in series))) if series else []
    ys = [[s[str(x)] for s in series] for x in xs]
    return xs, [sum(y) / len(y) for y in ys], [min(y) for y in ys], [max(y) for y in ys]


def plot(data: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    runs, summ, k = data["runs"], data["summary"], data["design"]["evaluation"]["sample_k"]
    ref = data["design"].get("reference_arm", "grpo")
    written = []
    if not runs:
        return written
    arms = list(runs)
    colors = {a: plt.cm.tab10(i % 10) for i, a in enumerate(arms)}

    # 1. final accuracy per arm with intervals and the per-seed points
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, m in zip(axes, ["greedy", f"avg@{k}", f"pass@{k}"]):
        for i, a in enumerate(arms):
            r = summ[a][m]
            ax.scatter([i] * len(r["values"]), [100 * v for v in r["values"].values()], color=colors[a], alpha=.5, s=14)
            if not math.isnan(r["low"]):
                ax.errorbar(i, 100 * r["mean"], yerr=[[100 * (r["mean"] - r["low"])], [100 * (r["high"] - r["mean"])]],
                            fmt="o", color="k", capsize=4)
        if data["sft"].get(m) is not None:
            ax.axhline(100 * data["sft"][m], ls="--", color="gray", label="SFT start")
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(arms)), arms, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"held-out {m} (%): mean, 95% CI, seeds")
    fig.tight_layout()
    fig.savefig(out / "final_accuracy.png", dpi=110)
    plt.close(fig)
    written.append("final_accuracy.png")

    # 2. paired differences against the reference arm
    others = [a for a in arms if a != ref and "vs_ref" in summ[a]["greedy"]]
    if others:
        fig, ax = plt.subplots(figsize=(7, 0.5 * len(others) + 1.5))
        for i, a in enumerate(others):
            d = summ[a]["greedy"]["vs_ref"]
            if not math.isnan(d["low"]):
                ax.errorbar(100 * d["mean"], i, xerr=[[100 * (d["mean"] - d["low"])], [100 * (d["high"] - d["mean"])]],
                            fmt="o", color=colors[a], capsize=4)
            elif not math.isnan(d["mean"]):
                ax.plot(100 * d["mean"], i, "o", color=colors[a])
        ax.axvline(0, color="gray", ls="--")
        ax.set_yticks(range(len(others)), others)
        ax.set_xlabel(f"greedy accuracy minus {ref}, paired by seed (points, 95% CI)")
        fig.tight_layout()
        fig.savefig(out / "paired_vs_reference.png", dpi=110)
        plt.close(fig)
        written.append("paired_vs_reference.png")

    # 3. learning curves: vs iteration and vs generated tokens (band = min..max over seeds)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for a in arms:
        curves = [r["curve"] for r in runs[a].values() if r["curve"]]
        if not curves:
            continue
        xs, mean, lo, hi = _band(curves)
        axes[0].plot(xs, [100 * v for v in mean], color=colors[a], label=a, marker=".")
        axes[0].fill_between(xs, [100 * v for v in lo], [100 * v for v in hi], color=colors[a], alpha=.15)
        tok_runs = [r for r in runs[a].values() if r["tokens_per_iteration"] and r["curve"]]
        if tok_runs:
            txs, tys = [], []
            for r in tok_runs:
                cum, total = {0: 0.0}, 0.0
                for i, v in sorted((int(i), v) for i, v in r["tokens_per_iteration"].items()):
                    total += v
                    cum[i] = total  # tokens generated in iterations 1..i
                pts = sorted((cum.get(int(i), math.nan), v) for i, v in r["curve"].items())
                txs.append([p[0] for p in pts])
                tys.append([p[1] for p in pts])
            n = min(map(len, txs))
            axes[1].plot([sum(t[j] for t in txs) / len(txs) for j in range(n)],
                         [100 * sum(t[j] for t in tys) / len(tys) for j in range(n)], color=colors[a], marker=".",
                         label=a)
    axes[0].set_xlabel("RL iteration (SFT control: optimizer step)")
    axes[1].set_xlabel("generated tokens (cumulative, mean over seeds)")
    for ax in axes:
        ax.set_ylabel("greedy accuracy on the curve set (%)")
        ax.legend(fontsize=8)
    axes[0].set_title("learning curves: mean over seeds, band = min..max")
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=110)
    plt.close(fig)
    written.append("learning_curves.png")

    # 4. training stability and 5. LamPO's pairwise statistics, per iteration
    for fname, spec, title in (("stability.png", STABILITY, "training stability"),
                               ("pairwise.png", PAIRWISE, "pairwise statistics (every arm's batch)")):
        fig, axes = plt.subplots(2, 3 if len(spec) > 4 else 2, figsize=(14, 7.5))
        for ax, (name, label) in zip(axes.flat, spec.items()):
            for a in arms:
                series = [r["train"][name] for r in runs[a].values() if r["train"].get(name)]
                if series:
                    xs, mean, lo, hi = _band(series)
                    ax.plot(xs, mean, color=colors[a], label=a, lw=1)
                    ax.fill_between(xs, lo, hi, color=colors[a], alpha=.12)
            ax.set_title(label, fontsize=10)
            ax.set_xlabel("iteration")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(title + " (mean over seeds, band = min..max)")
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)
        written.append(fname)
    return written


def write_report(study_dir: str | Path, arms: list[str] | None = None, out: str | Path | None = None) -> Path:
    """``report.md``, ``results.json`` and ``plots/`` of ``study_dir`` (default: into it; ``out``: another folder,
    e.g. for a subset of ``arms``)."""
    study_dir = Path(study_dir)
    out = Path(out) if out is not None else study_dir
    out.mkdir(parents=True, exist_ok=True)
    data = collect(study_dir, arms)
    plots = plot(data, out / "plots")
    for name, text in (("results.json", json.dumps(data, indent=1, default=float) + "\n"),
                       ("report.md", render(data, plots))):
        atomic_write_text(out / name, text)
    return out / "report.md"


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.study_report", description=__doc__.split("\n\n")[0])
    p.add_argument("study_dir", help="a study folder (holds study.json)")
    p.add_argument("--arms", default=None, help="only these arms, comma-separated (the reference arm is kept)")
    p.add_argument("--out", default=None, help="write report.md, results.json and plots/ here instead")
    args = p.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
    try:
        print(write_report(args.study_dir, arms, args.out))
    except ValueError as e:
        print(f"study_report: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
