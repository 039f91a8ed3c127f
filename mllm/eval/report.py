"""The evaluation report, `report.html` and `report.md`, next to results.json.

One summary table of every task, then per task: its metrics, its per-category
table, the items skipped as bad and why, and a sample of items (wrong ones first) showing the input media
(image thumbnails, audio and video players, generated files), the question,
the prediction and the answer. Sampled media are copied into `report_media/`
so the report folder can be moved or shared as it is.
"""

from __future__ import annotations

import html
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mllm.eval.tasks import Item, Task
from mllm.files import atomic_write
from mllm.media import load_image, save_image

THUMBNAIL = 160  # pixels, the longer side
SKIPS_LISTED = 20  # per task; the rest are counted
HEADLINE = ("circular_accuracy", "accuracy", "judge_accuracy", "wer", "cider", "f1", "perception_score")
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; } th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f3f3f3; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.proxy { background: #fff3cd; border-radius: 3px; padding: 0 0.4em; font-size: 0.85em; }
.item { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em; margin: 0.6em 0; display: flex; gap: 1em; }
.item.wrong { border-left: 5px solid #d9534f; } .item.right { border-left: 5px solid #5cb85c; }
.media img { max-width: 160px; image-rendering: pixelated; } .media video { max-width: 240px; }
pre { white-space: pre-wrap; margin: 0.2em 0; }
"""


def fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def headline(metrics: Mapping[str, Any]) -> str:
    key = next((k for k in HEADLINE if isinstance(metrics.get(k), (int, float))), None)
    return f"{key} {fmt(metrics[key])}" if key else ""


def _scalars(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in ("categories", "proxy") and not isinstance(v, (dict, list))}


def _sample(lines: Sequence[dict], k: int) -> list[dict]:
    """Up to k items: wrong ones first (half), then right ones, in file order."""
    wrong = [line for line in lines if line.get("score", 1.0) < 1.0]
    right = [line for line in lines if line.get("score", 1.0) >= 1.0]
    first = wrong[: max(k // 2, k - len(right))]
    return first + right[: k - len(first)]


class _Media:
    """Copies (or thumbnails) a sampled medium into report_media/ and returns its HTML and Markdown."""

    def __init__(self, out: Path):
        self.out, self.count = out, 0

    def place(self, kind: str, source: Path) -> str:
        self.count += 1
        folder = self.out / "report_media"
        folder.mkdir(exist_ok=True)
        if kind == "image":
            target = folder / f"{self.count:05d}.png"
            image = load_image(source)
            scale = THUMBNAIL / max(image.height, image.width)
            if scale < 1:
                image = image.resize((max(1, round(image.height * scale)), max(1, round(image.width * scale))))
            save_image(image, target)
        else:
            target = folder / f"{self.count:05d}{source.suffix.lower()}"
            shutil.copy2(source, target)
        return target.relative_to(self.out).as_posix()

    def html(self, kind: str, rel: str) -> str:
        src = html.escape(rel)
        if kind == "image":
            return f'<img src="{src}" alt="">'
        return f'<{kind} controls preload="none" src="{src}"></{kind}>'

    @staticmethod
    def markdown(kind: str, rel: str) -> str:
        return f"![]({rel})" if kind == "image" else f"[{kind}]({rel})"


def _media_of(item: Item, line: dict, out: Path, task: Task) -> list[tuple[str, Path]]:
    inputs = [(m.type, Path(m.path)) for m in item.media if Path(m.path).is_file()]
    outputs = [(task.modality or "image", out / f) for f in line.get("files", []) if (out / f).is_file()]
    return inputs + outputs


def _md_cell(value: Any) -> str:
    return fmt(value).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]


def _html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="{"num" if isinstance(v, (int, float)) else ""}">{html.escape(fmt(v))}</td>' for v in row) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(
    out: str | Path,
    tasks: Sequence[Task],
    results: Mapping[str, Mapping[str, Any]],
    items: Mapping[str, Mapping[str, Item]],
    lines: Sequence[dict],
    skipped: Mapping[str, Sequence[str]] | None = None,
    samples: int = 6,
) -> tuple[Path, Path]:
    """Write report.html and report.md into `out`; `lines` are predictions.jsonl's rows, `skipped` each task's bad
    items ("where: reason: detail")."""
    out = Path(out)
    shutil.rmtree(out / "report_media", ignore_errors=True)
    media = _Media(out)
    run = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    title = f"Evaluation of {run.get('model', 'a model')}"
    summary = [[t.name, "proxy" if t.proxy else "benchmark", results[t.name].get("n", 0),
                results[t.name].get("skipped", 0), headline(results[t.name])] for t in tasks]
    header = ["task", "data", "n", "skipped", "headline"]
    md = [f"# {title}", "", "Tasks marked *proxy* run the built-in corpora in a benchmark's format: "
          "they are not the benchmark's numbers.", "", *_md_table(header, summary), ""]
    body = [f"<h1>{html.escape(title)}</h1>",
            "<p>Tasks marked <span class=proxy>proxy</span> run the built-in corpora in a benchmark's format: "
            "they are not the benchmark's numbers.</p>", _html_table(header, summary)]
    by_task: dict[str, list[dict]] = {}
    for line in lines:
        by_task.setdefault(line["task"], []).append(line)
    for task in tasks:
        metrics = results[task.name]
        tag = " (proxy)" if task.proxy else ""
        md += [f"## {task.name}{tag}", "", f"Source: `{task.source}`", "",
               *_md_table(["metric", "value"], list(_scalars(metrics).items())), ""]
        body += [f"<h2>{html.escape(task.name)}{' <span class=proxy>proxy</span>' if task.proxy else ''}</h2>",
                 f"<p>Source: <code>{html.escape(task.source)}</code></p>",
                 _html_table(["metric", "value"], list(_scalars(metrics).items()))]
        categories = metrics.get("categories") or {}
        if categories:
            columns = sorted({k for m in categories.values() for k in _scalars(m)})
            rows = [[c] + [m.get(k, "") for k in columns] for c, m in categories.items()]
            md += ["### Per category", "", *_md_table(["category", *columns], rows), ""]
            body += ["<h3>Per category</h3>", _html_table(["category", *columns], rows)]
        skips = list((skipped or {}).get(task.name, []))
        if skips:
            listed = skips[:SKIPS_LISTED] + ([f"... and {len(skips) - SKIPS_LISTED} more"] if len(skips) > SKIPS_LISTED else [])
            md += ["### Skipped items", "", *[f"- {_md_cell(s)}" for s in listed], ""]
            body += ["<h3>Skipped items</h3>", "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in listed) + "</ul>"]
        sampled = _sample(by_task.get(task.name, []), samples)
        if sampled:
            md += ["### Sample items", ""]
            body.append("<h3>Sample items</h3>")
        for line in sampled:
            item = items[task.name][line["id"]]
            placed = [(kind, media.place(kind, path)) for kind, path in _media_of(item, line, out, task)]
            prediction = line.get("prediction") if "prediction" in line else line.get("likelihood_choice")
            verdict = "" if "score" not in line else ("right" if line["score"] >= 1.0 else "wrong")
            said = ("the judge read", line["judged"]) if "judged" in line else ("prediction", prediction)
            fields = [("question", item.question), said, ("answer", item.answer)]
            if "likelihood_choice" in line and "prediction" in line:
                fields.insert(2, ("most likely option", line["likelihood_choice"]))
            if "score" in line:
                fields.append(("score", line["score"]))
            md += [f"**{line['id']}** {verdict}", "", " ".join(media.markdown(k, r) for k, r in placed), ""]
            md += [f"- {name}: {_md_cell(value)}" for name, value in fields] + [""]
            text = "".join(f"<div><b>{name}:</b> <pre>{html.escape(fmt(value))}</pre></div>" for name, value in fields)
            players = "".join(media.html(k, r) for k, r in placed)
            body.append(f'<div class="item {verdict}"><div class="media">{players}</div>'
                        f"<div><b>{html.escape(line['id'])}</b>{text}</div></div>")
    html_path, md_path = out / "report.html", out / "report.md"
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")
    atomic_write(html_path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    atomic_write(md_path, lambda tmp: tmp.write_text("\n".join(md) + "\n", encoding="utf-8"))
    return html_path, md_path

