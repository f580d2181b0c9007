"""thinklab: measure how language models behave at test time."""

from thinklab.quiet import silence_third_party as _silence_third_party

_silence_third_party()  # before torch/torchao load: their import-time noise says nothing about a run


def run(spec, **options):
    """Generate (or load) a run and return its sample table; see `thinklab.runner.run`."""
    from thinklab.runner import run as _run

    return _run(spec, **options)


def load_run(path):
    """The sample table of a stored run as a polars DataFrame."""
    from thinklab.store import load_run as _load_run

    return _load_run(path)


def runs(runs_root=None):
    """Every stored run as one row (a polars DataFrame); see `thinklab.catalog.runs`."""
    from thinklab.catalog import runs as _runs

    return _runs(runs_root)


def samples(runs_root=None, run_ids=None):
    """Every stored sample as one polars LazyFrame; join with `runs()` on run_id."""
    from thinklab.catalog import samples as _samples

    return _samples(runs_root, run_ids)


def compare(a, b, **options):
    """Paired deltas b - a (accuracy, length, entropy) with 95% intervals; see `thinklab.catalog.compare`."""
    from thinklab.catalog import compare as _compare

    return _compare(a, b, **options)


def __getattr__(name):
    # `thinklab.viewer.widget()` in a notebook without importing the submodule first
    if name in ("catalog", "viewer"):
        import importlib

        return importlib.import_module(f"thinklab.{name}")
    raise AttributeError(f"module 'thinklab' has no attribute {name!r}")
