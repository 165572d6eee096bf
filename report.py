"""
The report of a run: one self-contained HTML page (inline SVG charts, no scripts) with the loss
curves, the dev loss table, the pairwise and rating tallies, and every answer, prompts down the
side and epochs across. No torch here. The command is eval.py's:

    python eval.py report --run out/demo [--pairwise ann-ana.jsonl ...] [--ratings rate-ana.jsonl ...]
"""

import html
import string
from pathlib import Path

from judge import (RATINGS, RESULTS, EvalError, check_record, load_answers, numbered_jsonl, prompt_text,
                   rating_tally, read_annotations, win_tie_loss)

PAGE = string.Template("""<!doctype html>
<html><head><meta charset="utf-8"><title>$title</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em; color: #222; }
h2 { margin-top: 2em; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; }
.answers td, .answers th { min-width: 26em; max-width: 34em; }
.answers .prompt { position: sticky; left: 0; background: #f6f6f6; min-width: 20em; }
.text { white-space: pre-wrap; max-height: 30em; overflow-y: auto; }
.ref { margin-top: 0.5em; color: #555; white-space: pre-wrap; }
svg text { font: 12px system-ui, sans-serif; }
</style></head><body>
<h1>$title</h1>
$body
</body></html>
""")

COLORS = {"win": "#3a8f5c", "tie": "#b8b8b8", "loss": "#c9543f",
          "Excellent": "#3a8f5c", "Pass": "#9cc7a8", "Fail": "#c9543f"}


def svg_lines(series: list[tuple], xlabel: str, ylabel: str, width=760, height=320) -> str:
    """A line chart of series [(name, color, [(x, y), ...])], with axes, ticks and a legend."""
    xs = [x for _, _, pts in series for x, _ in pts]
    ys = [y for _, _, pts in series for _, y in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    left, right, top, bottom = 60, 20, 20, 40  # margins, in pixels

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">',
           f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
           f'fill="none" stroke="#999"/>']
    for i in range(5):  # five ticks on each axis
        x, y = x0 + i * (x1 - x0) / 4, y0 + i * (y1 - y0) / 4
        tx, ty = px(x, y)
        out.append(f'<text x="{tx:.1f}" y="{height - bottom + 16}" text-anchor="middle">{x:.3g}</text>')
        out.append(f'<text x="{left - 6}" y="{ty + 4:.1f}" text-anchor="end">{y:.3g}</text>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle">{xlabel}</text>')
    out.append(f'<text x="14" y="{(top + height - bottom) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {(top + height - bottom) / 2})">{ylabel}</text>')
    for i, (name, color, pts) in enumerate(series):
        coords = [px(x, y) for x, y in pts]
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="'
                   + " ".join(f"{a:.1f},{b:.1f}" for a, b in coords) + '"/>')
        if len(pts) <= 40:  # few points (one per epoch): mark each one
            out += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{color}"/>' for a, b in coords]
        out.append(f'<text x="{width - right - 8}" y="{top + 16 + 16 * i}" text-anchor="end" '
                   f'fill="{color}">{html.escape(name)}</text>')
    return "\n".join(out + ["</svg>"])


def svg_stacked_bars(rows: list[tuple], keys: tuple, labels: tuple, width=760) -> str:
    """100% horizontal bars, one per row [(label, {key: percent})], as in LIMA's figure 1."""
    left, bar, gap = 180, 26, 10
    height = 30 + len(rows) * (bar + gap)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">']
    for j, (key, label) in enumerate(zip(keys, labels)):  # the legend, across the top
        out.append(f'<rect x="{left + 150 * j}" y="4" width="12" height="12" fill="{COLORS[key]}"/>'
                   f'<text x="{left + 150 * j + 16}" y="15">{html.escape(label)}</text>')
    for i, (name, pct) in enumerate(rows):
        y, x = 30 + i * (bar + gap), left
        out.append(f'<text x="{left - 8}" y="{y + bar / 2 + 4}" text-anchor="end">{html.escape(name)}</text>')
        for key in keys:
            w = pct[key] / 100 * (width - left - 10)
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar}" fill="{COLORS[key]}"/>')
            if w > 34:  # room for the number
                out.append(f'<text x="{x + w / 2:.1f}" y="{y + bar / 2 + 4}" text-anchor="middle">'
                           f'{pct[key]:.0f}%</text>')
            x += w
    return "\n".join(out + ["</svg>"])


def loss_curves(metrics_path) -> str:
    """Training loss per step and dev loss per epoch from train.py's metrics.jsonl, as a chart."""
    # A resumed run logs the steps after its checkpoint again: the last record of a step wins.
    train, dev = {}, {}
    for n, r in numbered_jsonl(metrics_path):
        kind = next((k for k in ("loss", "dev_loss") if isinstance(r, dict) and k in r), None)
        if kind is None:  # a step's record or an epoch's, as train.py writes them
            check_record(r, f"{metrics_path}:{n}", "a train.py metrics record")
            raise EvalError(f'{metrics_path}:{n}: neither "loss" nor "dev_loss"; not a train.py metrics record')
        check_record(r, f"{metrics_path}:{n}", "a train.py metrics record", numbers=("step", "epoch", kind))
        if "loss" in r:
            train[r["step"]] = (r["epoch"], r["loss"])
        if "dev_loss" in r:
            dev[r["step"]] = (r["epoch"], r["dev_loss"])
    series = [(name, color, [pts[k] for k in sorted(pts)])
              for name, color, pts in (("train loss", "#4a6fa5", train), ("dev loss", "#c9543f", dev)) if pts]
    return svg_lines(series, "epoch", "loss") if series else "<p>no losses in the metrics file</p>"


def table(header: list[str], rows: list[list]) -> str:
    cell = lambda v: f'<td class="num">{v:.4g}</td>' if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>"
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
            + "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows) + "</table>")


def references(dev) -> dict[str, str]:
    """--dev's reference answers: {prompt id: the last turn} of each record that ends with an answer.
    Ids as sample.py gives them: the record's "id", else its number in the file, from 1."""
    refs = {}
    for k, (n, r) in enumerate(numbered_jsonl(dev), 1):
        turns = check_record(r, f"{dev}:{n}", "a conversation {conversations: [...]}").get("conversations")
        if isinstance(turns, list) and turns and len(turns) % 2 == 0 and isinstance(turns[-1], str):
            refs[str(r.get("id", k))] = turns[-1]
    return refs


def answers_grid(files: list[Path], refs: dict[str, str] | None = None) -> str:
    """Prompts down the side (with the reference answer, if any), one column per answer file (per
    epoch), each cell the full answer."""
    columns = [(f.stem, load_answers(f)) for f in files]
    ids = list(dict.fromkeys(i for _, answers in columns for i in answers))  # first seen, first shown
    head = "<tr><th>prompt</th>" + "".join(f"<th>{html.escape(name)}</th>" for name, _ in columns) + "</tr>"
    rows = []
    for i in ids:
        first = next(answers[i] for _, answers in columns if i in answers)
        cells = [f'<div class="text">{html.escape(answers[i]["answer"])}</div>' if i in answers
                 else "<em>no answer</em>" for _, answers in columns]
        ref = f'<div class="ref"><b>reference:</b> {html.escape(refs[i])}</div>' if refs and i in refs else ""
        rows.append(f'<tr><td class="prompt"><b>{html.escape(i)}</b><div class="text">'
                    f'{html.escape(prompt_text(first))}</div>{ref}</td>' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f'<div class="scroll"><table class="answers">{head}{"".join(rows)}</table></div>'


def write_report(run, pairwise=(), ratings=(), out=None, dev=None) -> Path:
    """Write RUN/eval/report.html (or `out`) from whatever of the run's results exist; dev: the
    prompts' file, whose reference answers are shown beside each prompt."""
    run = Path(run)
    parts = []
    if (run / "metrics.jsonl").is_file():
        parts += ["<h2>Loss curves</h2>", loss_curves(run / "metrics.jsonl")]
    if (run / "eval" / "dev_loss.jsonl").is_file():
        rows = [check_record(r, f"{run / 'eval' / 'dev_loss.jsonl'}:{n}", "a row of eval.py loss",
                             strings=("checkpoint",), numbers=("epoch", "step", "dev_loss", "perplexity", "tokens"))
                for n, r in numbered_jsonl(run / "eval" / "dev_loss.jsonl")]
        parts += ["<h2>Dev loss per checkpoint</h2>",
                  table(["checkpoint", "epoch", "step", "dev loss", "perplexity", "tokens"],
                        [[r["checkpoint"], r["epoch"], r["step"], r["dev_loss"], r["perplexity"], r["tokens"]]
                         for r in rows])]
    for path in pairwise:
        bars = [(b, t) for b, t in win_tie_loss(read_annotations(path)).items()]
        parts += [f"<h2>Pairwise preference: {html.escape(str(path))}</h2>",
                  svg_stacked_bars(bars, RESULTS, ("ours wins", "tie", "baseline wins")),
                  table(["baseline", "n", "ours wins %", "tie %", "baseline wins %"],
                        [[b, t["n"], t["win"], t["tie"], t["loss"]] for b, t in bars])]
    for path in ratings:
        bars = list(rating_tally(read_annotations(path)).items())
        parts += [f"<h2>Absolute ratings: {html.escape(str(path))}</h2>", svg_stacked_bars(bars, RATINGS, RATINGS),
                  table(["system", "n"] + [f"{k} %" for k in RATINGS], [[s, t["n"]] + [t[k] for k in RATINGS]
                                                                       for s, t in bars])]
    answer_files = sorted((run / "eval" / "answers").glob("*.jsonl"))
    if answer_files:
        parts += ["<h2>Answers to the dev prompts</h2>", answers_grid(answer_files, references(dev) if dev else None)]
    if not parts:
        raise EvalError(f"{run}: nothing to report (no metrics.jsonl, eval/dev_loss.jsonl or eval/answers/)")
    out = Path(out) if out else run / "eval" / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(PAGE.substitute(title=html.escape(f"lima: {run}"), body="\n".join(parts)))
    return out

