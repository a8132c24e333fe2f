"""`promoe-bench report RUN [RUN...]`: one self-contained HTML file from run folders.

plotly.js is embedded once, with the first figure, so the file opens offline and can be attached to a CI
job; every other figure refers to it. Sections in order: what was run (and warnings), the verdict table,
latency, where the time goes, cache and prediction, the link, a timeline of one prefill and one decode step,
sweeps, and runs of one setup from several commits. Each opens with a line on what to look at. The file
is written to a temporary sibling and moved into place, so a failed report never replaces a good one.
"""

import html
import os
from pathlib import Path

import pandas as pd

from . import report_across as across
from . import report_data as data
from . import report_figures as figures
from .errors import UsageError
from .statistics import variability_warnings

STYLE = """body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1400px;color:#222}
h2{margin-top:40px;border-bottom:1px solid #ddd}p.guide{color:#555;font-style:italic}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.ci{color:#777;font-size:11px}
.warnings li{color:#8a4b00}.synthetic{background:#c62828;color:#fff;padding:8px 12px;font-weight:bold}
.note{color:#555}table.header td{text-align:left;vertical-align:top}"""

# verdict column -> (title, format of a value); byte columns are shown in MB
TITLES = {"ttft_ms": ("TTFT ms", "{:.1f}"), "tpot_ms": ("TPOT ms", "{:.2f}"),
          "prefill_tok_s": ("prefill tok/s", "{:.0f}"), "decode_tok_s": ("decode tok/s", "{:.1f}"),
          "hit_rate": ("hit rate", "{:.1%}"), "stall_share": ("stall share", "{:.1%}"),
          "copied_mb_per_repeat": ("copied MB / repeat", "{:.1f}"),
          "nvml_peak_memory_bytes": ("peak GPU memory MB (NVML)", "{:.0f}"),
          "peak_rss_bytes": ("peak RSS MB", "{:.0f}"), "speedup_ttft": ("TTFT speedup", "{:.2f}×"),
          "speedup_tpot": ("TPOT speedup", "{:.2f}×")}
UNRANKED = "full_gpu"  # the ceiling with every expert resident: not a contender for the best value
HEADER = ("folder", "status", "what", "model", "workload", "routing", "cache rate", "when", "link", "repeats",
          "environment", "git commit", "command")


class _Figures:
    """Renders figures as divs: the first carries plotly.js, the rest use it."""

    def __init__(self):
        self.count = 0

    def __call__(self, figure, name: str) -> str:
        self.count += 1
        return figure.to_html(full_html=False, include_plotlyjs=self.count == 1, div_id=f"fig-{name}",
                              config={"displaylogo": False})


def write_report(folders: list[Path], baseline: str | None, out: Path) -> int:
    """Write the report of `folders` to `out`; returns its size in bytes. Every input is checked first."""
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name such as report.html")
    runs = data.load_runs(folders)
    if baseline is not None and not any(data.baseline_label(run, label, baseline)
                                        for run in runs for label in run.labels):
        raise UsageError(f"--baseline {baseline} is in none of the runs; they have "
                         f"{', '.join(dict.fromkeys(label for run in runs for label in run.labels))}")
    document = render(runs, baseline)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(document, encoding="utf-8")
    os.replace(tmp, out)
    return out.stat().st_size


def render(runs: list[data.Run], baseline: str | None) -> str:
    styles = figures.Styles(data.series(runs))
    figure = _Figures()
    body = [_header(runs), *(_section(title, guide, content) for title, guide, content in (
        ("The verdict", "Read across a row for one strategy, down a column for who is best (bold; full_gpu, the "
         "ceiling, is not ranked); speedups are over the baseline at the same cache rate.", _verdict(runs, baseline)),
        ("Latency", "Whiskers are the 95% CI of the median: bars whose whiskers overlap are not told apart by "
         "this run. The boxes show how steady each decode step is.", _latency(runs, styles, figure)),
        ("Where the time goes", "Per MoE layer, the mean ms of one step: a tall red stall segment is compute "
         "waiting for a copy, which prefetching is meant to hide.", _breakdown(runs, styles, figure)),
        ("Cache and prediction", "Hit rate per layer says where the cache helps; recall per layer how well each "
         "predictor guesses; GoodPred (recall × FetchRate) how many guesses arrived in time.",
         _cache(runs, styles, figure)),
        ("The link", "Bytes per step show the copy traffic; achieved GB/s near the peak dash means the link is "
         "saturated and only fewer bytes can help.", _link(runs, styles, figure)),
        ("Timeline of one prefill and one decode step", "Compute against copies: a proactive strategy's copy "
         "lane is busy before compute needs the expert (LOW, speculative), a reactive one copies HIGH while "
         "compute stalls.", _timeline(runs, styles, figure)),
        ("Sweeps", "How each strategy's TTFT and TPOT move with the parameter the runs differ in; crossing "
         "lines mean the best strategy depends on it.", _sweeps(runs, styles, figure)),
        ("Commits", "Runs of one setup made at different commits: the change of each figure against the first "
         "commit given (negative is faster for times, slower for tokens/s).", _commits(runs)),
    ))]
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>promoe-bench report</title>"
            f"<style>{STYLE}</style></head><body><h1>promoe-bench report</h1>{''.join(body)}</body></html>")


def _section(title: str, guide: str, content: str) -> str:
    return f"<h2>{html.escape(title)}</h2><p class='guide'>{html.escape(guide)}</p>{content}"


def _note(text: str) -> str:
    return f"<p class='note'>{html.escape(text)}</p>"


def _header(runs: list[data.Run]) -> str:
    described = pd.DataFrame({run.name: _describe(run) for run in runs})
    described = described.reindex([row for row in HEADER if row in described.index])
    banners = "".join(f"<p class='synthetic'>SYNTHETIC routing in {html.escape(run.name)}: "
                      f"{html.escape(str(run.meta['simulated'].get('synthetic')))}; not a real model's routing</p>"
                      for run in runs if run.simulated and run.meta["simulated"].get("source") == "synthetic")
    warnings = [html.escape(line) for run in runs for line in _warnings(run, len(runs) > 1)]
    listed = f"<ul class='warnings'>{''.join(f'<li>{w}</li>' for w in warnings)}</ul>" if warnings else \
        _note("No warnings.")
    return _section("What was run", "Check the model, workload, machine and commit are the ones you meant, and "
                    "read the warnings before trusting a number below.",
                    banners + described.to_html(classes="header", na_rep="—") + "<h3>Warnings</h3>" + listed)


def _describe(run: data.Run) -> dict[str, str]:
    meta, config = run.meta, run.meta["config"]
    environment, model = meta.get("environment", {}), meta.get("model", {})
    gpu = environment.get("gpu", {})
    shape = f"{model.get('moe_layers')} MoE layers × {model.get('experts_per_layer')} experts, top-{model.get('top_k')}"
    slots = sorted({info.get("cache_slots_per_layer") for info in meta["strategies"].values()} - {None})
    row = {"folder": str(run.folder), "status": meta.get("status", "?") + (f": {meta['reason']}"
                                                                          if meta.get("reason") else "")}
    if run.simulated:
        sim = meta["simulated"]
        row["what"] = f"SIMULATED on profile {config.get('hardware') or config.get('measured')}"
        profile = model.get("profile") or f"measured in {model.get('from_run')}"
        row["model"] = f"{profile} ({model.get('precision', model.get('dtype'))}): {shape}"
        row["routing"] = f"{sim.get('source')} log {sim.get('trace')}" + (
            f" from {sim['imported']}" if sim.get("imported") else "") + (
            f"; SYNTHETIC {sim['synthetic']}" if sim.get("synthetic") else "")
        row["cache rate"] = ", ".join(map(str, config.get("cache_rates", [])))
        row["when"] = "simulated: no wall-clock times"
    else:
        workload = config.get("workload") or {}
        row["what"] = f"real run on {environment.get('device')}" + (f" ({gpu['name']})" if gpu.get("name") else "")
        row["model"] = f"{config.get('model')} ({model.get('family')}, {model.get('dtype')}): {shape}"
        row["workload"] = (f"{workload.get('name')} ({workload.get('source')}): {workload.get('num_requests')} "
                           f"requests, prompts {workload.get('min_prompt_tokens')}-{workload.get('max_prompt_tokens')}"
                           f" tokens, {workload.get('output_tokens')} out, batch {workload.get('batch_size')}")
        row["cache rate"] = (f"{config['gpu_memory']} bytes" if config.get("gpu_memory") else
                             str(config.get("cache_rate")))
        started, finished = pd.Timestamp(meta.get("started")), pd.Timestamp(meta.get("finished"))
        row["when"] = f"{started:%Y-%m-%d %H:%M:%S %Z}, {(finished - started).total_seconds():.0f} s"
    row["cache rate"] += f" ({', '.join(map(str, slots))} slots per layer)"
    row["link"] = _link_text(run)
    row["repeats"] = f"{config.get('repeats')} measured after {config.get('warmup')} warm-up"
    versions = environment.get("versions", {})
    ram = environment.get("ram_bytes")
    row["environment"] = "; ".join(filter(None, (
        f"Python {environment.get('python')}, " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        environment.get("os"), f"{environment.get('cpu')} × {environment.get('cpu_cores')} cores",
        f"{ram / 2**30:.0f} GiB RAM" if ram else None,
        f"GPU {gpu['name']}, driver {gpu.get('driver')}" if gpu.get("name") else None)))
    row["git commit"] = across.commit_label(run)
    row["command"] = environment.get("command", "?")
    return row


def _link_text(run: data.Run) -> str:
    link = next(iter(run.meta["strategies"].values())).get("link", {})
    peak = data.link_peak_gbps(run, next(iter(run.meta["strategies"])))
    if link.get("kind") == "emulated":
        return f"emulated: {link.get('gbps')} GB/s + {link.get('latency_us')} us per copy (not PCIe)"
    if link.get("kind") == "simulated":
        return "simulated" + (f": {peak} GB/s host-to-device" if peak else f" with {link.get('costs')}")
    return f"{link.get('kind')}" + (f": PCIe peak {peak:.1f} GB/s (theoretical)" if peak else "")


def _warnings(run: data.Run, several: bool) -> list[str]:
    meta, tables = run.meta, run.tables
    lines = []
    if meta.get("status") != "complete":
        lines.append(f"the run is {meta.get('status')}: {meta.get('reason', 'no reason recorded')}; "
                     f"it holds only the strategies that finished")
    if "statistics" in tables:
        lines += variability_warnings(tables["statistics"], tables["requests"])[0]
    reasons: dict[str, set[str]] = {}
    for info in meta["strategies"].values():
        for metric, why in info.get("unmeasured", {}).items():
            reasons.setdefault(why, set()).add(metric)
    lines += [f"not measured ({why}): {', '.join(sorted(metrics))}" for why, metrics in reasons.items()]
    lines += [f"{label} was not run: {why}" for label, why in meta.get("skipped", {}).items()]
    matches = tables["summary"].set_index("strategy")["tokens_match"].astype(str).str.lower()
    reference = meta.get("tokens_reference", "full_gpu")
    lines += [f"{label} produced different tokens than {reference}" for label in matches[matches == "false"].index]
    gaps = meta.get("simulated", {}).get("gaps", {}).get("missing_rows")
    if gaps:
        lines.append(f"the routing log misses {gaps} token-layers (imported as they were, never invented)")
    return [f"{run.name}: {line}" if several else line for line in lines]


def _verdict(runs: list[data.Run], baseline: str | None) -> str:
    values, reasons = data.verdict(runs, baseline)
    ranked = values[[data.label_parts(s)[0] != UNRANKED for s in values["strategy"]]]
    shown = pd.DataFrame({"strategy": values["series"].map(html.escape)})
    footnotes = {}
    for column, better in data.VERDICT.items():
        title, form = TITLES[column]
        scale = 1e-6 if column.endswith("_bytes") else 1.0
        candidates = ranked[column].dropna()
        best = (candidates.min() if better == "lower" else candidates.max()) if len(candidates) > 1 else None
        cells = []
        for index, value in values[column].items():
            if pd.isna(value):
                why = reasons.at[index, column]
                footnotes.setdefault((title, why), []).append(values.at[index, "series"])
                cells.append(f"<span title='{html.escape(why, quote=True)}'>—</span>")
                continue
            text = form.format(value * scale)
            low, high = (values.at[index, f"{column}_ci_{end}"] for end in ("low", "high")) \
                if column in data.WITH_CI else (None, None)
            if pd.notna(low) and low != high:  # one sample has no interval
                text += f" <span class='ci'>[{form.format(low)}, {form.format(high)}]</span>"
            cells.append(f"<b>{text}</b>" if best is not None and value == best and index in ranked.index else text)
        shown[title] = cells
    against = f"against {baseline}" if baseline else "against each run's own baseline (" + ", ".join(
        dict.fromkeys(str(run.meta["config"].get("baseline")) for run in runs)) + ")"
    notes = "".join(f"<li>— {html.escape(title)}: {html.escape(why)} ({len(names)} of {len(values)})</li>"
                    for (title, why), names in footnotes.items())
    return (shown.to_html(index=False, escape=False) + _note(f"Medians with their 95% CI in brackets; speedups "
            f"{against}.") + (f"<ul class='note'>{notes}</ul>" if notes else ""))


def _latency(runs, styles, figure) -> str:
    return figure(figures.latency(data.latency(runs), styles), "latency") + figure(
        figures.inter_token(data.inter_token(runs), styles), "inter-token")


def _breakdown(runs, styles, figure) -> str:
    return figure(figures.breakdown(data.time_breakdown(runs), styles), "breakdown")


def _cache(runs, styles, figure) -> str:
    parts = [figure(figures.per_layer_lines(data.hit_rate_per_layer(runs), "hit_rate", styles, "hit rate"),
                    "hit-rate")]
    recall = data.recall_per_layer(runs)
    if recall.empty:
        return parts[0] + _note("No strategy here predicts, so there is no recall, FetchRate or GoodPred.")
    several = recall["distance"].dropna().nunique() > 1
    parts.append(_note("Recall per layer over decode steps" + (", a panel per prediction distance (layers ahead)."
                                                               if several else ".")))
    parts.append(figure(figures.per_layer_lines(recall, "recall", styles, "recall",
                                                panels="distance" if several else None), "recall"))
    parts.append(figure(figures.prediction(data.prediction_quality(runs), styles), "prediction"))
    return "".join(parts)


def _link(runs, styles, figure) -> str:
    parts = [figure(figures.bytes_per_step(data.bytes_per_step(runs), styles), "bytes-per-step"),
             figure(figures.link_rates(data.link_rates(runs), styles), "link-rates")]
    sampled = data.samples_over_time(runs)
    nvml = sampled["counter"].str.contains("NVML")
    unmeasured = sorted({why for run in runs for info in run.meta["strategies"].values()
                         for metric, why in info.get("unmeasured", {}).items()
                         if "pcie" in metric or "nvml" in metric or metric == "hardware counters"})
    if not nvml.any():
        parts.append(_note("NVML counters (PCIe throughput, GPU memory, power) were not measured"
                           + (f": {'; '.join(unmeasured)}." if unmeasured else ".")
                           + (" Shown instead: what this machine sampled." if not sampled.empty else "")))
    if not sampled.empty:
        parts.append(figure(figures.samples(sampled, styles), "samples"))
    return "".join(parts)


def _timeline(runs, styles, figure) -> str:
    steps = data.step_timeline(runs)
    missing = [run.name for run in runs if run.timeline is None]
    note = _note(f"No timeline in {', '.join(missing)} (simulate --no-timeline keeps none).") if missing else ""
    if steps.empty:
        return note
    return note + _note("The first measured repeat's first batch. Compute: grey outside the experts, blue "
                        "experts, red stalls; copy chunks purple for HIGH (the router's choice), cyan for LOW (a "
                        "guess), hatched when early preemption dropped their task. "
                        "Use `promoe-bench trace` for the whole run.") + figure(figures.timeline(steps, styles),
                                                                                "timeline")


def _sweeps(runs, styles, figure) -> str:
    swept = across.sweeps(runs)
    if swept.empty:
        return _note("The runs given differ in no cache rate, batch size or hardware: no sweep to show.")
    return "".join(figure(figures.sweep(swept, styles, parameter), f"sweep-{parameter.replace(' ', '-')}")
                   for parameter in dict.fromkeys(swept["parameter"]))


def _commits(runs) -> str:
    table = across.commits(runs)
    if table.empty:
        return _note("No two runs of one setup from different commits were given.")
    metric = table["metric"].map(across.COMPARED)
    shown = table.assign(metric=metric).set_index(["setup", "strategy", "metric"])
    formats = {c: ("{:+.1f}%" if c.startswith("Δ") else "{:.4g}").format for c in shown.columns}
    return shown.to_html(formatters=formats, na_rep="—")
