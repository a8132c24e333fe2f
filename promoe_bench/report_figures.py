"""The report's plotly figures, each drawn from one frame of `report_data`.

One colour per strategy across the whole report: a strategy's bare name (`promoe` for
`promoe[cache_rate=0.25]`) picks it from a fixed palette. Series that share a name (one strategy at several
cache rates, or in several runs) are told apart by line dash or bar pattern, in order of appearance.
"""

import zlib

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

PALETTE = qualitative.D3
NAMED = {"lru": PALETTE[0], "skip_gate": PALETTE[1], "oracle": PALETTE[2], "promoe": PALETTE[3],
         "static": PALETTE[4], "on_demand": PALETTE[5], "full_gpu": PALETTE[7]}
OTHERS = qualitative.Dark24  # a plugin's strategy: a colour fixed by its name
DASHES = ("solid", "dash", "dot", "dashdot", "longdash")
PATTERNS = ("", "/", ".", "x", "+")
COMPONENT_COLOURS = {"non-expert compute": "#9e9e9e", "router": "#c7c7c7", "expert compute": PALETTE[0],
                     "stall": PALETTE[3], "predictor": PALETTE[1]}
# timeline bars: a compute kind, or a copy chunk's priority -> colour (preempted chunks are hatched too)
TIMELINE_COLOURS = {"non_expert": "#9e9e9e", "router": "#c7c7c7", "expert": PALETTE[0], "stall": PALETTE[3],
                    "head": "#7f7f7f", "predict": PALETTE[1], "HIGH": "#4a1486", "LOW": PALETTE[9]}
LAYOUT = {"template": "plotly_white", "margin": {"l": 60, "r": 30, "t": 50, "b": 40}}


def colour(name: str) -> str:
    return NAMED.get(name) or OTHERS[zlib.crc32(name.encode()) % len(OTHERS)]


class Styles:
    """Colour and variant (dash, pattern) of every series of the report."""

    def __init__(self, series: pd.DataFrame):
        variant = series.groupby("name", sort=False).cumcount()
        self.order = list(series["series"])
        self._style = {s: (colour(n), int(v)) for s, n, v in zip(series["series"], series["name"], variant,
                                                                  strict=True)}

    def colour(self, series: str) -> str:
        return self._style[series][0]

    def dash(self, series: str) -> str:
        return DASHES[self._style[series][1] % len(DASHES)]

    def pattern(self, series: str) -> str:
        return PATTERNS[self._style[series][1] % len(PATTERNS)]

    def bar(self, series: str) -> dict:
        """One series' bar style. A trace per series: plotly.js cannot draw patterns over an array of colours."""
        pattern = self.pattern(series)
        return {"marker_color": self.colour(series), "legendgroup": series,
                **({"marker_pattern": {"shape": pattern, "fgcolor": "white"}} if pattern else {})}

    def line(self, series: str) -> dict:
        return {"line": {"color": self.colour(series), "dash": self.dash(series)}, "marker_color": self.colour(series)}


def latency(frame: pd.DataFrame, styles: Styles) -> go.Figure:
    """TTFT and TPOT medians with their bootstrap 95% CI as whiskers."""
    figure = make_subplots(1, 2, subplot_titles=("TTFT ms (median, 95% CI)", "TPOT ms (median, 95% CI)"))
    for column, metric in enumerate(("ttft_ms", "tpot_ms"), start=1):
        for row in frame[frame["metric"] == metric].itertuples(index=False):
            figure.add_trace(go.Bar(x=[row.series], y=[row.median], name=row.series, showlegend=False,
                                    error_y={"type": "data", "array": [row.ci_high - row.median],
                                             "arrayminus": [row.median - row.ci_low]}, **styles.bar(row.series)),
                             1, column)
    return figure.update_layout(**LAYOUT, height=420)


def inter_token(frame: pd.DataFrame, styles: Styles) -> go.Figure:
    figure = go.Figure([go.Box(y=own["ms"], name=name, marker_color=styles.colour(name), boxpoints="outliers",
                               showlegend=False) for name, own in frame.groupby("series", sort=False)])
    return figure.update_layout(**LAYOUT, height=420, yaxis_type="log",  # a few slow steps would flatten the boxes
                                yaxis_title="decode step ms (inter-token latency, log scale)")


def breakdown(frame: pd.DataFrame, styles: Styles) -> go.Figure:
    """Stacked per-layer bars, a row per series, prefill and decode side by side, each with its own scale."""
    names = [s for s in styles.order if s in set(frame["series"])]
    phases = [p for p in ("prefill", "decode") if p in set(frame["phase"])]
    figure = make_subplots(len(names), len(phases), horizontal_spacing=0.06,
                           vertical_spacing=min(0.05, 0.6 / len(names)),
                           subplot_titles=[f"{name}: {phase}" for name in names for phase in phases])
    for row, name in enumerate(names, start=1):
        for column, phase in enumerate(phases, start=1):
            part = frame[(frame["series"] == name) & (frame["phase"] == phase)]
            for component, own in part.groupby("component", sort=False):
                figure.add_trace(go.Bar(x=own["layer"], y=own["ms"], name=component, legendgroup=component,
                                        showlegend=row == 1 and column == 1,
                                        marker_color=COMPONENT_COLOURS[component]), row, column)
    figure.update_yaxes(title_text="ms per step", col=1)
    figure.update_xaxes(title_text="MoE layer", row=len(names))
    figure.update_annotations(font_size=12)
    return figure.update_layout(**LAYOUT, barmode="stack", bargap=0.15, height=170 * len(names) + 120)


def per_layer_lines(frame: pd.DataFrame, value: str, styles: Styles, title: str,
                    panels: str | None = None) -> go.Figure:
    """A line per series over the layers; one panel per value of `panels` (e.g. prediction distance)."""
    keys = sorted(frame[panels].dropna().unique()) if panels else [None]
    figure = make_subplots(1, len(keys), shared_yaxes=True, subplot_titles=[
        f"{panels} {k}" for k in keys] if panels else None)
    for column, key in enumerate(keys, start=1):
        part = frame if key is None else frame[frame[panels] == key]
        for name, own in part.groupby("series", sort=False):
            figure.add_trace(go.Scatter(x=own["layer"], y=own[value], name=name, mode="lines+markers",
                                        legendgroup=name, **styles.line(name)), 1, column)
    figure.update_xaxes(title_text="MoE layer", dtick=1 if frame["layer"].max() < 16 else None)
    figure.update_yaxes(title_text=title, col=1, rangemode="tozero")
    return figure.update_layout(**LAYOUT, height=420)


def prediction(frame: pd.DataFrame, styles: Styles) -> go.Figure:
    figure = make_subplots(1, 2, column_widths=[0.65, 0.35],
                           subplot_titles=("over decode steps", "prefetched MB wasted per repeat"))
    measures = {"recall": "recall", "fetch_rate": "FetchRate", "good_pred": "GoodPred"}
    for row in frame.itertuples(index=False):
        figure.add_trace(go.Bar(x=list(measures.values()), y=[getattr(row, m) for m in measures], name=row.series,
                                **styles.bar(row.series)), 1, 1)
        figure.add_trace(go.Bar(x=[row.series], y=[row.wasted_mb_per_repeat], showlegend=False,
                                **styles.bar(row.series)), 1, 2)
    return figure.update_layout(**LAYOUT, height=420, barmode="group")


def bytes_per_step(frame: pd.DataFrame, styles: Styles) -> go.Figure:
    figure = go.Figure([go.Scatter(x=own["step"], y=own["mb"], name=name, mode="lines", **styles.line(name))
                        for name, own in frame.groupby("series", sort=False)])
    return figure.update_layout(**LAYOUT, height=400, xaxis_title="step (0 is the prefill)",
                                yaxis_title="MB copied (mean over repeats and batches)")


def link_rates(frame: pd.DataFrame, styles: Styles) -> go.Figure:
    """Achieved GB/s per phase as bars; NVML's PCIe rate as diamonds where measured; the peak as a dash."""
    phases = ("prefill", "decode")
    figure = make_subplots(1, 2, shared_yaxes=True, subplot_titles=[f"{p}: GB/s copied" for p in phases])
    for column, phase in enumerate(phases, start=1):
        part = frame[frame["phase"] == phase]
        for row in part.itertuples(index=False):
            figure.add_trace(go.Bar(x=[row.series], y=[row.copied_gbps], name=row.series, showlegend=False,
                                    hovertemplate="%{y:.3f} GB/s copied (layers' bytes / time)",
                                    **styles.bar(row.series)), 1, column)
        if part["pcie_gbps"].notna().any():
            figure.add_trace(go.Scatter(x=part["series"], y=part["pcie_gbps"], mode="markers", name="PCIe H2D (NVML)",
                                        marker={"symbol": "diamond", "size": 11, "color": "black"},
                                        showlegend=column == 1), 1, column)
        figure.add_trace(go.Scatter(x=part["series"], y=part["peak_gbps"], mode="markers", name="link peak",
                                    marker={"symbol": "line-ew-open", "size": 40, "line": {"width": 3},
                                            "color": "black"}, showlegend=column == 1), 1, column)
    figure.update_yaxes(title_text="GB/s (layers' bytes over the steps' time)", col=1, rangemode="tozero")
    return figure.update_layout(**LAYOUT, height=420)


def samples(frame: pd.DataFrame, styles: Styles) -> go.Figure:
    counters = list(dict.fromkeys(frame["counter"]))
    figure = make_subplots(len(counters), 1, shared_xaxes=True, subplot_titles=counters, vertical_spacing=0.08)
    for row, counter in enumerate(counters, start=1):
        for name, own in frame[frame["counter"] == counter].groupby("series", sort=False):
            figure.add_trace(go.Scatter(x=own["t_s"], y=own["value"], name=name, mode="lines", legendgroup=name,
                                          showlegend=row == 1, **styles.line(name)), row, 1)
    figure.update_xaxes(title_text="s on each strategy's clock", row=len(counters))
    return figure.update_layout(**LAYOUT, height=260 * len(counters) + 80)


def timeline(frame: pd.DataFrame, styles: Styles) -> go.Figure:
    """Per series a row, prefill and decode step apart: the compute lane (non-expert, router, expert slices,
    stalls, head), the predictor lane, and the copy lane's chunks coloured by priority, preempted hatched.
    The rows of one run share their time axes, so the strategies' step lengths compare at a glance."""
    names = [s for s in styles.order if s in set(frame["series"])]
    steps = list(dict.fromkeys(frame.sort_values("step")["shown_step"]))
    height = 160 * len(names) + 120
    figure = make_subplots(len(names), len(steps), horizontal_spacing=0.05,
                           vertical_spacing=70 / height,  # px: room for the ticks and the next row's title
                           subplot_titles=[f"{name}: {step}" for name in names for step in steps])
    frame = frame.assign(what=frame["priority"].where(frame["lane"] == "copy", frame["kind"]),
                         hatched=frame["preempted"].fillna(False).astype(bool))
    runs = frame.drop_duplicates("series").set_index("series")["run"]
    first_row = {}  # run -> its first row, whose axes the run's other rows follow
    shown: set[str] = set()
    for row, name in enumerate(names, start=1):
        first_row.setdefault(runs[name], row)
        for column, step in enumerate(steps, start=1):
            part = frame[(frame["series"] == name) & (frame["shown_step"] == step)]
            for (what, hatched), bars in part.groupby(["what", "hatched"], sort=False):
                legend = f"copy {what}" + (" (preempted)" if hatched else "") if bars["lane"].iloc[0] == "copy" \
                    else str(what).replace("_", "-")
                figure.add_trace(go.Bar(
                    y=bars["lane"], x=bars["ms"], base=bars["start_ms"], orientation="h", name=legend,
                    legendgroup=legend, showlegend=legend not in shown, marker_color=TIMELINE_COLOURS.get(what),
                    marker_pattern={"shape": "x", "fgcolor": "black"} if hatched else None, marker_line_width=0,
                    customdata=bars[["layer", "expert", "bytes"]].astype("float").to_numpy(),
                    hovertemplate="%{base:.3f} ms + %{x:.3f} ms<br>layer %{customdata[0]} expert %{customdata[1]}"
                                  "<br>%{customdata[2]} B"), row, column)
                shown.add(legend)
            anchor = (first_row[runs[name]] - 1) * len(steps) + column
            if anchor != (row - 1) * len(steps) + column:
                figure.update_xaxes(matches=f"x{anchor if anchor > 1 else ''}", row=row, col=column)
    figure.update_yaxes(categoryorder="array", categoryarray=["copy", "predictor", "compute"])
    figure.update_xaxes(title_text="ms from the step's start", row=len(names))
    figure.update_annotations(font_size=12)
    return figure.update_layout(**LAYOUT, barmode="overlay", height=height)


def sweep(frame: pd.DataFrame, styles: Styles, parameter: str) -> go.Figure:
    """TTFT and TPOT against one swept parameter, a line per strategy (coloured by its name)."""
    part = frame[frame["parameter"] == parameter]
    figure = make_subplots(1, 2, subplot_titles=("TTFT ms (median, 95% CI)", "TPOT ms (median, 95% CI)"))
    lines = list(dict.fromkeys(part["line"]))
    colours = {line: styles.colour(part.loc[part["line"] == line, "series"].iloc[0]) for line in lines}
    dashes = {line: DASHES[list(colours.values())[:i].count(colours[line]) % len(DASHES)]
              for i, line in enumerate(lines)}  # lines of one strategy apart: promoe and promoe[distance=1]
    for column, metric in enumerate(("ttft_ms", "tpot_ms"), start=1):
        for line, own in part[part["metric"] == metric].groupby("line", sort=False):
            own = own.sort_values("x")
            figure.add_trace(go.Scatter(x=own["x"], y=own["median"], name=line, legendgroup=line,
                                        showlegend=column == 1, mode="lines+markers",
                                        line={"color": colours[line], "dash": dashes[line]},
                                        marker_color=colours[line],
                                        error_y={"type": "data", "array": own["ci_high"] - own["median"],
                                                 "arrayminus": own["median"] - own["ci_low"]}), 1, column)
    figure.update_xaxes(title_text=parameter)
    return figure.update_layout(**LAYOUT, height=420)
