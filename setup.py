"""Build hooks that pyproject.toml cannot express: the cffi KVM extension."""
from setuptools import setup

setup(cffi_modules=["csrc/kvm_ioctl/build.py:ffibuilder"])
