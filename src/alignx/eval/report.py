"""The evaluation report: Markdown + HTML tables and Matplotlib plots, written next to results.json.

Every figure carries its 95 % bootstrap interval, and the report opens with the judges that produced
the numbers and their own held-out accuracy, so a reader can tell a real difference from judge noise.
``report.html`` is self-contained (plots embedded, no network): beside the tables it shows every prompt with
each method's answer, routing weights and judge verdicts, filtered by method, by verdict and by disagreement.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from alignx.axes import AXES
from alignx.eval.benchmarks import HEADLINE
from alignx.eval.judges import THRESHOLD
from alignx.eval.statistics import rates_of
from alignx.run import atomic_write_text

# (benchmark, metric, column title, higher is better)
COLUMNS = (
    ("alpacaeval", "win_rate", "win rate", True),
    ("alpacaeval", "equal_length_win_rate", "equal-length win rate", True),
    ("beavertails", "unsafe_rate", "unsafe", False),
    ("harmful", "refusal_rate", "refuses harmful", True),
    ("xstest_safe", "over_refusal_rate", "over-refusal", False),
    ("truthfulqa", "truthful", "truthful", True),
    ("truthfulqa", "informative", "informative", True),
    ("truthfulqa", "ti", "TI", True),
    ("truthfulqa_mc", "mc1", "MC1", True),
    ("truthfulqa_mc", "mc2", "MC2", True),
)


HHH_NOTE = ("HHH mean = the mean of the three axes' headline scores, each in [0, 1] with higher better: "
            "AlpacaEval equal-length win rate (helpful: the answer and the reference both cut to the shorter one's "
            "token count, at least 16, so a judge's preference for longer answers cannot move it), BeaverTails safe "
            "rate (harmless), TruthfulQA TI (honest); its interval resamples each benchmark's items independently. "
            "Win rate: against the whole reference, as the judge was trained (length-biased).")

# The rates a binary judge produces, shown again corrected for that judge's measured error: metric -> its judges.
CORRECTED_TASKS = {"win_rate": ("helpfulness",), "unsafe_rate": ("safety",), "refusal_rate": ("refusal",),
                   "over_refusal_rate": ("refusal",), "truthful": ("truth",), "informative": ("info",), "ti": ("truth", "info")}
CORRECTED = tuple(c for c in COLUMNS if c[1] in CORRECTED_TASKS)
CORRECTED_NOTE = (
    "Each rate corrected for its judge's validated sensitivity and specificity (Rogan–Gladen; TI solves the truth and "
    "info judges' joint errors, assuming each judge errs on its own label only); the interval resamples the items and "
    "the judge's validation set together, so it includes the judge's own uncertainty. A raw rate mixes the true rate "
    "with the judge's false positives and negatives (a judge with sensitivity 0.8 and specificity 0.7 reports 35 % "
    "unsafe when 10 % are); the correction undoes that only if the judge errs on these answers as it did on its "
    "validation set. † = the judge's error model does not fit these verdicts (e.g. a raw rate below its false-positive "
    "rate): the unclipped estimate is shown, it is not a rate, read the raw one. A judge whose correction missed "
    "held-out systems' true rates by more than the raw rate did is left out of these tables. Which to read, per judge:"
)


def correction_trusted(results: dict, task: str) -> bool:
    """Whether a judge's corrected rates are worth printing: it was validated, and where validation held a system
    out, the corrected rate came closer to the held-out systems' true rates than the raw one (reading_advice)."""
    description = results["judges"].get(task, {})
    points = description.get("points") or {}
    if not description.get("confusion"):
        return False
    if f"{task}_rate_error" in points:
        return points[f"{task}_rate_corrected_error"] <= points[f"{task}_rate_error"]
    return True


def _corrected_columns(results: dict) -> tuple:
    return tuple(c for c in CORRECTED if all(correction_trusted(results, t) for t in CORRECTED_TASKS[c[1]]))


def reading_advice(results: dict) -> str:
    """Per judge, which of its rates the evidence supports: where validation held a system out, the one that
    came closer to the held-out systems' true rates; otherwise the corrected rate, saying it is unchecked."""
    lines = []
    for task, description in results["judges"].items():
        points = description.get("points") or {}
        if not description.get("confusion"):
            lines.append(f"- {task}: raw only (this judge was not validated here, so there is nothing to correct with).")
        elif f"{task}_rate_error" in points:
            raw, fixed = points[f"{task}_rate_error"], points[f"{task}_rate_corrected_error"]
            better = "corrected" if correction_trusted(results, task) else "raw"
            lines.append(f"- {task}: **{better}**. On held-out systems the corrected rate missed the true rate by up to "
                         f"{fixed:.1f} points, the raw rate by up to {raw:.1f}.")
        else:
            lines.append(f"- {task}: **corrected**, unchecked: its validation data come from one source, so no held-out "
                         f"system could test whether its error rates transfer.")
    return "\n".join(lines)


def _cell(metric: dict | None) -> str:
    if not metric:
        return "–"
    lo, hi = metric["ci"]
    return f"{100 * metric['value']:.1f}{'†' if metric.get('rejected') else ''} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _share(metric: dict | None) -> str:
    return "–" if not metric else f"{100 * metric['value']:.0f}"


def _difference(entry: dict | None) -> str:
    """A paired difference in points with its interval, starred when the interval excludes 0."""
    if not entry:
        return "–"
    lo, hi = entry["ci"]
    return f"{100 * entry['value']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]" + (" *" if entry["excludes_zero"] else "")


def _rates(description: dict) -> list[str]:
    confusion = description.get("confusion")
    if not confusion:
        return ["–", "–"]
    return [f"{rate:.3f}" for rate in rates_of(confusion)]


def tables(results: dict) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, header, rows, note) of every table of the report, shared by the Markdown, HTML and terminal views."""
    out = []
    judges = [[task, d.get("judge", "?"), _accuracy(d), *_rates(d)] for task, d in results["judges"].items()]
    out.append(("Judges (held-out accuracy of each judge, measured by `alignx judge validate`)",
                ["task", "judge", "accuracy", "sensitivity", "specificity"], judges, ""))
    methods = results["methods"]
    columns = [c for c in COLUMNS if any(c[1] in e["benchmarks"].get(c[0], {}) for e in methods.values())]  # benchmarks run
    corrected_columns = tuple(c for c in _corrected_columns(results) if c in columns)
    main = [[m] + [_cell(e["benchmarks"].get(b, {}).get(k)) for b, k, _, _ in columns] + [_cell(e.get("hhh_mean"))]
            for m, e in methods.items()]
    out.append(("Results (%, 95 % bootstrap CI; raw judge verdicts)", ["method"] + [c[2] for c in columns] + ["HHH mean"],
                main, HHH_NOTE))
    generating = [b for b in dict.fromkeys(c[0] for c in columns) if any("at_cap" in e["benchmarks"].get(b, {}) for e in methods.values())]
    if generating:
        capped = [[m] + [_share(e["benchmarks"].get(b, {}).get("at_cap")) for b in generating] for m, e in methods.items()]
        out.append((f"Answers cut at the token cap (%, answers of at least {results['generation']['max_new_tokens'] - 1} "
                    "of the allowed new tokens)", ["method", *generating], capped,
                    "Judges learned from complete answers: a benchmark where one method is mostly cut off mid-sentence and "
                    "another mostly finishes compares more than what they say."))
    if "paired" in results:
        reference, paired = results["paired"]["reference"], results["paired"]["methods"]
        rows = [[m] + [_difference(d.get(b, {}).get(k)) for b, k, _, _ in columns] + [_difference(d.get("hhh_mean"))]
                for m, d in paired.items()]
        out.append((f"Paired differences to {reference} (method − {reference}, points; paired bootstrap 95 % CI; "
                    "* = the interval excludes 0)", ["method"] + [c[2] for c in columns] + ["HHH mean"], rows,
                    f"Both methods answered the same items; each resample draws the items once for both. For unsafe "
                    f"and over-refusal, a negative difference means the method is better than {reference}."))
        fixed = [[m] + [_difference(d.get(b, {}).get(k, {}).get("corrected")) for b, k, _, _ in corrected_columns]
                 for m, d in paired.items()]
        if any(cell != "–" for row in fixed for cell in row[1:]):
            out.append((f"Paired differences to {reference}, judge-corrected rates (points: the raw difference divided "
                        "by the judge's sensitivity + specificity − 1; the judge's validation set is redrawn once per "
                        "resample for both methods)", ["method"] + [c[2] for c in corrected_columns], fixed, ""))
    corrected = [[m] + [_cell(e["benchmarks"].get(b, {}).get(k, {}).get("corrected")) for b, k, _, _ in corrected_columns]
                 for m, e in methods.items()]
    if any(cell != "–" for row in corrected for cell in row[1:]):
        out.append(("Rates corrected for judge error (%, 95 % CI over items and the judge's validation set)",
                    ["method"] + [c[2] for c in corrected_columns], corrected, CORRECTED_NOTE + "\n\n" + reading_advice(results)))
    collapse = [[m] + [("–" if row["relative"][a] is None else f"{row['relative'][a]:.2f}") for a in AXES]
                + ["–" if not row["misrouting"] else " ".join(f"{a}={v:.2f}" for a, v in row["misrouting"].items())]
                for m, row in results["axis_collapse"].items()]
    out.append(("Axis Collapse (each axis's score relative to that axis's own expert; 1.00 = nothing forgotten)",
                ["method", *AXES, "misrouting"], collapse, ""))
    routing = [[m, *(f"{e['routing'][k]:.3f}" if k in e["routing"] else "–" for k in ("accuracy", "ece", "brier", "nll")),
                str(e["routing"]["n"]), f"{e['routing']['fallback']['n']} ({100 * e['routing']['fallback']['rate']:.1f} %)"]
               for m, e in methods.items() if "routing" in e]
    if routing:
        out.append(("Routing on the evaluation prompts (calibrated probabilities vs gold axis; prompts the out-of-distribution "
                    "gate sent to its fallback are counted apart)",
                    ["method", "accuracy", "ECE", "Brier", "NLL", "n routed", "fallback"], routing, ""))
    return out


def _accuracy(description: dict) -> str:
    accuracy = description.get("accuracy")
    if not accuracy:
        return "not validated"
    if isinstance(accuracy, dict):
        return ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in accuracy.items())
    return f"{accuracy:.3f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)])


def markdown(results: dict, plots: list[str]) -> str:
    lines = [f"# AlignX evaluation ({results['suite']} suite)", "",
             "Items per benchmark: " + ", ".join(f"{k} {v}" for k, v in results["items_per_benchmark"].items()), ""]
    for title, header, rows, note in tables(results):
        lines += [f"## {title}", ""] + ([note, ""] if note else []) + [markdown_table(header, rows), ""]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


# How report.html names a judge's verdict from its probability (p >= THRESHOLD: the first label; the pairwise
# helpfulness judge, on the whole answer or its equal-length pair: win, tie at exactly 0.5, loss against the reference).
VERDICT_LABELS = {"safety": ("unsafe", "safe"), "refusal": ("refused", "answered"), "truth": ("truthful", "untruthful"),
                  "info": ("informative", "uninformative"), "helpfulness": ("win", "loss")}

STYLE = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}table{border-collapse:collapse;margin:1em 0}"
         "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;vertical-align:top}td:first-child,th:first-child{text-align:left}"
         "img{max-width:100%}#answers td{text-align:left;max-width:28em;white-space:pre-wrap;font-size:90%}"
         ".verdict{display:inline-block;margin:2px 4px 0 0;padding:0 4px;border-radius:3px;background:#eee;font-size:85%}"
         ".weights{color:#555;font-size:80%}.controls label{margin-right:1em}.controls{margin:.5em 0;line-height:2}")

# The answers browser: renders the embedded answers (no network), filtered by method, verdict and disagreement.
SCRIPT = """
const data = JSON.parse(document.getElementById('answers-data').textContent);
const LABELS = JSON.parse(document.getElementById('verdict-labels').textContent);
const THRESHOLD = __THRESHOLD__;
const $ = id => document.getElementById(id);
function verdict(task, p) {
  if (task.startsWith('helpfulness')) return p > 0.5 ? 'win' : (p < 0.5 ? 'loss' : 'tie');
  return p >= THRESHOLD ? LABELS[task][0] : LABELS[task][1];
}
function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; }
function options(select, values) { select.replaceChildren(...values.map(v => { const o = el('option', v); o.value = v; return o; })); }
function benchmarkChanged() {
  const b = data[$('benchmark').value];
  const methods = Object.keys(b.methods);
  $('methods').replaceChildren(...methods.map(m => {
    const label = el('label'); const box = el('input'); box.type = 'checkbox'; box.checked = true; box.value = m;
    box.className = 'method'; box.onchange = render; label.append(box, ' ' + m); return label; }));
  const verdicts = new Set();
  for (const m of methods) for (const a of Object.values(b.methods[m])) for (const [t, p] of Object.entries(a.scores)) verdicts.add(t + ': ' + verdict(t, p));
  options($('verdict-method'), ['any method', ...methods]);
  options($('verdict'), ['any verdict', ...[...verdicts].sort()]);
  render();
}
function render() {
  const b = data[$('benchmark').value];
  const shown = [...document.querySelectorAll('input.method')].filter(x => x.checked).map(x => x.value);
  const who = $('verdict-method').value, wanted = $('verdict').value, disagree = $('disagree').checked;
  const table = $('answers');
  const head = el('tr'); head.append(el('th', 'prompt'), ...shown.map(m => el('th', m)));
  const rows = [head];
  let count = 0;
  for (const item of b.items) {
    const said = m => Object.entries((b.methods[m][item.id] || {scores: {}}).scores).map(([t, p]) => t + ': ' + verdict(t, p));
    if (wanted !== 'any verdict' && !(who === 'any method' ? shown : [who]).some(m => said(m).includes(wanted))) continue;
    if (disagree && new Set(shown.map(m => said(m).join('|'))).size < 2) continue;
    const tr = el('tr'); tr.className = 'item'; tr.append(el('td', item.prompt));
    for (const m of shown) {
      const a = b.methods[m][item.id]; const td = el('td');
      if (a) {
        td.append(el('div', a.response));
        for (const v of said(m)) td.append(el('span', v, 'verdict'));
        if (a.weights) td.append(el('div', Object.entries(a.weights).map(([k, w]) => k + ' ' + w.toFixed(2)).join(' · '), 'weights'));
      } else td.textContent = '–';
      tr.append(td);
    }
    rows.push(tr); count += 1;
  }
  table.replaceChildren(...rows);
  $('count').textContent = count + ' of ' + b.items.length + ' prompts';
}
if (Object.keys(data).length) {
  options($('benchmark'), Object.keys(data));
  $('benchmark').onchange = benchmarkChanged;
  for (const id of ['verdict-method', 'verdict', 'disagree']) $(id).onchange = render;
  // a link can preset the filters: report.html#benchmark=beavertails&of=alignx&verdict=safety:%20unsafe&disagree=1
  const preset = new URLSearchParams(location.hash.slice(1));
  if (preset.get('benchmark') in data) $('benchmark').value = preset.get('benchmark');
  benchmarkChanged();
  if (preset.has('of')) $('verdict-method').value = preset.get('of');
  if (preset.has('verdict')) $('verdict').value = preset.get('verdict');
  $('disagree').checked = preset.get('disagree') === '1';
  render();
}
"""


def _embedded_json(value) -> str:
    """JSON safe inside a <script> element (no "</" can close it early)."""
    return json.dumps(value, ensure_ascii=False).replace("</", "<\\/")


def html_page(results: dict, plots: list[str], answers: dict | None = None, images: dict[str, str] | None = None) -> str:
    """The report as one self-contained page: the tables, the plots embedded as data URIs (``images``: name ->
    base64 PNG), and, with ``answers`` (:func:`alignx.eval.runner.collect_answers`), every prompt with each
    method's answer, routing weights and judge verdicts side by side, filtered in the page itself."""
    images = images or {}
    parts = [f"<!doctype html><meta charset='utf-8'><title>AlignX evaluation</title><style>{STYLE}</style>",
             f"<h1>AlignX evaluation ({html.escape(results['suite'])} suite)</h1>"]
    for title, header, rows, note in tables(results):
        parts.append(f"<h2>{html.escape(title)}</h2>" + "".join(f"<p>{html.escape(line).replace('**', '')}</p>" for line in note.splitlines() if line)
                     + "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    for p in plots:
        source = f"data:image/png;base64,{images[p]}" if p in images else html.escape(p)
        parts.append(f"<h2>{html.escape(p)}</h2><img alt='{html.escape(p)}' src='{source}'>")
    if answers:
        parts += [
            "<h2>Answers, side by side</h2>",
            "<div class='controls'><label>benchmark <select id='benchmark'></select></label>"
            "<label>verdict of <select id='verdict-method'></select></label><select id='verdict'></select> "
            "<label><input type='checkbox' id='disagree'> only prompts where the shown methods' verdicts differ</label>"
            "<span id='count'></span></div><div class='controls' id='methods'></div><table id='answers'></table>",
            f"<script type='application/json' id='answers-data'>{_embedded_json(answers)}</script>",
            f"<script type='application/json' id='verdict-labels'>{_embedded_json(VERDICT_LABELS)}</script>",
            f"<script>{SCRIPT.replace('__THRESHOLD__', str(THRESHOLD))}</script>",
        ]
    return "\n".join(parts) + "\n"


def terminal_summary(results: dict) -> str:
    """The Results, corrected rates and Axis Collapse tables as fixed-width text, for the end of `make demo`."""
    blocks = []
    for title, header, rows, _ in tables(results)[1:]:
        if title.startswith("Routing"):
            continue
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths))  # noqa: E731
        blocks.append("\n".join([title, fmt(header), *(fmt(r) for r in rows)]))
    return "\n\n".join(blocks)


def write_report(results: dict, root: Path, answers: dict | None = None) -> Path:
    plots = _plots(results, root)
    atomic_write_text(root / "report.md", markdown(results, plots))
    images = {p: base64.b64encode((root / p).read_bytes()).decode("ascii") for p in plots}
    atomic_write_text(root / "report.html", html_page(results, plots, answers, images))
    return root / "report.html"


def _save(fig, root: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(root / name, dpi=110)
    plt.close(fig)
    return name


def _plots(results: dict, root: Path) -> list[str]:
    matplotlib.use("Agg")

    written = []
    methods = list(results["methods"])
    # HHH scores per method: grouped bars with CIs
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(methods)), 4))
    width = 0.8 / len(AXES)
    for a, axis in enumerate(AXES):
        benchmark, key = HEADLINE[axis]
        values, errors = [], [[], []]
        for m in methods:
            metric = results["methods"][m]["benchmarks"].get(benchmark, {}).get(key)
            value = metric["value"] if metric else np.nan
            values.append(value)
            errors[0].append(value - metric["ci"][0] if metric else 0)
            errors[1].append(metric["ci"][1] - value if metric else 0)
        ax.bar(np.arange(len(methods)) + a * width, values, width, yerr=errors, capsize=3, label=f"{axis} ({key})")
    ax.set_xticks(np.arange(len(methods)) + width, methods, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("score (95 % CI)")
    ax.set_title("HHH scores per method")
    ax.legend(fontsize=8)
    written.append(_save(fig, root, "hhh_scores.png"))
    # Axis Collapse heat map
    collapse = results["axis_collapse"]
    grid = np.array([[np.nan if collapse[m]["relative"][a] is None else collapse[m]["relative"][a] for a in AXES] for m in methods])
    if np.isfinite(grid).any():
        fig, ax = plt.subplots(figsize=(5, 0.5 * len(methods) + 1.5))
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=max(1.2, float(np.nanmax(grid))), aspect="auto")
        ax.set_xticks(range(len(AXES)), AXES)
        ax.set_yticks(range(len(methods)), methods)
        for i in range(len(methods)):
            for j in range(len(AXES)):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(image, ax=ax, label="score / own expert's score")
        ax.set_title("Axis Collapse")
        written.append(_save(fig, root, "axis_collapse.png"))
    # win rates with CIs
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(methods) + 1.5))
    for offset, key, label in ((-0.15, "win_rate", "win rate"), (0.15, "equal_length_win_rate", "equal-length")):
        for i, m in enumerate(methods):
            metric = results["methods"][m]["benchmarks"].get("alpacaeval", {}).get(key)
            if metric:
                ax.errorbar(metric["value"], i + offset, xerr=[[metric["value"] - metric["ci"][0]], [metric["ci"][1] - metric["value"]]],
                            fmt="o" if key == "win_rate" else "s", color="C0" if key == "win_rate" else "C1", capsize=3,
                            label=label if i == 0 else None)
    ax.set_yticks(range(len(methods)), methods)
    ax.set_xlim(0, 1)
    ax.set_xlabel("AlpacaEval win rate vs reference (95 % CI)")
    ax.legend(fontsize=8)
    written.append(_save(fig, root, "win_rates.png"))
    # reliability diagrams of the routed methods
    routed = [m for m in methods if "reliability" in results["methods"][m].get("routing", {})]
    if routed:
        fig, axes = plt.subplots(1, len(routed), figsize=(3.2 * len(routed), 3.2), squeeze=False)
        for ax, m in zip(axes[0], routed):
            bins = [b for b in results["methods"][m]["routing"]["reliability"] if b["count"]]
            ax.plot([0, 1], [0, 1], "k--", lw=0.8)
            ax.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["accuracy"] for b in bins], width=1 / 15, alpha=0.7, edgecolor="k")
            ax.set_title(f"{m}\nECE {results['methods'][m]['routing']['ece']:.3f}", fontsize=9)
            ax.set_xlabel("confidence")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
        axes[0][0].set_ylabel("accuracy")
        written.append(_save(fig, root, "routing_reliability.png"))
    return written
