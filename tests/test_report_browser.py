"""report.html in a real headless browser (Debian's chromium, installed by `make setup`, driven by
Playwright): no console errors, the verdict first, the unit table filters and sorts."""

from __future__ import annotations

import json
import shutil

import pytest
from torch.utils.data import TensorDataset

import cswap
from cswap.report_page import headline, suggestions

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def saved_run(trained_tiny, fashion_small, tmp_path_factory):
    _, _, held_x, held_y = fashion_small
    result = cswap.prune(
        trained_tiny,
        TensorDataset(held_x[:150], held_y[:150]),
        validation=TensorDataset(held_x[150:650], held_y[150:650]),
        test=TensorDataset(held_x[650:], held_y[650:]),
        target_params=0.3,
        tolerance=0.03,
        progress=False,
        min_class_size=3,
    )
    out = tmp_path_factory.mktemp("report") / "run"
    result.save(out)
    return out, json.loads((out / "report.json").read_text())


def test_report_in_a_real_browser(saved_run, tmp_path):
    from playwright.sync_api import sync_playwright

    out, report = saved_run
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto((out / "report.html").as_uri())
            title = page.inner_text("#headline")
            assert title == headline(report)
            word = "reached" if report["stop_reason"] == "target_reached" else "missed"
            assert title.startswith(f"Target {word}:")
            # filtering to one category shows exactly that category's units
            counts = {}
            for unit in report["units"]:
                counts[unit["category"]] = counts.get(unit["category"], 0) + 1
            for category in ("neutral", "critical", "detrimental", "estimated", "all"):
                page.select_option("#category-filter", category)
                visible = page.eval_on_selector_all(
                    "#unit-table tbody tr:not([hidden])",
                    "rows => rows.map(r => r.dataset.category)",
                )
                expected = len(report["units"]) if category == "all" else counts.get(category, 0)
                assert len(visible) == expected, category
                assert category == "all" or set(visible) <= {category}
                assert page.inner_text("#unit-count") == str(expected)
            # sorting by xi (a click on its header) orders the rows by the report's xi
            page.select_option("#category-filter", "all")
            page.click("#unit-table th:nth-child(8)")
            shown = page.eval_on_selector_all(
                "#unit-table tbody tr td:first-child", "cells => cells.map(c => +c.textContent)"
            )
            xi = {unit["id"]: unit["xi"] for unit in report["units"]}
            measured = sorted(v for v in xi.values() if v is not None)
            # units without xi (estimated: not scored exactly) come after every number
            expected_order = measured + [None] * (len(xi) - len(measured))
            assert [xi[unit] for unit in shown] == expected_order
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_a_missed_target_says_why_and_what_to_try():
    report = {
        "stop_reason": "tolerance_unmet",
        "target_status": [
            {"kind": "params", "goal": 0.5, "removed": 0.062, "met": False,
             "stopped_the_run": False}
        ],
        "tolerance": 0.005,
        "settings": {"allow_critical": False, "ignored_layers": ["fc"]},
        "compensation": {"mode": "mean"},
        "steps": [{"paired_se": 0.01, "accepted": False, "val_accuracy": 0.91}],
        "command": ["cswap", "prune", "--model", "zoo:vgg", "--out", "runs/vgg", "--tolerance",
                    "0.005", "--compensate", "mean", "--protect-critical", "--ignore", "fc"],
    }  # fmt: skip
    assert headline(report) == (
        "Target missed: 6.2% of the parameters removed (goal 50%, 43.8 points short)"
    )
    base = "cswap prune --model zoo:vgg --out runs/vgg-next"
    assert suggestions(report) == [
        ("allow a 0.01 accuracy drop",
         f"{base} --compensate mean --protect-critical --ignore fc --tolerance 0.01"),
        ("refit the layers that read removed units",
         f"{base} --tolerance 0.005 --protect-critical --ignore fc --compensate lstsq"),
        ("validate on the whole pool (steps were noisy)",
         f"{base} --tolerance 0.005 --compensate mean --protect-critical --ignore fc"),
        ("let critical units be removed, last",
         f"{base} --tolerance 0.005 --compensate mean --ignore fc --allow-critical"),
        ("prune the ignored layers too",
         f"{base} --tolerance 0.005 --compensate mean --protect-critical"),
    ]  # fmt: skip
    del report["command"]
    assert suggestions(report)[0] == (
        "allow a 0.01 accuracy drop",
        "cswap.prune(..., tolerance=0.01)",
    )
