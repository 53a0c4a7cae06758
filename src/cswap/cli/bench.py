"""`cswap bench`: every method x mode x compensation x target, resumable, into one CSV."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from cswap.cli.common import BatchSizeOption, DeviceOption, fail_cleanly

OverwriteOption = Annotated[bool, typer.Option(help="Replace the file already at --out.")]


def check_json_out(out: Path | None, overwrite: bool) -> None:
    """Refuse, before any work, an --out that would replace a finished result or cannot be one."""
    from cswap.errors import CswapError

    if out is None:
        return
    if out.is_dir():
        raise CswapError(f"--out {out} is a directory: give the path of a JSON file to write.")
    if out.exists() and not overwrite:
        raise CswapError(
            f"--out {out} already holds a result: pass another path, or --overwrite to replace it."
        )


def write_whole(out: Path, text: str) -> None:
    """``text`` into ``out``, whole or not at all: a temporary file beside it is renamed into
    place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(text)
    partial.replace(out)


def write_json(out: Path | None, result: dict) -> str:
    """The result as JSON text, also written whole to ``out`` when given."""
    import json

    text = json.dumps(result, indent=1)
    if out is not None:
        write_whole(out, text + "\n")
    return text


def register(app: typer.Typer) -> None:
    @app.command("bench-ranking")
    @fail_cleanly
    def bench_ranking_command(
        models: Annotated[
            str, typer.Option(help="Comma-separated model specs.")
        ] = "zoo:vgg,zoo:resnet20,zoo:vit",
        targets: Annotated[str, typer.Option(help="Fractions of params removed.")] = "0.3,0.5,0.7",
        compensate: Annotated[str, typer.Option(help="none, mean or lstsq.")] = "lstsq",
        baselines: Annotated[str, typer.Option(help="Baseline criteria cut the same way.")] = (
            "taylor,l1,fpgm"
        ),
        variants: Annotated[
            str, typer.Option(help="C-SWAP ranking variants (default: all), see bench_ranking.")
        ] = "all",
        calib_per_class: Annotated[int, typer.Option(help="Calibration images per class.")] = 50,
        error_correction: Annotated[
            bool,
            typer.Option(
                help="lstsq: refit each cut on its own pruned inputs, as cswap prune does at "
                "the end (rows compensated 'lstsq+correction')."
            ),
        ] = False,
        out: Annotated[Path, typer.Option(help="Output directory (resumed).")] = Path("runs/rank"),
        seed: Annotated[int, typer.Option(help="Seed of every random choice.")] = 0,
        device: DeviceOption = None,
        quiet: Annotated[bool, typer.Option(help="No progress bars or info logs.")] = False,
    ) -> None:
        """Compare orders of C-SWAP's candidates (one scoring, one-shot cuts): OUT/rankings.csv."""
        from cswap.bench import parse_list
        from cswap.bench_ranking import VARIANTS, compare_rankings, ranking_table
        from cswap.devices import resolve_device

        logging.basicConfig(
            level=logging.WARNING if quiet else logging.INFO,
            format="%(asctime)s %(levelname)s %(message)s",
        )
        rows = compare_rankings(
            parse_list(models),
            tuple(float(t) for t in parse_list(targets)),
            out,
            compensate=compensate,
            baselines=parse_list(baselines),
            variants=parse_list(variants, VARIANTS),
            calib_per_class=calib_per_class,
            seed=seed,
            device=resolve_device(device),
            progress=not quiet,
            echo=typer.echo,
            error_correction=error_correction,
        )
        typer.echo(ranking_table(rows))

    @app.command("bench")
    @fail_cleanly
    def bench_command(
        models: Annotated[
            str, typer.Option(help="Comma-separated model specs.")
        ] = "zoo:vgg,zoo:resnet20,zoo:vit",
        methods: Annotated[str, typer.Option(help="Comma-separated methods, or all.")] = "all",
        modes: Annotated[str, typer.Option(help="oneshot, progressive or both.")] = (
            "oneshot,progressive"
        ),
        compensate: Annotated[
            str,
            typer.Option(
                help="Comma-separated compensations (none, mean, lstsq); default: the tool's "
                "default, lstsq. Each extra one is a further set of rows."
            ),
        ] = "lstsq",
        targets: Annotated[
            str, typer.Option(help="Fractions of params removed.")
        ] = "0.1,0.2,0.3,0.4,0.5,0.6,0.7",
        tolerance: Annotated[
            float, typer.Option(help="Progressive mode's validation tolerance.")
        ] = 0.005,
        calib_per_class: Annotated[int, typer.Option(help="Calibration images per class.")] = 50,
        validation_size: Annotated[
            int | None, typer.Option(help="Validation images (default: the rest of the pool).")
        ] = None,
        out: Annotated[Path, typer.Option(help="Output directory (resumed if it exists).")] = Path(
            "runs/bench"
        ),
        seed: Annotated[int, typer.Option(help="Seed of every random choice.")] = 0,
        device: DeviceOption = None,
        batch_size: BatchSizeOption = 256,
        quiet: Annotated[bool, typer.Option(help="No progress bars or info logs.")] = False,
        docs: Annotated[
            Path | None,
            typer.Option(
                help="Also regenerate the tables between <!-- progressive --> / <!-- grid --> "
                "markers in this markdown file (e.g. docs/benchmarks.md)."
            ),
        ] = None,
    ) -> None:
        """Benchmark methods on models: OUT/results.csv, results.json, one PNG per model.

        Rerunning with the same OUT skips the rows already there."""
        from cswap.bench import ALL_METHODS, BenchConfig, parse_list, run_bench, table, update_doc
        from cswap.devices import resolve_device

        logging.basicConfig(
            level=logging.WARNING if quiet else logging.INFO,
            format="%(asctime)s %(levelname)s %(message)s",
        )
        try:
            target_values = tuple(float(t) for t in parse_list(targets))
        except ValueError as error:
            from cswap.errors import CswapError

            raise CswapError(
                f"--targets {targets!r} is not a list of numbers.", "e.g. 0.3,0.5."
            ) from error
        config = BenchConfig(
            models=parse_list(models),
            methods=parse_list(methods, ALL_METHODS),
            modes=parse_list(modes),
            compensations=parse_list(compensate),
            targets=target_values,
            tolerance=tolerance,
            calib_per_class=calib_per_class,
            validation_size=validation_size,
            batch_size=batch_size,
            seed=seed,
            device=resolve_device(device),
        )
        if docs is not None and not docs.is_file():
            from cswap.errors import CswapError

            raise CswapError(f"--docs {docs} does not exist.", "Give an existing markdown file.")
        rows = run_bench(config, out, progress=not quiet, echo=typer.echo)
        typer.echo(table(rows))
        if docs is not None:
            update_doc(docs, rows)
            typer.echo(f"tables updated: {docs}")
        typer.echo(f"results: {out / 'results.csv'}")

    @app.command("bench-latency")
    @fail_cleanly
    def bench_latency_command(
        run: Annotated[Path, typer.Argument(help="The --out directory of a `cswap prune` run.")],
        repeats: Annotated[int, typer.Option(min=1, help="Measurements of the ratio.")] = 5,
        threads: Annotated[int, typer.Option(min=1, help="Torch threads.")] = 1,
        out: Annotated[Path | None, typer.Option(help="Also write the JSON here.")] = None,
        overwrite: OverwriteOption = False,
    ) -> None:
        """The report's paired latency measured REPEATS times: how stable the ratio is."""
        from cswap.bench import latency_stability

        check_json_out(out, overwrite)
        result = latency_stability(run, repeats=repeats, threads=threads, echo=typer.echo)
        write_json(out, result)

    @app.command("bench-scale")
    @fail_cleanly
    def bench_scale_command(
        model: Annotated[str, typer.Option(help="Model spec.")] = "zoo:resnet20",
        workers: Annotated[str, typer.Option(help="Worker counts to time.")] = "1,2",
        calib_per_class: Annotated[int, typer.Option(help="Calibration images per class.")] = 10,
        compensate: Annotated[str, typer.Option(help="none, mean or lstsq.")] = "lstsq",
        out: Annotated[Path | None, typer.Option(help="Also write the JSON here.")] = None,
        overwrite: OverwriteOption = False,
    ) -> None:
        """Scoring on Ray workers against one process: time, speedup, identical effects."""
        from cswap.bench import parse_list, scale_bench

        check_json_out(out, overwrite)
        counts = [int(c) for c in parse_list(workers)]
        result = scale_bench(
            model, workers=counts, calib_per_class=calib_per_class, compensate=compensate,
            echo=typer.echo,
        )  # fmt: skip
        write_json(out, result)

    @app.command("bench-speed")
    @fail_cleanly
    def bench_speed_command(
        model: Annotated[
            str | None,
            typer.Option(
                help="Model spec (default zoo:resnet20); with --end-to-end a comma list of zoo "
                "models (default all three)."
            ),
        ] = None,
        levers: Annotated[
            str,
            typer.Option(
                help="naive, prefix, batching, sequential, futility, screening, band, all, "
                "onestage, oneedge, twostage, cv (default with the control variate), "
                "default (what cswap prune does: prefix reuse + the exact band in stages)."
            ),
        ] = "naive,prefix,band,default",
        calib_per_class: Annotated[int, typer.Option(help="Calibration images per class.")] = 50,
        compensate: Annotated[
            str,
            typer.Option(
                help="Compensation of the scored interventions: none, mean or lstsq "
                "(lstsq scores the refitted removal, as cswap prune does; the band needs it)."
            ),
        ] = "lstsq",
        memory_budget_mb: Annotated[
            float, typer.Option(help="Memory budget of batched interventions.")
        ] = 1024.0,
        end_to_end: Annotated[
            bool,
            typer.Option(
                "--end-to-end",
                help="Time the default `cswap prune` of zoo:vgg (50%), zoo:resnet20 (30%) and "
                "zoo:vit (35%) in fresh processes, with the per-stage timings.",
            ),
        ] = False,
        exact: Annotated[
            bool,
            typer.Option(help="--end-to-end: also run with --exact-band 0 and compare."),
        ] = False,
        project: Annotated[
            bool,
            typer.Option(
                "--project",
                help="Measure one unit per group of --model (default torchvision:resnet50 and "
                "vit_b_16, random init, 224 px) and project one exact scoring round.",
            ),
        ] = False,
        runs: Annotated[
            Path, typer.Option(help="--end-to-end: where the runs go (replaced).")
        ] = Path("runs/end_to_end"),
        out: Annotated[Path | None, typer.Option(help="Also write the JSON here.")] = None,
        overwrite: OverwriteOption = False,
        seed: Annotated[int, typer.Option(help="Seed.")] = 0,
        device: DeviceOption = None,
        batch_size: BatchSizeOption = 256,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
        bracket: Annotated[
            bool,
            typer.Option(
                help="Time every other lever once before and once after naive (the spread "
                "shows drift in the machine's speed).",
            ),
        ] = True,
    ) -> None:
        """Scoring speed: naive exact scoring vs each lever and the tool's default; or, with
        --end-to-end, the default prune's wall time."""
        from cswap.bench import END_TO_END, end_to_end_bench, parse_list, speed_bench
        from cswap.devices import resolve_device

        check_json_out(out, overwrite)
        echo = (lambda _line: None) if as_json else typer.echo
        if project:
            from cswap.bench import project_scoring

            specs = parse_list(model or "torchvision:resnet50,torchvision:vit_b_16")
            result = {"projections": [project_scoring(spec, echo=echo) for spec in specs]}
            typer.echo(write_json(out, result))
            return
        if end_to_end:
            models = tuple(END_TO_END) if model is None else parse_list(model)
            result = end_to_end_bench(models, runs, exact=exact, echo=echo)
            typer.echo(write_json(out, result))
            return
        result = speed_bench(
            model or "zoo:resnet20",
            levers=parse_list(levers),
            calib_per_class=calib_per_class,
            compensate=compensate,
            batch_size=batch_size,
            memory_budget_mb=memory_budget_mb,
            seed=seed,
            device=resolve_device(device),
            bracket=bracket,
            echo=echo,
        )
        text = write_json(out, result)
        typer.echo(text)
