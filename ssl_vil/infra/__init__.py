"""Infrastructure shared by training, evaluation, data and the launcher, one module per concept.

- :mod:`ssl_vil.infra.after_import`: run a callback once a module's import completes (timm registration);
- :mod:`ssl_vil.infra.dist`: process-group set-up and collectives (no-ops in a single process);
- :mod:`ssl_vil.infra.files`: atomic / durable file writes and the append-only JSONL log;
- :mod:`ssl_vil.infra.lazy_exports`: package attributes imported on first use;
- :mod:`ssl_vil.infra.precision`: the autocast precision of a run on a device;
- :mod:`ssl_vil.infra.timing`: step timing, durations, and when a periodic action is due.

Submodules are imported on use (``from ssl_vil.infra.files import ...``), so a light caller (the Slurm
launcher writing one file) does not pay for torch.
"""
