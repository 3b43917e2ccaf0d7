# Two commands on a fresh machine: `make demo` (the main job on an embedded default) and `make test`.
.PHONY: setup demo test bench bench-quick lint format kafka-up kafka-down clean

setup:
	bash scripts/bootstrap.sh

demo: setup
	.venv/bin/rnnstream demo

test:
	bash scripts/test.sh

bench: setup
	.venv/bin/rnnstream bench engine

bench-quick: setup
	.venv/bin/rnnstream bench engine --quick

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

kafka-up: setup
	bash scripts/system_deps.sh
	.venv/bin/rnnstream kafka up

kafka-down: setup
	.venv/bin/rnnstream kafka down

clean:
	rm -rf .venv .pytest_cache .ruff_cache .hypothesis results
