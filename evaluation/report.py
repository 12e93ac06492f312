"""Presenting results: a Markdown report and TensorBoard scalars (the pipeline owns the writer; we only name tags)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lampo.files import atomic_write_text


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _pm(metrics: dict[str, float], key: str) -> str:
    if key not in metrics:
        return "-"
    return f"{_pct(metrics[key])} ± {_pct(metrics.get(key + '_se'))}"


def render_report(results: dict[str, Any]) -> str:
    """Markdown: one summary row per benchmark (percentages, ± one standard error over problems), then breakdowns
    and skipped rows."""
    s = results["settings"]
    lines = [
        "# Evaluation report",
        "",
        f"model `{s.get('model')}`; k={s['samples']} samples per problem, temperature {s['temperature']}, "
        f"top_p {s['top_p']}, max_new_tokens {s['max_new_tokens']}, seed {s['seed']}, prompt style "
        f"{s['prompt_style']}. Accuracies in %, ± one standard error over problems.",
        "",
        "| benchmark | problems | avg@k | pass@1 | pass@k | maj@k | no answer % | mean tokens | truncated % |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results["benchmarks"].items():
        m, k, ln = r["metrics"], r["samples"], r["length"]
        lines.append(f"| {name} | {r['n_problems']} | {_pm(m, f'avg@{k}')} | {_pm(m, 'pass@1')} | "
                     f"{_pm(m, f'pass@{k}')} | {_pm(m, f'maj@{k}')} | {_pct(r['no_answer'])} | {ln['mean']:.0f} | "
                     f"{_pct(ln['truncated'])} |")
    for name, r in results["benchmarks"].items():
        for field_name, groups in r["breakdown"].items():
            lines += ["", f"## {name} by {field_name}", "", f"| {field_name} | problems | accuracy |",
                      "| --- | ---: | ---: |"]
            lines += [f"| {g} | {v['n']} | {_pct(v['accuracy'])} ± {_pct(v['accuracy_se'])} |"
                      for g, v in groups.items()]
    skipped = [(name, row) for name, r in results["benchmarks"].items() for row in r["skipped_rows"]]
    if skipped:
        lines += ["", "## Skipped rows", ""] + [f"- {name}: {row}" for name, row in skipped]
    return "\n".join(lines) + "\n"


def write_report(path: str | Path, results: dict[str, Any]) -> None:
    atomic_write_text(path, render_report(results))


def scalars(results: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """Flat ``{tag: value}``: ``{prefix}/{benchmark}/{metric}`` for every metric (not the standard errors) plus
    ``.../length_mean`` and ``.../truncated``."""
    out: dict[str, float] = {}
    for name, r in results["benchmarks"].items():
        for key, v in r["metrics"].items():
            if not key.endswith("_se"):
                out[f"{prefix}/{name}/{key}"] = float(v)
        out[f"{prefix}/{name}/length_mean"] = float(r["length"]["mean"])
        out[f"{prefix}/{name}/truncated"] = float(r["length"]["truncated"])
    return out


def log_to_tensorboard(writer: Any, results: dict[str, Any], step: int, prefix: str = "eval") -> dict[str, float]:
    """Write :func:`scalars` to a ``torch.utils.tensorboard.SummaryWriter`` at ``step``; returns what was written."""
    values = scalars(results, prefix)
    for tag, v in values.items():
        writer.add_scalar(tag, v, step)
    return values
