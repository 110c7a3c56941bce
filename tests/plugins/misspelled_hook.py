"""A plugin with a misspelled hook: loading it must fail loudly (check_pending)."""

from harness.hookspecs import hookimpl


@hookimpl
def register_backend(register):  # the hook is register_backends
    register("never", object)
