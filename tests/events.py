"""Counting XLA backend compilations with ``jax.monitoring`` (not timing)."""

import contextlib

from jax import monitoring


@contextlib.contextmanager
def count_compiles():
    """Yields a list that collects one entry per backend compilation inside the block."""
    events = []

    def listener(name, *args, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            events.append(name)

    monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        monitoring.unregister_event_duration_listener(listener)
