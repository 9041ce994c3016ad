# katapy: `make setup` installs everything, `make test` runs the suite,
# `make demo` runs a container in a VM through containerd.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PROTOS := $(wildcard protos/katapy/pb/*.proto)
PB_STAMP := src/katapy/pb/.generated
CFFI_SRC := csrc/kvm_ioctl/build.py $(wildcard csrc/kvm_ioctl/*.h) csrc/seccomp_trap/build.py
CFFI_STAMP := $(VENV)/.cffi-built
PYTEST_ARGS ?=
CONTAINERD_CONFIG ?= /etc/containerd/config.toml

.PHONY: setup deps venv protos cffi kernel guest-kernel harness-kernel image test demo bench fuzz install clean check

setup: deps venv protos cffi kernel image

deps:
	@bash scripts/setup-deps.sh

$(VENV)/.installed: pyproject.toml setup.py
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q -U pip setuptools wheel
	$(VPY) -m pip install -q -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

$(PB_STAMP): $(PROTOS) | $(VENV)/.installed
	$(VPY) -m grpc_tools.protoc -I protos --python_out=src --pyi_out=src $(PROTOS)
	@touch $@

protos: $(PB_STAMP)

$(CFFI_STAMP): $(CFFI_SRC) | $(VENV)/.installed
	cd csrc/kvm_ioctl && ../../$(VPY) build.py
	cd csrc/seccomp_trap && ../../$(VPY) build.py
	@touch $@

cffi: $(CFFI_STAMP)

kernel: guest-kernel harness-kernel

guest-kernel: protos
	$(VPY) -m katapy.osbuilder kernel --flavor guest

# the nested KVM harness's L1 kernel: only the kvm tests and benchmarks use it (make demo does not)
harness-kernel: protos
	$(VPY) -m katapy.osbuilder kernel --flavor harness

image: protos
	$(VPY) -m katapy.osbuilder image

test:
	@bash scripts/first-run.sh test
	@$(MAKE) --no-print-directory setup
	$(VPY) -m pytest -ra $(PYTEST_ARGS)

# what the demo needs, no more: not the harness kernel
demo:
	@bash scripts/first-run.sh demo
	@$(MAKE) --no-print-directory deps venv protos cffi guest-kernel image install
	bash scripts/demo.sh

bench: setup
	$(VPY) -m benchmarks.run

# Every fuzz target for FUZZ_CASES cases (atheris, one process at a time); non-zero exit on a crash.
FUZZ_CASES ?= 100000
fuzz: venv
	$(VPY) -m fuzz.run --cases $(FUZZ_CASES)

# The long form of the soak and leak accounting (tests/soak; the CI form runs a few of each): boots guests.
.PHONY: soak
soak: venv
	KATAPY_SOAK_RUNS=200 KATAPY_SOAK_PODS=10 KATAPY_SOAK_ROUNDS=5 KATAPY_SOAK_EXECS=100 $(VPY) -m pytest -v -s tests/soak

install: venv protos cffi
	bash scripts/install.sh
	$(VPY) scripts/containerd-config.py --config $(CONTAINERD_CONFIG)

check: venv
	$(VENV)/bin/katapy check

clean:
	rm -rf build src/*.egg-info $(PB_STAMP) src/katapy/pb/*_pb2*.py src/katapy/pb/*.pyi $(CFFI_STAMP)
	find . -name __pycache__ -prune -exec rm -rf {} +
