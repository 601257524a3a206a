"""The ``quantflow`` command line: run, demo, pull, storage, report, serve, server, doctor.

It lives with the deployments because it sits on top of everything: by default it runs the
Prefect flow (so a CLI run shows in the UI like any other), and ``serve`` starts a server.
The core (``quantflow/``) never imports Prefect; ``--engine local`` runs the core alone.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import typer
from typer._click import Context, exceptions  # typer 0.29 vendors click: the installed click's are other classes
from typer.core import TyperGroup

from quantflow.errors import QuantflowError


class _PlainUsageErrors(TyperGroup):
    """The command line's own refusals (a value of the wrong type, a flag without its value, an unknown flag or
    command) come before any quantflow code runs, as click's boxed usage message; under either engine they print
    the one ``error: ... fix: ...`` of every other refusal instead."""

    def make_context(self, info_name, args, parent=None, **extra) -> Context:
        with _plain_usage_errors(args):
            ctx = super().make_context(info_name, list(args), parent, **extra)
        ctx.meta["quantflow.argv"] = list(args)
        return ctx

    def invoke(self, ctx: Context) -> Any:
        with _plain_usage_errors(ctx.meta.get("quantflow.argv", [])):
            return super().invoke(ctx)


@contextmanager
def _plain_usage_errors(argv: list[str]) -> Iterator[None]:
    try:
        yield
    except exceptions.NoArgsIsHelpError:
        raise  # bare `quantflow`: the help, as asked
    except exceptions.UsageError as error:
        _fail(_usage_error(error, argv))


def _usage_error(error: exceptions.UsageError, argv: list[str]) -> QuantflowError:
    """Click's message on one line, with the value it refused (typer's own message omits it)."""
    problem = " ".join(error.format_message().split())
    opts = getattr(error, "param", None) and error.param.opts
    if isinstance(error, exceptions.BadParameter) and opts:
        given = [b for a, b in zip(argv, argv[1:]) if a in opts]
        given += [a.split("=", 1)[1] for a in argv if "=" in a and a.split("=", 1)[0] in opts]
        problem += f" (got {given[-1]!r})" if given else ""
    command = error.ctx.command_path if error.ctx else "quantflow"
    return QuantflowError(problem[:1].lower() + problem[1:], f"see `{command} --help` for what it accepts")


app = typer.Typer(
    cls=_PlainUsageErrors,
    add_completion=False,
    no_args_is_help=True,
    help="Quantize an LLM (AWQ, GPTQ, RTN, bitsandbytes), evaluate every variant, report.",
)


def _fail(error: QuantflowError) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _flag_overrides(**flags: Any) -> dict[str, Any]:
    return {
        path: str(value) if isinstance(value, Path) else value for path, value in flags.items() if value is not None
    }


@app.command()
def run(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run spec; flags below override it."),
    model: Optional[str] = typer.Option(None, help="Model source: hub id, folder, .gguf, or demo:smollm2-135m."),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag, commit)."),
    methods: Optional[str] = typer.Option(
        None,
        help="Comma-separated variants with default settings: rtn, gptq, awq, awq-gptq, autoround, mixed (4.5 "
        "bits per weight), fp8, int8, bnb-nf4, bnb-fp4, bnb-int8, nvfp4, mxfp4.",
    ),
    group_size: Optional[str] = typer.Option(
        None, help="Group size for the W4/W8 integer variants made by --methods (int, 'auto' or 'none')."
    ),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda."),
    gpu_memory_gb: Optional[float] = typer.Option(None, help="GPU memory each step may use, per GPU (GiB)."),
    num_samples: Optional[int] = typer.Option(None, help="Calibration samples."),
    seq_len: Optional[int] = typer.Option(None, help="Calibration sequence length."),
    calibration: Optional[str] = typer.Option(None, help="Calibration source (builtin:pydoc, a file, hf:<name>)."),
    window: Optional[int] = typer.Option(None, help="Perplexity window in tokens."),
    max_windows: Optional[int] = typer.Option(None, help="Evaluate at most this many windows."),
    cache_dir: Optional[Path] = typer.Option(None, help="Step cache folder."),
    engine: str = typer.Option(
        "prefect", help="'prefect' runs the Prefect flow (shows in the UI); 'local' runs the core pipeline in-process."
    ),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Print the libraries' output here, not to the run's log file."
    ),
) -> None:
    """Run the whole pipeline from a spec file and/or flags."""
    from quantflow.spec import GROUPED_METHODS, RunSpec, apply_overrides, load_spec, variant_for

    try:
        _check_engine(engine)
        spec = load_spec(config) if config else RunSpec()
        overrides = _flag_overrides(
            **{
                "model.source": model,
                "model.revision": revision,
                "output.dir": output,
                "device": device,
                "gpu_memory_gb": gpu_memory_gb,
                "calibration.num_samples": num_samples,
                "calibration.seq_len": seq_len,
                "calibration.source": calibration,
                "evaluation.window": window,
                "evaluation.max_windows": max_windows,
                "output.cache_dir": cache_dir,
            }
        )
        if methods:
            extra = {} if group_size is None else {"group_size": _group_size(group_size)}
            overrides["variants"] = [
                variant_for(m, **(extra if m.strip().lower() in GROUPED_METHODS else {}))
                for m in methods.split(",")
                if m.strip()
            ]
        elif group_size is not None:
            raise QuantflowError(
                "--group-size applies to the variants made by --methods",
                "pass --methods too, or set group_size on each variant in the --config file",
            )
        spec = apply_overrides(spec, overrides, RUN_FLAGS)
        _execute(spec, engine, verbose)
    except QuantflowError as error:
        _fail(error)


RUN_FLAGS = {
    "model.source": "--model",
    "model.revision": "--revision",
    "output.dir": "--output",
    "device": "--device",
    "gpu_memory_gb": "--gpu-memory-gb",
    "calibration.num_samples": "--num-samples",
    "calibration.seq_len": "--seq-len",
    "calibration.source": "--calibration",
    "evaluation.window": "--window",
    "evaluation.max_windows": "--max-windows",
    "output.cache_dir": "--cache-dir",
    "variants": "--methods/--group-size",
}


def _group_size(text: str) -> int | str | None:
    """'--group-size' as the spec takes it: an int, 'auto', or none/null for per-channel; anything else is left for the
    spec to refuse."""
    if text.lower() in ("none", "null"):
        return None
    return int(text) if text.lstrip("-").isdigit() else text


@app.command()
def demo(
    output: Path = typer.Option(Path("runs/demo"), "--output", "-o", help="Output folder."),
    engine: str = typer.Option("prefect", help="'prefect' or 'local' (see `run --help`)."),
    storage: Optional[Path] = typer.Option(
        None, help="Data folder of the local S3 server the demo uploads to (default $QUANTFLOW_HOME/s3)."
    ),
    keep_storage: bool = typer.Option(False, help="Leave the local S3 server running afterwards."),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Print the libraries' output here, not to the run's log file."
    ),
) -> None:
    """The embedded default: SmolLM2-135M, pydoc corpus, RTN/AWQ/GPTQ W4 g64 + bnb-nf4, offline on a CPU, stored to a
    local S3."""
    import os

    from quantflow.devtools import s3server
    from quantflow.devtools.demo import demo_spec
    from quantflow.spec import StoreSpec, apply_overrides

    try:
        _check_engine(engine)
        storage = storage or s3server.default_data_dir()
        server = s3server.start(storage)
        os.environ.update(server.env())
        typer.echo(f"[quantflow] local S3 (SeaweedFS) at {server.endpoint_url}, data in {storage}", err=True)
        store = StoreSpec(uri="s3://quantflow/demo", endpoint_url=server.endpoint_url, create_bucket=True)
        try:
            spec = apply_overrides(demo_spec(output), {"output.store": store.model_dump(mode="json")})
            _execute(spec, engine, verbose)
        finally:
            if not keep_storage and s3server.stop(storage):
                typer.echo(
                    f"[quantflow] local S3 stopped; `quantflow storage up --data {storage.resolve()}` serves it again",
                    err=True,
                )
    except QuantflowError as error:
        _fail(error)


@app.command()
def pull(
    uri: str = typer.Argument(..., help="s3://bucket/prefix/model/variant/hash/ of a stored artifact."),
    dest: Path = typer.Argument(..., help="New local folder to create."),
    endpoint_url: Optional[str] = typer.Option(
        None, help="S3 endpoint (MinIO/SeaweedFS/Ceph); else AWS_ENDPOINT_URL_S3 or AWS."
    ),
) -> None:
    """Download a stored artifact and verify every file against its manifest (all or nothing)."""
    from quantflow.delivery.store import parse_uri
    from quantflow.delivery.store import pull as pull_artifact
    from quantflow.spec import StoreSpec

    try:
        bucket, _ = parse_uri(uri)
        manifest = pull_artifact(uri, dest, StoreSpec(uri=f"s3://{bucket}", endpoint_url=endpoint_url))
        typer.echo(f"verified {len(manifest['files'])} files into {dest}")
    except QuantflowError as error:
        _fail(error)


@app.command()
def storage(
    action: str = typer.Argument(..., help="up, down or status"),
    data: Optional[Path] = typer.Option(None, help="Data folder of the local S3 server (default $QUANTFLOW_HOME/s3)."),
) -> None:
    """Start, stop or show the local SeaweedFS S3 server (credentials are printed as shell exports).

    It starts on the address it last had, so links signed for it (the Prefect UI's artifacts) open again.
    """
    from quantflow.devtools import s3server

    data = data or s3server.default_data_dir()
    try:
        if action == "up":
            server = s3server.start(data)
            typer.echo(f"[quantflow] local S3 (SeaweedFS) at {server.endpoint_url}, data in {data}", err=True)
            typer.echo("\n".join(f"export {k}={v}" for k, v in server.env().items()))
        elif action == "down":
            typer.echo("stopped" if s3server.stop(data) else "not running")
        elif action == "status":
            server = s3server.running(data)
            typer.echo(f"running at {server.endpoint_url} (pid {server.pid})" if server else "not running")
        else:
            raise QuantflowError(f"unknown storage action '{action}'", "use up, down or status")
    except QuantflowError as error:
        _fail(error)


def _stop_on_term(signum: int, frame: object) -> None:
    """SIGTERM (a service manager's stop, `docker stop`, `kill`) as Ctrl-C: without it the Prefect server (and a local
    PostgreSQL) outlived a terminated `server`, and a terminated run died without stopping its steps or its flow run."""
    raise KeyboardInterrupt("SIGTERM")


def _check_engine(engine: str) -> None:
    if engine not in ("prefect", "local"):
        raise QuantflowError(f"unknown engine '{engine}'", "use --engine prefect or --engine local")


def _execute(spec, engine: str, verbose: bool = False) -> None:
    from deployments.console import run_console
    from quantflow.reporting.report import load_report
    from quantflow.spec import with_output_folder

    spec = with_output_folder(spec, datetime.now())  # the console's log goes into the folder the run will write
    before = signal.signal(signal.SIGTERM, _stop_on_term)
    try:
        with run_console(Path(spec.output.dir), verbose) as console:
            out, where = _run_engine(spec, engine)
    except KeyboardInterrupt as stop:
        how = str(stop) or "Ctrl-C"
        typer.secho(
            f"stopped ({how}): the run and its steps stopped; finished steps stay in the cache, so the same command "
            "resumes from them",
            fg=typer.colors.YELLOW,
            err=True,
        )
        raise typer.Exit(128 + (signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)) from None
    finally:
        signal.signal(signal.SIGTERM, before)  # a caller in this process (a test's CliRunner) keeps its own
    report = load_report(out / "report.json")
    typer.echo((out / "report.md").read_text().split("\n## Protocol")[0])
    typer.echo(f"artifacts: {out.resolve()}  best: {report.best}")
    for row in report.rows:
        if row.artifact_uri:
            typer.echo(f"stored: {row.name} -> {row.artifact_uri}")
    if where:
        typer.echo(where)
    if console.log:
        typer.echo(f"log: {console.log}")


def _run_engine(spec, engine: str) -> tuple[Path, str | None]:
    """The run's output folder, and for the Prefect engine the lines that name its flow run."""
    if engine == "local":
        from quantflow.pipeline import run as run_pipeline

        # the core's log lines: into the run's log file, or here with --verbose
        return run_pipeline(spec, progress=lambda message: print(f"[quantflow] {message}", file=sys.stderr)), None
    if engine == "prefect":
        from deployments.prefect_home import use_quantflow_home

        use_quantflow_home()  # before Prefect is imported
        from flows.run import run_flow

        return run_flow(spec)
    raise AssertionError(engine)  # _check_engine ran first


@app.command()
def report(
    path: Path = typer.Argument(..., help="report.json of an earlier run."),
    max_ppl_increase: Optional[float] = typer.Option(
        None, help="Re-pick the best variant under this perplexity increase (%)."
    ),
    max_size_ratio: Optional[float] = typer.Option(None, help="...and at most this fraction of the baseline's size."),
) -> None:
    """Re-render report.md and plots from report.json, optionally under new constraints."""
    from pydantic import ValidationError

    from quantflow.reporting.report import load_report, pareto, pick_best, write_report
    from quantflow.spec import ConstraintsSpec, explain

    if not path.is_file():
        _fail(QuantflowError(f"{path} does not exist", "pass the report.json written by `quantflow run`"))
    try:
        data = load_report(path)
    except ValueError as error:
        _fail(
            QuantflowError(
                f"{path} is not a quantflow report ({str(error).splitlines()[0]})",
                "pass the report.json written by `quantflow run`",
            )
        )
    try:
        constraints = ConstraintsSpec.model_validate(
            {
                **data.constraints.model_dump(),
                **_flag_overrides(max_ppl_increase_pct=max_ppl_increase, max_size_ratio=max_size_ratio),
            }
        )
    except ValidationError as error:
        _fail(
            explain(
                error,
                "command-line flags",
                {"max_ppl_increase_pct": "--max-ppl-increase", "max_size_ratio": "--max-size-ratio"},
            )
        )
    best, reason = pick_best(data.rows, constraints)
    data = data.model_copy(
        update={"constraints": constraints, "best": best, "best_reason": reason, "pareto": pareto(data.rows)}
    )
    write_report(data, path.parent)
    typer.echo(f"best: {best} ({reason}); wrote {path.parent / 'report.md'}")


@app.command()
def serve(
    port: int = typer.Option(4200, help="Port of the local Prefect server (UI at http://127.0.0.1:PORT)."),
    home: Optional[Path] = typer.Option(
        None,
        help="PREFECT_HOME of the local server (SQLite database, results); default $PREFECT_HOME, else "
        "$QUANTFLOW_HOME/prefect, where `quantflow run` and `quantflow demo` record their runs.",
    ),
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="YAML run spec the Run form opens on (default: the demo's spec)."
    ),
) -> None:
    """Start a local Prefect server and serve the quantflow flow, so the UI's Run button works on a laptop."""
    from deployments.local import serve_locally
    from deployments.prefect_home import prefect_home
    from quantflow.spec import load_spec

    try:
        spec = load_spec(config) if config else None
        serve_locally(
            port, home or prefect_home(), lambda message: typer.echo(f"[quantflow] {message}", err=True), spec
        )
    except QuantflowError as error:
        _fail(error)


@app.command()
def server(
    database: str = typer.Option(
        "sqlite", help="sqlite (one person), postgres (a local PostgreSQL, for teams) or a postgresql://... URL."
    ),
    port: int = typer.Option(4200, help="Port of the Prefect server (API and UI)."),
    home: Optional[Path] = typer.Option(
        None, help="PREFECT_HOME of the server; default $PREFECT_HOME, else $QUANTFLOW_HOME/prefect."
    ),
    data: Optional[Path] = typer.Option(
        None, help="Data folder of the local PostgreSQL (postgres); default $QUANTFLOW_HOME/postgres."
    ),
) -> None:
    """Start a Prefect server for workers to share, on SQLite or PostgreSQL; Ctrl-C stops it."""
    import os
    import time

    from deployments.local import start_server, stop_server
    from deployments.postgres import database_url, shown, stop_postgres
    from deployments.prefect_home import prefect_home
    from quantflow.infra.home import quantflow_home

    # like `serve` and `run`: nothing outside QUANTFLOW_HOME (these defaulted to .quantflow/ in the current folder)
    home, data = home or prefect_home(), data or quantflow_home() / "postgres"
    signal.signal(signal.SIGTERM, _stop_on_term)  # a service manager's stop: the same clean stop as Ctrl-C

    try:
        url = database_url(database, data)
    except QuantflowError as error:
        _fail(error)
    try:
        if url:
            os.environ["PREFECT_API_DATABASE_CONNECTION_URL"] = url
            os.environ.setdefault("PREFECT_SERVER_DATABASE_TIMEOUT", "10")  # Prefect's default: no lock queue to wait
        process = start_server(port, home)
        where = shown(url) if url and database != "postgres" else database
        typer.echo(f"[quantflow] Prefect server at http://127.0.0.1:{port}/api on {where} (Ctrl-C stops)", err=True)
        try:
            while process.poll() is None:
                time.sleep(1)
        finally:
            stop_server(process)
    except KeyboardInterrupt:
        pass
    except QuantflowError as error:
        _fail(error)
    finally:  # the local PostgreSQL stops with the server, also when the server never came up
        if database == "postgres":
            stop_postgres(data)


@app.command()
def doctor() -> None:
    """Print the version matrix and what will and won't work on this machine."""
    from quantflow.devtools.doctor import checks

    failed = 0
    for name, ok, detail in checks():
        failed += ok is False
        mark = {True: "ok  ", False: "FAIL", None: "--  "}[ok]
        typer.echo(f"[{mark}] {name}: {detail}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    app()
