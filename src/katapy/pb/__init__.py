"""Generated protobuf modules (built from protos/ by `make protos`; never edited)."""
