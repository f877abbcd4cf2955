"""Shared tail of the benchmark scripts: the markdown report with the exact command, and ``main``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces this run."""
    return f"python bench/{script}.py " + " ".join(argv if argv is not None else sys.argv[1:])


def write_report(out: Path, title: str, script: str, argv: list[str] | None, seconds: float,
                 intro: str, body: str, picture: str | None = None) -> None:
    """Write ``out``: title, command and wall time, the method description, a picture link, the tables."""
    parts = [f"# {title}\n", f"Command: `{command_line(script, argv).strip()}` ({seconds:.0f} s on 2 CPU cores).\n",
             intro.strip() + "\n"]
    if picture:
        parts.append(f"![{title}]({picture})\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts) + body + "\n")
    print(f"wrote {out}")


def publish(out: Path, title: str, script: str, argv: list[str] | None, seconds: float, doc: str, table: str,
            body: str | None = None, picture: str | None = None) -> str:
    """Write the report (intro = the module docstring after its first paragraph; body = the table unless
    given), print the table, and return it: the common tail of the benchmark modules' ``run``."""
    write_report(out, title, script, argv, seconds, doc.split("\n\n", 1)[1], table + "\n" if body is None else body,
                 picture)
    print(table)
    return table


def run_benchmark(run: Callable, args: argparse.Namespace, argv: list[str] | None):
    """Run a benchmark after creating the folder of its ``--out`` page (its pictures are written first)."""
    out = getattr(args, "out", None)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    return run(args, argv)


def bench_main(doc: str, add_arguments: Callable, run: Callable, argv: list[str] | None = None) -> None:
    """``main`` of a benchmark module: parse its arguments and run it."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    add_arguments(parser)
    run_benchmark(run, parser.parse_args(argv), argv)
