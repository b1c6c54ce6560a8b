"""The `engine deploy` and `engine deployment` commands."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from engine import errors
from engine.core.deployments import (
    DEFAULT_WORKSPACE,
    Deployment,
    DeploymentKind,
    DeploymentSpec,
    package_directory,
)
from engine.sdk.client import resolve_address
from engine.sdk.deploy import DeploymentClient, parse_memory

# Base URL printed before the HTTP paths of a deployment, when set.
HTTP_URL_VARIABLE = "ENGINE_HTTP_URL"


def register(
    subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> None:
    deploy = subparsers.add_parser(
        "deploy",
        parents=[common],
        help="deploy a Python function as an HTTP endpoint or a task queue",
        description="Package the directory of FILE and deploy FUNCTION in it."
        " Each deploy of a name creates the next version. Prints the"
        " deployment id, the version and the HTTP routes.",
    )
    deploy.add_argument("target", metavar="PATH/FILE.py:FUNCTION")
    deploy.add_argument("--name", required=True, help="deployment name")
    kind = deploy.add_mutually_exclusive_group(required=True)
    kind.add_argument("--endpoint", action="store_true", help="a synchronous endpoint")
    kind.add_argument("--taskqueue", action="store_true", help="a task queue")
    deploy.add_argument("--image", default="host", help="image (default: host)")
    deploy.add_argument(
        "--cpu", type=float, default=1.0, help="cores per container (default: 1)"
    )
    deploy.add_argument(
        "--memory",
        default="512",
        help="memory per container in MiB, or a size such as 1Gi (default: 512)",
    )
    deploy.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds a call or task may run (default: 180 for an endpoint,"
        " 3600 for a task queue)",
    )
    deploy.add_argument(
        "--retries",
        type=int,
        default=0,
        metavar="N",
        help="times a failed task runs again (default: 0)",
    )
    deploy.add_argument(
        "--keep-warm",
        type=float,
        metavar="S",
        help="seconds a container stays up after its last call; 0 stops it at"
        " once (default: 180 for an endpoint, 10 for a task queue)",
    )
    deploy.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="maximum containers at once (default: 1)",
    )
    deploy.add_argument(
        "--max-pending",
        type=int,
        default=0,
        metavar="N",
        help="calls or tasks that may wait before HTTP 429 (default: 1000 for an"
        " endpoint, 100000 for a task queue)",
    )
    deploy.add_argument(
        "--callback-url",
        default="",
        metavar="URL",
        help="URL that receives a POST when a task ends (task queues only)",
    )
    deploy.add_argument(
        "--traceback",
        action="store_true",
        help="include the function's traceback in error responses",
    )
    deploy.add_argument(
        "--workspace",
        default="",
        help="workspace of the deployment (default: the token's workspace, or"
        f" {DEFAULT_WORKSPACE!r} over the unix socket without a token)",
    )
    deploy.add_argument("--json", action="store_true", help="print JSON")
    deploy.set_defaults(func=deploy_command)

    group = subparsers.add_parser(
        "deployment", parents=[common], help="list, show and delete deployments"
    )
    commands = group.add_subparsers(dest="deployment_command", required=True)
    ls = commands.add_parser("ls", parents=[common], help="list deployments")
    ls.add_argument(
        "--workspace",
        default="",
        help="workspace to list (default: the token's, or"
        f" {DEFAULT_WORKSPACE!r} over the unix socket without a token)",
    )
    ls.add_argument("--name", default="", help="only this name")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=ls_command)
    show = commands.add_parser("show", parents=[common], help="show a deployment")
    show.add_argument("deployment_id", metavar="ID")
    show.set_defaults(func=show_command)
    rm = commands.add_parser(
        "rm",
        parents=[common],
        help="delete deployments, their containers and their pending tasks",
    )
    rm.add_argument("deployment_ids", metavar="ID", nargs="+")
    rm.set_defaults(func=rm_command)


def _client(args: argparse.Namespace) -> DeploymentClient:
    return DeploymentClient(resolve_address(args.address, args.data_dir))


def _parse_target(target: str) -> tuple[Path, str]:
    path_text, separator, function = target.rpartition(":")
    path = Path(path_text)
    if not separator or not function.isidentifier() or path.suffix != ".py":
        raise errors.InvalidArgument(
            f"invalid target {target!r}: expected PATH/FILE.py:FUNCTION, such as"
            " app.py:handler"
        )
    if not path.is_file():
        raise errors.NotFound(f"file {path_text!r} not found")
    return path.resolve(), function


def routes(deployment: Deployment) -> list[str]:
    """Return the HTTP routes of a deployment, after $ENGINE_HTTP_URL when set."""
    base = os.environ.get(HTTP_URL_VARIABLE, "").rstrip("/")
    name = deployment.name
    if deployment.spec.kind == DeploymentKind.ENDPOINT:
        paths = [
            f"/endpoint/{name}",
            f"/endpoint/{name}/v{deployment.version}",
            f"/endpoint/id/{deployment.deployment_id}",
        ]
    else:
        paths = [f"/taskqueue/{name}"]
    return [f"POST {base}{path}" for path in paths]


def _as_json(deployment: Deployment) -> dict:
    spec = deployment.spec
    return {
        "id": deployment.deployment_id,
        "name": spec.name,
        "version": deployment.version,
        "kind": spec.kind.value,
        "handler": spec.handler,
        "workspace": spec.workspace,
        "image": spec.image,
        "cpu": spec.cpu,
        "memory_mib": spec.memory_mib,
        "timeout": spec.timeout,
        "retries": spec.retries,
        "keep_warm": spec.keep_warm,
        "workers": spec.workers,
        "max_pending": spec.max_pending,
        "callback_url": spec.callback_url,
        "traceback": spec.traceback,
        "created_at": deployment.created_at,
        "package_bytes": deployment.package_bytes,
        "urls": routes(deployment),
    }


def _check_options(args: argparse.Namespace) -> None:
    minimums = [
        ("--workers", args.workers, 1),
        ("--retries", args.retries, 0),
        ("--max-pending", args.max_pending, 0),
        ("--timeout", args.timeout, 0),
        ("--keep-warm", args.keep_warm if args.keep_warm is not None else 0, 0),
        ("--cpu", args.cpu, 0),
    ]
    for option, value, minimum in minimums:
        if value < minimum:
            raise errors.InvalidArgument(
                f"invalid {option} {value}: must be {minimum} or more"
            )


def deploy_command(args: argparse.Namespace) -> int:
    path, function = _parse_target(args.target)
    _check_options(args)
    spec = DeploymentSpec(
        name=args.name,
        kind=DeploymentKind.ENDPOINT if args.endpoint else DeploymentKind.TASK_QUEUE,
        handler=f"{path.stem}:{function}",
        image=args.image,
        cpu=args.cpu,
        memory_mib=parse_memory(args.memory),
        timeout=args.timeout,
        retries=args.retries,
        keep_warm=args.keep_warm,
        workers=args.workers,
        callback_url=args.callback_url,
        max_pending=args.max_pending,
        traceback=args.traceback,
        workspace=args.workspace,
    )
    package = package_directory(path.parent)
    with _client(args) as client:
        deployment = client.deploy(spec, package)
    if args.json:
        print(json.dumps(_as_json(deployment), indent=2))
        return 0
    print(f"id: {deployment.deployment_id}")
    print(f"version: {deployment.version}")
    for route in routes(deployment):
        print(f"url: {route}")
    return 0


def ls_command(args: argparse.Namespace) -> int:
    with _client(args) as client:
        deployments = client.list(args.workspace, args.name)
    if args.json:
        print(json.dumps([_as_json(d) for d in deployments], indent=2))
        return 0
    print(f"{'ID':<36}  {'NAME':<24} {'VERSION':>7}  {'KIND':<9}  CREATED")
    for deployment in deployments:
        created = time.strftime(
            "%Y-%m-%d %H:%M:%S", time.localtime(deployment.created_at)
        )
        print(
            f"{deployment.deployment_id:<36}  {deployment.name:<24}"
            f" {deployment.version:>7}  {deployment.spec.kind.value:<9}  {created}"
        )
    return 0


def show_command(args: argparse.Namespace) -> int:
    with _client(args) as client:
        deployment = client.get(args.deployment_id)
    print(json.dumps(_as_json(deployment), indent=2))
    return 0


def rm_command(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for deployment_id in args.deployment_ids:
            client.delete(deployment_id)
            print(deployment_id)
    return 0
