"""thinklab: measure how language models behave at test time."""


def run(spec, **options):
    """Generate (or load) a run and return its sample table; see `thinklab.runner.run`."""
    from thinklab.runner import run as _run

    return _run(spec, **options)


def load_run(path):
    """The sample table of a stored run as a polars DataFrame."""
    from thinklab.store import load_run as _load_run

    return _load_run(path)
