"""``ftserve`` command line. Options are generated from the pydantic settings in ``config.py``, so the
defaults live in one place."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ftserve.bench.workloads import EngineBenchConfig
from ftserve.client_cli import add_client_commands
from ftserve.config import DEFAULT_MODEL, ConfigError, StoreConfig, load_service_config
from ftserve.models import BUNDLED, ModelStore, ModelStoreError
from ftserve.report.cli import add_cost_command
from ftserve.train.formats import DataError

log = logging.getLogger("ftserve")


def _comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def add_model_options(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One ``--field-name`` option per scalar, ``Literal`` or list field (``--x/--no-x`` for booleans), help
    from the field's description.

    ``Literal`` fields become choices; list fields take comma-separated values (the model validates them).
    """
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        default = field.get_default(call_default_factory=True)
        kwargs: dict[str, Any] = {}
        if annotation in (str, int, float, Path):
            kwargs["type"] = annotation
        elif annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(annotation))
        elif typing.get_origin(annotation) is list:
            kwargs.update(type=_comma_list, metavar="A,B,...")
            default = ",".join(map(str, default))
        else:
            continue
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=None,
            help=f"{field.description or ''} (default: {default})",
            **kwargs,
        )


def options_to(model: type[BaseModel], ns: argparse.Namespace) -> Any:
    given = {k: v for k in model.model_fields if (v := getattr(ns, k, None)) is not None}
    return model(**given)


def validated(model: type[BaseModel], ns: argparse.Namespace, what: str) -> Any:
    """``options_to`` with a validation error turned into a ConfigError naming the command."""
    try:
        return options_to(model, ns)
    except ValidationError as exc:
        raise ConfigError(f"{what}: {exc}") from exc


def _store(ns: argparse.Namespace) -> ModelStore:
    return ModelStore(options_to(StoreConfig, ns).home)


def cmd_model_pull(ns: argparse.Namespace) -> int:
    path = _store(ns).pull(ns.ref)
    print(path)
    return 0


def cmd_model_list(ns: argparse.Namespace) -> int:
    store = _store(ns)
    pulled = set(store.list())
    for name in sorted(set(BUNDLED) | pulled):
        state = "pulled" if name in pulled else "bundled, not pulled"
        print(f"{name}\t{state}\t{store.path_for(name)}")
    return 0


def cmd_model_path(ns: argparse.Namespace) -> int:
    print(_store(ns).resolve(ns.ref))
    return 0


def _bench(ns: argparse.Namespace, config: Any, required: list[Path], run: Any) -> int:
    """Check the files a benchmark reads, get its model, run it, write its rows."""
    for path in required:
        if not path.is_file():
            raise ConfigError(f"bench {ns.action}: {path} does not exist")
    model_dir = _store(ns).pull(config.model)
    rows = run(config, model_dir, ns.json_path)
    log.info("wrote %d rows to %s", len(rows), ns.json_path)
    return 0


def cmd_bench_engine(ns: argparse.Namespace) -> int:
    from ftserve.bench.engine_bench import run_engine_bench  # imports torch: only when benchmarking

    return _bench(ns, validated(EngineBenchConfig, ns, "bench engine"), [], run_engine_bench)


def cmd_bench_optimize(ns: argparse.Namespace) -> int:
    from ftserve.bench.optimize_bench import run_optimize_bench  # imports torch: only when benchmarking
    from ftserve.bench.variants import OptimizeBenchConfig

    config = validated(OptimizeBenchConfig, ns, "bench optimize")
    required = [config.adapter / "adapter_model.safetensors", config.train_config, config.text, *config.heldout]
    return _bench(ns, config, required, run_optimize_bench)


def cmd_bench_spec(ns: argparse.Namespace) -> int:
    from ftserve.bench.spec_bench import run_spec_bench  # imports torch: only when benchmarking
    from ftserve.bench.spec_settings import SpecBenchConfig

    config = validated(SpecBenchConfig, ns, "bench spec")
    adapter = [config.adapter / "adapter_model.safetensors"] if config.adapter is not None else []
    return _bench(ns, config, [config.extract_items, *adapter], run_spec_bench)


def cmd_bench_soak(ns: argparse.Namespace) -> int:
    from ftserve.bench.soak import SoakBenchConfig, run_soak

    config = validated(SoakBenchConfig, ns, "bench soak")
    store = _store(ns)
    store.pull(DEFAULT_MODEL)  # the default deployment's model, provisioned as make serve does
    row = run_soak(config, store.home, ns.json_path, Path.cwd())[0]
    return 0 if row["failures"] == 0 and not row["steady_growth"] else 1


def cmd_data_generate(ns: argparse.Namespace) -> int:
    from ftserve.train.formats import write_jsonl
    from ftserve.train.tasks import get_task

    try:
        task = get_task(ns.task)
    except KeyError as exc:
        raise ConfigError(exc.args[0]) from None
    items = task.preferences(ns.n, ns.seed) if ns.preferences else task.generate(ns.n, ns.seed)
    digest = write_jsonl(ns.out, items)
    log.info("wrote %d %s records to %s (sha256 %s)", len(items), ns.task, ns.out, digest[:16])
    return 0


def cmd_data_replay(ns: argparse.Namespace) -> int:
    from ftserve.train.replay import generate_replay, write_replay
    from ftserve.train.trainers import set_threads

    set_threads(None)
    texts = generate_replay(_store(ns).pull(ns.model), ns.n, ns.seed, ns.max_new_tokens)
    write_replay(ns.out, texts)
    log.info("wrote %d replay texts to %s", len(texts), ns.out)
    return 0


def cmd_data_check(ns: argparse.Namespace) -> int:
    from ftserve.train.filters import apply_filters
    from ftserve.train.formats import load_jsonl, write_jsonl
    from ftserve.train.settings import FilterConfig

    config = validated(FilterConfig, ns, "data check")
    kept, report = apply_filters(load_jsonl(ns.file), config)
    print(json.dumps({"file": str(ns.file), **report.to_json()}, indent=2))
    if ns.out:
        write_jsonl(ns.out, kept)
        log.info("wrote %d filtered records to %s", len(kept), ns.out)
    return 0 if kept else 1


def cmd_train(ns: argparse.Namespace) -> int:
    from ftserve.train.pipeline import run_training
    from ftserve.train.settings import load_train_config

    overrides = dict(item.split("=", 1) for item in ns.set or [])
    config = load_train_config(ns.config, overrides)
    card = run_training(config, _store(ns), resume=ns.resume)
    print(json.dumps(card["metrics"], indent=2))
    return 0


def cmd_optimize(ns: argparse.Namespace) -> int:
    from ftserve.optimize.quantize import QuantizeError
    from ftserve.optimize.recipe import load_recipe
    from ftserve.optimize.runner import GateFailed, run_recipe

    recipe = load_recipe(ns.recipe)
    try:
        manifest = run_recipe(recipe, _store(ns))
    except QuantizeError as exc:
        raise ConfigError(str(exc)) from None
    except GateFailed as exc:
        log.error("%s", exc)
        return 3
    print(json.dumps({"out": str(recipe.out), "ready": manifest["ready"]}, indent=2))
    return 0


def cmd_config_show(ns: argparse.Namespace) -> int:
    overrides = dict(item.split("=", 1) for item in ns.set or [])
    config = load_service_config(ns.file, overrides)
    print(json.dumps(config.model_dump(mode="json"), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftserve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    groups = parser.add_subparsers(dest="group", required=True)

    model = groups.add_parser("model", help="the model store").add_subparsers(dest="action", required=True)
    commands: list[tuple[str, str, Callable[[argparse.Namespace], int], bool]] = [
        ("pull", "convert a bundled model (or check a local HF folder) into the store", cmd_model_pull, True),
        ("path", "print the local folder of a pulled model", cmd_model_path, True),
        ("list", "list bundled and pulled models", cmd_model_list, False),
    ]
    for name, help_, func, takes_ref in commands:
        sub = model.add_parser(name, help=help_)
        if takes_ref:
            sub.add_argument("ref", nargs="?", default=DEFAULT_MODEL, help="bundled model name or local folder")
        add_model_options(sub, StoreConfig)
        sub.set_defaults(func=func)

    bench = groups.add_parser("bench", help="benchmarks: JSON rows, baselines measured in the same run")
    bench_actions = bench.add_subparsers(dest="action", required=True)
    _add_benches(bench_actions)

    _add_data_commands(groups)
    train = groups.add_parser("train", help="train one LoRA adapter (SFT or DPO) from adapters/<name>.yaml")
    train.add_argument("config", type=Path, help="training config, e.g. adapters/support-router.yaml")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this run")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. optim.max_steps=10")
    add_model_options(train, StoreConfig)
    train.set_defaults(func=cmd_train)

    optimize = groups.add_parser("optimize", help="merge / quantize / gate / export, from optimize/<recipe>.yaml")
    optimize.add_argument("recipe", type=Path, help="optimize recipe, e.g. optimize/support-router-int8.yaml")
    add_model_options(optimize, StoreConfig)
    optimize.set_defaults(func=cmd_optimize)

    config = groups.add_parser("config", help="deployment settings").add_subparsers(dest="action", required=True)
    show = config.add_parser("show", help="print the resolved service settings")
    show.add_argument("file", nargs="?", default=None, help="deployment file (default bentos/default.yaml)")
    show.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. engine.dtype=float32")
    show.set_defaults(func=cmd_config_show)
    add_client_commands(groups)
    _add_loadtest(groups)
    add_cost_command(groups)
    _add_router(groups)
    return parser


def cmd_router(ns: argparse.Namespace) -> int:
    import asyncio
    import contextlib

    from ftserve.router.app import serve
    from ftserve.router.settings import RouterConfig

    config = validated(RouterConfig, ns, "router")
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn shut down cleanly, then re-raised the signal
        asyncio.run(serve(config))
    return 0


def _add_router(groups: Any) -> None:
    from ftserve.router.settings import RouterConfig

    sub = groups.add_parser(
        "router", help="adapter-affinity HTTP router in front of several replicas (see ftserve.router)"
    )
    add_model_options(sub, RouterConfig)
    sub.set_defaults(func=cmd_router)


def cmd_loadtest(ns: argparse.Namespace) -> int:
    from ftserve.loadtest.cli import cmd_loadtest as run
    from ftserve.loadtest.settings import LoadtestConfig

    return run(ns, validated(LoadtestConfig, ns, "loadtest"))


def _add_loadtest(groups: Any) -> None:
    from ftserve.loadtest.settings import LoadtestConfig

    sub = groups.add_parser("loadtest", help="Locust, headless, against a running service: report + SLO verdict")
    sub.add_argument("--json", dest="json_path", type=Path, default=None, metavar="FILE", help="JSON report here")
    add_model_options(sub, LoadtestConfig)
    sub.set_defaults(func=cmd_loadtest)


def _add_benches(bench_actions: Any) -> None:
    from ftserve.bench.soak import SoakBenchConfig
    from ftserve.bench.spec_settings import SpecBenchConfig
    from ftserve.bench.variants import OptimizeBenchConfig

    benches: list[tuple[str, str, type[BaseModel], Any]] = [
        ("engine", "the native engine vs HF generate (and vLLM CPU) per scenario", EngineBenchConfig, cmd_bench_engine),
        (
            "optimize",
            "fp32 / bf16 (LoRA) vs merged, int8, int4, gptq: size, quality and speed, one run",
            OptimizeBenchConfig,
            cmd_bench_optimize,
        ),
        (
            "spec",
            "speculative decoding (prompt lookup, draft model) vs plain decoding, grounded and chat",
            SpecBenchConfig,
            cmd_bench_spec,
        ),
        (
            "soak",
            "the default deployment under steady load for 10 minutes: memory growth and errors",
            SoakBenchConfig,
            cmd_bench_soak,
        ),
    ]
    for name, help_text, settings, func in benches:
        sub = bench_actions.add_parser(name, help=help_text)
        sub.add_argument("--json", dest="json_path", type=Path, required=True, metavar="FILE", help="rows go here")
        add_model_options(sub, settings)
        add_model_options(sub, StoreConfig)
        sub.set_defaults(func=func)


def _add_data_commands(groups: Any) -> None:
    from ftserve.train.settings import FilterConfig

    data = groups.add_parser("data", help="training data").add_subparsers(dest="action", required=True)
    gen = data.add_parser("generate", help="write a task's generated examples (or preference pairs) as JSONL")
    gen.add_argument("task", help="task name: support-router or order-extract")
    gen.add_argument("--n", type=int, default=2000, help="records to write (default: 2000)")
    gen.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    gen.add_argument("--preferences", action="store_true", help="write (prompt, chosen, rejected) pairs")
    gen.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    gen.set_defaults(func=cmd_data_generate)
    replay = data.add_parser("replay", help="sample base-model text for replay against forgetting (SFT)")
    replay.add_argument("--model", default=DEFAULT_MODEL, help="base model reference")
    replay.add_argument("--n", type=int, default=512, help="texts to write (default: 512)")
    replay.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    replay.add_argument("--max-new-tokens", type=int, default=80, help="tokens per continuation (default: 80)")
    replay.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    add_model_options(replay, StoreConfig)
    replay.set_defaults(func=cmd_data_replay)
    check = data.add_parser("check", help="validate a JSONL file and report what the quality filters drop")
    check.add_argument("file", type=Path, help="JSONL in Alpaca, chat or preference form")
    check.add_argument("--out", type=Path, default=None, help="also write the filtered records here")
    add_model_options(check, FilterConfig)
    check.set_defaults(func=cmd_data_check)


def main(argv: Sequence[str] | None = None) -> int:
    from ftserve.client import ClientError

    ns = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if ns.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(ns.func(ns))
    except (ModelStoreError, ConfigError, DataError) as exc:
        log.error("%s", exc)
        return 2
    except ClientError as exc:
        log.error("the server said %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
