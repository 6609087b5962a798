# igpt — two commands set everything up on a fresh machine:
#   make demo   train the default model if missing, then open the completion demo
#   make test   install what the tests need (incl. Debian's Chromium when root) and run them all
#               (the notebooks are executed once, then rendered into the docs site a browser test opens)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --quiet -c requirements/constraints.txt
RUNS   ?= runs
DEFAULT_RUN := digits

.PHONY: demo test test-fast dashboard notebooks bench figures docs install install-dev browser default-run probe-demo clean help

help:
	@echo "make demo        train the default digits model if missing (1–4 min on CPU), open http://127.0.0.1:7860"
	@echo "make test        run the whole test suite (installs dev tools and Chromium first)"
	@echo "make test-fast   the unit tests only (no servers, browser, notebooks or torchrun; < 2 min)"
	@echo "make dashboard   probe the default run if not yet done, then open the dashboard on http://127.0.0.1:8501"
	@echo "make probe-demo  train and probe a model of translated digits (~8 min of CPU; see docs/findings.md)"
	@echo "make notebooks   open JupyterLab on the teaching notebooks"
	@echo "make bench       run the side-by-side benchmarks against Hugging Face (prints JSON)"
	@echo "make figures     train what is missing (digits, photos; ~5 min on 2 cores) and draw docs/images/*.png"
	@echo "make docs        execute the notebooks, then build the documentation site into site/ (offline)"

# torch first, pinned to the CPU build; then the package with its extras, all from the constraints file.
$(VENV)/.installed-base: pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch
	$(PIP) -e ".[apps,notebooks]"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-base
	$(PIP) -e ".[apps,notebooks,datasets,dev,docs]"
	touch $@

$(VENV)/.installed-docs: $(VENV)/.installed-base
	$(PIP) -e ".[apps,notebooks,docs]"
	touch $@

install: $(VENV)/.installed-base
install-dev: $(VENV)/.installed-dev

# Browser tests drive Debian's Chromium (Playwright cannot download browsers here).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "browser tests need /usr/bin/chromium: sudo apt-get install chromium"; exit 1; fi; fi

default-run: $(VENV)/.installed-base
	$(BIN)/igpt train --runs-dir $(RUNS) --dataset digits --preset tiny --colors 16 --steps 300 \
	  --name $(DEFAULT_RUN) --skip-existing

# Translated digits with 8 blocks of width 64 (docs/findings.md): there learned features beat raw
# pixels by 17-22 points in every seed; the dashboard shows the run beside digits. One BLAS thread:
# much faster fits.
probe-demo: $(VENV)/.installed-base
	$(BIN)/igpt train --runs-dir $(RUNS) --dataset digits-moved --preset tiny --set n_layer=8 --set n_embd=64 \
	  --colors 16 --batch-size 32 --steps 300 --checkpoints 25,50,100,150,200,300 --name digits-moved --skip-existing
	OMP_NUM_THREADS=1 $(BIN)/igpt probe digits-moved --runs-dir $(RUNS) --skip-existing

demo: default-run
	$(BIN)/igpt demo --runs-dir $(RUNS)

# The dashboard opens on charts: the default run's probes are computed first when missing.
dashboard: default-run
	OMP_NUM_THREADS=1 $(BIN)/igpt probe $(DEFAULT_RUN) --runs-dir $(RUNS) --skip-existing
	$(BIN)/igpt dashboard --runs-dir $(RUNS)

notebooks: $(VENV)/.installed-base
	$(BIN)/jupyter lab notebooks $$( [ "$$(id -u)" = 0 ] && echo --allow-root )

test: $(VENV)/.installed-dev browser
	$(BIN)/python -m pytest

# The first tier: unit tests, no server, browser, notebook or torchrun (under 2 minutes on 2 cores).
test-fast: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -m "not slow"

# The pictures of the README and the docs: the default run (as above), a small photos run, the probes.
figures: default-run
	$(BIN)/python scripts/figures.py --runs-dir $(RUNS)

# The site renders the executed notebooks; the test suite builds it the same way from its own run.
docs: $(VENV)/.installed-docs
	$(BIN)/python scripts/run_notebooks.py build/notebooks
	NO_MKDOCS_2_WARNING=1 IGPT_EXECUTED_NOTEBOOKS=build/notebooks $(BIN)/mkdocs build --site-dir site

bench: $(VENV)/.installed-dev
	@for script in benchmarks/*.py; do echo "== $$script"; OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build site
