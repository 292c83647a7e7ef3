# The two front-door commands (see README): `make demo` and `make test`. Both set up first.
.PHONY: setup demo test test-fast

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/forgetless info
	.venv/bin/forgetless generate --prompt "Question: Tell me the capital of France. Answer:" --max-new-tokens 8
	.venv/bin/forgetless run configs/quickstart.yaml --out runs/quickstart
	@echo "open runs/quickstart/domain/report.html and runs/quickstart/facts/report.html"

test: setup
	.venv/bin/python -m pytest -q --durations=15

test-fast:
	.venv/bin/python -m pytest -q -m "not e2e"
