# hexgen: make demo (install + run the main job), make test (install + lint + the whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Extra pip arguments for torch, e.g. a CPU-only index on machines without a local CPU wheel.
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test lint format install sysdeps bench clean

demo: $(STAMP)
	$(BIN)/hexgen-node demo

test: $(STAMP) lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@mkdir -p .lint/hexgen && for p in daemon coordinator engine cli; do ln -sfn ../../$$p .lint/hexgen/$$p; done
	@ln -sfn "$$($(BIN)/python -c 'import os, trio; print(os.path.dirname(trio.__file__))')" .lint/trio
	cd .lint && ../$(BIN)/mypy --config-file ../pyproject.toml -p hexgen.daemon -p hexgen.coordinator -p hexgen.engine

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory sysdeps
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "hexgen needs Python 3.11 or newer ($(PYTHON) is $$($(PYTHON) --version))"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing torch with CUDA"; $(BIN)/python -m pip install -q "torch>=2.3,<3"; \
	else \
		echo "no GPU: installing the CPU build of torch"; \
		$(BIN)/python -m pip install -q "torch==2.13.0" $(TORCH_PIP_ARGS); \
	fi
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

# libp2p builds fastecdsa from source, which needs the GMP headers; the multi-host tests need `ip` (iproute2)
# and `iptables` to build network namespaces and firewall one of them.
sysdeps:
	@missing=""; \
	if ! [ -f /usr/include/gmp.h ] && ! [ -f /usr/include/x86_64-linux-gnu/gmp.h ] && \
		! [ -f /usr/include/aarch64-linux-gnu/gmp.h ]; then missing="$$missing libgmp-dev"; fi; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	command -v iptables >/dev/null || [ -x /usr/sbin/iptables ] || missing="$$missing iptables"; \
	[ -n "$$missing" ] || exit 0; \
	echo "installing system packages:$$missing"; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && apt-get install -y -q $$missing; \
	elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then \
		sudo apt-get update -q && sudo apt-get install -y -q $$missing; \
	else \
		echo "cannot install$$missing here: install them (GMP headers, iproute2, iptables) and rerun"; exit 1; \
	fi

bench: $(STAMP)
	$(BIN)/python bench/planner.py --quick --json bench/out/planner.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .lint
