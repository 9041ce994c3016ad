"""katapy benchmarks: each module measures katapy against a reference in the same run."""
