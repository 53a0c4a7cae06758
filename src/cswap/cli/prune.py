"""`cswap prune`, `cswap score` and `cswap demo`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from cswap.cli.common import BatchSizeOption, DeviceOption

ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        help="zoo:NAME | torchvision:NAME | timm:NAME | hf:PATH | a saved pruned-model directory.",
    ),
]
DataOption = Annotated[
    str, typer.Option("--data", help="fashion-mnist | imagefolder:PATH[?test_fraction=F&seed=N].")
]
OutOption = Annotated[Path, typer.Option("--out", help="Output directory.")]
WorkersOption = Annotated[
    int,
    typer.Option(
        min=0,
        help="Score on N Ray workers (a local runtime; needs `pip install cswap[ray]`); "
        "0: in this process.",
    ),
]
MaxMemoryOption = Annotated[
    float | None,
    typer.Option(
        help="Refuse at once a run that cannot fit this much memory (GiB; default: what the "
        "machine has available)."
    ),
]
RayAddressOption = Annotated[
    str | None,
    typer.Option(help="Join a running Ray cluster (e.g. auto) instead of starting one."),
]


def _configure_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )


def summary_lines(report: dict) -> list[str]:
    from cswap.report_page import describe_targets
    from cswap.timings import summary as timing_summary

    def pair(name, before, after, fmt):
        def show(value):
            return "-" if value is None else fmt.format(value)

        return f"  {name:22s} {show(before):>14s} -> {show(after):>14s}"

    return [
        f"model {report['model']}, method {report['method']}, stop reason: "
        f"{report.get('stop_reason')}",
        *(f"  target: {line}" for line in describe_targets(report)),
        pair("params", report["params_before"], report.get("params_after"), "{:,}"),
        pair("MACs / image", report["macs_before"], report.get("macs_after"), "{:,}"),
        pair(
            "CPU latency (ms)",
            report.get("latency_ms_before"),
            report.get("latency_ms_after"),
            "{:.3f}",
        ),
        pair(
            "validation accuracy",
            report["val_accuracy_before"],
            report.get("val_accuracy_after"),
            "{:.4f}",
        ),
        pair(
            "test accuracy",
            report.get("test_accuracy_before"),
            report.get("test_accuracy_after"),
            "{:.4f}",
        ),
        f"  mode {report.get('mode')}, compensation {report.get('compensation', {}).get('mode')}"
        + _correction_summary(report.get("compensation", {}).get("error_correction"))
        + (
            f", categories (first scoring): {report['categories']}"
            if report.get("categories")
            else ""
        ),
        f"  units removed {report.get('units_removed')} (critical at removal: "
        f"{report.get('critical_removed', 0)}), failed {report.get('units_failed')}, "
        f"{len(report.get('steps', []))} validation steps, {report.get('total_seconds')} s",
        *(
            [f"  time: {timing_summary(report['timings']['totals'])}"]
            if report.get("timings")
            else []
        ),
    ]


def _correction_summary(correction: dict | None) -> str:
    if not correction:
        return ""
    applied = "applied" if correction["applied"] else "not applied"
    return (
        f" (error correction {applied}: validation KL {correction['val_kl']:.4g} vs "
        f"{correction['val_kl_without']:.4g}, accuracy {correction['val_accuracy']:.4f} vs "
        f"{correction['val_accuracy_without']:.4f})"
    )


def run_prune(
    *,
    model: str,
    data: str,
    out: Path,
    target_params: float | None,
    target_macs: float | None,
    tolerance: float,
    calib_per_class: int,
    validation_size: int | None,
    label_free: bool,
    export: list[str],
    resume: bool,
    overwrite: bool,
    weights: str | None,
    data_dir: str | None,
    device: str | None,
    batch_size: int,
    quiet: bool,
    options: dict,
    method: str = "cswap",
    mode: str = "progressive",
    compensate: str | None = None,
    input_size: int | None = None,
) -> dict:
    from cswap.api import DEFAULT_COMPENSATE, _check_choices, load_spec, prune, select_data
    from cswap.data.spec import check_data_spec
    from cswap.devices import resolve_device
    from cswap.inputs import check_data_sizes, check_export, check_out_dir, finished_run
    from cswap.schedule import ScheduleConfig
    from cswap.session import make_options

    compensate = compensate or DEFAULT_COMPENSATE
    # Check everything cheap before any work or any file is written.
    check_out_dir(out, overwrite=overwrite, resume=resume)
    if overwrite and finished_run(out) is not None:
        resume = False  # --overwrite redoes a finished run; there is nothing to continue
    check_export(export)
    _check_choices(method, mode, compensate)
    make_options(options)
    ScheduleConfig(target_params=target_params, target_macs=target_macs, tolerance=tolerance)
    check_data_sizes(calib_per_class, validation_size)
    check_data_spec(data)
    device = resolve_device(device)
    loaded = load_spec(model, weights=weights, input_size=input_size)
    selection = select_data(
        loaded,
        data,
        per_class=calib_per_class,
        validation_size=validation_size,
        label_free=label_free,
        correct_only=options.get("correct_only", True),
        seed=options.get("seed", 0),
        data_dir=data_dir,
        batch_size=batch_size,
        device=device,
    )
    result = prune(
        loaded.model,
        selection.calibration,
        validation=selection.validation,
        test=selection.test,
        target_params=target_params,
        target_macs=target_macs,
        tolerance=tolerance,
        method=method,
        mode=mode,
        compensate=compensate,
        label_free=label_free,
        device=device,
        progress=not quiet,
        # a saved run is its own base: cswap.load() then replays both removals in turn
        model_spec=str(Path(model).resolve()) if loaded.family == "saved" else model,
        preprocessing=loaded.preprocessing,
        checkpoint_dir=out,
        resume=resume,
        batch_size=batch_size,
        **options,
    )
    result.report["data"] = selection.summary
    if selection.summary.get("note"):  # why one class, in the data's terms
        result.report["warnings"].append(selection.summary["note"])
    result.report["command"] = command_line(
        model=model, data=data, out=out, target_params=target_params, target_macs=target_macs,
        tolerance=tolerance, method=method, mode=mode, compensate=compensate,
        calib_per_class=calib_per_class, validation_size=validation_size, label_free=label_free,
        weights=weights, data_dir=data_dir, input_size=input_size, options=options,
    )  # fmt: skip
    result.save(out, export=export, overwrite=True)
    return result.report


# option name -> (flag when true / the flag, flag when false): the CLI spelling of Options
_FLAG_NAMES = {"stat_test": "--test", "ignored_layers": "--ignore"}
_BOOLEAN_FLAGS = {"allow_critical": ("--allow-critical", "--protect-critical")}


def command_line(*, options: dict, **arguments) -> list[str]:
    """The `cswap prune` command that reproduces this run: its explicit arguments, and every
    option whose value differs from the default (the report's suggestions edit this)."""
    from cswap.session import Options

    args = ["cswap", "prune", "--model", arguments["model"], "--data", arguments["data"]]
    args += ["--out", str(arguments["out"])]
    for name in ("target_params", "target_macs", "tolerance", "calib_per_class"):
        if arguments[name] is not None:
            args += ["--" + name.replace("_", "-"), f"{arguments[name]:g}"]
    names = ("method", "mode", "compensate", "validation_size", "weights", "data_dir", "input_size")
    for name in names:
        if arguments.get(name) is not None:
            args += ["--" + name.replace("_", "-"), str(arguments[name])]
    if arguments["label_free"]:
        args.append("--label-free")
    defaults = Options()
    for name, value in options.items():
        if value == getattr(defaults, name, value) or (name == "sequential_looks" and not value):
            continue
        flag = _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        if name == "sequential_looks":
            args.append("--sequential")
        elif name == "ignored_layers":
            for layer in value:
                args += [flag, layer]
        elif isinstance(value, bool):
            yes, no = _BOOLEAN_FLAGS.get(name, (flag, "--no-" + flag[2:]))
            args.append(yes if value else no)
        else:
            args += [flag, str(value)]
    return args


def register(app: typer.Typer) -> None:
    from cswap.cli.common import fail_cleanly

    @app.command("prune")
    @fail_cleanly
    def prune_command(
        model: ModelOption,
        data: DataOption = "fashion-mnist",
        out: OutOption = Path("runs/prune"),
        target_params: Annotated[
            float | None, typer.Option(help="Fraction of all parameters to remove, in (0, 1).")
        ] = None,
        target_macs: Annotated[
            float | None, typer.Option(help="Fraction of MACs to remove, in (0, 1).")
        ] = None,
        tolerance: Annotated[
            float, typer.Option(help="Allowed validation accuracy drop (fraction).")
        ] = 0.005,
        method: Annotated[
            str,
            typer.Option(
                help="cswap (causal) or a baseline: l1 l2 taylor bn_scale fpgm lrp random."
            ),
        ] = "cswap",
        mode: Annotated[
            str, typer.Option(help="progressive (validated steps) or oneshot (one cut).")
        ] = "progressive",
        compensate: Annotated[
            str | None,
            typer.Option(
                help="lstsq (refit the reading layers by ridge least squares), mean (fold "
                "removed units' mean activation) or none. Default: lstsq."
            ),
        ] = None,
        calib_per_class: Annotated[int, typer.Option(help="Calibration images per class.")] = 50,
        validation_size: Annotated[
            int | None, typer.Option(help="Validation images (default: the rest of the pool).")
        ] = None,
        label_free: Annotated[
            bool, typer.Option(help="Use the model's own top-1 as labels.")
        ] = False,
        export: Annotated[list[str], typer.Option(help="Extra export format: onnx.")] = [],  # noqa: B006
        resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --out.")] = False,
        overwrite: Annotated[bool, typer.Option(help="Replace a report already in --out.")] = False,
        weights: Annotated[
            str | None, typer.Option(help="Local weights file for the model.")
        ] = None,
        input_size: Annotated[
            int | None,
            typer.Option(
                help="Input size in pixels (square), instead of the model's own (its resize "
                "scales along)."
            ),
        ] = None,
        data_dir: Annotated[
            str | None, typer.Option(help="Directory of the Fashion-MNIST IDX files.")
        ] = None,
        margin: Annotated[float, typer.Option(help="Practical margin delta of the tests.")] = 0.001,
        test: Annotated[str, typer.Option(help="t or wilcoxon.")] = "t",
        alpha: Annotated[float, typer.Option(help="Significance level.")] = 0.05,
        correction: Annotated[str, typer.Option(help="holm, bonferroni, bh or none.")] = "holm",
        correction_scope: Annotated[str, typer.Option(help="classes or units.")] = "classes",
        min_class_size: Annotated[
            int, typer.Option(help="Smaller classes are pooled for the tests.")
        ] = 5,
        correct_only: Annotated[
            bool, typer.Option(help="Calibrate on correctly classified images only.")
        ] = True,
        allow_critical: Annotated[
            bool,
            typer.Option(
                "--allow-critical/--protect-critical",
                help="Critical units become candidates (last, smallest damage first) when the "
                "target needs them; --protect-critical keeps the paper's strict rule.",
            ),
        ] = True,
        rank_by: Annotated[
            str, typer.Option(help="Ranking statistic: kl, logp or xi (see docs/method.md).")
        ] = "kl",
        rank_per_cost: Annotated[
            bool, typer.Option(help="Divide the damage by the params / MACs a unit saves.")
        ] = True,
        rank_categories_first: Annotated[
            bool,
            typer.Option(
                help="Detrimental, then neutral, then critical units, each by damage (critical "
                "last); default: one order by damage per cost across categories."
            ),
        ] = False,
        rank_joint: Annotated[
            bool,
            typer.Option(
                help="With kl and lstsq: rank each unit by its damage removed together with "
                "the units of its group ranked before it (the refit's interaction, in closed "
                "form); --no-rank-joint ranks by each unit's damage alone."
            ),
        ] = True,
        oneshot_start: Annotated[
            bool,
            typer.Option(
                help="Progressive: start with one validated cut to the target (see "
                "--oneshot-first), then bisection along the re-scored cut if it fails."
            ),
        ] = True,
        oneshot_first: Annotated[
            bool,
            typer.Option(
                help="The start validates the one-shot cut of the first scoring round first "
                "(one round when it passes); --no-oneshot-first re-scores the model every "
                "--rescore-every along the cut before validating it."
            ),
        ] = True,
        error_correction: Annotated[
            bool,
            typer.Option(
                help="With lstsq: refit the kept removal's layers on the pruned model's own "
                "inputs, in the order they run (corrects the error that upstream removals pass "
                "on); kept when the validation accuracy is no worse."
            ),
        ] = True,
        lstsq_memory_gb: Annotated[
            float, typer.Option(help="Memory budget of lstsq Gram matrices (GiB).")
        ] = 4.0,
        lstsq_min_rows: Annotated[
            float,
            typer.Option(
                help="Rows of calibration inputs (images x positions) per input feature that "
                "a layer needs to be refitted by lstsq; below it (e.g. a classifier after "
                "global pooling, one row per image) it is mean-compensated."
            ),
        ] = 4.0,
        max_memory_gb: MaxMemoryOption = None,
        grouping_seconds: Annotated[
            float,
            typer.Option(
                help="Torch-Pruning's grouping of one layer's channels, at most (s; a layer "
                "over it, or over --max-memory-gb, is excluded with the reason)."
            ),
        ] = 60.0,
        ignore: Annotated[list[str], typer.Option(help="Layer never to prune.")] = [],  # noqa: B006
        round_to: Annotated[int, typer.Option(help="Keep unit counts a multiple of this.")] = 1,
        initial_chunk: Annotated[
            float, typer.Option(help="First chunk, fraction of prunable params.")
        ] = 0.01,
        rescore_every: Annotated[
            float, typer.Option(help="Re-score after this fraction of params is gone.")
        ] = 0.10,
        patience: Annotated[
            int, typer.Option(help="Isolated failures in a row before stopping (tolerance_unmet).")
        ] = 8,
        seed: Annotated[int, typer.Option(help="Seed of every random choice.")] = 0,
        sequential: Annotated[
            bool,
            typer.Option(help="Sequential tests: settle critical units at 25/50/75% of samples."),
        ] = False,
        screen: Annotated[
            bool, typer.Option(help="First-order screening of clearly critical units.")
        ] = False,
        exact_band: Annotated[
            float,
            typer.Option(
                help="Progressive: score exactly only the units whose estimated damage lies "
                "within this many sd of the next cut; the rest keep the estimate. 0: every unit "
                "exactly (needs lstsq)."
            ),
        ] = 2.0,
        exact_max: Annotated[
            int,
            typer.Option(
                help="Progressive: at most this many units per scoring round exactly inside the "
                "band, the closest to the cut first (for big models); 0: no cap."
            ),
        ] = 0,
        score_images: Annotated[
            int,
            typer.Option(
                help="Score units causally on at most this many calibration images (spread "
                "over the labels); the compensation's statistics still use all of them. For "
                "many calibration images and little time. 0: all."
            ),
        ] = 0,
        sample_fraction: Annotated[
            float,
            typer.Option(
                help="Progressive: score the band first on this share of the calibration "
                "images; units that are then clearly on one side of the cut keep that mean. "
                "0: every band unit on every image."
            ),
        ] = 0.25,
        early_fraction: Annotated[
            float,
            typer.Option(
                help="Progressive: before that, score the band on this share of those images "
                "(at least 8) with the same rule. 0: no early stage."
            ),
        ] = 0.25,
        control_variate: Annotated[
            bool,
            typer.Option(
                help="Progressive: correct the band's subsample means by a cheap per-image "
                "proxy of the same KL known on every image (same mean, narrower: fewer images "
                "per verdict; only for units whose consumers are mean-folded)."
            ),
        ] = False,
        units_per_pass: Annotated[
            int | None,
            typer.Option(
                help="Interventions per forward pass; 0: as many as --memory-budget-mb allows "
                "(default: 1 on CPU, where batching measured slower; 0 on GPU)."
            ),
        ] = None,
        memory_budget_mb: Annotated[
            float, typer.Option(help="Memory budget of batched interventions.")
        ] = 1024.0,
        workers: WorkersOption = 0,
        ray_address: RayAddressOption = None,
        device: DeviceOption = None,
        batch_size: BatchSizeOption = 256,
        quiet: Annotated[bool, typer.Option(help="No progress bars or info logs.")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    ) -> None:
        """Prune a model to a target (C-SWAP or a baseline criterion); write report, model and
        checkpoints to --out."""
        _configure_logging(quiet)
        report = run_prune(
            model=model,
            data=data,
            out=out,
            target_params=target_params,
            target_macs=target_macs,
            tolerance=tolerance,
            calib_per_class=calib_per_class,
            validation_size=validation_size,
            label_free=label_free,
            export=export,
            resume=resume,
            overwrite=overwrite,
            weights=weights,
            input_size=input_size,
            data_dir=data_dir,
            device=device,
            batch_size=batch_size,
            quiet=quiet,
            method=method,
            mode=mode,
            compensate=compensate,
            options={
                "margin": margin,
                "stat_test": test,
                "alpha": alpha,
                "correction": correction,
                "correction_scope": correction_scope,
                "min_class_size": min_class_size,
                "correct_only": correct_only,
                "allow_critical": allow_critical,
                "rank_by": rank_by,
                "rank_per_cost": rank_per_cost,
                "rank_categories_first": rank_categories_first,
                "rank_joint": rank_joint,
                "oneshot_start": oneshot_start,
                "oneshot_first": oneshot_first,
                "error_correction": error_correction,
                "lstsq_memory_gb": lstsq_memory_gb,
                "lstsq_min_rows": lstsq_min_rows,
                "max_memory_gb": max_memory_gb,
                "grouping_seconds": grouping_seconds,
                "ignored_layers": tuple(ignore),
                "round_to": round_to,
                "initial_chunk": initial_chunk,
                "rescore_every": rescore_every,
                "patience": patience,
                "seed": seed,
                "sequential_looks": (0.25, 0.5, 0.75) if sequential else (),
                "screen": screen,
                "exact_band": exact_band,
                "exact_max": exact_max,
                "score_images": score_images,
                "sample_fraction": sample_fraction,
                "early_fraction": early_fraction,
                "control_variate": control_variate,
                "units_per_pass": units_per_pass,
                "memory_budget_mb": memory_budget_mb,
                "workers": workers,
                "ray_address": ray_address,
            },
        )
        if as_json:
            keys = [k for k in report if k not in ("units", "steps", "groups")]
            typer.echo(json.dumps({k: report[k] for k in keys}))
        else:
            typer.echo("\n".join(summary_lines(report)))
            typer.echo(f"report: {out / 'report.html'}")

    @app.command("score")
    @fail_cleanly
    def score_command(
        model: ModelOption,
        data: DataOption = "fashion-mnist",
        out: OutOption = Path("runs/score"),
        calib_per_class: Annotated[int, typer.Option(help="Calibration images per class.")] = 50,
        label_free: Annotated[bool, typer.Option(help="Use the model's own top-1.")] = False,
        overwrite: Annotated[bool, typer.Option(help="Replace a report already in --out.")] = False,
        weights: Annotated[str | None, typer.Option(help="Local weights file.")] = None,
        input_size: Annotated[
            int | None, typer.Option(help="Input size in pixels, instead of the model's own.")
        ] = None,
        margin: Annotated[float, typer.Option(help="Practical margin delta.")] = 0.001,
        test: Annotated[str, typer.Option(help="t or wilcoxon.")] = "t",
        alpha: Annotated[float, typer.Option(help="Significance level.")] = 0.05,
        correction: Annotated[str, typer.Option(help="holm, bonferroni, bh or none.")] = "holm",
        max_memory_gb: MaxMemoryOption = None,
        ignore: Annotated[list[str], typer.Option(help="Layer never to prune.")] = [],  # noqa: B006
        compensate: Annotated[
            str | None, typer.Option(help="Score compensated removals: mean or none.")
        ] = None,
        seed: Annotated[int, typer.Option(help="Seed.")] = 0,
        workers: WorkersOption = 0,
        ray_address: RayAddressOption = None,
        device: DeviceOption = None,
        batch_size: BatchSizeOption = 256,
        quiet: Annotated[bool, typer.Option(help="No progress bars or info logs.")] = False,
    ) -> None:
        """Score and categorise every unit without pruning (the explanation first)."""
        from cswap.api import DEFAULT_COMPENSATE, load_spec, score, select_data
        from cswap.data.spec import check_data_spec
        from cswap.devices import resolve_device
        from cswap.inputs import check_data_sizes, check_out_dir

        _configure_logging(quiet)
        check_out_dir(out, overwrite=overwrite)
        check_data_sizes(calib_per_class, None)
        check_data_spec(data)
        resolved = resolve_device(device)
        loaded = load_spec(model, weights=weights, input_size=input_size)
        selection = select_data(
            loaded,
            data,
            per_class=calib_per_class,
            label_free=label_free,
            seed=seed,
            batch_size=batch_size,
            device=resolved,
        )
        result = score(
            loaded.model,
            selection.calibration,
            validation=selection.validation,
            label_free=label_free,
            device=resolved,
            progress=not quiet,
            model_spec=model,
            compensate=compensate or DEFAULT_COMPENSATE,
            margin=margin,
            stat_test=test,
            alpha=alpha,
            correction=correction,
            ignored_layers=tuple(ignore),
            seed=seed,
            batch_size=batch_size,
            workers=workers,
            ray_address=ray_address,
            max_memory_gb=max_memory_gb,
        )
        result.report["data"] = selection.summary
        result.save(out, overwrite=True)
        typer.echo(f"categories: {result.report['categories']}; report: {out / 'report.html'}")

    @app.command("demo")
    @fail_cleanly
    def demo_command(
        out: OutOption = Path("runs/demo"),
        target_params: Annotated[float, typer.Option(help="Fraction of params to remove.")] = 0.5,
        device: DeviceOption = None,
        quiet: Annotated[bool, typer.Option(help="No progress bars or info logs.")] = False,
    ) -> None:
        """Show the zoo, then prune zoo vgg with C-SWAP and print a before / after summary."""
        from cswap.zoo.store import read_manifest

        _configure_logging(quiet)
        typer.echo("Reference zoo (Fashion-MNIST test accuracy, from the manifest):")
        for name, entry in read_manifest()["models"].items():
            typer.echo(
                f"  {name:10s} {entry['test_accuracy']:.4f}  params {entry['params']:>9,}  "
                f"MACs {entry['macs']:>11,}"
            )
        typer.echo(f"Pruning zoo:vgg to {target_params:.0%} fewer parameters ...")
        report = run_prune(
            model="zoo:vgg",
            data="fashion-mnist",
            out=out,
            target_params=target_params,
            target_macs=None,
            tolerance=0.005,
            calib_per_class=DEMO_CALIBRATION_PER_CLASS,
            validation_size=DEMO_VALIDATION_SIZE,
            label_free=False,
            export=[],
            resume=False,
            overwrite=True,
            weights=None,
            data_dir=None,
            device=device,
            batch_size=256,
            quiet=quiet,
            options={},
        )
        typer.echo("\n".join(summary_lines(report)))
        typer.echo(f"report: {out / 'report.html'}")


# The demo must finish within ~10 minutes on 2 CPU cores: a smaller calibration and validation
# set than the defaults (50 per class, the whole 5,000-image pool).
DEMO_CALIBRATION_PER_CLASS = 10
DEMO_VALIDATION_SIZE = 2000
