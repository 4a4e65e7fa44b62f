"""The `swarm` command: the composition root.

It builds Settings once (in the root callback, kept on the typer context) and passes them
down. Commands are thin: parse flags, call one small function that does the work, turn its
result into output and an exit code. `main()` turns every SwarmError into one line on stderr
and its exit code (DESIGN.md: 2 bad input, 3 infrastructure unavailable, 1 the run failed).
Adapters (redis, docker, openai, uvicorn) are imported inside the commands that use them, so
`swarm --version` and `--help` stay fast.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import anyio
import typer
from pydantic import ValidationError

from swarm import __version__
from swarm.errors import InfraUnavailable, SwarmError, UserError
from swarm.models import Budget, RunSpec
from swarm.settings import Endpoint, Settings
from swarm.tui import want_tui

if TYPE_CHECKING:
    from swarm.simulator import SimConfig

T = TypeVar("T")
HOST = "127.0.0.1"  # servers bind loopback only
SIM_DEFAULT_PORT = 8900
SIM_CHECK_GOAL = "Check that the swarm simulator can plan: survey a small project in 3 parts."

app = typer.Typer(
    name="swarm",
    help="A long-horizon agent swarm orchestrator.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def run_async(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Every command's event loop: uvloop when installed (it cuts the per-request CPU of
    thousands of concurrent agents), asyncio otherwise."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return anyio.run(fn, *args)
    return anyio.run(fn, *args, backend_options={"use_uvloop": True})


# ---- settings: built once, here -------------------------------------------------------


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "SWARM_" + "__".join(str(p) for p in first["loc"]).upper()
        raise UserError(f"bad setting {name}: {first['msg']}") from None


def settings_of(ctx: typer.Context) -> Settings:
    settings = ctx.find_root().obj
    assert isinstance(settings, Settings), "the root callback builds Settings"
    return settings


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"swarm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True,
                     help="Print the version and exit."),
    ] = False,
) -> None:
    ctx.obj = load_settings()


# ---- swarm doctor ---------------------------------------------------------------------


@app.command()
def doctor(ctx: typer.Context) -> None:
    """Redis, Docker, the sandbox image, model endpoints: OK or why not (exit 3 if not)."""
    raise typer.Exit(run_async(doctor_report, settings_of(ctx)))


async def doctor_report(settings: Settings) -> int:
    from swarm.doctor import exit_code, run_checks

    checks = await run_checks(settings)
    for check in checks:
        typer.echo(check.line())
    return exit_code(checks)


# ---- swarm sim ------------------------------------------------------------------------


@app.command()
def sim(
    ctx: typer.Context,
    port: Annotated[int | None, typer.Option(
        min=0, max=65535, show_default=False,
        help=f"Port [default: {SIM_DEFAULT_PORT}; with --check a free one].")] = None,
    host: Annotated[str, typer.Option(
        help="Address to bind. Loopback unless other machines (or the containers of "
        "docker-compose.yml) must reach it; it has no authentication.")] = HOST,
    latency_ms: Annotated[int | None, typer.Option(
        min=0, show_default=False,
        help="Added latency per request [default: SWARM_SIM_LATENCY_MS].")] = None,
    faults: Annotated[str, typer.Option(
        help='Injected faults, e.g. "429=0.1,500=0.05,hang=0.01,malformed=0.05".')] = "",
    seed: Annotated[int | None, typer.Option(
        show_default=False, help="Seed of every decision [default: SWARM_SIM_SEED].")] = None,
    check: Annotated[bool, typer.Option(
        "--check", help="Start it, send one planning request through the model client, "
        "print the plan's size, and exit.")] = False,
) -> None:
    """Serve the built-in OpenAI-compatible model simulator (every answer is simulated)."""
    from swarm.simulator import SimConfig

    settings = settings_of(ctx)
    config = SimConfig.from_spec(
        faults,
        seed=settings.sim_seed if seed is None else seed,
        latency_ms=settings.sim_latency_ms if latency_ms is None else latency_ms,
    )
    if check:
        typer.echo(run_async(sim_check, settings, config, port or 0))
    else:
        serve_sim(config, host, SIM_DEFAULT_PORT if port is None else port)


def serve_sim(config: SimConfig, host: str, port: int) -> None:
    from swarm.simulator import run_simulator_forever

    try:
        run_simulator_forever(config, host, port)
    except OSError as exc:
        raise UserError(f"cannot serve the simulator on {host}:{port}: "
                        f"{exc.strerror or exc}") from None


async def sim_check(settings: Settings, config: SimConfig, port: int) -> str:
    """Serve the simulator in-process and plan one goal through llm.py and the planner: the
    same path a run takes. The line it returns says what came back."""
    from swarm.simulator import MODEL, serve_simulator

    async with anyio.create_task_group() as tg:
        try:
            bound = await tg.start(serve_simulator, config, HOST, port)
        except OSError as exc:
            raise UserError(f"cannot serve the simulator on {HOST}:{port}: {exc.strerror}"
                            ) from None
        base_url = f"http://{HOST}:{bound}/v1"
        try:
            nodes = await plan_once(settings, Endpoint(base_url=base_url, model=MODEL,
                                                       timeout_s=30))
        finally:
            tg.cancel_scope.cancel()
    shown = ", ".join(nodes[:6]) + (", ..." if len(nodes) > 6 else "")
    return (f"simulator OK: {base_url} answered a planning request with a plan of "
            f"{len(nodes)} nodes ({shown}) [simulated]")


async def plan_once(settings: Settings, endpoint: Endpoint) -> list[str]:
    """Node ids of the plan the planner gets from `endpoint` for SIM_CHECK_GOAL."""
    from swarm.llm import LLM
    from swarm.planner import Planner

    llm = LLM({"planner": endpoint})
    try:
        plan = await Planner(llm, max_nodes=settings.max_nodes).plan("sim-check", SIM_CHECK_GOAL)
    finally:
        await llm.aclose()
    return [node.id for node in plan.nodes]


# ---- runs -----------------------------------------------------------------------------

ROLES = ("planner", "worker", "merger")


def parse_pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{what} {item!r} must look like KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def build_spec(settings: Settings, goal: str | None, workflow: Path | None, params: list[str],
               max_agents: int | None, budget: Budget, output: Path | None,
               models: list[str], simulate: bool, sandbox: str) -> RunSpec:
    from swarm.merge import check_output_dir
    from swarm.workflow import load_workflow

    if (goal is None) == (workflow is None):
        raise UserError("give a GOAL or --workflow FILE (one of them)")
    roles = parse_pairs(models, "--model")
    if bad := sorted(set(roles) - set(ROLES)):
        raise UserError(f"--model role {bad[0]!r} is not one of {', '.join(ROLES)}")
    if output is not None:
        output = output.resolve()
        check_output_dir(output)
    common = dict(max_agents=max_agents or settings.max_agents, budget=budget, models=roles,
                  simulate=simulate, sandbox=sandbox,
                  output_dir=str(output) if output else None)
    if workflow is not None:
        wf = load_workflow(workflow, parse_pairs(params, "--param"), max_nodes=settings.max_nodes)
        return RunSpec(goal=wf.goal, plan=wf.plan, mounts=wf.mounts, workflow_name=wf.name,
                       **common)
    if params:
        raise UserError("--param only applies to --workflow")
    assert goal is not None
    if not goal.strip():
        raise UserError("the goal is empty")
    return RunSpec(goal=goal, **common)


@app.command()
def run(
    ctx: typer.Context,
    goal: Annotated[str | None, typer.Argument(help="What the swarm should achieve.")] = None,
    workflow: Annotated[Path | None, typer.Option(help="A workflow YAML file.")] = None,
    param: Annotated[list[str], typer.Option(help="Workflow parameter KEY=VALUE.")] = [],  # noqa: B006
    max_agents: Annotated[int | None, typer.Option(min=1, help="Agents at once.")] = None,
    budget_usd: Annotated[float | None, typer.Option(min=0.0, help="Stop at this cost.")] = None,
    budget_tokens: Annotated[int | None, typer.Option(min=1, help="Stop at these tokens.")] = None,
    budget_steps: Annotated[int | None, typer.Option(min=1, help="Stop at these steps.")] = None,
    budget_minutes: Annotated[float | None, typer.Option(min=0.0, help="Stop after.")] = None,
    output: Annotated[Path | None, typer.Option(help="Folder for the merged result.")] = None,
    model: Annotated[list[str], typer.Option(help="ROLE=MODEL for planner/worker/merger.")] = [],  # noqa: B006
    simulate: Annotated[bool, typer.Option(help="Use the built-in simulator.")] = False,
    detach: Annotated[bool, typer.Option(help="Print the run id; run in the background.")] = False,
    submit: Annotated[bool, typer.Option(
        help="Only record the run and print its id: a `swarm coordinator` and `swarm worker`s "
        "on that Redis (docker-compose.yml's) run it; --output is a path on their side.")
    ] = False,
    no_tui: Annotated[bool, typer.Option("--no-tui", help="Plain progress lines.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="End with status as JSON.")] = False,
    sandbox: Annotated[str, typer.Option(help="docker, local or auto.")] = "auto",
    slots: Annotated[int, typer.Option(min=1, help="Worker slots in this process.")] = 256,
) -> None:
    """Plan a goal (or take a workflow), run it with a swarm of sub-agents, merge the result."""
    from swarm import commands

    settings = settings_of(ctx)
    if sandbox not in ("docker", "local", "auto"):
        raise UserError("--sandbox must be docker, local or auto")
    budget = Budget(max_cost_usd=budget_usd or None, max_tokens=budget_tokens,
                    max_steps=budget_steps,
                    max_wall_s=budget_minutes * 60 if budget_minutes else None)
    if submit and detach:
        raise UserError("--submit and --detach exclude each other: --submit starts nothing here")
    # Run here, with no endpoint configured, the simulator answers; submitted, the
    # coordinator's endpoints decide, and it labels simulated output itself.
    spec = build_spec(settings, goal, workflow, param, max_agents, budget, output, model,
                      simulate or (not submit and not settings.endpoints), sandbox)
    if submit:
        raise typer.Exit(run_async(commands.submit, settings, spec))
    tui = want_tui(no_tui, as_json=as_json)
    raise typer.Exit(run_async(lambda: commands.run(settings, spec, detached=detach, slots=slots,
                                                    as_json=as_json, tui=tui)))


@app.command()
def resume(
    ctx: typer.Context, run_id: Annotated[str, typer.Argument(metavar="RUN")],
    detach: Annotated[bool, typer.Option(help="Continue in the background.")] = False,
    no_tui: Annotated[bool, typer.Option("--no-tui", help="Plain progress lines.")] = False,
    slots: Annotated[int, typer.Option(min=1, help="Worker slots in this process.")] = 256,
) -> None:
    """Continue a run whose processes stopped, from its last checkpoints."""
    from swarm import commands

    settings = settings_of(ctx)
    tui = want_tui(no_tui)
    raise typer.Exit(run_async(lambda: commands.resume(settings, run_id, detached=detach,
                                                       slots=slots, tui=tui)))


@app.command()
def watch(ctx: typer.Context, run_id: Annotated[str, typer.Argument(metavar="RUN")]) -> None:
    """The terminal UI on a run, live or finished: counts, plan, nodes, events (? for keys)."""
    from swarm.tui import watch as watch_run

    settings = settings_of(ctx)
    raise typer.Exit(run_async(watch_run, settings, run_id))


@app.command()
def status(ctx: typer.Context, run_id: Annotated[str, typer.Argument(metavar="RUN")],
           as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Counts of nodes by status, usage and elapsed time."""
    from swarm import commands

    settings = settings_of(ctx)
    raise typer.Exit(run_async(lambda: commands.status(settings, run_id, as_json=as_json)))


@app.command(name="ls")
def list_runs(ctx: typer.Context,
              as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Runs, newest first, with status and whether they can be resumed."""
    from swarm import commands

    settings = settings_of(ctx)
    raise typer.Exit(run_async(lambda: commands.list_runs(settings, as_json=as_json)))


@app.command()
def result(ctx: typer.Context, run_id: Annotated[str, typer.Argument(metavar="RUN")],
           output: Annotated[Path | None, typer.Option(help="Copy the result here.")] = None
           ) -> None:
    """Print a run's RESULT.md, or copy its merged output to a folder."""
    from swarm import commands

    settings = settings_of(ctx)
    raise typer.Exit(run_async(lambda: commands.result(settings, run_id, output=output)))


@app.command()
def logs(ctx: typer.Context, run_id: Annotated[str, typer.Argument(metavar="RUN")],
         node: Annotated[str | None, typer.Argument()] = None) -> None:
    """The run's events, oldest first (only one node's with NODE)."""
    from swarm import commands

    settings = settings_of(ctx)
    raise typer.Exit(run_async(lambda: commands.logs(settings, run_id, node)))


@app.command()
def cancel(ctx: typer.Context, run_id: Annotated[str, typer.Argument(metavar="RUN")]) -> None:
    """Stop a run: no new nodes start, running steps end, what exists is merged."""
    from swarm import commands

    settings = settings_of(ctx)
    raise typer.Exit(run_async(lambda: commands.cancel(settings, run_id)))


@app.command()
def worker(ctx: typer.Context,
           slots: Annotated[int, typer.Option(min=1, help="Agents at once.")] = 256,
           simulate: Annotated[bool, typer.Option(help="Use the built-in simulator.")] = False,
           sandbox: Annotated[str, typer.Option(help="docker, local or auto.")] = "auto",
           ) -> None:
    """Take node jobs from Redis and run them until SIGTERM (then hand them back)."""
    from swarm import commands

    settings = settings_of(ctx)
    raise typer.Exit(run_async(lambda: commands.worker(settings, slots=slots,
                                                       simulate=simulate, sandbox=sandbox)))


@app.command()
def coordinator(ctx: typer.Context,
                simulate: Annotated[bool, typer.Option(help="Use the simulator.")] = False
                ) -> None:
    """Lead every unfinished run that has no live leader."""
    from swarm import commands

    settings = settings_of(ctx)
    raise typer.Exit(run_async(lambda: commands.coordinator(settings, simulate=simulate)))


@app.command()
def gc(ctx: typer.Context) -> None:
    """Remove sandboxes and containers that no live run owns."""
    from swarm import commands

    settings = settings_of(ctx)
    raise typer.Exit(run_async(lambda: commands.gc(settings)))


@app.command(name="export")
def export_cmd(ctx: typer.Context, run_id: Annotated[str, typer.Argument(metavar="RUN")],
               file: Annotated[Path, typer.Argument(metavar="FILE", help="Ends in .gz: "
                                                    "compressed.")],
               keep: Annotated[bool, typer.Option(help="Do not expire the run from Redis "
                                                  "afterwards.")] = False) -> None:
    """Write a finished run (plan, states, steps, events, usage, result) to one file; the
    run then expires from Redis after SWARM_FINISHED_RUN_TTL_S."""
    from swarm import commands

    settings = settings_of(ctx)
    raise typer.Exit(run_async(lambda: commands.export(settings, run_id, file, keep=keep)))


@app.command(name="import")
def import_cmd(ctx: typer.Context,
               file: Annotated[Path, typer.Argument(metavar="FILE")]) -> None:
    """Read a run written by `swarm export` back into Redis."""
    from swarm import commands

    settings = settings_of(ctx)
    raise typer.Exit(run_async(lambda: commands.import_(settings, file)))


# ---- entry point ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> NoReturn:
    """Console script `swarm`. Usage errors are typer's (exit 2); everything else that goes
    wrong becomes one line on stderr and the exit code its kind calls for."""
    try:
        app(args=argv, prog_name="swarm")
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:
        err = swarm_error_in(exc)
        if err is not None:
            _fail(one_line(err), err.exit_code)
        _fail(f"unexpected error: {one_line(leaf(exc))}", 1)
    sys.exit(0)  # not reached: typer exits in standalone mode


def swarm_error_in(exc: BaseException) -> SwarmError | None:
    """The SwarmError behind `exc`, looking inside exception groups (task groups raise
    them) when every error in the group is one."""
    if isinstance(exc, SwarmError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        found = [swarm_error_in(e) for e in exc.exceptions]
        if found and all(found):
            infra = [e for e in found if isinstance(e, InfraUnavailable)]
            return (infra or found)[0]
    return None


def leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if not isinstance(exc, SwarmError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text[:500] or type(exc).__name__


def _fail(message: str, code: int) -> NoReturn:
    print(f"swarm: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
