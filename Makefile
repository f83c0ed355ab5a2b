# The README documents these targets; `.ci/run` calls `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SYSTEM_PACKAGES := orthanc orthanc-dicomweb dcmtk chromium redis-server postgresql
DEMO_PORT ?= 8000

.PHONY: install system-packages test lint demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $@

# The integration tests need real peers: Orthanc as the PACS, dcmtk, Chromium, Redis and
# PostgreSQL. On Debian, as root, the missing ones are installed; elsewhere we say what is needed.
system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
		else \
			echo "please install these Debian packages:$$missing"; exit 1; \
		fi; \
	fi

test: install system-packages lint
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

# The demo runs in debug mode: with DEBUG off the portal refuses the demo's secret key.
demo: export PORTAL_DEBUG = true
demo: install
	$(PY) manage.py migrate --noinput
	$(PY) manage.py demo_data
	$(PY) manage.py collectstatic --noinput >/dev/null
	$(PY) manage.py serve_demo --port $(DEMO_PORT)

bench: install system-packages
	$(PY) -m tests.bench

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
