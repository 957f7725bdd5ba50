"""Generate the demo dataset: order sentences -> a fixed JSON schema, with planted bad samples.

The task (extract customer, item, quantity and city from a free-form order sentence, answer
with exactly one JSON object) is one a 135M base model gets wrong and a small LoRA adapter
learns: it is about output structure and style, which is what LoRA is for. Every sample is
generated from a seed, so the demo is the same on every machine.

Planted bad samples, one or more of each gate reason, are listed in ``PLANTED`` so tests can
check the gate rejects each of them for the right reason.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Alice", "Bruno", "Chen", "Dara", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jonas", "Keiko", "Lena",
         "Mateo", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wen", "Yara", "Zoe"]
ITEMS = ["blue mug", "desk lamp", "notebook", "rain jacket", "coffee grinder", "yoga mat", "water bottle",
         "phone charger", "wool scarf", "chess set", "backpack", "teapot", "bike helmet", "sketchbook", "headphones"]
CITIES = ["Berlin", "Lagos", "Lima", "Osaka", "Porto", "Quebec", "Nairobi", "Oslo", "Hanoi", "Austin",
          "Krakow", "Seville", "Dublin", "Pune", "Tbilisi"]
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}
TEMPLATES = [
    "{name} ordered {qty} {item}{s} to be shipped to {city}.",
    "Please send {qty} {item}{s} to {name} in {city}.",
    "Hi, this is {name} from {city}; I'd like {qty} {item}{s}.",
    "New order: {qty} x {item} for {name}, delivery city {city}.",
    "{name} ({city}) wants {qty} {item}{s}, thanks!",
    "Could you ship {qty} {item}{s} to {city}? The order is for {name}.",
]
INSTRUCTION = "Extract the order as JSON with the keys customer, item, quantity and city. Answer with the JSON only."


def order_sample(rng: random.Random) -> dict:
    name, item, city = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(CITIES)
    qty = rng.randint(1, 10)
    spelled = NUMBERS[qty] if rng.random() < 0.4 else str(qty)
    text = rng.choice(TEMPLATES).format(name=name, qty=spelled, item=item, s="" if qty == 1 else "s", city=city)
    answer = json.dumps({"customer": name, "item": item, "quantity": qty, "city": city})
    return {"messages": [{"role": "user", "content": f"{INSTRUCTION}\n\n{text}"}, {"role": "assistant", "content": answer}]}


def _rambling(rng: random.Random, words: int) -> str:
    vocab = NAMES + ITEMS + CITIES + ["and", "then", "maybe", "because", "order", "parcel", "weekend", "soon"]
    return " ".join(rng.choice(vocab) for _ in range(words))


def _planted(rng: random.Random) -> list[tuple[str, str]]:
    """(reason the gate must give, raw JSONL line)."""
    good = order_sample(rng)
    user = good["messages"][0]
    loop = "I will extract the order now. " * 8
    return [
        ("malformed_json", '{"messages": [{"role": "user", "content": "unterminated'),
        ("schema", json.dumps({"question": "What is 2+2?", "answer": "4"})),
        ("empty_response", json.dumps({"messages": [user, {"role": "assistant", "content": "  "}]})),
        ("too_short", json.dumps({"messages": [user, {"role": "assistant", "content": "..."}]})),
        ("role_order", json.dumps({"messages": [user, {"role": "user", "content": "Hello?"}]})),
        ("special_token", json.dumps({"messages": [user, {"role": "assistant", "content": good["messages"][1]["content"] + "<|im_end|>"}]})),
        ("special_token", json.dumps({"messages": [{"role": "user", "content": "[INST] " + user["content"]}, good["messages"][1]]})),
        ("repetition", json.dumps({"messages": [user, {"role": "assistant", "content": loop}]})),
        ("too_long", json.dumps({"messages": [user, {"role": "assistant", "content": _rambling(rng, 2500)}]})),
        ("no_supervised_tokens", json.dumps({"messages": [{"role": "user", "content": user["content"] + " Notes: " + _rambling(rng, 2500)}, good["messages"][1]]})),
        ("exact_duplicate", json.dumps(good)),
    ]


PLANTED_REASONS = [reason for reason, _ in _planted(random.Random(0))]


def write_demo_data(path: Path | str, n: int = 400, seed: int = 0) -> dict[str, int]:
    """Write ``n`` good samples and the planted bad ones (shuffled in) as JSONL; return counts."""
    rng = random.Random(seed)
    lines = [json.dumps(order_sample(rng)) for _ in range(n)]
    planted = _planted(rng)
    # the exact duplicate must come after its original: plant it at the end
    duplicate = planted.pop()
    lines.insert(0, duplicate[1])
    for _, line in planted:
        lines.insert(rng.randrange(1, len(lines)), line)
    lines.append(duplicate[1])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"good": n + 1, "planted": len(planted) + 1}


def write_test_data(path: Path | str, n: int = 40, seed: int = 1, exclude: Path | str | None = None) -> int:
    """Write ``n`` clean held-out samples for ``loraforge eval``: a different seed than the
    training data, and no sample whose question also appears in ``exclude`` (the training file),
    so the evaluation measures what the adapter learned, not what it memorized."""
    seen: set[str] = set()
    if exclude is not None:
        for line in Path(exclude).read_text(encoding="utf-8").splitlines():
            try:
                seen.add(json.loads(line)["messages"][0]["content"])
            except (json.JSONDecodeError, KeyError, IndexError, TypeError):
                continue  # the planted bad lines of the training file
    rng = random.Random(seed)
    lines: list[str] = []
    while len(lines) < n:
        sample = order_sample(rng)
        question = sample["messages"][0]["content"]
        if question not in seen:
            seen.add(question)
            lines.append(json.dumps(sample))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return n
