# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast check lint typecheck venv mosquitto test-tools clean qemu-deps qemu-test

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found (Python 3.11 is required)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/edgelearn demo

mosquitto:
	@if command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing mosquitto (Debian package)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; \
	else echo "error: mosquitto is missing; install it (e.g. sudo apt-get install mosquitto)"; exit 1; fi

# Third-party parts some tests drive (Debian packages): chromium (the dashboard, headless), openssh-server and rsync
# (flash over a real ssh). Installed when running as root with apt; elsewhere those tests are skipped, saying why.
TEST_TOOLS := chromium:chromium sshd:openssh-server rsync:rsync
test-tools:
	@missing=""; for t in $(TEST_TOOLS); do cmd=$${t%%:*}; pkg=$${t#*:}; \
		command -v $$cmd >/dev/null || test -x /usr/sbin/$$cmd || missing="$$missing $$pkg"; done; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing$$missing (Debian packages)"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; } || \
		echo "warning: could not install$$missing; their tests will be skipped"; \
	else echo "note: missing$$missing and no root to install them; their tests will be skipped"; fi

# -X faulthandler: a crash after pytest's own handler is gone (interpreter shutdown) still prints its stacks.
test: $(STAMP) mosquitto test-tools
	$(BIN)/python -X faulthandler -m pytest -q

# The inner loop: everything but the tests marked slow (exports, fleets, crash and broker restarts).
test-fast: $(STAMP) mosquitto
	$(BIN)/python -X faulthandler -m pytest -q -m "not slow and not qemu"

# arm64 rehearsal under qemu-user (root; caches ~8 GB under /var/cache/edgelearn-qemu). Not part of `make test`.
qemu-deps:
	@if [ "$$(id -u)" != 0 ]; then echo "error: make qemu-test needs root (debootstrap, chroot, mounts)"; exit 1; fi
	@for t in debootstrap qemu-aarch64-static update-binfmts; do command -v $$t >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then echo "installing debootstrap qemu-user-static binfmt-support (Debian packages)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			debootstrap qemu-user-static binfmt-support >/dev/null; fi

qemu-test: $(STAMP) mosquitto qemu-deps
	$(BIN)/python -m pytest -m qemu -s -p no:cacheprovider --log-cli-level=INFO tests/test_qemu.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# What CI runs (.ci/run): lint, types, every test.
check: lint typecheck test

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
