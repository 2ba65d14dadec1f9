"""Training loop and the small components it injects (guards, preemption, watchdog, metrics)."""
