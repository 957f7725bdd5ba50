"""``loraforge demo``: the pipeline end to end on generated data with the embedded default.

Stages that exist run in order; each later stage adds its step here.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from loraforge.config import load_config
from loraforge.demo.data import write_demo_data
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


def run_demo(out: Path, model: str, console: Console) -> None:
    out = Path(out)
    data = out / "data.jsonl"
    counts = write_demo_data(data)
    console.rule("1. demo data")
    console.print(f"{data}: {counts['good']} good order-extraction samples and {counts['planted']} planted bad ones")

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

    console.rule("4. serve")
    ask_through_the_api(model, result.run_dir, out, console)


FALLBACK_SYSTEM_PROMPT = (
    "Reply with exactly one JSON object with the keys customer, item, quantity (a number) and city, nothing else."
)


def ask_through_the_api(model: str, run_dir: Path, out: Path, console: Console) -> None:
    """Serve the adapter; ask base and adapter through the OpenAI API; then show the resilient
    client falling back to a second server when the adapter's server is killed, and recovering."""
    import time

    import openai

    from loraforge.client import BreakerConfig, LLMClient, Route
    from loraforge.demo.data import INSTRUCTION
    from loraforge.serve.process import ServerProcess

    question = f"{INSTRUCTION}\n\nHi, this is Marta from Valencia; I'd like three desk lamps."
    with ServerProcess(model, {"orders": run_dir}, log=out / "serve.log") as primary, ServerProcess(model, {}, log=out / "serve-fallback.log") as backup:
        console.print(f"adapter server {primary.url}, fallback server {backup.url} (logs in {out})")
        api = openai.OpenAI(base_url=primary.url + "/v1", api_key=primary.api_key, max_retries=0)
        for name in ("base", "orders"):
            reply = api.chat.completions.create(model=name, messages=[{"role": "user", "content": question}], max_tokens=48, temperature=0)
            console.print(f"[bold]{name}[/bold] via the OpenAI API: {reply.choices[0].message.content!r}")

        console.rule("5. resilient client")
        routes = [
            Route("lora", primary.url, "orders", api_key=primary.api_key, timeout_s=60),
            Route("base-fallback", backup.url, "base", api_key=backup.api_key, system_prompt=FALLBACK_SYSTEM_PROMPT, timeout_s=60),
        ]
        with LLMClient(routes, breaker=BreakerConfig(failure_threshold=1, reset_timeout_s=2), deadline_s=120) as client:
            def ask(when: str) -> None:
                answer = client.generate(question, max_tokens=48)
                console.print(f"{when}: route [bold]{answer.route}[/bold] in {answer.latency_ms:.0f} ms: {answer.text!r}")

            ask("both servers up")
            primary.kill()
            console.print("[red]adapter server killed (SIGKILL)[/red]")
            ask("adapter server down")
            with ServerProcess(model, {"orders": run_dir}, log=out / "serve-restarted.log", api_key=primary.api_key, port=primary.port):
                console.print("[green]adapter server restarted[/green]")
                time.sleep(2.1)  # the breaker's reset timeout: the next call is its trial
                ask("after recovery")
