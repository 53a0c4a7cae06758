"""report.html: one self-contained page that explains a run, verdict first.

Sections, in reading order: the verdict (target reached or missed, by how much, why it stopped,
what to try, as exact command lines), before / after with ratios and the paired latency, the
classes that paid, every unit in a sortable, filterable table, the calibration images that show
what the most important units did, then steps, layers, compensation, warnings and settings.
The page opens offline: images are inlined and the table's script is a few lines of plain
JavaScript.
"""

from __future__ import annotations

import base64
import html
import io
import json
import shlex
from pathlib import Path

import numpy as np

from cswap.categorize import CRITICAL, DETRIMENTAL, ESTIMATED, NEUTRAL

CATEGORY_COLOURS = {
    CRITICAL: "#d62728",
    NEUTRAL: "#7f7f7f",
    DETRIMENTAL: "#2ca02c",
    ESTIMATED: "#9467bd",
}
TARGET_NAMES = {"params": "parameters", "macs": "MACs"}
e = html.escape


def describe_targets(report: dict) -> list[str]:
    """Each target in words: the goal, where the run stands, met or not, which one stopped it."""
    lines = []
    for item in report.get("target_status") or []:
        verdict = "met" if item["met"] else "NOT met"
        if item["stopped_the_run"]:
            verdict += ", stopped the run"
        lines.append(
            f"remove {item['goal']:.1%} of the {TARGET_NAMES[item['kind']]}: removed "
            f"{item['removed']:.1%} ({verdict})"
        )
    return lines


def layer_table(report: dict) -> list[dict]:
    """Kept / removed units per group (named by its root layer)."""
    roots = {group["id"]: group["root"] for group in report.get("groups", [])}
    rows: dict[int, dict] = {}
    for unit in report.get("units", []):
        root = roots.get(unit["group"], unit["layers"][0])
        row = rows.setdefault(
            unit["group"], {"group": unit["group"], "root": root, "kept": 0, "removed": 0}
        )
        row["removed" if unit["removed_at_step"] is not None else "kept"] += 1
    return [rows[key] for key in sorted(rows)]


# ----------------------------------------------------------------------------- the verdict


def reached(report: dict) -> bool:
    status = report.get("target_status") or []
    return report.get("stop_reason") == "target_reached" and any(s["met"] for s in status)


def headline(report: dict) -> str:
    status = report.get("target_status") or []
    if not status:
        return "Scored without pruning"
    if reached(report):
        met = next(s for s in status if s["stopped_the_run"] or s["met"])
        return (
            f"Target reached: {met['removed']:.1%} of the {TARGET_NAMES[met['kind']]} removed "
            f"(goal {met['goal']:.0%})"
        )
    first = status[0]
    short = (first["goal"] - first["removed"]) * 100
    return (
        f"Target missed: {first['removed']:.1%} of the {TARGET_NAMES[first['kind']]} removed "
        f"(goal {first['goal']:.0%}, {short:.1f} points short)"
    )


def stop_explanation(report: dict) -> str:
    """Why the run stopped, in plain words with the numbers behind it."""
    reason = report.get("stop_reason")
    steps = report.get("steps", [])
    tolerance = report.get("tolerance", 0.0)
    before = report.get("val_accuracy_before") or 0.0
    if reason == "target_reached":
        return "The run stopped because the target was reached."
    if reason == "tolerance_unmet":
        rejected = [s for s in steps if not s["accepted"]]
        last = rejected[-1]["val_accuracy"] if rejected else None
        bound = "at most " if rejected and rejected[-1].get("stopped_early") else ""
        measured = f"; the last rejected step measured {bound}{last:.4f}" if rejected else ""
        patience = (report.get("schedule") or {}).get("patience")
        return (
            "Every further step cost more validation accuracy than the tolerance allows: "
            f"{len(rejected)} steps were rolled back ({patience} isolated failures in a row end "
            f"the run). The floor is {before - tolerance:.4f} (before {before:.4f} minus "
            f"tolerance {tolerance}){measured}."
        )
    if reason == "candidates_exhausted":
        kept = {}
        for unit in report.get("units", []):
            if unit.get("kept_reason"):
                kept[unit["kept_reason"]] = kept.get(unit["kept_reason"], 0) + 1
        detail = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in sorted(kept.items()))
        return f"No candidate unit was left to try. Units kept, by reason: {detail or 'none'}."
    if reason == "max_steps":
        return "The safety limit on the number of validation steps was reached."
    return f"The run stopped: {reason}."


DROP = object()  # a flag (with its value) removed from the command


def suggestions(report: dict) -> list[tuple[str, str]]:
    """(what it changes, exact command) for the options that would go further: the command line
    when the run came from the CLI, else the keyword arguments of ``cswap.prune``."""
    if reached(report) or not report.get("target_status"):
        return []
    settings = report.get("settings") or {}
    tolerance = report.get("tolerance", 0.005)
    changes = []  # (what, {flag: value | None (bare) | DROP}, keyword arguments)
    if report.get("stop_reason") in ("tolerance_unmet", "max_steps"):
        looser = f"{2 * tolerance:g}"
        changes.append(
            (f"allow a {looser} accuracy drop", {"--tolerance": looser}, f"tolerance={looser}")
        )
        if (report.get("compensation") or {}).get("mode") != "lstsq":
            changes.append(
                ("refit the layers that read removed units", {"--compensate": "lstsq"},
                 "compensate='lstsq'")
            )  # fmt: skip
        if any(s["paired_se"] > tolerance for s in report.get("steps", [])):
            changes.append(
                ("validate on the whole pool (steps were noisy)", {"--validation-size": DROP},
                 "a larger validation set")
            )  # fmt: skip
    if not settings.get("allow_critical", True):
        changes.append(
            ("let critical units be removed, last", {"--allow-critical": None},
             "allow_critical=True")
        )  # fmt: skip
    if settings.get("ignored_layers"):
        changes.append(("prune the ignored layers too", {"--ignore": DROP}, "ignored_layers=()"))
    command = report.get("command")
    return [
        (what, _changed_command(command, change) if command else f"cswap.prune(..., {keywords})")
        for what, change, keywords in changes
    ]


def _changed_command(command: list[str], change: dict) -> str:
    args = list(command)
    for flag, value in change.items():
        while flag in args:  # drop every occurrence, with its value
            position = args.index(flag)
            del args[position : position + (1 if flag.startswith("--allow") else 2)]
        if flag == "--allow-critical":
            args = [a for a in args if a != "--protect-critical"]
        if value is DROP:
            continue
        args += [flag] if value is None else [flag, value]
    if "--out" in args:
        position = args.index("--out") + 1
        args[position] = args[position].rstrip("/") + "-next"
    return shlex.join(args)


# ----------------------------------------------------------------------------- sections


def _fraction(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _ratio(before, after) -> str:
    if not before or after is None:
        return "-"
    return f"x{after / before:.2f}"


def verdict_section(report: dict) -> str:
    if not report.get("target_status"):  # `cswap score`: the categories are the result
        counts = report.get("categories") or {}
        listed = ", ".join(f"{n} {name}" for name, n in counts.items())
        return (
            f"<section id=verdict class=reached><h1 id=headline>{e(headline(report))}</h1>"
            f"<p>{report.get('units_total', 0)} units scored: {e(listed)}.</p></section>"
        )
    state = "reached" if reached(report) else "missed"
    test_before, test_after = report.get("test_accuracy_before"), report.get("test_accuracy_after")
    val_before, val_after = report.get("val_accuracy_before"), report.get("val_accuracy_after")
    if test_before is not None and test_after is not None:
        accuracy = f"test accuracy {test_before:.4f} -> {test_after:.4f}"
        accuracy += f" ({(test_after - test_before) * 100:+.2f} pt)"
    elif val_before is not None and val_after is not None:
        accuracy = f"validation accuracy {val_before:.4f} -> {val_after:.4f}"
        accuracy += f" ({(val_after - val_before) * 100:+.2f} pt)"
    else:
        accuracy = ""
    sizes = [
        f"parameters {report['params_before']:,} -> {report.get('params_after', 0):,} "
        f"({_ratio(report['params_before'], report.get('params_after'))})",
        f"MACs {report['macs_before']:,} -> {report.get('macs_after', 0):,} "
        f"({_ratio(report['macs_before'], report.get('macs_after'))})",
    ]
    latency = (report.get("latency") or [None])[0]
    if latency:
        sizes.append(
            f"CPU latency {latency['before_ms']:.3f} -> {latency['after_ms']:.3f} ms "
            f"(x{latency['ratio']:.2f}, middle half of rounds x{latency['ratio_quartiles'][0]:.2f}"
            f"-x{latency['ratio_quartiles'][1]:.2f})"
        )
    tried = "".join(
        f"<li>{e(what)}:<br><code>{e(command)}</code></li>" for what, command in suggestions(report)
    )
    further = f"<p>To go further, try:</p><ul class=try>{tried}</ul>" if tried else ""
    why = "" if reached(report) else f"<p class=why>{e(stop_explanation(report))}</p>"
    targets = "".join(f"<li>{e(line)}</li>" for line in describe_targets(report))
    return f"""<section id=verdict class={state}>
<h1 id=headline>{e(headline(report))}</h1>
<p>{e(accuracy)}</p>
<p>{"<br>".join(e(line) for line in sizes)}</p>
<ul>{targets}</ul>
{why}{further}
</section>"""


def class_names(report: dict) -> list[str] | None:
    names = ((report.get("data") or {}).get("data") or {}).get("classes")
    return list(names) if names else None


def _class_label(names: list[str] | None, label: int) -> str:
    if label < 0:
        return "pooled small classes"
    return names[label] if names and 0 <= label < len(names) else f"class {label}"


def per_class_section(report: dict, arrays: dict) -> str:
    classes = report.get("per_class") or {}
    if not classes:
        return ""
    names = class_names(report)
    label_free = (report.get("calibration") or {}).get("label_free")
    measure = "agreement with the unpruned model" if label_free else "accuracy"
    split = "test" if classes.get("test") else "validation"
    table = {row["class"]: row for row in classes.get("validation", [])}
    tests = {row["class"]: row for row in classes.get("test", [])}
    order = sorted(
        table or tests,
        key=lambda c: (tests or table)[c]["after"] - (tests or table)[c]["before"],
    )
    rows = []
    for label in order:
        cells = [f"<td>{e(_class_label(names, label))}</td>"]
        for source in (table, tests):
            row = source.get(label)
            if row is None:
                cells.append("<td>-</td><td>-</td><td>-</td>")
                continue
            change = (row["after"] - row["before"]) * 100
            cells.append(
                f"<td>{row['before']:.3f}</td><td>{row['after']:.3f}</td>"
                f"<td class={'lost' if change < 0 else 'kept'}>{change:+.1f}</td>"
            )
        rows.append(f"<tr>{''.join(cells)}</tr>")
    lost = [_class_label(names, c) for c in order[:3]]
    return f"""<h2>Classes</h2>
<p>Per-class {measure} before and after, the classes that lost most ({split}) first:
{e(", ".join(lost))}.</p>
<table id=class-table><tr><th>class</th><th>val. before</th><th>val. after</th><th>pt</th>
<th>test before</th><th>test after</th><th>pt</th></tr>{"".join(rows)}</table>
{_category_classes(report, arrays, names)}"""


def _category_classes(report: dict, arrays: dict, names) -> str:
    """Which classes each category of units matters to: the mean per-class effect of its units
    (the first scoring), most negative first."""
    if "class_means" not in arrays or "categories" not in arrays:
        return ""
    means, tested = np.asarray(arrays["class_means"]), np.asarray(arrays["tested_classes"])
    categories = np.asarray(arrays["categories"]).astype(str)
    rows = []
    for category in (CRITICAL, NEUTRAL, DETRIMENTAL):
        members = categories == category
        if not members.any() or means.size == 0:
            continue
        average = means[members].mean(axis=0)
        top = np.argsort(average)[:3]
        listed = ", ".join(
            f"{_class_label(names, int(tested[i]))} ({average[i]:+.4f})" for i in top
        )
        rows.append(
            f"<tr><td>{_badge(category)} ({int(members.sum())} units)</td><td>{e(listed)}</td></tr>"
        )
    if not rows:
        return ""
    return (
        "<p>The classes each category of units matters to most: the mean change of a class's "
        "correct-class effect when one unit of the category is removed (unpruned model; "
        "negative: the class relies on those units).</p>"
        f"<table><tr><th>category</th><th>classes (mean effect)</th></tr>{''.join(rows)}</table>"
    )


def _badge(category: str | None) -> str:
    if category is None:
        return "-"
    colour = CATEGORY_COLOURS.get(category, "#444")
    return f'<span class=badge style="background:{colour}">{e(category)}</span>'


def _number(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "<td data-value=''>-</td>"
    return f"<td data-value='{value}'>{fmt.format(value)}</td>"


def unit_section(report: dict, arrays: dict) -> str:
    units = report.get("units", [])
    if not units:
        return ""
    names = class_names(report)
    effects = _unit_class_effects(arrays, names)
    rows = []
    for unit in units:
        p_values = effects.get(unit["id"], ("", None, None))
        fate = (
            f"removed at step {unit['removed_at_step']}"
            if unit.get("removed_at_step") is not None
            else f"kept: {(unit.get('kept_reason') or '-').replace('_', ' ')}"
        )
        rows.append(
            f"<tr data-category='{e(str(unit.get('category')))}'>"
            f"<td data-value='{unit['id']}'>{unit['id']}</td><td>{e(unit['layers'][0])}</td>"
            f"<td data-value='{unit['index']}'>{unit['index']}</td><td>{e(unit['kind'])}</td>"
            f"{_number(unit['params'], '{:,}')}{_number(unit['macs'], '{:,}')}"
            f"<td>{_badge(unit.get('category'))}</td>"
            f"{_number(unit.get('xi'), '{:+.5f}')}{_number(unit.get('kl'), '{:.2e}')}"
            f"<td>{e(p_values[0])}</td>{_number(p_values[1], '{:.3g}')}"
            f"{_number(p_values[2], '{:.3g}')}<td>{e(fate)}</td></tr>"
        )
    options = "".join(
        f"<option value={c}>{c}</option>"
        for c in ("all", CRITICAL, NEUTRAL, DETRIMENTAL, ESTIMATED)
    )
    return f"""<h2>Every unit</h2>
<p>Click a column to sort. xi: the unit's global causal effect (change of accuracy, fraction);
KL: mean KL divergence of the predictions when it is removed; classes: its most negative
per-class effects; p: the smallest corrected p-value of "class effect below -margin" (critical)
and the p-value of "effect above +margin" (detrimental). Category and effects are those of the
first scoring, on the unpruned model; "estimated": a unit whose side of the cut was clear
without scoring it on every calibration image (its KL is its mean on a subsample of the images,
or, far from the cut, the estimate from its consumers' refit; no test was run).</p>
<p><label>category <select id=category-filter>{options}</select></label>
<label>search <input id=unit-search type=search placeholder="layer, class, fate"></label>
<span id=unit-count>{len(units)}</span> of {len(units)} units shown</p>
<div class=scroll><table id=unit-table><thead><tr><th>unit</th><th>layer</th><th>index</th>
<th>kind</th><th>params</th><th>MACs</th><th>category</th><th>xi</th><th>KL</th>
<th>classes most hurt</th><th>p critical</th><th>p detrimental</th><th>fate</th></tr></thead>
<tbody>{"".join(rows)}</tbody></table></div>"""


def _unit_class_effects(arrays: dict, names) -> dict[int, tuple[str, float | None, float | None]]:
    """unit id -> (its three most negative class effects, min corrected p, detrimental p)."""
    if "class_means" not in arrays:
        return {}
    means = np.asarray(arrays["class_means"])
    p_values = np.asarray(arrays["class_p_values"])
    detrimental = np.asarray(arrays["detrimental_p_values"])
    tested = np.asarray(arrays["tested_classes"])
    found = {}
    for row, unit in enumerate(np.asarray(arrays["unit_ids"]).tolist()):
        if means.shape[1] == 0:
            continue
        top = np.argsort(means[row])[:3]
        text = ", ".join(f"{_class_label(names, int(tested[i]))} {means[row, i]:+.3f}" for i in top)
        found[int(unit)] = (text, float(p_values[row].min()), float(detrimental[row]))
    return found


def evidence_section(report: dict, arrays: dict) -> str:
    entries = report.get("evidence") or []
    images = arrays.get("evidence_images")
    if not entries or images is None or len(images) == 0:
        return ""
    names = class_names(report)
    units = {unit["id"]: unit for unit in report.get("units", [])}
    blocks = []
    for entry in entries:
        unit = units.get(entry["unit"], {})
        figures = "".join(
            f"<figure><img alt='calibration image {item['image']}' "
            f"src='data:image/png;base64,{_png(images[item['thumbnail']])}'>"
            f"<figcaption>{e(_class_label(names, item['label']))}: p {item['p_label_before']:.2f}"
            f" -&gt; {item['p_label_after']:.2f}<br>predicted "
            f"{e(_class_label(names, item['predicted_before']))} -&gt; "
            f"{e(_class_label(names, item['predicted_after']))}</figcaption></figure>"
            for item in entry["images"]
        )
        xi = unit.get("xi")
        blocks.append(
            f"<div class=evidence><h3>unit {entry['unit']}: {e(unit.get('layers', ['?'])[0])} "
            f"#{unit.get('index')} {_badge(unit.get('category'))} "
            f"xi {'-' if xi is None else f'{xi:+.4f}'} ({e(entry['why'])})</h3>{figures}</div>"
        )
    return f"""<h2>What the units did</h2>
<p>For the most critical units and the removed units that cost accuracy (xi &lt; 0, largest cost
first): the calibration images whose probability of their own label fell most when the unit alone
was removed from the unpruned model (with the run's compensation).</p>
{"".join(blocks)}"""


def _png(image: np.ndarray) -> str:
    from PIL import Image

    array = np.asarray(image, dtype=np.uint8)
    if array.shape[-1] == 1:
        array = array[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def latency_section(report: dict) -> str:
    rows = []
    for item in report.get("latency") or []:
        rows.append(
            f"<tr><td>{item['batch']}</td><td>{item['before_ms']:.3f} "
            f"({item['before_quartiles'][0]:.3f}-{item['before_quartiles'][1]:.3f})</td>"
            f"<td>{item['after_ms']:.3f} ({item['after_quartiles'][0]:.3f}-"
            f"{item['after_quartiles'][1]:.3f})</td><td>x{item['ratio']:.3f} "
            f"(x{item['ratio_quartiles'][0]:.3f}-x{item['ratio_quartiles'][1]:.3f})</td>"
            f"<td>{item['rounds']}</td><td>{item['threads']}</td></tr>"
        )
    if not rows:
        return ""
    return f"""<h3>CPU latency (ms per image; median, middle half of rounds in brackets)</h3>
<p>Both models timed in alternation on the same input and threads; the ratio is the median of
per-round ratios, so drift of the machine cancels.</p>
<table><tr><th>batch</th><th>before</th><th>after</th><th>after / before</th><th>rounds</th>
<th>threads</th></tr>{"".join(rows)}</table>"""


SCRIPT = """
(function () {
  var table = document.getElementById('unit-table');
  if (!table) { return; }
  var body = table.tBodies[0];
  var filter = document.getElementById('category-filter');
  var search = document.getElementById('unit-search');
  var count = document.getElementById('unit-count');
  function apply() {
    var category = filter.value, query = search.value.toLowerCase(), shown = 0;
    Array.prototype.forEach.call(body.rows, function (row) {
      var show = (category === 'all' || row.dataset.category === category) &&
        (!query || row.textContent.toLowerCase().indexOf(query) >= 0);
      row.hidden = !show;
      if (show) { shown += 1; }
    });
    count.textContent = shown;
  }
  function key(row, column) {
    var cell = row.cells[column];
    var raw = cell.dataset.value !== undefined ? cell.dataset.value : cell.textContent;
    var number = parseFloat(raw);
    return isNaN(number) ? raw.toLowerCase() : number;
  }
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (header, column) {
    header.addEventListener('click', function () {
      var ascending = header.dataset.order !== 'asc';
      header.dataset.order = ascending ? 'asc' : 'desc';
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = key(a, column), y = key(b, column);
        if (typeof x !== typeof y) { return typeof x === 'number' ? -1 : 1; }
        return (x > y ? 1 : x < y ? -1 : 0) * (ascending ? 1 : -1);
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
  filter.addEventListener('change', apply);
  search.addEventListener('input', apply);
  apply();
})();
"""

STYLE = """
body { font-family: sans-serif; max-width: 72em; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
td:first-child, th:first-child { text-align: left; }
#unit-table { font-size: 0.9em; }
#unit-table th { cursor: pointer; background: #f4f4f4; position: sticky; top: 0; }
#unit-table td, #class-table td:first-child { text-align: left; }
#unit-table td[data-value] { text-align: right; }
.scroll { max-height: 40em; overflow: auto; }
tr.no { color: #999; }
img { max-width: 100%; }
#verdict { border-left: 0.5em solid; padding: 0.2em 1em; margin-bottom: 1.5em; }
#verdict.reached { border-color: #2ca02c; background: #f3fbf3; }
#verdict.missed { border-color: #d62728; background: #fdf3f3; }
#verdict h1 { font-size: 1.5em; }
code { background: #eee; padding: 0.1em 0.3em; word-break: break-all; }
.badge { color: white; border-radius: 0.3em; padding: 0 0.4em; font-size: 0.9em; }
td.lost { color: #d62728; }
.evidence figure { display: inline-block; margin: 0 0.6em 0.6em 0; text-align: center;
  font-size: 0.8em; width: 9em; vertical-align: top; }
.evidence img { width: 6em; height: 6em; image-rendering: pixelated; border: 1px solid #ccc; }
"""


def render_html(report: dict, directory: Path, arrays: dict | None = None) -> str:
    """One self-contained page (images inlined) a person reads."""
    arrays = arrays or {}
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cswap report: {e(str(report["model"]))}</title>
<style>{STYLE}</style></head><body>
{verdict_section(report)}
{metrics_section(report, directory)}
{latency_section(report)}
{per_class_section(report, arrays)}
{unit_section(report, arrays)}
{evidence_section(report, arrays)}
{details_sections(report, directory)}
<script>{SCRIPT}</script>
</body></html>
"""


def _image(directory: Path, name: str) -> str:
    path = directory / name
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{name}" src="data:image/png;base64,{data}">'


def metrics_section(report: dict, directory: Path) -> str:
    run = [
        ("model", report["model"]),
        ("method", report["method"]),
        ("mode", report.get("mode")),
        ("compensation", (report.get("compensation") or {}).get("mode")),
        ("stop reason", report.get("stop_reason")),
    ]
    metrics = [
        ("parameters", report.get("params_before"), report.get("params_after"), "{:,}"),
        ("MACs / image", report.get("macs_before"), report.get("macs_after"), "{:,}"),
        ("CPU latency (ms, batch 1)", report.get("latency_ms_before"),
         report.get("latency_ms_after"), "{:.3f}"),
        ("validation accuracy", report.get("val_accuracy_before"),
         report.get("val_accuracy_after"), "{:.4f}"),
        ("test accuracy", report.get("test_accuracy_before"),
         report.get("test_accuracy_after"), "{:.4f}"),
    ]  # fmt: skip
    paired = (report.get("latency") or [None])[0]
    rows = "".join(
        f"<tr><td>{name}</td><td>{'-' if a is None else fmt.format(a)}</td>"
        f"<td>{'-' if b is None else fmt.format(b)}</td><td>"
        + (f"x{paired['ratio']:.2f}" if paired and name.startswith("CPU") else _ratio(a, b))
        + "</td></tr>"
        for name, a, b, fmt in metrics
    )
    return f"""<h2>Run</h2>
<table>{"".join(f"<tr><td>{k}</td><td>{e(str(v))}</td></tr>" for k, v in run)}</table>
<h2>Before and after</h2>
<table><tr><th></th><th>before</th><th>after</th><th>after / before</th></tr>{rows}</table>"""


def _ranking_section(report: dict, directory: Path) -> str:
    counts = report.get("categories")
    if counts is None:
        return (
            f"<h2>Ranking</h2><p>Units ranked by the <code>{e(str(report['method']))}</code> "
            "criterion (lowest score removed first; every unit's score is in "
            "<code>report.json</code>). No causal categories: that is C-SWAP's.</p>"
        )
    return f"""<h2>Categories (first scoring, unpruned model)</h2>
<p>{_badge(CRITICAL)} {counts.get(CRITICAL, 0)} {_badge(NEUTRAL)} {counts.get(NEUTRAL, 0)}
{_badge(DETRIMENTAL)} {counts.get(DETRIMENTAL, 0)}{_estimated_count(counts)}. Candidates are
ordered by the damage their removal does per parameter saved; critical units come last and only
when allowed.</p>
{_image(directory, "xi.png")}"""


def _estimated_count(counts: dict) -> str:
    if not counts.get(ESTIMATED):
        return ""
    return (
        f" {_badge(ESTIMATED)} {counts[ESTIMATED]} (clearly on one side of the first cut: "
        "estimated from a subsample of the images or their consumers' refit, not tested)"
    )


def _compensation_section(report: dict) -> str:
    compensation = report.get("compensation") or {}
    folds = compensation.get("folded_into") or {}
    instead = compensation.get("mean_instead_of_lstsq")
    rows = "".join(
        f"<tr><td>{e(layer)}</td><td>{e(sink)}</td>"
        + (
            f"<td>{e('mean: ' + instead[layer]) if layer in instead else 'refit'}</td>"
            if instead is not None
            else ""
        )
        + "</tr>"
        for layer, sink in folds.items()
    )
    if not rows:
        return ""
    how = "<th>how</th>" if instead is not None else ""
    return (
        "<h2>Compensation</h2><p>Where each reading layer's folded constant went.</p>"
        f"{_correction_note(compensation.get('error_correction'))}"
        f"<table><tr><th>layer</th><th>folded into</th>{how}</tr>{rows}</table>"
    )


def _correction_note(correction: dict | None) -> str:
    """One line on the error correction (the refit on the pruned model's own inputs)."""
    if not correction:
        return ""
    verdict = "applied" if correction["applied"] else "not applied"
    return (
        f"<p>Error correction {verdict}: {correction['layers_refitted']} layers refitted and "
        f"{correction['layers_shifted']} shifted on the pruned model's own inputs; on the "
        f"validation images, mean KL from the unpruned model {correction['val_kl']:.4g} with "
        f"it, {correction['val_kl_without']:.4g} without; accuracy "
        f"{correction['val_accuracy']:.4f} with it, {correction['val_accuracy_without']:.4f} "
        f"without ({correction['seconds']:.1f} s).</p>"
    )


def _timings_section(report: dict) -> str:
    totals = (report.get("timings") or {}).get("totals") or {}
    if not totals:
        return ""

    first = {name: position for position, name in enumerate(totals)}

    def order(item):  # stages in the order they ran, each followed by those nested in it
        name, entry = item
        return (first.get(entry["within"] or name, 0), entry["within"] is not None)

    rows = "".join(
        f"<tr><td>{e(name if entry['within'] is None else 'of which ' + name)}</td>"
        f"<td>{entry['count']}</td><td>{entry['seconds']:.1f}</td></tr>"
        for name, entry in sorted(totals.items(), key=order)
    )
    return f"""<h2>Where the time went</h2>
<p>Wall time per stage of the run ({report.get("total_seconds")} s in all). Prefix reuse in
scoring: {e(report.get("prefix_reuse") or "not used (no causal scoring)")}.</p>
<table><tr><th>stage</th><th>times</th><th>seconds</th></tr>{rows}</table>"""


def details_sections(report: dict, directory: Path) -> str:
    steps = "".join(
        f"<tr class={'ok' if s['accepted'] else 'no'}><td>{s['index']}</td>"
        f"<td>{s['units_tried']}</td><td>{'accepted' if s['accepted'] else 'rolled back'}</td>"
        f"<td>{s['params']:,}</td><td>{s['macs']:,}</td>"
        f"<td>{'at most ' if s.get('stopped_early') else ''}{_fraction(s['val_accuracy'])}</td>"
        f"<td>{s['paired_se']:.4f}</td></tr>"
        for s in report.get("steps", [])
    )
    layers = "".join(
        f"<tr><td>{e(row['root'])}</td><td>{row['kept']}</td><td>{row['removed']}</td></tr>"
        for row in layer_table(report)
    )
    warnings = "".join(f"<li>{e(w)}</li>" for w in report.get("warnings", []))
    settings = e(json.dumps(report.get("settings", {}), indent=1))
    return f"""{_ranking_section(report, directory)}
{_timings_section(report)}
<h2>Steps</h2>
{_image(directory, "steps.png")}
<p>A step stops validating as soon as its accuracy can no longer reach the threshold even if
every remaining image came out right; its accuracy then reads "at most".</p>
<table><tr><th>step</th><th>units</th><th>verdict</th><th>params</th><th>MACs</th>
<th>val. accuracy</th><th>paired s.e.</th></tr>{steps}</table>
<h2>Per layer</h2>
{_image(directory, "layers.png")}
<table><tr><th>group (root layer)</th><th>kept</th><th>removed</th></tr>{layers}</table>
{_compensation_section(report)}
<h2>Warnings</h2><ul>{warnings or "<li>none</li>"}</ul>
<h2>Settings</h2><pre>{settings}</pre>
<p>Machine-readable: <code>report.json</code> (every unit, its effects, category and fate) and
<code>units.npz</code> (per-class effects and p-values).</p>"""
