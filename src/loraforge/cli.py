"""The ``loraforge`` command line: one command per stage, all reading the same YAML config.

Every command takes ``--config FILE``; its flags override single keys of that file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from loraforge.config import EMBEDDED_DEFAULT_MODEL, load_config
from loraforge.errors import LoraforgeError

app = typer.Typer(
    help="loraforge: from raw instruction data to a LoRA adapter served in production.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
bench_app = typer.Typer(help="Benchmarks, side by side with the baseline named in their issue.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
console = Console(stderr=False)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file (sections model:, gate:, ...).")]
ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help=f"Embedded '{EMBEDDED_DEFAULT_MODEL}' (default) or a local Hugging Face model directory."),
]


@app.command()
def gate(
    inputs: Annotated[list[Path], typer.Argument(help="Input files: .jsonl, .json, .parquet, optionally .gz.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory for kept.jsonl, rejected.jsonl, report.json.")],
    model: ModelOpt = None,
    max_seq_length: Annotated[Optional[int], typer.Option(help="Reject samples longer than this many tokens.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Worker processes (default: one per core).")] = None,
    eval_file: Annotated[Optional[list[Path]], typer.Option("--eval-file", help="Decontaminate against these eval files (13-gram overlap).")] = None,
    pii: Annotated[Optional[str], typer.Option(help="PII handling: off, flag, drop or redact.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Clean training data: keep good samples, reject bad ones with a reason.

    Example: [bold]loraforge gate data/train.jsonl more.parquet --out gated/ --max-seq-length 2048[/bold]
    """
    from loraforge.gate import run_gate
    from loraforge.gate.report import render_table

    cfg = load_config(
        config,
        {
            "model.name": model,
            "gate.max_seq_length": max_seq_length,
            "gate.workers": workers,
            "gate.checks.eval_overlap.files": [str(p) for p in eval_file] if eval_file else None,
            "gate.checks.pii.mode": pii,
        },
    )
    report = run_gate(inputs, out, cfg, show_progress=True)
    console.print(render_table(report))
    console.print(f"kept -> {report.outputs['kept']}\nrejected -> {report.outputs['rejected']}\nreport -> {report.outputs['report']}")
    console.print(f"{report.timings['samples_per_s']:,.0f} samples/s on {int(report.timings['workers'])} workers")


def _parse_sets(sets: list[str] | None) -> dict:
    """--set key.path=value pairs; values are parsed as YAML (numbers, booleans, null, lists)."""
    import yaml

    from loraforge.errors import ConfigError

    out = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lora.r=32")
        out[key.strip()] = yaml.safe_load(value)
    return out


@app.command()
def train(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config file.", show_default=False)] = None,
    data: Annotated[Optional[Path], typer.Option(help="Training data: gate output (kept.jsonl) or any raw file the gate reads.")] = None,
    model: ModelOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps to run.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", "-r", help="LoRA rank.")] = None,
    quantization: Annotated[Optional[str], typer.Option(help="nf4 for QLoRA (CUDA only).")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="Serve Prometheus metrics on 127.0.0.1:PORT while training.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any config key: --set train.lora.alpha=64 (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Run the preflight checks only and print them.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run directory's last checkpoint.")] = False,
    gpus: Annotated[
        Optional[int],
        typer.Option("--gpus", "--nproc", min=1, help="Processes, one per GPU, started by torchrun (without GPUs: CPU processes, gloo)."),
    ] = None,
) -> None:
    """Train a LoRA / QLoRA adapter on gated data (raw data is gated first).

    Example: [bold]loraforge train --data gated/kept.jsonl --out runs/orders --max-steps 200[/bold]
    On 8 GPUs: [bold]loraforge train --data gated/kept.jsonl --out runs/orders --gpus 8[/bold]
    """
    from rich.table import Table

    from loraforge.train import launch

    ctx = launch.Dist.from_env()
    launch.check_launch(gpus, ctx)
    if gpus and gpus > 1 and not ctx.enabled and not dry_run:
        launch.relaunch_under_torchrun(gpus, sys.argv[1:])  # does not return: torchrun runs N of this command

    from loraforge.train.recipe import train as run_train

    overrides = {
        "model.name": model, "train.data": str(data) if data else None, "train.out": str(out) if out else None,
        "train.max_steps": max_steps, "train.lr": lr, "train.lora.r": rank, "train.quantization": quantization,
        "train.metrics_port": metrics_port, **_parse_sets(set_),
    }
    cfg = load_config(config, overrides)
    result = run_train(cfg, resume=resume, dry_run=dry_run, processes=gpus)
    if not ctx.main:
        return  # rank 0 reports for all
    table = Table(title="preflight")
    for column in ("level", "check", "finding", "fix"):
        table.add_column(column, overflow="fold")
    colors = {"ok": "green", "warn": "yellow", "block": "red"}
    for f in result.findings:
        table.add_row(f"[{colors[f.level]}]{f.level}[/]", f.check, f.message, f.fix)
    console.print(table)
    if dry_run:
        if any(f.level == "block" for f in result.findings):
            raise typer.Exit(1)
        return
    m = result.metrics
    console.print(
        f"{result.status}: {result.steps} steps, train loss {m.get('train_loss')}, eval loss {m.get('eval_loss')}, "
        f"{m.get('tokens_per_s', 0):,.0f} tokens/s\nadapter -> {result.run_dir / 'adapter'}\nloss curve -> {result.run_dir / 'loss.png'}"
    )


@app.command()
def merge(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (or its adapter/ folder).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the merged model.")],
    dtype: Annotated[str, typer.Option(help="auto, bf16 or fp32 (never 4-bit).")] = "auto",
) -> None:
    """Merge an adapter into full safetensors weights that plain transformers loads.

    Example: [bold]loraforge merge runs/orders --out merged/orders[/bold]
    """
    from loraforge.train.merge import merge as run_merge

    console.print(f"merged model -> {run_merge(run_dir, out, dtype)}")


@app.command("eval")
def eval_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (holds adapter/ and manifest.json); eval.json is written there.", show_default=False)],
    data: Annotated[Path, typer.Option("--data", "-d", help="Held-out test data, any format the gate reads; the last turn is the reference answer.")],
    task: Annotated[str, typer.Option(help="auto (JSON-object references -> json, else text), json or text.")] = "auto",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most per answer (greedy, stops at end of turn).")] = 128,
    batch_size: Annotated[int, typer.Option(help="Samples per generation / loss batch.")] = 16,
    examples: Annotated[int, typer.Option(help="Example outputs to show and keep in eval.json.")] = 5,
    require: Annotated[Optional[list[str]], typer.Option("--require", help="Promotion requirement on the adapter's metrics: 'exact_match>=0.8' (repeatable; >=, >, <=, <, ==).")] = None,
    require_better_than_base: Annotated[bool, typer.Option("--require-better-than-base", help="The adapter must beat the base on the primary metric (field_accuracy / rouge_l) and on loss.")] = False,
) -> None:
    """Evaluate base model and adapter side by side on held-out data; gate the adapter's promotion.

    Exit code 3 when a promotion requirement fails (2 when the evaluation cannot run).

    Example: [bold]loraforge eval runs/orders --data test.jsonl --require "exact_match>=0.8" --require-better-than-base[/bold]
    """
    from loraforge.eval import evaluate
    from loraforge.eval.report import examples_table, metrics_table, promotion_lines

    result = evaluate(
        run_dir, data, max_new_tokens=max_new_tokens, batch_size=batch_size, task=task, examples=examples,
        require=require, require_better_than_base=require_better_than_base, show_progress=True, console=console,
    )
    if result.examples:
        console.print(examples_table(result))
    console.print(metrics_table(result))
    for line in promotion_lines(result):
        console.print(line)
    t = result.timings
    console.print(f"eval.json -> {result.path}  ({t['total_s']:.1f} s: load {t['load_s']:.1f}, loss {t['loss_s']:.1f}, "
                  f"generation {t['generate_base_s'] + t['generate_adapter_s']:.1f}, {t['tokens_per_s']:,.0f} tokens/s)")
    result.promotion.raise_if_failed()


@app.command()
def serve(
    model: ModelOpt = None,
    adapter: Annotated[Optional[list[str]], typer.Option("--adapter", "-a", help="NAME=RUN_DIR_OR_ADAPTER_DIR (repeatable).")] = None,
    host: Annotated[Optional[str], typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default 8000).")] = None,
    adapter_root: Annotated[Optional[Path], typer.Option(help="Directory POST /v1/adapters may load from.")] = None,
    config: ConfigOpt = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any config key: --set serve.max_batch_size=16.")] = None,
) -> None:
    """Serve the base model and LoRA adapters behind an OpenAI-compatible API.

    Example: [bold]loraforge serve --adapter orders=runs/orders --port 8000[/bold]
    (API key: set LORAFORGE_API_KEY; admin key for loading adapters: LORAFORGE_ADMIN_KEY)
    """
    from loraforge.errors import ConfigError
    from loraforge.serve.app import serve as run_server

    adapters = {}
    for item in adapter or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {item!r}: expected NAME=DIR, e.g. --adapter orders=runs/orders")
        adapters[name] = path
    overrides = {
        "model.name": model, "serve.host": host, "serve.port": port,
        "serve.adapter_root": str(adapter_root) if adapter_root else None, **_parse_sets(set_),
    }
    cfg = load_config(config, overrides)
    if adapters:
        cfg.serve.adapters = {**cfg.serve.adapters, **{k: Path(v) for k, v in adapters.items()}}
    run_server(cfg)


@app.command()
def ask(
    prompt: Annotated[str, typer.Argument(help="The question.", show_default=False)],
    route: Annotated[list[str], typer.Option("--route", "-r", help="NAME=URL,MODEL in fallback order (repeatable).")],
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 for greedy.")] = 0.0,
    deadline: Annotated[float, typer.Option(help="Overall deadline in seconds.")] = 30.0,
    api_key: Annotated[Optional[str], typer.Option(envvar="LORAFORGE_API_KEY", help="Bearer key for every route.")] = None,
) -> None:
    """Ask through the resilient client (breakers, deadline, fallback) and say which route answered.

    Example: [bold]loraforge ask "Extract the order: ..." --route lora=http://127.0.0.1:8000,orders --route base=http://127.0.0.1:8001,base[/bold]
    """
    from loraforge.client import LLMClient, Route
    from loraforge.errors import ConfigError

    routes = []
    for item in route:
        name, sep, rest = item.partition("=")
        url, comma, model = rest.rpartition(",")
        if not sep or not comma or not name or not url or not model:
            raise ConfigError(f"--route {item!r}: expected NAME=URL,MODEL, e.g. lora=http://127.0.0.1:8000,orders")
        routes.append(Route(name, url, model, api_key=api_key))
    with LLMClient(routes, deadline_s=deadline) as client:
        answer = client.generate(prompt, max_tokens=max_tokens, temperature=temperature)
    console.print(answer.text)
    tried = "; ".join(f"{k}: {v}" for k, v in answer.failures.items())
    console.print(f"[dim]answered by route {answer.route} in {answer.latency_ms:.0f} ms, {answer.attempts} attempt(s), {answer.tokens_used} tokens{'; before: ' + tried if tried else ''}[/dim]")


@app.command()
def doctor(as_json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON.")] = False) -> None:
    """Check the environment a fine-tune depends on; exit 1 on a blocking problem.

    Example: [bold]loraforge doctor[/bold]   or   [bold]loraforge doctor --json[/bold]
    """
    from loraforge import doctor as doctor_module

    raise typer.Exit(doctor_module.run(as_json=as_json))


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A training run directory (the --out of `loraforge train`).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="HTML file to write (default: RUN_DIR/report.html).")] = None,
    gate_dir: Annotated[Optional[Path], typer.Option("--gate", help="The gate's output folder or report.json (default: beside the training data).")] = None,
) -> None:
    """Write one self-contained report.html: gate breakdown, loss curves, eval base vs adapter, latency.

    Example: [bold]loraforge report runs/mine[/bold]
    """
    from loraforge.report import write_report

    console.print(f"report -> {write_report(run_dir, out, gate_dir)}")


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Option("--out", "-o", help="JSONL file to write.")] = Path("demo-out/data.jsonl"),
    samples: Annotated[int, typer.Option(help="Good samples to generate (bad ones are planted on top).")] = 400,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same file.")] = 0,
) -> None:
    """Generate the demo dataset (order sentences -> JSON) with planted bad samples.

    Example: [bold]loraforge demo-data --out demo-out/data.jsonl --samples 400[/bold]
    """
    from loraforge.demo.data import write_demo_data

    counts = write_demo_data(out, samples, seed)
    console.print(f"wrote {out}: {counts['good']} good samples, {counts['planted']} planted bad ones")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for everything the demo writes.")] = Path("demo-out"),
    model: ModelOpt = None,
) -> None:
    """Run the whole pipeline on generated data with the embedded default model.

    Example: [bold]loraforge demo --out demo-out[/bold]
    """
    from loraforge.demo.run import run_demo

    run_demo(out, model or EMBEDDED_DEFAULT_MODEL, console)


@app.command("model")
def model_cmd(
    name: Annotated[str, typer.Argument(help="Model name or local directory.")] = EMBEDDED_DEFAULT_MODEL,
    weights: Annotated[bool, typer.Option(help="Also prepare the weights, not only the tokenizer.")] = True,
) -> None:
    """Prepare a model for offline use and show where it lives (converts the embedded GGUF once).

    Example: [bold]loraforge model smollm2-135m-instruct[/bold]
    """
    from loraforge.models import resolve_model

    console.print(f"{name} -> {resolve_model(name, with_weights=weights)}")


@bench_app.command("gate")
def bench_gate_cmd(
    data: Annotated[Path, typer.Option(help="Alpaca JSON file to replicate.")] = Path("../shared/data/alpaca_cleaned_1000.json"),
    records: Annotated[int, typer.Option(help="Records after replication.")] = 100_000,
    workers: Annotated[Optional[int], typer.Option(help="Gate workers (default: one per core).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Work directory.")] = Path("bench-out/gate"),
    datatrove: Annotated[bool, typer.Option(help="Compare the repetition check with datatrove's GopherRepetitionFilter.")] = True,
) -> None:
    """Gate throughput (samples/s per core, all checks on) and the repetition check vs datatrove.

    Example: [bold]loraforge bench gate --records 100000[/bold]
    """
    import json

    from loraforge.bench.gate import bench_gate

    result = bench_gate([data], records=records, workers=workers, out_dir=out, with_datatrove=datatrove)
    console.print_json(json.dumps(result, default=str))


@bench_app.command("serve")
def bench_serve_cmd(
    model: ModelOpt = None,
    adapter: Annotated[Optional[list[str]], typer.Option("--adapter", "-a", help="NAME=DIR (repeatable).")] = None,
    random_adapters: Annotated[int, typer.Option(help="Make this many random-weight adapters of the model instead.")] = 0,
    requests: Annotated[int, typer.Option(help="Requests to send.")] = 32,
    concurrency: Annotated[int, typer.Option(help="Requests in flight.")] = 8,
    max_tokens: Annotated[str, typer.Option(help="Output length range MIN,MAX.")] = "16,64",
    out: Annotated[Path, typer.Option("--out", "-o", help="Work directory.")] = Path("bench-out/serve"),
) -> None:
    """Serving throughput, TTFT and TPOT under concurrent load vs one model.generate at a time.

    Example: [bold]loraforge bench serve --random-adapters 2 --requests 32 --concurrency 8[/bold]
    """
    import json

    from loraforge.bench.serve import bench_serve, make_random_adapters
    from loraforge.models import resolve_model

    name = model or EMBEDDED_DEFAULT_MODEL
    adapters = {k: Path(v) for k, _, v in (a.partition("=") for a in adapter or [])}
    if random_adapters:
        adapters |= make_random_adapters(resolve_model(name), out / "adapters", random_adapters)
    low, high = (int(x) for x in max_tokens.split(","))
    result = bench_serve(name, adapters, out, requests, concurrency, (low, high))
    console.print_json(json.dumps(result))


@bench_app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_train_cmd(
    ctx: typer.Context,
    arch: Annotated[str, typer.Option(help="llama3-8b (random bf16 weights, GPU), smollm2 (the embedded default's shape; runs on CPU) or smollm2-real (its real weights: the numerics check).")] = "llama3-8b",
    engines: Annotated[str, typer.Option(help="Comma list of hf-peft, loraforge, loraforge-lean, loraforge-plain (every lever off), unsloth, unsloth-packed.")] = "hf-peft,loraforge,loraforge-lean,unsloth",
    cases: Annotated[str, typer.Option(help="dense (2 x 4096 random tokens) and/or alpaca (the shared file, real lengths).")] = "dense,alpaca",
    quants: Annotated[str, typer.Option(help="bf16 and/or nf4 (QLoRA, CUDA only).")] = "bf16,nf4",
    steps: Annotated[int, typer.Option(help="Timed optimizer steps per engine (after --warmup).")] = 8,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where results.json goes.")] = Path("bench-out/train"),
) -> None:
    """Training tokens/s, peak memory and epoch time: hf-peft, loraforge and Unsloth side by side.

    Each engine runs in its own process on the same model folder and data. More options
    (--warmup, --samples, --max-seq-length, --lean-budget GiB|match, --profile, --alpaca, --loraforge-set K=V):
    `python -m loraforge.bench.train_speed --help`.

    Example: [bold]loraforge bench train --arch smollm2 --engines hf-peft,loraforge --cases alpaca --quants bf16 --steps 3[/bold]
    """
    from loraforge.bench.train_speed import main as bench_main

    bench_main(["--arch", arch, "--engines", engines, "--cases", cases, "--quants", quants, "--steps", str(steps), "--out", str(out), *ctx.args])


@bench_app.command("train-distributed")
def bench_train_distributed_cmd(
    gpus: Annotated[int, typer.Option(help="GPUs of the multi-GPU cases (compared with 1).")] = 2,
    cases: Annotated[str, typer.Option(help="8b: Llama-3-8B shape, bf16 LoRA, 1 GPU vs N (DDP); 70b: Llama-3-70B shape, QLoRA, FSDP over N.")] = "8b,70b",
    steps: Annotated[int, typer.Option(help="Optimizer steps per case (tokens/s counts steps 2 on).")] = 8,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where train_distributed.json goes.")] = Path("bench-out/train-distributed"),
    tokenizer: Annotated[Optional[Path], typer.Option(help="A tokenizer directory (default: the tiny in-process one).")] = None,
) -> None:
    """Training tokens/s and peak memory per GPU on N GPUs vs 1 (random weights, built on each GPU).

    Example: [bold]loraforge bench train-distributed --gpus 2 --cases 8b,70b[/bold]
    """
    from loraforge.bench.train_distributed import main as bench_main

    bench_main(["--gpus", str(gpus), "--cases", cases, "--steps", str(steps), "--out", str(out), *(["--tokenizer", str(tokenizer)] if tokenizer else [])])


@bench_app.command("client")
def bench_client_cmd(calls: Annotated[int, typer.Option(help="Calls of each kind.")] = 2000) -> None:
    """The resilient client's overhead per call against raw httpx on the same local server.

    Example: [bold]loraforge bench client --calls 2000[/bold]
    """
    import json

    from loraforge.bench.client import bench_client

    console.print_json(json.dumps(bench_client(calls)))


def main() -> None:
    try:
        app()
    except LoraforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)  # plain: paths in messages must not be wrapped
        raise SystemExit(exc.exit_code) from None


if __name__ == "__main__":
    main()
