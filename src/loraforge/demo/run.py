"""``loraforge demo``: the pipeline end to end on generated data with the embedded default.

1. generate order-extraction data with planted bad samples, and a clean held-out test set;
2. gate it; 3. train an adapter; 4. evaluate base vs adapter, with a promotion gate;
5. serve the adapter, ask through the OpenAI API and the resilient client, kill the server,
   show the fallback answering, restart, show recovery; 6. write the run report.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from loraforge.config import load_config
from loraforge.demo.data import write_demo_data, write_test_data
from loraforge.gate import run_gate
from loraforge.gate.report import render_table

# Small enough for 2 CPU cores in about two minutes (a 135M model trains at ~100 tokens/s
# there), large enough for the loss to fall clearly: 16 steps of 4 rows of <= 256 tokens.
DEMO_TRAIN = {
    "train.max_seq_length": 256,
    "train.micro_batch_size": 4,
    "train.max_steps": 16,
    "train.lr": 1e-3,
    "train.eval_every": 8,
    "train.checkpoint_every": 8,
}
# The promotion gate the adapter must pass before it is served: strict JSON with every field
# right on at least 80% of held-out orders, and better than the base model.
DEMO_REQUIREMENTS = ["exact_match>=0.8", "json_valid>=0.9"]
TEST_SAMPLES = 40


def run_demo(out: Path, model: str, console: Console) -> None:
    out = Path(out)
    data, test_data = out / "data.jsonl", out / "test.jsonl"
    counts = write_demo_data(data)
    write_test_data(test_data, TEST_SAMPLES, seed=1, exclude=data)
    console.rule("1. demo data")
    console.print(f"{data}: {counts['good']} good order-extraction samples and {counts['planted']} planted bad ones")
    console.print(f"{test_data}: {TEST_SAMPLES} held-out samples, none of them in the training file")

    console.rule("2. gate")
    config = load_config(overrides={"model.name": model, "train.data": str(out / "gated" / "kept.jsonl"), "train.out": str(out / "run"), **DEMO_TRAIN})
    report = run_gate([data], out / "gated", config, show_progress=True)
    console.print(render_table(report))
    console.print(f"kept -> {report.outputs['kept']}\nrejected (with reasons) -> {report.outputs['rejected']}")

    console.rule("3. train")
    import shutil

    from loraforge.train.recipe import train

    shutil.rmtree(out / "run", ignore_errors=True)  # the demo always starts fresh
    result = train(config)
    m = result.metrics
    console.print(
        f"{result.status}: {result.steps} steps, train loss {m['train_loss']:.3f}, eval loss {m['eval_loss']:.3f}, "
        f"{m['tokens_per_s']:,.0f} tokens/s\nadapter -> {result.run_dir / 'adapter'}\nloss curve -> {result.run_dir / 'loss.png'}"
    )

    console.rule("4. evaluate: base vs adapter")
    from loraforge.eval import evaluate
    from loraforge.eval.report import metrics_table, promotion_lines

    evaluation = evaluate(
        result.run_dir, test_data, max_new_tokens=48, require=DEMO_REQUIREMENTS, require_better_than_base=True, show_progress=True, console=console
    )
    console.print(metrics_table(evaluation))
    for line in promotion_lines(evaluation):
        console.print(line)
    promoted = evaluation.promotion.passed
    console.print(
        "[green]promotion gate passed[/green]: the adapter is served" if promoted else "[red]promotion gate failed[/red]: serving it anyway to show the rest of the pipeline"
    )

    console.rule("5. serve")
    latencies = ask_through_the_api(model, result.run_dir, out, console)
    (result.run_dir / "serving.json").write_text(json.dumps({"requests": latencies}, indent=1) + "\n")

    console.rule("6. report")
    from loraforge.report import write_report

    html = write_report(result.run_dir)
    console.print(summary_table(report, result, evaluation, latencies))
    console.print(f"report -> [bold]{html}[/bold] (open it in a browser)")


def summary_table(gate_report, result, evaluation, latencies: list[dict]):
    from rich.table import Table

    from loraforge.eval.metrics import PRIMARY
    from loraforge.report import latency_table

    base, adapter = evaluation.base, evaluation.adapter
    primary = PRIMARY[evaluation.task]
    table = Table(title="loraforge demo: summary")
    table.add_column("stage")
    table.add_column("result")
    table.add_row("gate", f"{gate_report.kept} kept, {gate_report.rejected} rejected ({len(gate_report.reasons)} reasons)")
    from loraforge.train.report import read_metrics

    first_loss = read_metrics(result.run_dir / "metrics.jsonl")[0]["loss"]
    table.add_row("train", f"{result.steps} steps, loss {first_loss:.2f} -> {result.metrics['train_loss']:.2f}")
    table.add_row(
        "eval",
        f"exact match {base['exact_match']:.0%} -> {adapter['exact_match']:.0%}, {primary} {base[primary]:.0%} -> {adapter[primary]:.0%}, "
        f"loss {base['loss']:.2f} -> {adapter['loss']:.2f}",
    )
    table.add_row("promotion", "passed" if evaluation.promotion.passed else "FAILED")
    for row in latency_table({"requests": latencies}):
        table.add_row(f"serve via {row['route']}", f"{row['requests']} requests, p50 {row['p50']:.0f} ms, p99 {row['p99']:.0f} ms")
    return table


FALLBACK_SYSTEM_PROMPT = (
    "Reply with exactly one JSON object with the keys customer, item, quantity (a number) and city, nothing else."
)
LATENCY_REQUESTS = 8


def ask_through_the_api(model: str, run_dir: Path, out: Path, console: Console) -> list[dict]:
    """Serve the adapter; ask base and adapter through the OpenAI API; then show the resilient
    client falling back to a second server when the adapter's server is killed, and recovering.
    Returns every client call's route and latency (the report's latency section)."""
    import time

    import openai

    from loraforge.client import BreakerConfig, LLMClient, Route
    from loraforge.demo.data import INSTRUCTION
    from loraforge.serve.process import ServerProcess

    question = f"{INSTRUCTION}\n\nHi, this is Marta from Valencia; I'd like three desk lamps."
    calls: list[dict] = []
    with ServerProcess(model, {"orders": run_dir}, log=out / "serve.log") as primary, ServerProcess(model, {}, log=out / "serve-fallback.log") as backup:
        console.print(f"adapter server {primary.url}, fallback server {backup.url} (logs in {out})")
        api = openai.OpenAI(base_url=primary.url + "/v1", api_key=primary.api_key, max_retries=0)
        for name in ("base", "orders"):
            reply = api.chat.completions.create(model=name, messages=[{"role": "user", "content": question}], max_tokens=48, temperature=0)
            console.print(f"[bold]{name}[/bold] via the OpenAI API: {reply.choices[0].message.content!r}")

        console.rule("5b. resilient client")
        routes = [
            Route("lora", primary.url, "orders", api_key=primary.api_key, timeout_s=60),
            Route("base-fallback", backup.url, "base", api_key=backup.api_key, system_prompt=FALLBACK_SYSTEM_PROMPT, timeout_s=60),
        ]
        with LLMClient(routes, breaker=BreakerConfig(failure_threshold=1, reset_timeout_s=2), deadline_s=120) as client:

            def ask(when: str, show: bool = True) -> None:
                answer = client.generate(question, max_tokens=48)
                calls.append({"route": answer.route, "latency_ms": answer.latency_ms, "ok": True, "phase": when})
                if show:
                    console.print(f"{when}: route [bold]{answer.route}[/bold] in {answer.latency_ms:.0f} ms: {answer.text!r}")

            ask("both servers up")
            for _ in range(LATENCY_REQUESTS - 1):
                ask("both servers up", show=False)
            primary.kill()
            console.print("[red]adapter server killed (SIGKILL)[/red]")
            for i in range(3):
                ask("adapter server down", show=i == 0)
            with ServerProcess(model, {"orders": run_dir}, log=out / "serve-restarted.log", api_key=primary.api_key, port=primary.port):
                console.print("[green]adapter server restarted[/green]")
                time.sleep(2.1)  # the breaker's reset timeout: the next call is its trial
                ask("after recovery")
    return calls
