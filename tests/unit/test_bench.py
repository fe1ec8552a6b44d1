"""The benchmark (bench/, a package run as `python -m bench.run`): every module imports, so a
broken import shows here rather than half an hour into a run; the tables land between the
markers of docs/benchmark.md."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import bench
from bench import remote, report

MODULES = sorted(module.name for module in pkgutil.iter_modules(bench.__path__, "bench."))


def test_the_package_has_the_benchmark_and_its_contenders():
    assert {
        "bench.run", "bench.remote", "bench.plain_loop", "bench.seed_recipe", "bench.raw_save", "bench.plain_ddp"
    } <= set(MODULES)  # fmt: skip


@pytest.mark.parametrize("name", MODULES)
def test_every_bench_module_imports(name):
    importlib.import_module(name)


def test_the_tables_replace_what_is_between_the_markers(tmp_path, monkeypatch):
    docs = tmp_path / "benchmark.md"
    old_marker = "<!-- bench:begin: written by bench/run.py --update-readme -->"
    docs.write_text(f"# Benchmark\n\n{old_marker}\nold\n<!-- bench:end -->\n\nAfter.\n")
    monkeypatch.setattr(report, "DOCS", docs)

    report.update_docs("| new | table |")

    assert docs.read_text() == (
        f"# Benchmark\n\n{report.DOCS_BEGIN_LINE}\n| new | table |\n<!-- bench:end -->\n\nAfter.\n"
    )


def test_the_shipped_docs_have_the_markers():
    text = report.DOCS.read_text()
    assert report.DOCS_BEGIN in text and report.DOCS_END in text
    assert text.index(report.DOCS_BEGIN) < text.index(report.DOCS_END)


def test_the_remote_tables_replace_only_what_is_between_their_own_markers(tmp_path, monkeypatch):
    docs = tmp_path / "benchmark.md"
    ours = f"{report.DOCS_BEGIN_LINE}\nrun.py's tables\n{report.DOCS_END}\n"
    docs.write_text(f"# Benchmark\n\n{ours}\n{remote.DOCS_BEGIN}: older -->\nold\n{remote.DOCS_END}\n\nAfter.\n")
    monkeypatch.setattr(report, "DOCS", docs)

    report.update_docs(
        "| new | table |",
        begin_marker=remote.DOCS_BEGIN,
        begin_line=remote.DOCS_BEGIN_LINE,
        end_marker=remote.DOCS_END,
    )

    assert docs.read_text() == (
        f"# Benchmark\n\n{ours}\n{remote.DOCS_BEGIN_LINE}\n| new | table |\n{remote.DOCS_END}\n\nAfter.\n"
    )


def test_the_shipped_docs_have_the_remote_markers_after_run_pys():
    text = report.DOCS.read_text()
    assert text.index(report.DOCS_END) < text.index(remote.DOCS_BEGIN) < text.index(remote.DOCS_END)
