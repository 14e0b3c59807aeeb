"""The HTML page of a run: header, contents, then one section per kind of content.

Builds one self-contained string: inline CSS, line charts as inline SVG (lines.py), neuron
maps as PNG data URIs (maps.py), no JavaScript. Small multiples sit in CSS grids, one panel
per layer, numbered as in the Layers table; sections fold with plain <details> and the
contents link to anchors. Every name from the run directory is HTML-escaped.
"""
from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from html import escape

from matplotlib import colormaps
from matplotlib.colors import to_hex

from . import content, lines, maps

LEGEND_UP_TO = 8  # layers: named in the overview's legend; beyond, a depth colour bar
COLOUR = "#1f6fb4"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d2430;margin:0;background:#eef0f3}
main{max-width:940px;margin:0 auto;padding:16px 22px 60px;background:#fff;min-height:100vh}
h1{font-size:21px;margin:4px 0 2px}h2{font-size:17px;margin:26px 0 6px;border-bottom:2px solid #e3e6ea;padding-bottom:3px}
h3{font-size:14px;margin:16px 0 4px}.meta{color:#5a6372;margin:0 0 8px;font-size:13px}
nav{background:#eef2f7;border-radius:6px;padding:5px 10px;margin:8px 0}nav a{margin-right:14px}
a{color:#1f5fbf;text-decoration:none}a:hover{text-decoration:underline}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0}td,th{padding:2px 8px;border-bottom:1px solid #e8eaee;text-align:left;vertical-align:top}
th{background:#f1f3f6}td.n{text-align:right;font-variant-numeric:tabular-nums}
details{margin:4px 0 8px}summary{cursor:pointer;font-weight:600;font-size:13.5px}
.note{color:#5a6372;font-size:12.5px;font-weight:normal}
.empty{background:#fff6dd;border:1px solid #f0d98a;padding:10px 12px;border-radius:6px}
.scroll{overflow-x:auto}code{font-size:12.5px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,212px);gap:4px 10px;margin:4px 0}
.wide{grid-template-columns:repeat(auto-fill,440px)}
figure{margin:0}figcaption{font-size:11px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;color:#2c3440}
figure img{display:block;width:200px;height:90px;image-rendering:pixelated;margin-left:6px;outline:1px solid #cfd4da}
.ax{display:flex;justify-content:space-between;font-size:9.5px;color:#5a6372;width:200px;margin-left:6px}
.bar{display:inline-block;width:220px;height:10px;vertical-align:middle;margin:0 6px;border-radius:2px}
.key{font-size:12px;color:#2c3440;margin:2px 0}.key span.sw{display:inline-block;width:14px;height:3px;vertical-align:middle;margin:0 4px 0 10px}
"""


def _num(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else lines.fmt(x)


def _table(header: list[str], rows: list[list[str]], numeric_from: int = 99) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="n">{c}</td>' if j >= numeric_from else f"<td>{c}</td>"
                                    for j, c in enumerate(row)) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def _details(title: str, body: str, opened: bool) -> str:
    return f"<details{' open' if opened else ''}><summary>{title}</summary>{body}</details>"


def _panel(caption: str, body: str) -> str:
    return f'<figure><figcaption title="{escape(caption)}">{escape(caption)}</figcaption>{body}</figure>'


def _grid(panels: list[str], wide: bool = False) -> str:
    return f'<div class="grid{" wide" if wide else ""}">{"".join(panels)}</div>'


def _numbered(run, names) -> dict[str, str]:
    """Panel captions: a layer's number in run.json order, then its name."""
    index = {layer: i for i, layer in enumerate(run.layers)}
    return {name: f"#{index[name]} {name}" if name in index else name for name in names}


def _line_grid(run, series: content.Series) -> str:
    """One panel per entry of {name: (steps, values)}, on a shared step axis."""
    xrange = lines.step_range(list(series.values()))
    captions = _numbered(run, series)
    return _grid([_panel(captions[name], lines.panel([(s, v, COLOUR)], xrange))
                  for name, (s, v) in series.items()])


def _depth_colours(layers: list[str]) -> dict[str, str]:
    cmap = colormaps["viridis"]
    return {layer: to_hex(cmap(0.9 * i / max(1, len(layers) - 1))) for i, layer in enumerate(layers)}


def _overview(run, shown: dict[str, content.Series]) -> str:
    colours = _depth_colours(run.layers)
    panels = [_panel(metric, lines.panel([(s, v, colours[layer]) for layer, (s, v) in series.items()],
                                         width=430, height=170))
              for metric, series in shown.items()]
    if len(run.layers) <= LEGEND_UP_TO:
        key = "".join(f'<span class="sw" style="background:{colours[layer]}"></span>{escape(layer)}'
                      for layer in run.layers)
    else:
        stops = ",".join(colours[layer] for layer in run.layers[::max(1, len(run.layers) // 10)])
        key = (f'layer 0 <span class="bar" style="background:linear-gradient(to right,{stops})">'
               f"</span> layer {len(run.layers) - 1} (run.json order)")
    return f'<p class="key">{key}</p>' + _grid(panels, wide=True)


def _header(run, last: int | None) -> str:
    info = run.info
    facts = [f"directory <code>{escape(run.path)}</code>",
             f"created {escape(str(info.get('created', '?')))}",
             f"world size {escape(str(info.get('world_size', '?')))}",
             f"{len(run.layers)} monitored layers",
             f"last logged step {last if last is not None else '–'}",
             f"{len(run.summaries)} summaries"]
    facts += [f"{len(w.step)} {escape(s)} windows" for s, w in run.windows.items()]
    resumes = info.get("resumes") or []
    if resumes:
        facts.append("resumed at step " + ", ".join(escape(str(r.get("step"))) for r in resumes))
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return (f"<h1>lrfluct_fast run <code>{escape(run.run_id)}</code></h1>"
            f'<p class="meta">{" · ".join(facts)}<br>page written {now}: a run still being '
            f"written shows what its files held then</p>")


def _metrics_section(run, series) -> str:
    shown = {m: s for m, s in series.items() if s}
    if not shown:
        return '<p class="note">No metrics logged yet (metrics.csv has no complete step).</p>'
    parts = ['<p class="note">Every column of metrics.csv against step: all layers together '
             "(colour: depth), then each metric with one panel per layer (click to open).</p>",
             _overview(run, shown)]
    for metric, s in shown.items():
        note = content.METRIC_NOTES.get(metric, "")
        title = f'<span id="metric-{escape(metric)}">{escape(metric)}</span>' + (
            f' <span class="note">— {escape(note)}</span>' if note else "")
        parts.append(_details(title, _line_grid(run, s), opened=False))
    return "".join(parts)


def _map_grid(run, quantity: str, records: content.Maps) -> str:
    grids = {layer: maps.resampled(*v) for layer, v in records.items()}
    logs = {layer: maps.log10(g) for layer, (g, _) in grids.items()}
    lo, hi = maps.scale(logs.values())
    captions = _numbered(run, records)
    panels = [_panel(f"{captions[layer]}  ({records[layer][1].shape[1]} neurons)",
                     f'<img src="{maps.image(logs[layer], lo, hi)}" alt="{escape(layer)}">'
                     f'<div class="ax"><span>step {first}</span><span>{last}</span></div>')
              for layer, (_, (first, last)) in grids.items()]
    bar = (f'<p class="key">{escape(quantity)}: {lines.fmt(10 ** lo)}<span class="bar" '
           f'style="background:{maps.gradient_css()}"></span>{lines.fmt(10 ** hi)} (log scale; '
           f"white: zero, grey: no value)</p>")
    return bar + _grid(panels)


def _neuron_section(run, neuron_maps: list[content.NeuronMaps]) -> str:
    if not neuron_maps:
        return '<p class="note">No summaries or window records yet.</p>'
    parts = ['<p class="note">One map per layer: neurons up (neuron 0 at the bottom), steps '
             "across, one colour scale per quantity. <i>Per window</i>: each closed window of "
             "instrument's <code>windows</code> option alone. <i>Cumulative</i>: each summary "
             "file, everything since the run began (or since reset()).</p>"]
    for m in neuron_maps:
        parts.append(f'<h3 id="neurons-{escape(m.key)}">{escape(m.title)} '
                     f'<span class="note">({escape(m.key)})</span></h3>')
        if m.windows:
            parts.append(_details("per window", _map_grid(run, m.title, m.windows), opened=True))
        if m.summaries:
            parts.append(_details("cumulative, at each summary", _map_grid(run, m.title, m.summaries),
                                  opened=not m.windows))
    return "".join(parts)


def _scalars_section(run, groups) -> str:
    if not groups:
        return ('<p class="note">Not logged: this run has no scalars.csv (sharpness and spectra '
                "are logged by SharpnessTracker and SpectraTracker).</p>")
    return "".join(f"<h3>{escape(title)}</h3>" + _line_grid(run, series) for title, series in groups)


def _layers_section(run, series) -> str:
    info = run.info
    neurons = info.get("neurons") or {}
    metrics = [m for m, s in series.items() if s]
    rows = []
    for i, layer in enumerate(run.layers):
        last = [_num(float(series[m][layer][1][-1])) if layer in series[m] else "–" for m in metrics]
        rows.append([str(i), f'<span id="layer-{i}">{escape(layer)}</span>',
                     escape(str(neurons.get(layer, "?"))), *last])
    parts = ['<p class="note">Panels are numbered as here. Last logged value of each metric.</p>',
             _table(["#", "layer", "neurons", *metrics], rows, numeric_from=2)]
    coverage = info.get("coverage")
    if coverage:
        total, covered = coverage.get("trainable_parameters", 0), coverage.get("monitored_parameters", 0)
        share = f" ({100 * covered / total:.2f}%)" if total else ""
        parts.append(f"<p>Monitored {covered:,} of {total:,} trainable parameters{share}.</p>")
    skipped = info.get("skipped")
    if skipped is None:
        parts.append('<p class="note">Skipped modules: not recorded (run.json written before '
                     "lrfluct_fast recorded them).</p>")
    elif skipped:
        parts.append("<h3>Skipped modules</h3>" + _table(
            ["module", "reason"], [[escape(name or "(model)"), escape(reason)] for name, reason in skipped]))
    else:
        parts.append("<p>Skipped modules: none.</p>")
    return "".join(parts)


def _options_section(run) -> str:
    options = run.info.get("options") or {}
    rows = [[escape(k), f"<code>{escape(json.dumps(v))}</code>"] for k, v in options.items()]
    return _table(["option", "value"], rows)


SECTIONS = (("metrics", "Layer metrics"), ("neurons", "Per-neuron maps"),
            ("scalars", "Sharpness and spectra"), ("layers", "Layers"), ("options", "Options"))


def render(run) -> str:
    """The whole page of a Run (lf.load_run) as one HTML string."""
    last = content.last_step(run)
    series = content.metric_series(run)
    groups = content.scalar_groups(run)
    body = {"layers": _layers_section(run, series), "options": _options_section(run)}
    if last is None and not groups:
        notice = ('<p class="empty">No logged steps yet: run.json is there but metrics.csv, '
                  "summaries/ and windows/ hold nothing. The training has not reached its first "
                  "logging step (log_every, summary_every), or it stopped before.</p>")
        sections = ("layers", "options")
    else:
        notice = ""
        body.update(metrics=_metrics_section(run, series),
                    neurons=_neuron_section(run, content.neuron_maps(run)),
                    scalars=_scalars_section(run, groups))
        sections = tuple(key for key, _ in SECTIONS)
    titles = dict(SECTIONS)
    nav = "".join(f'<a href="#{key}">{titles[key]}</a>' for key in sections)
    main = "".join(f'<h2 id="{key}">{titles[key]}</h2>{body[key]}' for key in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>lrfluct run {escape(run.run_id)}</title><style>{CSS}</style></head>"
            f"<body><main>{_header(run, last)}<nav>{nav}</nav>{notice}{main}</main></body></html>\n")
