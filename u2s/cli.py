"""The `u2s` command line. Imports stay light: Ray, torch and friends load only inside commands."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any, get_args

import typer

from u2s.config import PRESETS, ConfigError, JobConfig, StorageConfig, dump_config, load_config
from u2s.eval.config import VLM_METRICS, MetricName

app = typer.Typer(
    help="Unsafe2Safe: turn image datasets with private content into privacy-safe datasets, on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect job configurations.", no_args_is_help=True)


def _conventional_help_types() -> None:
    """Show option values the way command lines do (``TEXT``, ``URI``, ``KEY=VALUE``) and flags bare.

    typer 0.29 prints Python types instead (``<str>``, ``<list[str]>``), even for flags and ``--help``
    (``<bool>``); an option's own ``metavar`` still wins, and an argument with one shows just its name.
    """
    from typer.core import TyperArgument, TyperOption

    def conventional(label: str | None) -> str | None:
        if label and label.startswith("<") and label.endswith(">"):
            name = label[1:-1].removeprefix("list[").removesuffix("]")
            return {"str": "TEXT", "int": "INTEGER", "float": "FLOAT"}.get(name, name.upper())
        return label

    option_type, argument_type = TyperOption.display_type_rich, TyperArgument.display_type_rich

    def option(self: TyperOption, ctx: typer.Context) -> str | None:
        return None if self.is_flag else conventional(self.metavar or option_type(self, ctx))

    def argument(self: TyperArgument, ctx: typer.Context) -> str | None:
        return None if self.metavar else conventional(argument_type(self, ctx))

    TyperOption.display_type_rich = option  # type: ignore[method-assign]
    TyperArgument.display_type_rich = argument  # type: ignore[method-assign]


_conventional_help_types()
app.add_typer(config_app, name="config")

PresetOpt = Annotated[
    str | None,
    typer.Option(
        "--preset",
        "-p",
        metavar="NAME",
        rich_help_panel="Config",
        help=f"Bundled preset: {', '.join(PRESETS)}.",
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", rich_help_panel="Config", help="YAML job config (merged over the preset)."
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        rich_help_panel="Config",
        help="Override a config field, e.g. stage2.seed=7 (value parsed as YAML; repeatable).",
    ),
]

RAY_ADDRESS_HELP = (
    "Ray cluster address; default: $RAY_ADDRESS, else a running `ray start` head, else a private local "
    "cluster (`local` forces a private one)."
)


def io_overrides(
    input: str | None = None,
    input_format: str | None = None,
    output: str | None = None,
    sensitive_output: str | None = None,
    ray_address: str | None = None,
) -> list[str]:
    """Shortcut options → `--set` overrides (shared by the CLI and the Ray job entrypoint)."""
    pairs = {"input.uri": input, "input.format": input_format, "output.uri": output,
             "output.sensitive_uri": sensitive_output, "ray.address": ray_address}  # fmt: skip
    return [f"{key}={value}" for key, value in pairs.items() if value is not None]


def resolve_config(preset: str | None, config: Path | None, overrides: list[str]) -> JobConfig:
    """Load and validate, or exit with status 2 and the list of problems (before Ray starts)."""
    if not preset and not config:
        raise typer.BadParameter("give --preset and/or --config")
    try:
        return load_config(preset=preset, path=config, overrides=overrides)
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None


#: Help panels of the run and submit options.
IO_PANEL, CONFIG_PANEL, RESUME_PANEL, CLUSTER_PANEL = "Input and output", "Config", "Resuming", "Cluster"


def _input_formats() -> str:
    import typing

    from u2s.config import InputConfig

    return ", ".join(typing.get_args(InputConfig.model_fields["format"].annotation))


def preset_defaults(key: str) -> str:
    """`` (default: cpu-tiny: X; paper: Y)`` for a dotted config key the presets set (help texts)."""
    import yaml

    from u2s.config import preset_text

    values = []
    for name in PRESETS:
        node: object = yaml.safe_load(preset_text(name))
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            values.append(f"{name}: {node}")
    return f" (default: {'; '.join(values)})" if values else ""


def _io_option(metavar: str, help: str, key: str) -> Any:
    """An input/output option of `run` and `submit` (their values are as the cluster sees them)."""
    return typer.Option(metavar=metavar, rich_help_panel=IO_PANEL, help=help + preset_defaults(key))


InputOpt = Annotated[
    str | None, _io_option("URI", "Input images: a local path or s3:// prefix.", "input.uri")
]
InputFormatOpt = Annotated[str | None, _io_option("FORMAT", f"{_input_formats()}.", "input.format")]
OutputOpt = Annotated[str | None, _io_option("URI", "Safe dataset (published).", "output.uri")]
SensitiveOutputOpt = Annotated[
    str | None,
    _io_option("URI", "Sensitive table (captions, instructions, source paths).", "output.sensitive_uri"),
]


@app.command()
def run(
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    input: InputOpt = None,
    input_format: InputFormatOpt = None,
    output: OutputOpt = None,
    sensitive_output: SensitiveOutputOpt = None,
    stage1_from: Annotated[
        str | None,
        typer.Option(
            metavar="URI",
            rich_help_panel=IO_PANEL,
            help="Take the rows, their ids and stage 1's results from an earlier run's sensitive output "
            "and only edit (no VLM or LLM is loaded); images are read from each row's source. Rows without "
            "a stage-1 result there stay error rows (--retry-errors cannot fix them here). Sets "
            "input.stage1_from.",
        ),
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(metavar="ADDRESS", rich_help_panel=CLUSTER_PANEL, help=RAY_ADDRESS_HELP)
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            rich_help_panel=RESUME_PANEL,
            help="Continue an interrupted run in the same outputs: rows it finished are kept and not "
            "processed again. Refused if the config or the input changed since, unless --force.",
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            rich_help_panel=RESUME_PANEL,
            help="With --resume: resume even if the config or input changed.",
        ),
    ] = False,
    retry_errors: Annotated[
        bool,
        typer.Option(
            "--retry-errors",
            rich_help_panel=RESUME_PANEL,
            help="With --resume: process the earlier attempts' error rows again; their new rows replace "
            "them in both tables.",
        ),
    ] = False,
) -> None:
    """Anonymize a dataset: stage 1 (inspect, describe, instruct), stage 2 (edit), Parquet sinks."""
    if retry_errors and not resume:
        raise typer.BadParameter("needs --resume", param_hint="--retry-errors")
    overrides = io_overrides(input, input_format, output, sensitive_output, ray_address) + (set_ or [])
    if stage1_from is not None:
        overrides.append(f"input.stage1_from={stage1_from}")
    cfg = resolve_config(preset, config, overrides)
    from u2s.io.errors import InputError
    from u2s.io.storage import OutputUnavailable
    from u2s.io.writers import OutputExistsError
    from u2s.pipeline import JobFailed, JobInterrupted, format_summary
    from u2s.pipeline import run as run_job
    from u2s.preflight import PreflightError, check_job
    from u2s.run_record import ResumeRefused

    try:
        check_job(cfg)  # before Ray starts: each problem is one line with its fix
    except PreflightError as e:
        typer.echo(f"u2s run: {e}", err=True)
        raise typer.Exit(2) from None
    try:
        summary = run_job(cfg, resume=resume, force=force, retry_errors=retry_errors, progress=True)
    except (InputError, OutputExistsError, OutputUnavailable, ResumeRefused) as e:
        typer.echo(f"u2s run: {e}", err=True)
        raise typer.Exit(2) from None
    except JobInterrupted as e:
        typer.echo(f"u2s run: {e}", err=True)
        raise typer.Exit(130) from None
    except JobFailed as e:
        typer.echo(f"u2s run: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(format_summary(summary))


@app.command()
def finetune(
    config: Annotated[
        Path,
        typer.Option(
            "--config",
            "-c",
            metavar="FILE",
            rich_help_panel=CONFIG_PANEL,
            help="YAML fine-tuning config: runs (safe and sensitive tables), editor, method, storage_path, "
            "the recipe (docs/finetuning.md).",
        ),
    ],
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            metavar="KEY=VALUE",
            rich_help_panel=CONFIG_PANEL,
            help="Override a config field, e.g. max_steps=2000 or lora.rank=8 (value parsed as YAML; "
            "repeatable).",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            rich_help_panel=RESUME_PANEL,
            help="Continue the experiment at storage_path/name from its latest checkpoint (weights, "
            "optimizer, EMA, data position). Without it an existing experiment there is refused.",
        ),
    ] = False,
) -> None:
    """Fine-tune an editor on earlier runs' pairs on Ray Train; prints the checkpoint that
    `--set stage2.<editor>.weights=<checkpoint>` loads in the next run."""
    from u2s.finetune.config import load_finetune_config

    try:
        cfg = load_finetune_config(config, set_ or [])
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    from u2s.finetune.trainer import FinetuneError
    from u2s.finetune.trainer import finetune as run_finetune

    try:
        result = run_finetune(cfg, resume=resume)
    except FinetuneError as e:
        typer.echo(f"u2s finetune: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo("pairs: " + ", ".join(f"{name} {count}" for name, count in result.counts.items()))
    shown = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}
    typer.echo("metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    typer.echo(f"checkpoint: {result.checkpoint}")
    typer.echo(f"use it: --set stage2.{cfg.editor}.weights={result.checkpoint}")


def check_job_args(job_args: list[str]) -> None:
    """``job_args`` must parse as options of ``u2s run`` (what ``jobs/anonymize.py`` accepts); raises
    :class:`~u2s.submit.SubmitError` naming the problem."""
    if not job_args:
        return
    import shlex

    import typer.main

    from u2s.submit import CONFIG_NAME, SubmitError

    command = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    try:
        command.make_context("run", ["--config", CONFIG_NAME, *job_args])
    except Exception as e:  # a click usage error (typer vendors its own click: no stable class to name)
        reason = e.format_message() if hasattr(e, "format_message") else type(e).__name__
        raise SubmitError(f"job options {shlex.join(job_args)}: {reason}") from None


@app.command()
def submit(
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    input: InputOpt = None,
    input_format: InputFormatOpt = None,
    output: OutputOpt = None,
    sensitive_output: SensitiveOutputOpt = None,
    address: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            rich_help_panel=CLUSTER_PANEL,
            help="Ray dashboard address, e.g. http://head:8265. Default: $RAY_ADDRESS, else local.",
        ),
    ] = None,
    working_dir: Annotated[
        Path, typer.Option(help="u2s checkout uploaded as the job's working dir, with the config.")
    ] = Path("."),
    image: Annotated[
        str | None,
        typer.Option(
            help="Run the job in this u2s image (Ray's image_uri runtime env) instead of uploading "
            "a working dir."
        ),
    ] = None,
    submission_id: Annotated[str | None, typer.Option(help="Submission id (default: Ray picks one).")] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="Follow the logs, reconnecting when the stream drops; exit 0 if the job succeeded, 1 if "
            "it failed or was stopped, 3 if the cluster stayed out of reach past --reconnect-timeout "
            "(the job runs on).",
        ),
    ] = False,
    reconnect_timeout: Annotated[
        float,
        typer.Option(
            min=0, help="With --wait: how long (seconds) to keep reconnecting to an unreachable cluster."
        ),
    ] = 600.0,
    job_args: Annotated[
        list[str] | None,
        typer.Argument(metavar="[-- RUN_OPTIONS]", help="More `u2s run` options for the job, after `--`."),
    ] = None,
) -> None:
    """Submit the job to a Ray cluster (Ray Job Submission); the config is validated here first."""
    cfg = resolve_config(
        preset, config, io_overrides(input, input_format, output, sensitive_output) + (set_ or [])
    )
    from u2s.submit import UNREACHABLE_EXIT, ClusterUnreachable, SubmitError, submit_job

    try:
        check_job_args(job_args or [])
        status = submit_job(cfg, address, working_dir, image, job_args, submission_id, wait,
                            echo=typer.echo, reconnect_timeout=reconnect_timeout)  # fmt: skip
    except SubmitError as e:
        typer.echo(f"submit: {e}", err=True)
        raise typer.Exit(2) from None
    except ClusterUnreachable as e:
        typer.echo(f"submit: {e}", err=True)
        raise typer.Exit(UNREACHABLE_EXIT) from None
    if status is not None:
        raise typer.Exit(0 if status == "SUCCEEDED" else 1)


@app.command()
def plan(
    images: Annotated[int, typer.Option(min=1, help="Images in the run.")],
    gpu: Annotated[str, typer.Option(help="GPU type: H100, H200, A100, L40S, L4.")],
    bench: Annotated[
        list[Path] | None,
        typer.Option(
            help="bench/stage1.py or bench/stage2.py --json output with measured figures (repeatable)."
        ),
    ] = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    flagged: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Fraction of images stage 1 flags (the paper publishes none)."),
    ] = 0.5,
    gpus: Annotated[int | None, typer.Option(min=1, help="Total GPUs to split over the pools.")] = None,
    hours: Annotated[
        float, typer.Option(min=0.01, help="Target wall hours, when --gpus is not given.")
    ] = 24.0,
    price: Annotated[
        float | None, typer.Option(help="USD per GPU-hour of --gpu (default: a list price).")
    ] = None,
    pool_gpu: Annotated[
        list[str] | None,
        typer.Option(metavar="POOL=TYPE", help="Another GPU type for one pool, e.g. edit=L40S (repeatable)."),
    ] = None,
    cluster: Annotated[
        Path | None,
        typer.Option(
            help="Cluster config (cluster/aws.yaml, a KubeRay manifest): the groups each pool fits, groups "
            "too small for the plan, and the price of every node (head and CPU workers too)."
        ),
    ] = None,
    cpu_cost: Annotated[
        str | None,
        typer.Option(
            metavar="SECONDS|JSON",
            help="CPU-seconds per row outside the models (sizes the CPU cores per GPU): a number, or the "
            "JSON `bench/cluster_sim.py --cpu-json` writes. Default: the figure recorded in "
            "docs/benchmarks.md.",
        ),
    ] = None,
    cpu_nodes: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="With --cluster: CPU-only worker nodes held for the run (default: each CPU group at its "
            "maximum).",
        ),
    ] = None,
    verify_fail: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="stage2.verify: fraction of edits assumed to fail their check (each is edited and checked "
            "again).",
        ),
    ] = 0.25,
    finetune: Annotated[
        str | None,
        typer.Option(
            metavar="EDITOR",
            help="Size a `u2s finetune` job of this editor instead (safe_attention, instruct_pix2pix, "
            "flux_kontext): --images is then the number of training pairs.",
        ),
    ] = None,
    epochs: Annotated[float, typer.Option(min=0.01, help="With --finetune: epochs (the paper: 200).")] = 200,
    lora: Annotated[bool, typer.Option(help="With --finetune: a LoRA instead of full fine-tuning.")] = False,
    resolution: Annotated[
        int | None,
        typer.Option(min=8, help="With --finetune: training side (default: 256, flux_kontext 512)."),
    ] = None,
    mfu: Annotated[
        float,
        typer.Option(min=0.01, max=1.0, help="With --finetune: assumed share of the card's peak (MFU)."),
    ] = 0.40,
) -> None:
    """Size a run: GPUs per stage pool, pool ratios, hours and cost; prints the pool sizes to configure.

    With --finetune EDITOR, size a fine-tuning job instead: pairs x epochs x FLOP per sample at --mfu.
    Exits 1 when --cluster has no group for a pool (e.g. tensor-parallel workers need more GPUs than one
    node has), 2 on bad options.
    """
    from u2s.costs import RECORDED_CPU_COST, load_cpu_cost
    from u2s.plan import card_for, format_plan, load_cluster, make_plan, parse_pool_cards, read_bench

    if finetune is not None:
        from u2s.plan import format_finetune_plan, make_finetune_plan

        try:
            job = make_finetune_plan(finetune, images, card_for(gpu), epochs, "lora" if lora else "full",
                                     resolution, mfu, gpus, hours, price)  # fmt: skip
        except ValueError as e:
            typer.echo(f"plan: {e}", err=True)
            raise typer.Exit(2) from None
        typer.echo(format_finetune_plan(job))
        return

    cfg = resolve_config(preset or (None if config else "paper"), config, set_ or [])
    try:
        cards = parse_pool_cards(pool_gpu or [])
        nodes = load_cluster(cluster) if cluster is not None else None
        cpu = RECORDED_CPU_COST if cpu_cost is None else load_cpu_cost(cpu_cost)
        result = make_plan(cfg, images, card_for(gpu), read_bench(bench or []), flagged, gpus, hours, price,
                           cards, nodes, cpu_nodes, verify_fail, cpu)  # fmt: skip
    except (ValueError, OSError, KeyError) as e:
        typer.echo(f"plan: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_plan(result))
    if result.fit is not None and not all(result.fit.placement.values()):
        raise typer.Exit(1)


@config_app.command("show")
def config_show(
    preset: Annotated[str | None, typer.Argument(help=f"Preset: {', '.join(PRESETS)}.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Print the resolved, validated config as YAML (secrets read `<redacted>`)."""
    typer.echo(dump_config(resolve_config(preset, config, set_ or [])), nl=False)


@app.command("eval-flags")
def eval_flags(
    table: Annotated[
        str,
        typer.Argument(
            metavar="RUN_OR_TABLE",
            help="A run's sensitive table (or the _run.json beside it), or any u2s table (the safe table "
            "matches labels by id only: it publishes no paths); local or s3://.",
        ),
    ],
    labels: Annotated[
        str,
        typer.Option(
            metavar="MANIFEST",
            help="Label manifest (CSV or JSON lines): `id` or `source`/`file`; `private` or VISPR `labels`.",
        ),
    ],
    out: Annotated[
        str | None, typer.Option(help="Also write the report as JSON here (local or s3://).")
    ] = None,
    endpoint_url: Annotated[str | None, typer.Option(help="S3-compatible endpoint (default: AWS).")] = None,
) -> None:
    """Score stage 1's privacy flags against labels: accuracy, precision, recall, F1, confusion matrix."""
    from u2s.config import StorageConfig
    from u2s.eval.flags import LabelError, evaluate_flags, format_report, write_report

    storage = StorageConfig(endpoint_url=endpoint_url)
    try:
        report = evaluate_flags(table, labels, storage)
    except (LabelError, ValueError, FileNotFoundError) as e:
        typer.echo(f"eval-flags: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_report(report))
    if out:
        write_report(report, out, storage)
    if report.scored == 0:
        typer.echo("eval-flags: no labelled row could be scored", err=True)
        raise typer.Exit(1)


def _named_uri(value: str, option: str) -> tuple[str | None, str]:
    """``NAME=URI`` → (NAME, URI); a plain URI (``s3://...`` included) → (None, URI)."""
    name, sep, uri = value.partition("=")
    if sep and "://" not in name and "/" not in name:
        return name, uri
    if option == "--method":
        raise typer.BadParameter(f"expected NAME=URI, got {value!r}", param_hint=option)
    return None, value


@app.command("eval")
def eval_(
    original: Annotated[str, typer.Option(help="The original images (local path or s3://).")],
    anonymized: Annotated[
        str, typer.Option(metavar="[NAME=]URI", help="A run's safe table (NAME default: the run's editor).")
    ],
    out: Annotated[str, typer.Option(help="Output folder: metrics.parquet, summary.json, report.html.")],
    method: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME=URI", help="Another safe table to compare (repeatable)."),
    ] = None,
    original_format: Annotated[
        str | None, typer.Option(help="image_folder, class_folders, coco, parquet or manifest.")
    ] = None,
    coco_annotations: Annotated[str | None, typer.Option(help="COCO originals: instances JSON.")] = None,
    sensitive: Annotated[
        str | None, typer.Option(help="The anonymized run's sensitive table (directional CLIP, texts).")
    ] = None,
    metrics: Annotated[
        str | None,
        typer.Option(
            metavar="NAME,...",
            help=f"Comma-separated metrics, of: {', '.join(get_args(MetricName))} "
            f"(default: all but the VLM ones, {', '.join(VLM_METRICS)}).",
        ),
    ] = None,
    sample: Annotated[int | None, typer.Option(help="Evaluate only the first N originals.")] = None,
    clip_model: Annotated[str | None, typer.Option(help="CLIP HF id or path.")] = None,
    face_model: Annotated[str | None, typer.Option(help="InsightFace antelopev2 folder (else dlib).")] = None,
    vlm_model: Annotated[str | None, typer.Option(help="VLM HF id or path for the VLM metrics.")] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="YAML eval config (u2s/eval/config.py); options win."),
    ] = None,
    set_: SetOpt = None,
    endpoint_url: Annotated[str | None, typer.Option(help="S3-compatible endpoint (default: AWS).")] = None,
    ray_address: Annotated[str | None, typer.Option(help=RAY_ADDRESS_HELP)] = None,
) -> None:
    """Evaluate anonymized runs against the originals: Quality, Cheating and Privacy metrics per method."""
    from u2s.eval.config import load_eval_config
    from u2s.eval.evaluate import run_editor

    storage = {"endpoint_url": endpoint_url} if endpoint_url else {}
    name, uri = _named_uri(anonymized, "--anonymized")
    methods = {name or run_editor(uri, StorageConfig(**storage)) or "anonymized": uri}
    for item in method or []:
        extra_name, extra_uri = _named_uri(item, "--method")
        if extra_name in methods:
            raise typer.BadParameter(f"method {extra_name!r} given twice", param_hint="--method")
        methods[extra_name] = extra_uri  # type: ignore[index]  # _named_uri requires a name here
    original_cfg: dict = {"uri": original}
    for key, value in (
        ("format", original_format),
        ("coco_annotations", coco_annotations),
        ("limit", sample),
    ):
        if value is not None:
            original_cfg[key] = value
    base: dict = {"original": original_cfg, "methods": methods, "out": out, "storage": storage}
    if sensitive:
        base["sensitive_uri"] = sensitive
    if metrics:
        base["metrics"] = [m.strip() for m in metrics.split(",") if m.strip()]
    models: dict = {}
    if clip_model:
        models["clip"] = {"model": clip_model}
    if face_model:
        models["face"] = {"model_dir": face_model}
    if vlm_model:
        models["vlm"] = {"model": {"model": vlm_model}}
    if models:
        base["models"] = models
    if ray_address:
        base["ray"] = {"address": ray_address}
    try:
        cfg = load_eval_config(base, config, set_ or [])
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    from u2s.eval.evaluate import run_eval
    from u2s.eval.job import EvalInputError
    from u2s.eval.summary import format_summary
    from u2s.io.readers import InputError

    try:
        result = run_eval(cfg)
    except (EvalInputError, InputError, FileExistsError) as e:
        typer.echo(f"eval: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_summary(result.summary))
    typer.echo(f"metrics: {result.metrics_uri}\nsummary: {result.summary_uri}\nreport:  {result.report_uri}")


@app.command("eval-utility")
def eval_utility(
    original: Annotated[
        str | None, typer.Option(help="Original training split: class folders or a Parquet table.")
    ] = None,
    anonymized: Annotated[
        str | None,
        typer.Option(
            help="Anonymized training split: a u2s safe table (or its _run.json); method name 'anonymized'."
        ),
    ] = None,
    method: Annotated[
        list[str] | None, typer.Option(metavar="NAME=URI", help="Another training split (repeatable).")
    ] = None,
    test: Annotated[str | None, typer.Option(help="Original test split (class folders or Parquet).")] = None,
    out: Annotated[str | None, typer.Option(help="Write the report as JSON here (local or s3://).")] = None,
    model: Annotated[str | None, typer.Option(help="Classifier: HF id or local path.")] = None,
    mode: Annotated[str | None, typer.Option(help="finetune or linear_probe.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs (paper: 100).")] = None,
    num_workers: Annotated[
        int | None, typer.Option(help="Training workers. Default: every GPU of the cluster, else 1.")
    ] = None,
    use_gpu: Annotated[bool | None, typer.Option("--use-gpu/--no-use-gpu", help="Default: if any.")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML UtilityConfig.")] = None,
    set_: SetOpt = None,
    endpoint_url: Annotated[str | None, typer.Option(help="S3-compatible endpoint (default: AWS).")] = None,
    ray_address: Annotated[str | None, typer.Option(help=RAY_ADDRESS_HELP)] = None,
) -> None:
    """Utility: train a classifier per training split (Ray Train), report top-1 on the original test split.

    One classifier is trained on the original training split and one on each anonymized split, with the
    same settings (the paper's by default: MAE ViT-B/16, 100 epochs); each is tested on the original test
    split. Prints top-1 and its change against the original; --out writes the report as JSON.
    """
    from u2s.eval.utility import load_utility_config

    methods: dict[str, dict] = {"anonymized": {"uri": anonymized}} if anonymized else {}
    for item in method or []:
        name, sep, uri = item.partition("=")
        if not sep or not name or not uri:
            typer.echo(f"eval-utility: --method {item!r}: expected NAME=URI", err=True)
            raise typer.Exit(2)
        methods[name] = {"uri": uri}
    classifier = {k: v for k, v in {"model": model, "mode": mode, "epochs": epochs}.items() if v is not None}
    values = {
        "original": {"uri": original} if original else None, "methods": methods or None,
        "test": {"uri": test} if test else None, "out": out, "num_workers": num_workers, "use_gpu": use_gpu,
        "ray_address": ray_address, "storage": {"endpoint_url": endpoint_url} if endpoint_url else None,
        "classifier": classifier or None,
    }  # fmt: skip
    try:
        cfg = load_utility_config(config, {k: v for k, v in values.items() if v is not None}, set_ or [])
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    from u2s.eval.classifier_data import SplitError
    from u2s.eval.utility import evaluate_utility, format_report, write_report

    try:
        report = evaluate_utility(cfg)
    except (SplitError, ConfigError) as e:
        typer.echo(f"eval-utility: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_report(report))
    if cfg.out:
        write_report(report, cfg.out, cfg.storage)
        typer.echo(f"report: {cfg.out}")


@app.command("tiny-models")
def tiny_models(
    out: Annotated[Path, typer.Argument(help="Folder to write the models into.")],
    seed_offset: Annotated[int, typer.Option(help="Added to every model's default weight seed.")] = 0,
) -> None:
    """Build tiny random models of every supported family (for tests and the CPU demo)."""
    from u2s.testing.tiny_models import build_all

    for name, path in build_all(out, seed_offset=seed_offset).items():
        typer.echo(f"{name:<18}{path}")


@app.command("sample-data")
def sample_data(
    out: Annotated[Path, typer.Argument(help="Folder to write the sample images into.")],
    list_files: Annotated[
        bool, typer.Option("--list", help="Print each file: its kind, size and header.")
    ] = False,
) -> None:
    """Write the demo's sample dataset (faces, text, plates, odd formats, broken files)."""
    from u2s.demo_data import describe_samples, write_sample_dataset

    samples = write_sample_dataset(out)
    if list_files:
        typer.echo(describe_samples(samples))
        return
    broken = sum(sample.expected == "error" for sample in samples)
    images = len(samples) - broken
    typer.echo(f"{out}: {len(samples)} sample files, {images} images and {broken} broken files (they become "
               "error rows); --list shows each")  # fmt: skip


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    # u2s's own messages at INFO; other libraries' (botocore's "Found credentials"...) only from WARNING,
    # unless --verbose asks for everything.
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    logging.getLogger("u2s").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        from u2s.quiet import quiet_driver

        quiet_driver()


if __name__ == "__main__":
    app()


def run_command(command: str, argv: list[str] | None, prog_name: str) -> int:
    """Run ``u2s COMMAND`` with ``argv`` (default: the command line) and return its exit status: the
    body of a Ray job entrypoint (``jobs/*.py``)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        app([command, *args], prog_name=prog_name)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0
