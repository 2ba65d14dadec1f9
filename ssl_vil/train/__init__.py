"""Pretraining: ``python -m ssl_vil.train --config recipes/X.yaml --output-dir RUN [key=value ...]``.

``cli`` parses and validates, ``loop`` drives the run, ``step`` is one optimizer step, ``step_guard`` the per-step
decisions, ``checkpointing`` when and what to save; the remaining modules are the components they inject.
"""
