"""Suite-wide pytest set-up: the `kvm` marker's runner (see katapy.testing.pytest_kvm)."""
pytest_plugins = ["katapy.testing.pytest_kvm"]
