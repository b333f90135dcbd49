"""``ftserve bench spec``: speculative decoding against plain decoding, same engine, same run.

Scenarios (``requests`` prompts each, greedy, stopping at EOS or ``max_new_tokens``):

- ``grounded``: output that copies from the input: order extraction (the order-extract adapter's held-out
  texts, run with that adapter) and editing (return a paragraph with its spelling fixed);
- ``chat``: open questions, where little of the answer is in the prompt.

Each scenario runs at each batch size (that many requests in flight at once) with drafter ``none``,
``prompt-lookup`` (``history: true``, the default, also drafting from earlier outputs of the same adapter in
the run; ``history: false``, the request's own text only) and ``draft-model`` (one set of rows per ``drafts``
entry), chosen per request, the cases interleaved within each repeat so drift hits them alike (every other
repeat in reverse order). Every run starts with an empty output history, so no prompt's answer is drafted
from an earlier run of that prompt.

A row: ``tokens_per_s`` (decode speed of a stream: tokens after each request's first over the time from
its first token to its last, median of ``repeats``), ``throughput_tokens_per_s`` (all output tokens over the
case's wall time, prefill included), ``speedup`` (``tokens_per_s`` over ``none``'s in the same repeat,
median over repeats: paired, so a machine whose speed drifts between repeats does not compare one repeat's
case with another's baseline), ``acceptance_rate`` (accepted / drafted tokens) and ``same_output`` (every
request's tokens equal the ``none`` run's in every repeat: greedy speculation must not change them).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ftserve.bench.engine_bench import write_rows
from ftserve.bench.spec_settings import DRAFT_FORM, SpecBenchConfig
from ftserve.config import EngineConfig, SpeculativeConfig
from ftserve.engine.draft_model import DraftModel, load_draft
from ftserve.engine.loader import HFTokenizer, eos_token_ids, prepare_runtime
from ftserve.engine.lora import LoraAdapter
from ftserve.engine.model import NativeLlama
from ftserve.engine.native import NativeEngine
from ftserve.engine.request import GenerationOutput, GenerationRequest, SamplingParams, SpeculationParams

log = logging.getLogger(__name__)
Row = dict[str, Any]

EDITS = [
    "Our new office opend last monday. The kitchen is on the secnd floor and the meeting rooms are next to the "
    "stairs. Please remeber to book a room before you use it, and clean the whiteboard when you leave.",
    "The train to Bergen leavs at nine in the morning. Tickets can be bougth at the station or online, and "
    "children under six travel for free. The jorney takes about seven hours and the views are beatiful.",
    "To reset your pasword, open the settings page and click on security. Enter your old pasword, then the new "
    "one twice. If you forgot the old one, use the link in the email we sent you when you signed up.",
    "The libary will be closed on friday for the anual inventory. Books that are due that day can be returned "
    "on saturday without a fine. The reading room upstairs stays open untill six in the evening.",
]
CHAT = [
    "Write a short story about a robot who learns to paint.",
    "What are some tips for staying productive when working from home?",
    "Explain why the sky is blue to a ten year old.",
    "Give me three ideas for a birthday party for a seven year old.",
    "What should I pack for a weekend hiking trip?",
    "Describe a perfect Sunday morning.",
    "How do I start learning to play the guitar?",
    "Write a friendly email inviting my neighbours to a barbecue.",
]


@dataclass(frozen=True)
class Prompt:
    messages: list[dict[str, str]]
    adapter: str | None


def scenarios(config: SpecBenchConfig, adapter: str | None) -> dict[str, list[Prompt]]:
    items = [json.loads(line) for line in config.extract_items.read_text().splitlines() if line.strip()]
    extract = [Prompt([item["messages"][0]], adapter) for item in items]
    edits = [
        Prompt([{"role": "user", "content": f"Fix the spelling and return the whole text:\n\n{t}"}], None)
        for t in EDITS
    ]
    grounded = [p for pair in itertools.zip_longest(extract, edits) for p in pair if p is not None]
    chat = [Prompt([{"role": "user", "content": text}], None) for text in CHAT]
    return {"grounded": _take(grounded, config.requests), "chat": _take(chat, config.requests)}


def _take(prompts: list[Prompt], n: int) -> list[Prompt]:
    return list(itertools.islice(itertools.cycle(prompts), n))


@dataclass
class Run:
    tokens_per_s: float  # decode: tokens after each request's first / the time between its first and last
    throughput: float  # every output token / wall time of the case (prefill included)
    outputs: list[list[int]]
    drafted: int
    accepted: int


async def run_case(engine: NativeEngine, prompts: list[Prompt], batch: int, drafter: str, k: int, limit: int) -> Run:
    """Every prompt, at most ``batch`` in flight, each asking for ``drafter``."""
    params = SamplingParams(max_tokens=limit, temperature=0.0)
    speculation = SpeculationParams(drafter=drafter, num_tokens=k)  # type: ignore[arg-type]
    slots = asyncio.Semaphore(batch)

    async def one(i: int, prompt: Prompt) -> tuple[list[int], GenerationOutput, float]:
        ids = engine.tokenizer.apply_chat_template(prompt.messages)
        request = GenerationRequest(f"spec-{drafter}-{i}", ids, params, prompt.adapter, speculation=speculation)
        async with slots:
            tokens: list[int] = []
            last: GenerationOutput | None = None
            first = 0.0
            async for last in engine.generate(request):
                if last.error is not None:
                    raise RuntimeError(f"request {request.request_id} failed: {last.error}")
                if not tokens:
                    first = time.perf_counter()
                tokens.extend(last.token_ids)
            if last is None:
                raise RuntimeError(f"request {request.request_id} produced nothing")
            return tokens, last, time.perf_counter() - first

    start = time.perf_counter()
    done = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    wall = time.perf_counter() - start
    # The first token's step also ran the prefill; decoding is what follows it. Tokens that arrived with the
    # first one (an accepted draft) count as decoded.
    decode_s = sum(s for _, _, s in done)
    return Run(
        tokens_per_s=sum(len(t) - 1 for t, _, _ in done) / decode_s if decode_s else 0.0,
        throughput=sum(len(t) for t, _, _ in done) / wall,
        outputs=[t for t, _, _ in done],
        drafted=sum(last.num_draft_tokens for _, last, _ in done),
        accepted=sum(last.num_accepted_tokens for _, last, _ in done),
    )


def build_draft(form: str, model_dir: Path, model: NativeLlama) -> DraftModel:
    match = DRAFT_FORM.match(form)
    if match is None:
        raise ValueError(f"draft {form!r}")
    quantize, layers = match.group(1), match.group(2)
    spec = SpeculativeConfig(
        drafter="draft-model",
        draft_quantize=quantize,
        draft_layers=int(layers) if layers else None,  # type: ignore[arg-type]
    )
    return load_draft(spec, model_dir, model)


def run_spec_bench(config: SpecBenchConfig, model_dir: Path, json_path: Path) -> list[Row]:
    return asyncio.run(_run(config, model_dir, json_path))


@dataclass(frozen=True)
class Case:
    """One row's configuration: a drafter asked for per request, on an engine built for it."""

    drafter: str
    engine: NativeEngine
    fields: dict[str, Any]  # what the row says about the drafter beyond its name


async def _run(config: SpecBenchConfig, model_dir: Path, json_path: Path) -> list[Row]:
    engine_config = EngineConfig(max_num_seqs=max(config.batches), max_loras=1)
    device, dtype, threads = prepare_runtime(engine_config, model_dir)
    model = NativeLlama.from_dir(model_dir, device, dtype)
    tokenizer = HFTokenizer(model_dir)
    eos = eos_token_ids(model_dir, tokenizer)
    log.info("target %s as %s on %s (%d threads)", model_dir.name, dtype, device, threads)

    def engine(draft: DraftModel | None, history: bool = True) -> NativeEngine:
        spec = SpeculativeConfig(num_tokens=config.num_tokens, ngram_history=history)
        return NativeEngine(model, tokenizer, eos, engine_config.model_copy(update={"speculative": spec}), draft)

    drafts = [build_draft(form, model_dir, model) for form in tqdm(config.drafts, desc="draft models", unit="model")]
    main = engine(drafts[0])
    cases = [
        Case("none", main, {}),
        Case("prompt-lookup", main, {"history": True}),
        Case("prompt-lookup", engine(None, history=False), {"history": False}),
        *(
            Case("draft-model", main if n == 0 else engine(d), {"draft": f"{d.name} ({str(d.model.dtype)[6:]})"})
            for n, d in enumerate(drafts)
        ),
    ]
    engines = list({id(c.engine): c.engine for c in cases}.values())
    rows: list[Row] = []
    try:
        for e in engines:
            await e.start()
            adapter = await _load_adapter(e, config.adapter)
        for scenario, prompts in scenarios(config, adapter).items():
            for batch in config.batches:
                runs = await _measure(cases, prompts, batch, config)
                for case, repeats in zip(cases, runs, strict=True):
                    rows.append(_row(scenario, case, batch, repeats, runs[0], dtype))
                    log.info("%s", rows[-1])
                write_rows(json_path, rows)
    finally:
        for e in engines:
            await e.stop()
    return rows


async def _measure(cases: list[Case], prompts: list[Prompt], batch: int, config: SpecBenchConfig) -> list[list[Run]]:
    """Every case ``repeats`` times, interleaved, every other repeat in reverse order (so a drift within a
    repeat favours no case); each run starts with no output history (prompt lookup must not draft a prompt's
    answer from an earlier run of the same prompt). Runs per case, in repeat order.

    The warm-up prefills every prompt on every engine, so every measured run finds the same prompts in the
    prefix cache: a prompt's output is compared with the baseline's under the same caching."""
    for case in cases:
        await run_case(case.engine, prompts, 1, "none", config.num_tokens, 8)  # warm-up
    runs: list[list[Run]] = [[] for _ in cases]
    for repeat in tqdm(range(config.repeats), desc=f"batch {batch}", unit="repeat", leave=False):
        order = list(zip(cases, runs, strict=True))
        for case, done in order if repeat % 2 == 0 else reversed(order):
            case.engine.speculator.clear_history()
            done.append(
                await run_case(case.engine, prompts, batch, case.drafter, config.num_tokens, config.max_new_tokens)
            )
    return runs


def _median(runs: list[Run]) -> Run:
    mid = sorted(runs, key=lambda r: r.tokens_per_s)[len(runs) // 2]
    rate, throughput = (statistics.median(getattr(r, key) for r in runs) for key in ("tokens_per_s", "throughput"))
    return Run(rate, throughput, mid.outputs, mid.drafted, mid.accepted)


def paired_speedup(runs: list[Run], baseline: list[Run]) -> float:
    """Median over repeats of a case's decode speed over the baseline's in the same repeat."""
    return statistics.median(r.tokens_per_s / b.tokens_per_s for r, b in zip(runs, baseline, strict=True))


def _row(scenario: str, case: Case, batch: int, runs: list[Run], none: list[Run], dtype: Any) -> Row:
    run = _median(runs)
    return {
        "scenario": scenario,
        "drafter": case.drafter,
        "batch": batch,
        "tokens_per_s": round(run.tokens_per_s, 2),
        "throughput_tokens_per_s": round(run.throughput, 2),
        "speedup": round(paired_speedup(runs, none), 3),
        "acceptance_rate": round(run.accepted / run.drafted, 3) if run.drafted else None,
        "draft_tokens": run.drafted,
        "accepted_tokens": run.accepted,
        "output_tokens": sum(len(t) for t in run.outputs),
        "same_output": all(r.outputs == b.outputs for r, b in zip(runs, none, strict=True)),
        "dtype": str(dtype).removeprefix("torch."),
        **case.fields,
    }


async def _load_adapter(engine: NativeEngine, folder: Path | None) -> str | None:
    if folder is None:
        return None
    adapter: LoraAdapter = await engine.load_adapter(folder.name, folder)
    return adapter.name
