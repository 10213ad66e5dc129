"""`cas report`: one self-contained HTML page per run (no network, no CDN): the steps as
an SVG graph with their counts, the accounting table, why each step was cached or
computed, and the first rows of each leaf.

The page carries one small script, which measures what the browser drew (every step's
box is on the canvas, boxes do not overlap, each label fits its box) and writes the
result on <body data-layout=...>: a person sees a warning if a label is cut, and the
browser test reads it from the rendered DOM.
"""

from __future__ import annotations

import html
import json
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from castore.changes import StepExplanation, explain
from castore.runs import RunInfo, resolve_run, step_table
from castore.store import Store
from castore.store.manifests import StepManifest, load_model
from castore.store.parquet import METADATA_COLUMN
from castore.summary import RunSummary

PREVIEW_ROWS = 10
CELL_CHARS = 300
BOX_H, GAP_X, GAP_Y, PAD = 74, 30, 34, 20
CHAR_W = 7.4  # px per character of the 12-13px monospace labels (measured: 7.2)


class Preview(BaseModel):
    leaf: str
    rows: int
    columns: list[str]
    first: list[list[str]]  # the first rows, each cell as display text


class Report(BaseModel):
    name: str
    signature: str
    run_id: str
    status: str
    started: datetime
    seconds: float
    error: str | None
    steps: list[dict[str, Any]]
    edges: list[tuple[str, str]]
    why: list[StepExplanation]
    saved: str
    tokens_spent: int
    cost_spent_usd: float
    previews: list[Preview]


def build(store: Store, run: str) -> Report:
    """What the page shows of `run` (a name, signature prefix or run id prefix)."""
    info: RunInfo = resolve_run(store, run)
    summary = RunSummary.load(store, info.oid)
    return Report(
        name=info.name,
        signature=info.sig,
        run_id=info.oid,
        status=info.status,
        started=info.manifest.started,
        seconds=summary.seconds,
        error=info.manifest.error,
        steps=step_table(store, info),
        edges=[(a, b) for a, b in info.manifest.edges],
        why=explain(store, info.oid).steps,
        saved=summary.saved.line(),
        tokens_spent=summary.tokens_spent,
        cost_spent_usd=summary.cost_spent_usd,
        previews=[_preview(store, info, leaf) for leaf in info.manifest.leaves],
    )


def _preview(store: Store, info: RunInfo, leaf: str) -> Preview:
    sm = load_model(store, info.manifest.step_manifest_id(leaf), StepManifest)
    columns = [c for c, _ in sm.columns if c != METADATA_COLUMN]
    first: list[list[str]] = []
    for batch in sm.batches:
        for oid in batch.outputs:
            if len(first) >= PREVIEW_ROWS:
                break
            table = store.get_table(oid)
            keep = [c for c in columns if c in table.column_names]
            for row in table.select(keep).slice(0, PREVIEW_ROWS - len(first)).to_pylist():
                first.append([_cell(row.get(c)) for c in columns])
    return Preview(leaf=leaf, rows=sm.rows, columns=columns, first=first)


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= CELL_CHARS else text[: CELL_CHARS - 1] + "…"


# -- the page -------------------------------------------------------------------------


def _usd(value: float) -> str:
    """Dollars at the LLM's prices; a dash when the step has none (or spent nothing)."""
    return f"{value:.4f}" if value else "-"


def render(rep: Report) -> str:
    """The page as one HTML document: styles, the SVG and the check script inline."""
    e = html.escape
    head = (
        f"<h1>{e(rep.name)} <span class='status {e(rep.status)}'>{e(rep.status)}</span></h1>"
        f"<p class='meta'>run {e(rep.run_id[:12])} · signature {e(rep.signature[:12])} · "
        f"started {e(rep.started.strftime('%Y-%m-%d %H:%M:%S'))} UTC · "
        f"{rep.seconds:.1f} s · {rep.tokens_spent:,} tokens spent"
        + (f" (≈ ${rep.cost_spent_usd:.4f})" if rep.cost_spent_usd else "")
        + "</p>"
        f"<p class='saved'>{e(rep.saved)}</p>"
    )
    if rep.error:
        head += f"<p class='error'>error: {e(rep.error)}</p>"
    parts = [
        head,
        "<h2>Steps</h2>",
        f"<div class='canvas'>{_svg(rep)}</div>",
        "<p id='layout-warning' hidden></p>",
        _table(rep),
        "<h2>Why each step was cached or computed</h2>",
        _why(rep),
        "<h2>First rows</h2>",
        *(_preview_html(p) for p in rep.previews),
    ]
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>castore report: {e(rep.name)}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(parts)}<script>{_CHECK}</script></body></html>\n"
    )


def _layers(rep: Report) -> dict[str, tuple[int, int]]:
    """Each step's (column, row) in the drawing: its row is its longest distance from a
    step with no input, so every edge points down and a long chain stays readable (a
    page scrolls down); steps side by side are fan-out."""
    names = [s["name"] for s in rep.steps]
    preds: dict[str, list[str]] = {n: [] for n in names}
    for a, b in rep.edges:
        preds[b].append(a)
    depth: dict[str, int] = {}
    for n in names:  # manifests list steps in topological order
        depth[n] = max((depth[p] + 1 for p in preds[n]), default=0)
    used: dict[int, int] = {}
    out = {}
    for n in names:
        out[n] = (used.get(depth[n], 0), depth[n])
        used[depth[n]] = out[n][0] + 1
    return out


def _labels(s: dict[str, Any]) -> list[str]:
    """A step box's lines under its name."""
    total = s["batches_total"] if s["batches_total"] is not None else "?"
    return [
        f"{s['batches_done']}/{total} batches: {s['batches_cached']} cached, "
        f"{s['batches_computed']} computed, {s['batches_failed']} failed",
        f"{s['rows']:,} rows"
        + (f", {s['rows_reused']:,} reused by row key" if s["rows_reused"] else ""),
        f"{s['compute_seconds']:.1f} s computed, {s['seconds_saved']:.1f} s saved"
        + (f", {s['tokens_spent']:,} tokens" if s["tokens_spent"] else ""),
    ]


def _svg(rep: Report) -> str:
    e = html.escape
    at = _layers(rep)
    longest = max((len(t) for s in rep.steps for t in [s["name"], *_labels(s)]), default=10)
    box_w = max(200, int(longest * CHAR_W) + 24)
    cols = max((c for c, _ in at.values()), default=0) + 1
    rows = max((r for _, r in at.values()), default=0) + 1
    width = 2 * PAD + cols * box_w + (cols - 1) * GAP_X
    height = 2 * PAD + rows * BOX_H + (rows - 1) * GAP_Y

    def xy(name: str) -> tuple[int, int]:
        c, r = at[name]
        return PAD + c * (box_w + GAP_X), PAD + r * (BOX_H + GAP_Y)

    edges = []
    for a, b in rep.edges:
        (ax, ay), (bx, by) = xy(a), xy(b)
        x1, y1, x2, y2 = ax + box_w // 2, ay + BOX_H, bx + box_w // 2, by - 4
        mid = (y1 + y2) // 2
        edges.append(
            f"<path class='edge' d='M{x1},{y1} C{x1},{mid} {x2},{mid} {x2},{y2}' "
            "marker-end='url(#arrow)'/>"
        )
    boxes = []
    for s in rep.steps:
        x, y = xy(s["name"])
        kind = _kind(s)
        lines = _labels(s)
        texts = "".join(
            f"<text class='line' x='{x + 10}' y='{y + 38 + 14 * i}'>{e(t)}</text>"
            for i, t in enumerate(lines)
        )
        boxes.append(
            f"<g class='step {kind}' data-step='{e(s['name'])}'>"
            f"<title>{e(s['name'])} ({e(s['class'])})</title>"
            f"<rect x='{x}' y='{y}' width='{box_w}' height='{BOX_H}' rx='6'/>"
            f"<text class='name' x='{x + 10}' y='{y + 20}'>{e(s['name'])}</text>{texts}</g>"
        )
    return (
        f"<svg id='dag' xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' role='img' aria-label='steps of {e(rep.name)}'>"
        "<defs><marker id='arrow' viewBox='0 0 10 10' refX='9' refY='5' markerWidth='7' "
        "markerHeight='7' orient='auto-start-reverse'><path d='M0,0 L10,5 L0,10 z'/></marker>"
        f"</defs>{''.join(edges)}{''.join(boxes)}</svg>"
    )


def _kind(step: dict[str, Any]) -> str:
    """The box's colour: failed, incomplete, computed (some work paid) or cached."""
    if step["batches_failed"]:
        return "failed"
    if not step["complete"]:
        return "incomplete"
    return "computed" if step["batches_computed"] else "cached"


def _table(rep: Report) -> str:
    e = html.escape
    head = (
        "<tr><th>step</th><th>class</th><th>batches</th><th>cached</th><th>computed</th>"
        "<th>failed</th><th>rows</th><th>rows reused by key</th><th>compute s</th>"
        "<th>saved s</th><th>tokens spent</th><th>tokens saved</th><th>$ spent</th>"
        "<th>$ saved</th></tr>"
    )
    body = "".join(
        f"<tr><td>{e(s['name'])}</td><td title='{e(s['class'])}'>"
        f"{e(s['class'].rpartition(':')[2])}</td>"
        f"<td>{s['batches_done']}/{s['batches_total'] if s['batches_total'] is not None else '?'}"
        f"</td><td>{s['batches_cached']}</td><td>{s['batches_computed']}</td>"
        f"<td>{s['batches_failed']}</td><td>{s['rows']:,}</td><td>{s['rows_reused']:,}</td>"
        f"<td>{s['compute_seconds']:.2f}</td><td>{s['seconds_saved']:.2f}</td>"
        f"<td>{s['tokens_spent']:,}</td><td>{s['tokens_saved']:,}</td>"
        f"<td>{_usd(s['cost_spent_usd'])}</td><td>{_usd(s['cost_saved_usd'])}</td></tr>"
        for s in rep.steps
    )
    return f"<table class='steps'>{head}{body}</table>"


def _why(rep: Report) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(w.step)}</td><td>{e(w.status)}</td><td>"
        + ("<br>".join(e(r) for r in w.reasons) or "&#8212;")
        + "</td></tr>"
        for w in rep.why
    )
    return f"<table class='why'><tr><th>step</th><th>status</th><th>why</th></tr>{rows}</table>"


def _preview_html(p: Preview) -> str:
    e = html.escape
    shown = len(p.first)
    head = "".join(f"<th>{e(c)}</th>" for c in p.columns)
    body = "".join("<tr>" + "".join(f"<td>{e(v)}</td>" for v in row) + "</tr>" for row in p.first)
    return (
        f"<h3>{e(p.leaf)}: {shown} of {p.rows:,} rows</h3>"
        f"<div class='preview'><table data-leaf='{e(p.leaf)}'><tr>{head}</tr>{body}</table></div>"
    )


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#1d2330}
h1 .status{font-size:14px;padding:2px 8px;border-radius:10px;background:#e3e7ee}
.status.finished{background:#d7f2dc}.status.failed{background:#f7d4d4}
.status.interrupted,.status.running,.status.waiting{background:#fbe8c8}
.meta{color:#5a6474}.saved{font-weight:600}.error{color:#a11}
.canvas{overflow-x:auto}#dag{display:block;margin:8px 0 16px}
#dag .step rect{stroke:#55657a;stroke-width:1.2}
#dag .cached rect{fill:#e4f5e7}#dag .computed rect{fill:#e3edfb}
#dag .failed rect{fill:#fbe1e1}#dag .incomplete rect{fill:#fdf0d8}
#dag text{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;fill:#1d2330}
#dag text.name{font-weight:700;font-size:13px}
#dag .edge{fill:none;stroke:#7b8799;stroke-width:1.4}#dag marker path{fill:#7b8799}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
td,th{border:1px solid #d5dae2;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f1f3f7}.steps td:nth-child(n+3){text-align:right}
.preview{overflow-x:auto}.preview td{max-width:420px;white-space:pre-wrap;word-break:break-word}
#layout-warning{color:#a11;font-weight:600}
"""

# Measures the drawing as the browser laid it out; see the module docstring.
_CHECK = """
(function(){
  var svg=document.getElementById('dag'),box=svg.viewBox.baseVal,problems=[],rects=[];
  svg.querySelectorAll('g.step').forEach(function(g){
    var r=g.querySelector('rect').getBBox(),name=g.getAttribute('data-step');
    if(r.width<=0||r.x<0||r.y<0||r.x+r.width>box.width||r.y+r.height>box.height)
      problems.push(name+': off the canvas');
    g.querySelectorAll('text').forEach(function(t){
      var b=t.getBBox();
      if(b.x+b.width>r.x+r.width-2) problems.push(name+': label wider than its box');
    });
    rects.push([name,r]);
  });
  rects.forEach(function(a,i){rects.slice(i+1).forEach(function(b){
    var p=a[1],q=b[1];
    if(p.x<q.x+q.width&&q.x<p.x+p.width&&p.y<q.y+q.height&&q.y<p.y+p.height)
      problems.push(a[0]+' overlaps '+b[0]);
  });});
  document.body.setAttribute('data-layout',problems.length?problems.join('; '):
    'ok: '+rects.length+' steps drawn');
  if(problems.length){var w=document.getElementById('layout-warning');
    w.hidden=false;w.textContent='Drawing problems: '+problems.join('; ');}
})();
"""
