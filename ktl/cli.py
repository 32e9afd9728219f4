"""The ``ktl`` command. Errors a user can fix print as one line: ``ktl: error: …`` (exit status 2)."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import httpx

from ktl.errors import KtlError

__all__ = ["main", "build_parser"]

logger = logging.getLogger("ktl")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (not the stream of the moment the
    handler was made: a test's captured stream is closed once the test ends, and a background thread
    that logs later would hit it)."""

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger("ktl")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    for noisy in ("transformers", "diffusers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


class _Parser(argparse.ArgumentParser):
    """ktl's parsers (sub-commands inherit the class): no abbreviated flags (``--round 3`` is not
    ``--rounds 3``), and an unknown flag or choice gets a "did you mean" from every flag of the command line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def _all_options(self) -> list[str]:
        found: set[str] = set()
        stack: list[argparse.ArgumentParser] = [self]
        while stack:
            parser = stack.pop()
            for action in parser._actions:
                found.update(o for o in action.option_strings if o.startswith("--"))
                if isinstance(action, argparse._SubParsersAction):
                    stack.extend(action.choices.values())
        return sorted(found)

    def error(self, message: str) -> NoReturn:
        hints: list[str] = []
        if message.startswith("unrecognized arguments:"):
            for word in message.partition(":")[2].split():
                flag = word.partition("=")[0]
                if flag.startswith("--"):
                    others = [
                        o for o in self._all_options() if o != flag
                    ]  # e.g. --round belongs to another command
                    close = difflib.get_close_matches(flag, others, n=1, cutoff=0.7)
                    hints += [f"{flag} → did you mean {close[0]}?"] if close else []
        elif "invalid choice:" in message:
            wrong = message.partition("invalid choice: ")[2].split("'")[1] if "'" in message else ""
            choices = message.partition("(choose from ")[2].rstrip(")").replace("'", "").split(", ")
            close = difflib.get_close_matches(wrong, choices, n=1, cutoff=0.6)
            hints += [f"did you mean {close[0]}?"] if close else []
        super().error(message + ("; " + "; ".join(hints) if hints else ""))


def _preset_in(argv: Sequence[str] | None) -> str | None:
    """The preset ``argv`` names (``--preset X`` or ``--preset=X``; the last wins, as in argparse), found
    before parsing so that the settings flags' help can show that preset's values."""
    preset = None
    args = list(argv or ())
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--preset" and i + 1 < len(args):
            preset = args[i + 1]
        elif arg.startswith("--preset="):
            preset = arg.partition("=")[2]
    return preset


def _plugins_in(argv: Sequence[str]) -> list[str]:
    """The ``--plugin SPEC`` / ``--plugin=SPEC`` options before the subcommand (where argparse takes the
    global options), found before parsing so that the plugins' names are registered when the parser and
    its help are built."""
    specs: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--plugin" and i + 1 < len(args):
            specs.append(args[i + 1])
            i += 2
            continue
        if arg.startswith("--plugin="):
            specs.append(arg.partition("=")[2])
        elif arg == "--" or not arg.startswith("-"):
            break  # the subcommand
        i += 1
    return specs


def _load_plugins(argv: Sequence[str]) -> None:
    """Entry points, then ``$KTL_PLUGINS``, then each ``--plugin`` (see `ktl.plugins`)."""
    from ktl.plugins import ENV_VAR, load_plugins, plugins_from_env

    load_plugins([*plugins_from_env(os.environ.get(ENV_VAR)), *_plugins_in(argv)])


def _add_config_flags(
    parser: argparse.ArgumentParser,
    exclude: frozenset[str] = frozenset({"preset"}),
    preset: str | None = None,
) -> None:
    """A flag per setting; its help is the setting's description, its default and, where the preset
    (``preset``, else the parser's ``--preset`` default) sets it, that preset's value."""
    from ktl.config import config_fields

    if preset is None:
        preset = parser.get_default("preset")
    try:
        fields = list(config_fields(preset=preset))
    except KtlError:  # an unknown or broken preset: parsing reports it; the help shows the defaults
        preset, fields = None, list(config_fields())
    title = "settings (override the preset; see docs/configuration.md)"
    if preset is not None:
        title = f"settings (override the preset, here {preset}; see docs/configuration.md)"
    group = parser.add_argument_group(title)
    for dotted, _annotation, help_text in fields:
        if dotted in exclude:
            continue
        names = [f"--{dotted.replace('_', '-')}"]
        if "_" in dotted:
            names.append(f"--{dotted}")
        group.add_argument(
            *names,
            dest=f"set:{dotted}",
            default=argparse.SUPPRESS,
            metavar="V",
            help=help_text.replace("%", "%%"),
        )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from ktl.config import config_fields, nest, parse_flag_value

    annotations = {dotted: ann for dotted, ann, _ in config_fields()}
    given = {k.removeprefix("set:"): v for k, v in vars(args).items() if k.startswith("set:")}
    return nest({k: parse_flag_value(annotations[k], v) for k, v in given.items()})


def _cmd_simulate(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from ktl.config import build_config
    from ktl.simulate import run_repeats

    config = build_config(preset=args.preset, config_file=args.config, overrides=_overrides(args))
    with logging_redirect_tqdm(loggers=[logging.getLogger("ktl")]):
        summary = run_repeats(config, overwrite=args.overwrite, progress=not args.no_progress)
    if config.study.repeats > 1:
        final, best = summary["final_accuracy"], summary["best_accuracy"]
        sys.stdout.write(
            f"{config.study.repeats} seeds ({summary['seeds'][0]}…{summary['seeds'][-1]}): "
            f"final accuracy {final['mean']:.4f} ± {final['std']:.4f}, "
            f"best {best['mean']:.4f} ± {best['std']:.4f}\n"
        )
    return 0


def _count_or_fraction(text: str) -> int | float:
    """``3`` → 3 (a count), ``0.5`` → 0.5 (a fraction), as Flower's SecAgg+ reads them."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _cmd_flower_simulate(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ktl.config import build_config
    from ktl.flower.config import FlowerOptions

    try:
        from ktl.flower.simulation import run_flower_simulation
    except ImportError as exc:
        raise KtlError(
            f"Flower is not installed ({exc.name}): pip install 'ktl[flower]' (make setup does)"
        ) from None
    config = build_config(preset=args.preset, config_file=args.config, overrides=_overrides(args))
    try:
        options = FlowerOptions(
            fraction=args.fraction,
            min_nodes=1,
            out=str(args.out or ""),
            secagg_shares=args.secagg_shares,
            secagg_threshold=args.secagg_threshold,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise KtlError(f"invalid Flower option: {first['msg'].removeprefix('Value error, ')}") from None
    summary = run_flower_simulation(config, options, cpus_per_client=args.cpus_per_client)
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from ktl.catalog import listing

    names = listing()  # the built-in names from ktl/catalog.json (no torch), or live once plugins loaded
    lines = [
        "presets:    " + ", ".join(names["presets"]),
        "methods:    " + ", ".join(names["methods"]),
        "datasets:   " + ", ".join(names["datasets"]),
        "generators: " + ", ".join(names["generators"]),
        "models:",
        *(f"  {name:12s} {summary}" for name, summary in names["models"].items()),
        "model groups (--models NAME):",
        *(
            f"  {name:12s} {group['summary']}\n  {'':12s} = {', '.join(group['members'])}"
            for name, group in names.get("model_groups", {}).items()
        ),
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import gc

    import uvicorn

    from ktl.api import create_app, load_settings
    from ktl.api.process import bind_port, raise_fd_limit, server_options

    settings = load_settings(
        args.config,
        data_dir=args.data_dir,
        host=args.host,
        port=args.port,
        device=args.device,
        devices=args.devices,
    )
    # Refused in one line before anything loads: a busy port, then a data folder another server holds.
    sock = bind_port(settings.host, settings.port)
    app = create_app(settings)  # refuses to start without an admin token
    # What the imports made (torch, the app: ~430 k objects) lives as long as the server: out of the
    # collector's sight, a JSON body of many small lists (1 MiB of ``[],``) is parsed in 0.03 s, not the
    # 0.7 s of full collections that block the event loop.
    gc.collect()
    gc.freeze()
    # Every connection is a file: with the soft limit (often 1024), ~1000 stalled sockets would make
    # accept() fail with "Too many open files" before their head timeout closes them.
    was, now = raise_fd_limit()
    logger.info(
        "ktl serve on http://%s:%d (OpenAPI schema at /openapi.json), state in %s, devices %s; open files %d (was %d), %d "
        "requests at once, request heads and bodies within %gs",
        settings.host,
        settings.port,
        settings.data_dir,
        ",".join(str(d) for d in app.state.service.devices),
        now,
        was,
        settings.limit_concurrency,
        settings.body_timeout_s,
    )
    config = uvicorn.Config(app, log_level=args.log_level, **server_options(settings))
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ktl.demo import DemoOptions, run_demo

    options = DemoOptions(
        rounds=args.rounds,
        clients=args.clients,
        seed=args.seed,
        preset=args.preset,
        out=args.out,
        keep_serving=args.keep_serving,
        method=args.method,
        overrides=_overrides(args),
    )
    if options.rounds < 1 or options.clients < 1:
        raise KtlError("--rounds and --clients must be at least 1")
    run_demo(options)
    return 0


def _sdk(args: argparse.Namespace, env: str, what: str) -> Any:
    """An SDK client for ``args.url`` with ``--token`` or ``$env``."""
    from ktl.clients.sdk import KtlHttpClient

    token = args.token or os.environ.get(env)
    if not token:
        raise KtlError(f"no {what}: pass --token or set {env}")
    return KtlHttpClient(args.url, token, timeout=args.timeout)


def _client_sdk(args: argparse.Namespace) -> Any:
    return _sdk(args, "KTL_TOKEN", "token")


@contextlib.contextmanager
def _server_errors(url: str) -> Iterator[None]:
    """What a server or the network answers, as one line: an API error, no connection, a wait run out."""
    from ktl.clients.sdk import KtlApiError

    try:
        yield
    except KtlApiError as exc:
        raise KtlError(f"server answered {exc}") from None
    except httpx.HTTPError as exc:
        raise KtlError(f"cannot reach {url}: {exc}") from None
    except TimeoutError as exc:  # --wait ran out: one line, not a traceback
        raise KtlError(f"gave up waiting: {exc}") from None


def _cmd_client(args: argparse.Namespace) -> int:
    with _server_errors(args.url):
        return int(args.client_func(args))


def _client_status(args: argparse.Namespace) -> int:
    with _client_sdk(args) as sdk:
        answer = sdk.round(args.federation, args.round) if args.round else sdk.federation(args.federation)
    sys.stdout.write(json.dumps(answer, indent=2) + "\n")
    return 0


def _client_upload(args: argparse.Namespace) -> int:
    from ktl.records import Prototypes

    if not args.file.is_file():
        raise KtlError(f"{args.file} does not exist")
    prototypes = Prototypes.from_bytes(args.file.read_bytes())
    with _client_sdk(args) as sdk:
        answer = sdk.upload(args.federation, args.round, prototypes, dtype=prototypes.vectors.dtype)
    sys.stdout.write(json.dumps(answer, indent=2) + "\n")
    return 0


def _client_pairs(args: argparse.Namespace) -> int:
    with _client_sdk(args) as sdk:
        data = sdk.request("GET", f"/v1/federations/{args.federation}/rounds/{args.round}/pairs").content
        args.out.write_bytes(data)
        if args.png:
            args.png.write_bytes(sdk.pairs_png(args.federation, args.round))
    logger.info(
        "pairs of round %d: %s (%d bytes)%s",
        args.round,
        args.out,
        len(data),
        f", grid {args.png}" if args.png else "",
    )
    return 0


def _refuse_federation_settings(overrides: dict[str, Any], federation: dict[str, Any]) -> None:
    """The method and its settings sections are the federation's: a flag that would change them is
    refused with one line, never ignored."""
    from ktl.methods import SECTIONS, get_method

    method = federation["method"]
    given_method = overrides.pop("method", None)
    if given_method is not None and given_method != method:
        raise KtlError(f"federation {federation['id']} runs method {method!r}, not {given_method!r}")
    cls = get_method(method)
    for section in SECTIONS:
        given = overrides.pop(section, None)
        if not given:
            continue
        if section not in cls.settings_model.sections():
            raise KtlError(f"--{section}.* settings do not apply to method {method!r}")
        held = federation["spec"][section]
        try:
            wanted = cls.settings_from({section: {**held, **given}}).model_dump()[section]
        except KtlError as exc:
            raise KtlError(f"--{section}.*: {exc}") from None
        changed = sorted(k for k in given if wanted[k] != held[k])
        if changed:
            raise KtlError(
                f"{section}.{changed[0]} is the federation's setting ({held[changed[0]]!r} in "
                f"{federation['id']}); it is chosen when the federation is created"
            )


def _participant(args: argparse.Namespace, sdk: Any) -> tuple[Any, Any, dict[str, Any]]:
    """The client (a partition of the preset's data, or ``--site``'s own files) and the client side of the
    federation's method, as ``ktl client run`` and ``ktl client prototypes`` build them."""
    import secrets

    from ktl.config import build_config
    from ktl.data import FederatedData, build_federated_data
    from ktl.device import resolve_device
    from ktl.participant import method_for_federation
    from ktl.simulate import build_client
    from ktl.site import load_site

    overrides = _overrides(args)
    if args.method is not None:
        overrides["method"] = args.method
    fed = sdk.federation(args.federation)
    _refuse_federation_settings(overrides, fed)
    num_classes = int(fed["spec"]["num_classes"])
    if args.site is not None:
        given = sorted(k for k in overrides.get("data", {}) if k != "path")
        if given:
            raise KtlError(f"--data.{given[0]} does not apply to --site (a site's own data is used as it is)")
    config = build_config(preset=args.preset, config_file=args.config, overrides=overrides)
    if args.site is not None:
        index = args.client_index if args.client_index is not None else 0
        names = fed["spec"].get("class_names") or [f"class {c}" for c in range(num_classes)]
        local = load_site(
            args.site, num_classes=num_classes, index=args.client_index, class_names=list(names)
        )
        model = config.models[index % len(config.models)]
        config = config.model_copy(update={"models": [model]})
        data = FederatedData(clients=[local], class_names=list(names), source=f"site {args.site}")
        logger.info("site %s: %d training and %d test samples, model %s", args.site, len(local.train_y),
                    len(local.test_y), model)  # fmt: skip
        index = 0
    else:
        if args.client_index is None:
            raise KtlError("--client-index is needed (which partition of the preset's data), or --site DIR")
        index = args.client_index
        if not 0 <= index < config.num_clients:
            raise KtlError(f"--client-index must lie in [0, {config.num_clients})")
        data = build_federated_data(config.data, num_clients=config.num_clients, seed=config.seed)
        if num_classes != data.num_classes:
            raise KtlError(f"federation has {num_classes} classes, the local data {data.num_classes}")
    device = resolve_device(config.device)
    client = build_client(config, data, index, sdk.etf(args.federation), device)
    # The client's privacy noise comes from a secret seed: a server that knew it could remove it.
    method = method_for_federation(fed, seed=secrets.randbits(62), device=device)
    if fed["privacy"]:
        logger.info(
            "privacy: the federation's budget ε = %g over %d rounds (noise σ = %.3g per release)",
            fed["privacy"]["epsilon"],
            fed["privacy"]["rounds"],
            fed["privacy"]["noise_std"],
        )
    return client, method, fed


def _client_run(args: argparse.Namespace) -> int:
    """One participant: the runner's client side (`ktl.runner.participate`) over the SDK."""
    from ktl.participant import round_broadcast, upload_metrics
    from ktl.runner import participate

    with _client_sdk(args) as sdk:
        client, method, fed = _participant(args, sdk)
        start = int(fed["current_round"])

        def report(r: int, score: tuple[int, int]) -> None:
            (correct, total), federation = (
                score,
                sdk.round(args.federation, r).get("metrics", {}).get("accuracy"),
            )
            logger.info(
                "round %d: local accuracy %.4f (%d test samples)%s",
                r,
                correct / max(total, 1),
                total,
                f"; the federation's {federation['mean']:.4f} over {federation['clients']} clients"
                if federation
                else "",
            )

        participate(
            method,
            client,
            range(start, start + args.rounds),
            upload=lambda r, reply, score: sdk.upload_bytes(
                args.federation, r, reply.payload, metrics=upload_metrics(score, reply.stats)
            ),
            broadcast=lambda r: round_broadcast(sdk, args.federation, r, timeout=args.wait),
            report=report,
        )
    return 0


def _client_prototypes(args: argparse.Namespace) -> int:
    """Train one local round and write the method's upload (what ``ktl client upload`` sends) to a file."""
    with _client_sdk(args) as sdk:
        client, method, fed = _participant(args, sdk)
        update = method.client_update(client, int(fed["current_round"]))
    if update.payload is None:
        raise KtlError(f"method {fed['method']!r} uploads nothing")
    args.out.write_bytes(update.payload)
    logger.info("wrote %s (%d bytes) for round %d", args.out, len(update.payload), fed["current_round"])
    return 0


def _cmd_admin_api(args: argparse.Namespace) -> int:
    """``ktl admin federation|client|job …``: one SDK call, its JSON answer on stdout."""
    with _server_errors(args.url), _sdk(args, "KTL_ADMIN_TOKEN", "admin token") as sdk:
        answer = args.admin_func(sdk, args)
    if answer is not None:
        sys.stdout.write(json.dumps(answer, indent=2) + "\n")
    return 0


def _json_file(path: Path) -> dict[str, Any]:
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KtlError(f"cannot read {path}: {exc}") from None
    if not isinstance(spec, dict):
        raise KtlError(f"{path} must hold a JSON object")
    return spec


def _federation_create(sdk: Any, args: argparse.Namespace) -> Any:
    spec = _json_file(args.spec) if args.spec else {}
    for key, value in (("name", args.name), ("num_classes", args.num_classes), ("method", args.method),
                       ("quorum", args.quorum)):  # fmt: skip
        if value is not None:
            spec[key] = value
    if "num_classes" not in spec:
        raise KtlError("--num-classes (or num_classes in --spec) is needed")
    return sdk.create_federation(spec)


def _client_add(sdk: Any, args: argparse.Namespace) -> Any:
    created = sdk.register_client(args.federation, args.name)
    logger.warning("the token is shown once: store it now (the server keeps only its hash)")
    return created


def _job_submit(sdk: Any, args: argparse.Namespace) -> Any:
    spec = _json_file(args.spec) if args.spec else {}
    for key, value in (
        ("federation_id", args.federation),
        ("round", args.round),
        ("per_class", args.per_class),
        ("spread", args.spread),
    ):
        if value is not None:
            spec[key] = value
    job = sdk.submit_job(spec)
    return sdk.wait_for_job(job["id"], timeout=args.wait) if args.wait else job


def _job_result(sdk: Any, args: argparse.Namespace) -> Any:
    data = sdk.job_result_bytes(args.job)
    args.out.write_bytes(data)
    logger.info("job %s: %s (%d bytes)", args.job, args.out, len(data))
    return None


_ADMIN_CALLS: dict[str, Any] = {
    "federation create": _federation_create,
    "federation list": lambda sdk, a: sdk.federations(limit=a.limit, after=a.after),
    "federation show": lambda sdk, a: sdk.federation(a.federation),
    "federation pause": lambda sdk, a: sdk.pause_federation(a.federation),
    "federation resume": lambda sdk, a: sdk.resume_federation(a.federation),
    "federation delete": lambda sdk, a: sdk.delete_federation(a.federation),
    "client add": _client_add,
    "client list": lambda sdk, a: sdk.clients(a.federation, limit=a.limit, after=a.after),
    "client remove": lambda sdk, a: sdk.remove_client(a.federation, a.client),
    "job submit": _job_submit,
    "job status": lambda sdk, a: sdk.job(a.job),
    "job result": _job_result,
    "job cancel": lambda sdk, a: sdk.cancel_job(a.job),
}


def _add_admin_api(admin_sub: Any) -> None:
    """``ktl admin federation|client|job …`` over the SDK (token: --token or $KTL_ADMIN_TOKEN)."""

    def leaf(group: Any, name: str, help_text: str, key: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(name, help=help_text)
        p.add_argument("--url", default=os.environ.get("KTL_URL"), required="KTL_URL" not in os.environ,
                       help="server URL (default: $KTL_URL)")  # fmt: skip
        p.add_argument("--token", default=None, help="admin token (default: $KTL_ADMIN_TOKEN)")
        p.add_argument("--timeout", type=float, default=30.0, help="seconds per request attempt")
        p.set_defaults(func=_cmd_admin_api, admin_func=_ADMIN_CALLS[key])
        return p

    def page(p: argparse.ArgumentParser) -> None:
        p.add_argument("--limit", type=int, default=100, help="at most this many (one page)")
        p.add_argument("--after", default=None, help="the last id of the page before")

    fed = admin_sub.add_parser("federation", help="create, list, show, pause, resume or delete federations")
    fed_sub = fed.add_subparsers(dest="admin_fed_command", required=True)
    create = leaf(fed_sub, "create", "create a federation from flags and/or a JSON spec", "federation create")
    create.add_argument("--spec", type=Path, default=None, help="a JSON federation spec (docs/api.md)")
    create.add_argument("--name", default=None)
    create.add_argument("--num-classes", type=int, default=None)
    create.add_argument(
        "--method", default=None, help="fedktl (default), fedproto, fedtgp, fd, fedktl-latents"
    )
    create.add_argument("--quorum", type=int, default=None, help="uploads that close a round")
    page(leaf(fed_sub, "list", "list federations (one page)", "federation list"))
    for name in ("show", "pause", "resume", "delete"):
        leaf(fed_sub, name, f"{name} a federation", f"federation {name}").add_argument("federation")
    cl = admin_sub.add_parser("client", help="register (token printed once), list or remove clients")
    cl_sub = cl.add_subparsers(dest="admin_client_command", required=True)
    add = leaf(cl_sub, "add", "register a client; its token is printed once", "client add")
    add.add_argument("federation")
    add.add_argument("--name", default=None)
    lst = leaf(cl_sub, "list", "a federation's clients (one page)", "client list")
    lst.add_argument("federation")
    page(lst)
    rm = leaf(cl_sub, "remove", "remove a client (its token stops working)", "client remove")
    rm.add_argument("federation")
    rm.add_argument("client")
    job = admin_sub.add_parser("job", help="batch generation jobs: submit, status, result, cancel")
    job_sub = job.add_subparsers(dest="admin_job_command", required=True)
    submit = leaf(job_sub, "submit", "queue a generation job from flags and/or a JSON spec", "job submit")
    submit.add_argument("--spec", type=Path, default=None, help="a JSON job spec (docs/api.md)")
    submit.add_argument("--federation", default=None, help="federation id (federation_id)")
    submit.add_argument("--round", type=int, default=None, help="a published round")
    submit.add_argument("--per-class", type=int, default=None, help="images per class centroid")
    submit.add_argument(
        "--spread",
        type=float,
        default=None,
        help="latent = centroid + spread · ε (default: the server's, 0.25: distinct images per class)",
    )
    submit.add_argument("--wait", type=float, default=0.0, help="wait up to this many seconds for it to end")
    for name in ("status", "cancel"):
        leaf(
            job_sub, name, f"a job's {name}" if name == "status" else "cancel a job", f"job {name}"
        ).add_argument("job")
    result = leaf(job_sub, "result", "download a finished job's safetensors", "job result")
    result.add_argument("job")
    result.add_argument("--out", type=Path, required=True)


def _cmd_admin_check(args: argparse.Namespace) -> int:
    from ktl.api.check import check_data_dir

    data_dir = args.data_dir or Path(os.environ.get("KTL_DATA_DIR", "ktl-data"))
    report = check_data_dir(data_dir, repair=args.repair)
    sys.stdout.write(report.render())
    return 0 if report.ok else 1


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from ktl.pretrain import PretrainSettings, pretrain_generator

    given = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "sigma", "seed", "font")}
    settings = PretrainSettings(**{k: v for k, v in given.items() if v is not None})
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with logging_redirect_tqdm(loggers=[logging.getLogger("ktl")]):
        result = pretrain_generator(args.out, settings, progress=not args.no_progress)
    summary = {"out": str(result.out_dir), "seconds": round(result.seconds, 1), "kid": result.kid}
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def _batch_size(text: str) -> int | None:
    """``--batch-size``: a positive integer, or ``auto`` (None)."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer or auto, got {text!r}") from None


def _cmd_generate(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from ktl import generate as gen

    child = os.environ.get("KTL_GENERATE_CHILD") == "1"
    try:
        sources = [s for s in ("data_dir", "url", "latents") if getattr(args, s) is not None]
        if len(sources) != 1:
            raise KtlError("give exactly one source: --data-dir DIR, --url URL or --latents FILE")
        if sources[0] != "latents" and not args.federation:
            raise KtlError(f"--{sources[0].replace('_', '-')} needs --federation FID")
        options = gen.GenerateOptions(
            out=args.out,
            per_class=args.per_class,
            spread=gen.DEFAULT_SPREAD if args.spread is None else args.spread,
            seed=args.seed,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            precision=args.precision,
            channels_last=args.channels_last,
            compile=args.compile,
            image_folder=args.image_folder,
            eval_reference=args.eval,
            eval_max_images=args.eval_max_images,
            max_images=args.max_images,
            device=args.device,
            progress=not args.no_progress,
        )
        gen.check_precision(options.precision, options.device)
        gen.check_processes(args.processes, options.device)
        if args.data_dir is not None:
            source = gen.source_from_data_dir(args.data_dir, args.federation, args.round)
        elif args.url is not None:
            with _server_errors(args.url), _client_sdk(args) as sdk:
                source = gen.source_from_server(sdk, args.federation, args.round, url=args.url)
        else:
            source = gen.source_from_latents(args.latents)
        spec = gen.resolve_generator_spec(args.generator or source.generator, args.server_config)
        options.check(int(source.latents.shape[0]))
        if args.processes > 1 and not gen.in_distributed_launch():
            # a folder of something else or of another spec: refused here, once (not by every process)
            gen.check_against(
                options.out, gen.options_spec(source, options), gen.existing_spec(options.out), partial=True
            )
            argv = list(args.argv)
            i = argv.index("generate")
            # the resolved round, so every process reads the same one (a newer round may be published)
            rest = [a for a in _without_flag(argv[i + 1 :], "--processes")]
            if args.round is None and args.latents is None:
                rest += ["--round", str(source.info["round"])]
            rc = gen.launch(args.processes, [*argv[:i], "generate", *rest], options.device)
            if rc != 0:
                raise KtlError(f"a generate process failed (exit status {rc}); run again to resume")
            _generate_summary(options.out, json.loads((options.out / gen.MANIFEST).read_text()), {})
            return 0
        with gen.quiet_unless_main(), logging_redirect_tqdm(loggers=[logging.getLogger("ktl")]):
            result = gen.generate_dataset(source, spec, options)
    except KtlError:
        if gen.process_rank() != 0:  # the main process says it once
            raise SystemExit(2) from None
        raise
    if result.is_main and not child:
        done = {
            "generated": len(result.generated),
            "kept": len(result.kept),
            "seconds": round(result.seconds, 1),
        }
        _generate_summary(result.out, result.manifest, done)
    return 0


def _generate_summary(out: Path, manifest: dict[str, Any], done: dict[str, Any]) -> None:
    """The one line ``ktl generate`` prints: the folder, images, shards, what was done, the eval."""
    summary = {"out": str(out), "images": manifest["total"], "shards": len(manifest["shards"]), **done}
    if "eval" in manifest:
        summary["eval"] = {k: manifest["eval"][k] for k in ("fid", "kid", "kid_std")}
    sys.stdout.write(json.dumps(summary) + "\n")


def _without_flag(argv: Sequence[str], flag: str) -> list[str]:
    """``argv`` without ``flag VALUE`` / ``flag=VALUE``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


def _cmd_bench(args: argparse.Namespace) -> int:
    return int(args.bench_main(args))


# ``ktl bench NAME``: module ktl.benchmarks.NAME (its add_arguments and main), help, description.
_BENCHES: tuple[tuple[str, str, str | None], ...] = (
    ("api", "upload latency with concurrent clients; server RSS over many rounds", None),
    (
        "server",
        "server round vs a faithful re-run of the reference loop; generation throughput",
        "Time to the reference's alignment loss, ours vs the reference loop, same inputs; batch-job vs "
        "bare-generator images/s. See docs/benchmarks.md.",
    ),
    (
        "accuracy",
        "every method (and FedKTL's ablations) in the same harness, mean ± std over seeds",
        "Runs a suite of ktl simulate runs (resumable: finished runs are kept) and builds the table: "
        "last/best-round accuracy, bytes up/down per client per round, wall time; --write also draws "
        "accuracy-per-round plots. See docs/results.md.",
    ),
    (
        "chaos",
        "a bounded soak of a real server with kill -9, a full disk and a poison federation",
        "Healthy federations run rounds while the server is killed, its disk fills (root) and a poison round "
        "runs beside them; checks that no acknowledged upload is lost and every healthy round publishes; "
        "reports /healthz latency. See docs/benchmarks.md.",
    ),
    (
        "generate",
        "ktl generate: 1 vs P processes; images/s per precision and batch size, job vs bare forward",
        "The same data set by ktl generate in 1 and in P processes (the whole command timed); for the embedded "
        "generator and a diffusers UNet at 64×64, images/s of the bare forward and of ktl generate's shard loop "
        "per precision and batch size. See docs/benchmarks.md.",
    ),
    (
        "startup",
        "how long ktl takes before it answers (--help, a mistyped command, list), median of runs",
        "Fresh processes per case; the whole parser built eagerly side by side. See docs/benchmarks.md.",
    ),
)


# ``ktl bench flower|secagg``: their modules import Flower (an optional extra) only when they run.
_FLOWER_BENCHES: tuple[tuple[str, str, str, bool], ...] = (
    (
        "flower",
        "ktl on Flower's Simulation Engine vs ktl simulate (overhead per round); 200 clients",
        "Per-round time of the same configuration through ktl simulate and ktl flower simulate, and a run of "
        "many virtual clients (time per round, peak memory). See docs/benchmarks.md.",
        True,
    ),
    (
        "secagg",
        "what secure aggregation costs on Flower: bytes and time per round, plain vs SecAgg+",
        "fedproto, fedproto-secagg, fedktl and fedktl-secagg through ktl flower simulate with the same "
        "configuration: wire bytes per client and round both ways, time per round, final accuracy. See "
        "docs/results.md.",
        False,
    ),
)


def _flower_bench_main(args: argparse.Namespace) -> int:
    return int(importlib.import_module(f"ktl.benchmarks.{args.bench_command}").main(args))


def _command_in(argv: Sequence[str] | None) -> str | None:
    """The sub-command ``argv`` names (its first word after the global options); None when there is none."""
    skip = False
    for arg in argv or ():
        if skip:
            skip = False
        elif arg == "--plugin":
            skip = True
        elif arg == "--":
            break
        elif not arg.startswith("-"):
            return arg
    return None


def _bench_in(argv: Sequence[str] | None) -> str | None:
    """The benchmark ``ktl bench NAME`` names (the first word after the ``bench`` command); None when none."""
    words = list(argv or ())
    for i, arg in enumerate(words):
        if arg == "bench" and _command_in(words[: i + 1]) == "bench":
            return _command_in(words[i + 1 :])
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``ktl`` parser; ``argv``, when given, is pre-scanned for ``--preset`` (see `_add_config_flags`)
    and for its sub-command: only that one gets its settings flags, and ``ktl bench NAME`` imports only
    benchmark NAME's module (they import torch, some the server's packages), so ``ktl --help`` and a
    mistyped command answer at once. Without ``argv``, everything."""
    preset = _preset_in(argv)
    command = _command_in(argv)
    bench_name = _bench_in(argv)

    def wants(name: str) -> bool:
        return argv is None or command == name

    parser = _Parser(prog="ktl", description="Generator-based knowledge transfer (FedKTL).")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="SPEC",
        help="load a plugin before anything else: a .py file or a module path (repeatable; also "
        "$KTL_PLUGINS, comma-separated; see docs/extending.md)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser(
        "simulate",
        help="run N clients × R rounds in one process",
        description="Run a federated simulation; e.g. ktl simulate --preset cpu-small --method fedktl --seed 0",
    )
    sim.add_argument("--preset", default=None, help="a preset name (see `ktl list`), e.g. cpu-small")
    sim.add_argument(
        "--config", type=Path, default=None, help="a TOML or JSON config file (e.g. a run's config.json)"
    )
    sim.add_argument(
        "--overwrite", action="store_true", help="replace the contents of an existing --out folder"
    )
    sim.add_argument("--no-progress", action="store_true", help="no progress bar")
    sim.add_argument(
        "--repeats",
        dest="set:study.repeats",
        default=argparse.SUPPRESS,
        metavar="N",
        help="run seeds seed … seed+N−1 into sub-folders and report mean ± std (= --study.repeats N)",
    )
    if wants("simulate"):
        _add_config_flags(sim, preset=preset)
    sim.set_defaults(func=_cmd_simulate)

    flower = sub.add_parser("flower", help="run ktl's methods on Flower (see docs/flower.md)")
    flower_sub = flower.add_subparsers(dest="flower_command", required=True)
    fsim = flower_sub.add_parser(
        "simulate",
        help="the Flower app on Flower's Simulation Engine: one virtual SuperNode per client",
        description="Same configuration as ktl simulate; e.g. ktl flower simulate --preset smoke --method fedproto",
    )
    fsim.add_argument("--preset", default=None, help="a preset name (see `ktl list`), e.g. cpu-small")
    fsim.add_argument("--config", type=Path, default=None, help="a TOML or JSON config file")
    fsim.add_argument(
        "--fraction",
        type=float,
        default=None,
        help="fraction of the nodes sampled each round (= --study.join-ratio)",
    )
    fsim.add_argument(
        "--cpus-per-client", type=float, default=1.0, help="Ray CPUs reserved per virtual client"
    )
    fsim.add_argument("--out", type=Path, default=None, help="the run folder (default runs/flower-…)")
    fsim.add_argument(
        "--secagg-shares",
        type=_count_or_fraction,
        default=3,
        help="methods *-secagg: SecAgg+ shares per client, an integer > 2 or a fraction of the sampled nodes",
    )
    fsim.add_argument(
        "--secagg-threshold",
        type=_count_or_fraction,
        default=2,
        help="methods *-secagg: shares needed to rebuild a secret (integer below the shares, or a fraction)",
    )
    if wants("flower"):
        _add_config_flags(fsim, exclude=frozenset({"preset", "out"}), preset=preset)
    fsim.set_defaults(func=_cmd_flower_simulate)

    lst = sub.add_parser("list", help="presets, methods, data sets, generators and models")
    lst.set_defaults(func=_cmd_list)

    serve = sub.add_parser(
        "serve",
        help="run the HTTP server (needs KTL_ADMIN_TOKEN)",
        description=(
            "Serve the ktl API. Settings come from flags, KTL_* environment variables and --config (TOML); "
            "the admin token only from KTL_ADMIN_TOKEN (or the TOML file)."
        ),
    )
    serve.add_argument("--config", type=Path, default=None, help="TOML settings file")
    serve.add_argument("--data-dir", type=Path, default=None, help="where state lives (default ./ktl-data)")
    serve.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8000)")
    serve.add_argument(
        "--device", default=None, help="one device: cpu | cuda | cuda:N | auto (the GPU, else the CPU)"
    )
    serve.add_argument(
        "--devices",
        default=None,
        help="devices, comma-separated (e.g. cuda:0,cuda:1; one worker each: rounds on the first, batch "
        "jobs on all); default: every visible CUDA GPU, else the CPU",
    )
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    serve.set_defaults(func=_cmd_serve)

    demo = sub.add_parser("demo", help="server + heterogeneous clients over real HTTP, on this machine")
    demo.add_argument("--rounds", type=int, default=5)
    demo.add_argument("--clients", type=int, default=20)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--preset", default="cpu-small", help="data, models and local training of this preset")
    demo.add_argument("--out", type=Path, default=None, help="run folder (default runs/demo-<time>)")
    demo.add_argument(
        "--keep-serving", action="store_true", help="leave the server up afterwards (Ctrl-C stops)"
    )
    demo.add_argument(
        "--method", default="fedktl", help="a method that exchanges payloads: fedktl, fedproto, fedtgp, fd, …"
    )
    if wants("demo"):
        _add_config_flags(
            demo,
            exclude=frozenset({"preset", "rounds", "num_clients", "seed", "out", "method"}),
            preset=preset,
        )
    demo.set_defaults(func=_cmd_demo)

    client = sub.add_parser(
        "client", help="talk to a ktl server as a client (token from --token or KTL_TOKEN)"
    )
    client_sub = client.add_subparsers(dest="client_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=os.environ.get("KTL_URL"), required="KTL_URL" not in os.environ,
                       help="server URL, e.g. http://127.0.0.1:8000 (default: $KTL_URL)")  # fmt: skip
        p.add_argument("--token", default=None, help="bearer token (default: $KTL_TOKEN)")
        p.add_argument("--federation", required=True, help="federation id")
        p.add_argument("--timeout", type=float, default=30.0, help="seconds per request attempt")

    st = client_sub.add_parser("status", help="print the federation, or a round with --round")
    common(st)
    st.add_argument("--round", type=int, default=None)
    st.set_defaults(client_func=_client_status)
    up = client_sub.add_parser("upload", help="upload a prototypes safetensors file")
    common(up)
    up.add_argument("--round", type=int, required=True)
    up.add_argument("--file", type=Path, required=True)
    up.set_defaults(client_func=_client_upload)
    pr = client_sub.add_parser("pairs", help="download a published round's pairs")
    common(pr)
    pr.add_argument("--round", type=int, required=True)
    pr.add_argument("--out", type=Path, required=True, help="where to write the safetensors")
    pr.add_argument("--png", type=Path, default=None, help="also write the labelled grid here")
    pr.set_defaults(client_func=_client_pairs)
    run = client_sub.add_parser(
        "run",
        help="participate for --rounds rounds: on a site's own data (--site DIR), or on partition "
        "--client-index of the preset's data",
    )
    protos = client_sub.add_parser(
        "prototypes",
        help="train one local round and write the upload (what `ktl client upload` takes) to --out",
    )
    for p in (run, protos):
        common(p)
        p.add_argument(
            "--site",
            type=Path,
            default=None,
            help="this site's own data: a folder with train.npz and test.npz (or PFLlib's train/<i>.npz and "
            "test/<i>.npz of this site only); nothing of other clients is needed",
        )
        p.add_argument(
            "--client-index",
            type=int,
            default=None,
            help="which partition of the preset's data (without --site); with --site, the <i> of its files",
        )
        p.add_argument("--preset", default="cpu-small")
        p.add_argument("--config", type=Path, default=None)
        p.add_argument(
            "--method", default=None, help="check that the federation runs this method (it decides which)"
        )
        if wants("client"):
            _add_config_flags(p, exclude=frozenset({"preset", "rounds", "method", "out"}), preset=preset)
        p.epilog = (
            "The method and its settings sections (fedktl.*, baseline.*, privacy.*, …: the sections its "
            "settings model declares) are the federation's; a flag that would change them is refused."
        )
    run.add_argument("--rounds", type=int, default=1)
    run.add_argument("--wait", type=float, default=3600.0, help="seconds to wait for each round's broadcast")
    run.set_defaults(client_func=_client_run)
    protos.add_argument("--out", type=Path, required=True, help="the safetensors file to write")
    protos.set_defaults(client_func=_client_prototypes)
    for p in (st, up, pr, run, protos):
        p.set_defaults(func=_cmd_client)

    admin = sub.add_parser(
        "admin", help="operator tools: a server's federations, clients and jobs; its data folder"
    )
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    check = admin_sub.add_parser(
        "check",
        help="verify the data folder (checksums, references); --repair rebuilds what can be rebuilt",
        description="Check every stored file against the SHA-256 recorded when it was written, and every "
        "database row against the files it refers to; print a report; exit 1 when something is wrong. "
        "--repair (stop the server first) rebuilds a missing or unreadable database from the federation "
        "folders, records missing checksums and deletes stale rows, and says what cannot be rebuilt.",
    )
    check.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="the server's data folder (default $KTL_DATA_DIR or ./ktl-data)",
    )
    check.add_argument("--repair", action="store_true", help="fix what can be fixed")
    check.set_defaults(func=_cmd_admin_check)
    _add_admin_api(admin_sub)

    pre = sub.add_parser(
        "pretrain-generator",
        help="train the embedded default generator on emoji (offline) and report its KID",
        description="Train the default AutoencoderKL on Noto Color Emoji; e.g. "
        "ktl pretrain-generator --out generator/default",
    )
    pre.add_argument("--out", type=Path, required=True, help="folder for config.json + safetensors")
    # None: the default of ktl.pretrain.PretrainSettings (those of the shipped weights)
    pre.add_argument("--steps", type=int, default=None, help="Adam steps (default 1500)")
    pre.add_argument("--batch-size", type=int, default=None, help="default 64")
    pre.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3)")
    pre.add_argument("--sigma", type=float, default=None, help="decoder pixel noise, the VAE balance (0.3)")
    pre.add_argument("--seed", type=int, default=None, help="default 0")
    pre.add_argument("--font", default=None, help="Noto Color Emoji font file (Debian's path by default)")
    pre.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    pre.set_defaults(func=_cmd_pretrain)

    gen = sub.add_parser(
        "generate",
        help="a training data set from a published FedKTL round: sharded, resumable, multi-process",
        description="Generate --per-class images around each class centroid of a published FedKTL round "
        "(--data-dir DIR or --url URL, with --federation FID [--round R]) or around given latents "
        "(--latents FILE) into --out: safetensors shards and manifest.json (docs/generate.md). Run it "
        "again to resume.",
    )
    gen.add_argument("--out", type=Path, required=True, help="the data set folder")
    gen.add_argument("--data-dir", type=Path, default=None, help="a ktl serve data folder (read only)")
    gen.add_argument("--url", default=None, help="a running server, e.g. http://127.0.0.1:8000")
    gen.add_argument("--token", default=None, help="with --url: bearer token (default: $KTL_TOKEN)")
    gen.add_argument("--timeout", type=float, default=30.0, help="with --url: seconds per request attempt")
    gen.add_argument("--federation", default=None, help="federation id (with --data-dir or --url)")
    gen.add_argument("--round", type=int, default=None, help="a published round (default: the latest)")
    gen.add_argument(
        "--latents", type=Path, default=None, help="a safetensors file: latents (m, W), optional class_ids"
    )
    gen.add_argument("--per-class", type=int, default=100, help="images per class centroid (default 100)")
    gen.add_argument(
        "--spread",
        type=float,
        default=None,
        help="latent = centroid + spread · ε (default 0.25, ktl.generator.base.DEFAULT_SPREAD: distinct "
        "images per class, latents in the prior's typical set; 0: one image per class)",
    )
    gen.add_argument("--seed", type=int, default=0, help="the noise seed (default 0)")
    gen.add_argument("--shard-size", type=int, default=1024, help="images per shard (default 1024)")
    gen.add_argument(
        "--batch-size",
        type=_batch_size,
        default=64,
        help="latents per generator pass, or auto (probed; recorded in the spec) (default 64)",
    )
    gen.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32", help="autocast dtype")
    gen.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    gen.add_argument("--compile", action="store_true", help="torch.compile the generator's decoder")
    gen.add_argument("--image-folder", action="store_true", help="also write images/<class>/00001.png")
    gen.add_argument(
        "--eval", type=Path, default=None, metavar="REF_FOLDER", help="FID and KID against these PNG/JPGs"
    )
    gen.add_argument("--eval-max-images", type=int, default=10_000, help="images per side in --eval")
    gen.add_argument(
        "--max-images", type=int, default=1_000_000, help="refuse larger data sets (default 1,000,000)"
    )
    gen.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    gen.add_argument(
        "--processes", type=int, default=1, help="processes to launch (torch.distributed.run), shards split"
    )
    gen.add_argument(
        "--generator", default=None, help="generator name in the server settings (default: the federation's)"
    )
    gen.add_argument(
        "--server-config", type=Path, default=None, help="the server's TOML settings (its generators)"
    )
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.set_defaults(func=_cmd_generate, argv=list(argv or ()))

    bench = sub.add_parser("bench", help="benchmarks (code in benchmarks/)")
    if wants("bench"):
        bench_sub = bench.add_subparsers(dest="bench_command", required=True)
        for name, help_text, description in _BENCHES:
            p = bench_sub.add_parser(name, help=help_text, description=description)
            if argv is None or bench_name == name:  # the one that runs: its module, flags and main
                module = importlib.import_module(f"ktl.benchmarks.{name}")
                module.add_arguments(p)
                p.set_defaults(func=_cmd_bench, bench_main=module.main)
        for name, help_text, description, scale in _FLOWER_BENCHES:
            p = bench_sub.add_parser(name, help=help_text, description=description)
            p.add_argument("--preset", default="cpu-small")
            p.add_argument("--clients", type=int, default=20)
            p.add_argument("--rounds", type=int, default=3)
            if scale:
                p.add_argument("--scale-clients", type=int, default=200, help="0: skip the scale run")
                p.add_argument("--scale-rounds", type=int, default=2)
                p.add_argument("--engine", choices=["simulation", "deployment"], default="simulation",
                               help="deployment: a SuperLink and a SuperNode per client on loopback (flwr run), "
                               "a round after the first vs ktl simulate, one thread")  # fmt: skip
                p.add_argument("--method", default="fedproto", help="with --engine deployment")
                p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                               help="with --engine deployment: also run without the node workers")  # fmt: skip
            p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
            p.add_argument("--write", type=Path, default=None, help="also write the table into this file")
            p.set_defaults(func=_cmd_bench, bench_main=_flower_bench_main)

    return parser


def _pin_if_asked(entry: bool) -> None:
    """``KTL_REPRODUCIBLE=1``: the pinned mode of ``ktl.seeding`` (same bits on any x86-64 CPU). Its
    environment must be there when the process starts, so the ``ktl`` command re-executes itself with it
    once; then (or in-process, where it is already in place) the backends are pinned."""
    if os.environ.get("KTL_REPRODUCIBLE", "") != "1":
        return
    from ktl import seeding

    if entry and not seeding.reproducible_env_in_place():
        os.execve(sys.executable, [sys.executable, "-m", "ktl", *sys.argv[1:]], seeding.reproducible_env())
    seeding.pin_backends()


def main(argv: Sequence[str] | None = None) -> int:
    entry = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        _pin_if_asked(entry)
        _load_plugins(argv)
    except KtlError as exc:
        sys.stderr.write(f"ktl: error: {exc}\n")
        return 2
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    _setup_logging(-1 if args.quiet else args.verbose)
    try:
        return int(args.func(args))
    except KtlError as exc:
        sys.stderr.write(f"ktl: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("ktl: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
