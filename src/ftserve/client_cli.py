"""``ftserve client ...``: talk to a running service over gRPC (default) or REST.

ftserve client generate --model support-router --message "My card was charged twice"
ftserve client generate --protocol rest --prompt "Once upon a time" --max-tokens 32
ftserve client models
FTSERVE_ADMIN_TOKEN=... ftserve client adapters load order-extract --pinned
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import closing
from typing import Any

from ftserve.config import DEFAULT_MODEL


def cmd_generate(ns: argparse.Namespace) -> int:
    from ftserve.client import Ask, Completion

    ask = Ask(
        model=ns.model,
        messages=[("user", ns.message)] if ns.message is not None else None,
        prompt=ns.prompt,
        max_tokens=ns.max_tokens,
        temperature=ns.temperature,
        seed=ns.seed,
        stop=ns.stop or [],
    )
    completion = Completion()
    with closing(_connect(ns)) as client:
        for piece in client.stream(ask, completion):
            print(piece, end="", flush=True)
    print()
    summary = {k: getattr(completion, k) for k in ("finish_reason", "prompt_tokens", "completion_tokens", "cached")}
    print(json.dumps(summary), file=sys.stderr)
    return 0


def cmd_models(ns: argparse.Namespace) -> int:
    with closing(_connect(ns)) as client:
        print("\n".join(client.models()))
    return 0


def cmd_adapters(ns: argparse.Namespace) -> int:
    with closing(_connect(ns)) as client:
        if ns.action == "list":
            result: Any = client.adapters()
        elif ns.action == "load":
            result = client.load_adapter(ns.name, pinned=ns.pinned, reload=ns.reload)
        else:
            result = client.unload_adapter(ns.name)
    print(json.dumps(result, indent=2))
    return 0


def add_client_commands(groups: Any) -> None:
    client = groups.add_parser("client", help="call a running service over gRPC or REST")
    actions = client.add_subparsers(dest="command", required=True)

    gen = actions.add_parser("generate", help="stream a completion to stdout (usage and finish reason to stderr)")
    _connection_options(gen)
    gen.add_argument("--model", default=DEFAULT_MODEL, help="base model or adapter name (default: %(default)s)")
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--message", help="one user message, rendered with the chat template")
    what.add_argument("--prompt", help="raw text to complete")
    gen.add_argument("--max-tokens", type=int, default=None, help="tokens at most (default: the server's)")
    gen.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the server's)")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.set_defaults(func=cmd_generate)

    models = actions.add_parser("models", help="list the base model and the adapters")
    _connection_options(models)
    models.set_defaults(func=cmd_models)

    adapters = actions.add_parser("adapters", help="adapter admin (needs the admin token)")
    adapter_actions = adapters.add_subparsers(dest="action", required=True)
    listing = adapter_actions.add_parser("list", help="loaded adapters (residency, version) and available ones")
    _connection_options(listing)
    load = adapter_actions.add_parser("load", help="load (or reload / pin) an adapter from the allowed folders")
    unload = adapter_actions.add_parser("unload", help="unload an adapter (in-flight requests finish first)")
    for sub in (load, unload):
        _connection_options(sub)
        sub.add_argument("name", help="adapter folder name")
    load.add_argument("--pinned", action=argparse.BooleanOptionalAction, default=None, help="pin in a slot")
    load.add_argument("--reload", action="store_true", help="read the folder again")
    adapters.set_defaults(func=cmd_adapters)


def _connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--protocol", choices=["grpc", "rest"], default="grpc", help="(default: %(default)s)")
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="REST base URL (default: %(default)s)")
    parser.add_argument("--target", default="127.0.0.1:50051", help="gRPC host:port (default: %(default)s)")
    parser.add_argument(
        "--token-env", default="FTSERVE_ADMIN_TOKEN", help="env variable with the admin token (default: %(default)s)"
    )


def _connect(ns: argparse.Namespace) -> Any:
    from ftserve.client import connect

    return connect(ns.protocol, ns.url, ns.target, os.environ.get(ns.token_env))
