# The README documents these targets; `.ci/run` calls `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SYSTEM_PACKAGES := orthanc orthanc-dicomweb dcmtk chromium redis-server postgresql unzip nginx
DEMO_PORT ?= 8000

LOCK := requirements.lock

.PHONY: install system-packages ohif test lint demo bench clean lock check-lock

install: $(VENV)/.installed

# Exactly the versions of requirements.lock, each file checked against its hash; then the
# project itself, whose dependencies are all in the lock already.
$(VENV)/.installed: pyproject.toml $(LOCK)
	@$(PYTHON) .ci/lockfile.py check
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet --require-hashes -r $(LOCK)
	$(VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

# After a change of the dependencies in pyproject.toml (or on merging branches that changed
# them): the lock again, keeping every pinned version that still fits; commit it. To move
# everything to the newest versions allowed: make lock LOCK_ARGS=--upgrade
lock:
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet "pip-tools>=7.4"
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile --quiet --generate-hashes \
		--extra dev --strip-extras --no-emit-index-url --no-emit-find-links $(LOCK_ARGS) \
		-o $(LOCK) pyproject.toml
	$(PYTHON) .ci/lockfile.py stamp

# Fails when pyproject.toml's dependencies changed since the lock was made.
check-lock:
	$(PYTHON) .ci/lockfile.py check

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

# OHIF, fetched from the npm registry by the npm client and checked against the checksum pinned
# in dicomweb/ohif/__init__.py; nothing happens when that version is already installed. It only
# fetches and writes files, so it runs in debug mode: no secret key is needed, none is used.
ohif: install
	@command -v npm >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing: npm"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null; \
		else \
			echo "please install npm (Debian: npm)"; exit 1; \
		fi; \
	}
	PORTAL_DEBUG=true $(PY) manage.py install_ohif

test: check-lock install system-packages ohif lint
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
