.PHONY: run test lint bench fmt

run:  ## start the whole platform on embedded defaults
	scripts/run.sh

test:  ## install what is needed and run every check and test
	scripts/test.sh

lint:
	scripts/uv.sh run ruff check .
	scripts/uv.sh run ruff format --check .
	scripts/uv.sh run mypy

fmt:
	scripts/uv.sh run ruff format .
	scripts/uv.sh run ruff check --fix .

bench:
	scripts/uv.sh run python bench/queue_core_bench.py
