"""Slurm launcher for ssl_vil: pretraining and evaluation jobs through submitit.

``python cluster/submit.py --help`` is the entry point. Modules:

* :mod:`cluster.resources`  the job's resources -> sbatch / local-executor parameters (explicit defaults)
* :mod:`cluster.dist_env`   torch.distributed rendezvous variables from the Slurm allocation
* :mod:`cluster.job`        the checkpointable callable that runs inside the allocation and requeues itself
* :mod:`cluster.submit`     the command line: validate the config, render or submit the job
"""
